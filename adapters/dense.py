"""Dense memory attention: every query attends to every row of its partition, streamed.

The store's rows are visited block by block (:meth:`kvmem.MemoryStore.scan_rows`);
each block's float32 logits are folded into a running maximum, a running sum
of exponentials and a running weighted sum of values (the log-sum-exp merge
of flash attention), so memory per call is O(queries x block), whatever the
number of rows. :func:`merge_local` then joins that partial softmax with the
local logits into the one softmax of Focused Transformer.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

__all__ = ["BLOCK_ELEMS", "Partial", "dense_memory", "merge_local"]

BLOCK_ELEMS = 1 << 24  # logits per block at most (64 MB in float32)


class Partial(NamedTuple):
    """An unnormalised softmax over some keys, per query."""

    top: torch.Tensor  # (B, H, T) float32 maximum logit; -inf where no key
    total: torch.Tensor  # (B, H, T) float32 sum of exp(logit - top)
    acc: torch.Tensor  # (B, H, T, dv) float32 sum of exp(logit - top) * value


def dense_memory(memory_query: torch.Tensor, store: Any, scaling: float, Hkv: int) -> Partial:
    """Softmax statistics of ``memory_query (B, H, T, d)`` over every row of each query's partition.

    Partition ``b * Hkv + h`` serves the ``H / Hkv`` query heads of key-value head ``h``.
    """
    B, H, T, d = memory_query.shape
    G = H // Hkv
    q = memory_query.detach().to(torch.float32).reshape(B, Hkv, G * T, d)  # (B, Hkv, G*T, d)
    device = q.device
    top = torch.full((B, Hkv, G * T), -math.inf, device=device)
    total = torch.zeros((B, Hkv, G * T), device=device)
    acc = torch.zeros((B, Hkv, G * T, store.value_dim), device=device)

    def visit(keys: torch.Tensor, values: torch.Tensor, held: torch.Tensor) -> None:
        n = keys.shape[1]
        k = keys.to(device, torch.float32).view(B, Hkv, n, d)  # (B, Hkv, n, d)
        v = values.to(device, torch.float32).view(B, Hkv, n, -1)  # (B, Hkv, n, dv)
        logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, Hkv, G*T, n)
        logits = logits.masked_fill(~held.to(device).view(B, Hkv, 1, n), -math.inf)
        new_top = torch.maximum(top, logits.amax(-1))  # (B, Hkv, G*T)
        safe = torch.where(torch.isinf(new_top), torch.zeros_like(new_top), new_top)
        scale = torch.exp(top - safe)  # 0 where nothing was seen yet
        weights = torch.exp(logits - safe.unsqueeze(-1))  # (B, Hkv, G*T, n)
        total.mul_(scale).add_(weights.sum(-1))
        acc.mul_(scale.unsqueeze(-1)).add_(torch.matmul(weights, v))
        top.copy_(new_top)

    store.scan_rows(visit, block_rows=max(16, BLOCK_ELEMS // max(1, B * H * T)))
    return Partial(top.view(B, H, T), total.view(B, H, T), acc.view(B, H, T, -1))


def merge_local(memory: Partial, local: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One softmax over memory and the local logits ``(B, H, T, Tl)`` (-inf: masked) with local
    ``values (B, Hkv, Tl, dv)`` float32 -> ``(B, H, T, dv)``; a query with nothing to attend gets zeros."""
    B, H, T, Tl = local.shape
    Hkv = values.shape[1]
    top = torch.maximum(memory.top, local.amax(-1))  # (B, H, T)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w_local = torch.exp(local - top.unsqueeze(-1))  # (B, H, T, Tl)
    w_mem = torch.exp(memory.top - top)  # (B, H, T)
    out = torch.matmul(w_local.reshape(B, Hkv, (H // Hkv) * T, Tl), values).view(B, H, T, -1)
    out = out + memory.acc * w_mem.unsqueeze(-1)
    norm = w_local.sum(-1) + memory.total * w_mem  # (B, H, T)
    return (out / norm.unsqueeze(-1)).nan_to_num(0.0)


def normalised(memory: Partial) -> torch.Tensor:
    """The memory softmax alone ``(B, H, T, dv)`` (gated attention); zeros where memory is empty."""
    return (memory.acc / memory.total.unsqueeze(-1)).nan_to_num(0.0)
