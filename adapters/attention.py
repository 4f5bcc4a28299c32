"""Memory attention in plain PyTorch: local causal attention plus top-k memory.

Each query of a chunk retrieves its top-k keys from a kvmem store and attends
to them together with the local keys of the chunk:

- without a gate, with **one softmax over the memory logits and the causal
  local logits** (Focused Transformer / LongLLaMA);
- with a gate, with two softmaxes mixed per head by a learned
  ``sigmoid(gate)`` (Memorizing Transformers): ``g * memory + (1 - g) * local``.

Grouped-query attention: a layer with H query heads and Hkv key-value heads
uses one store with ``B * Hkv`` partitions, partition ``b * Hkv + h``; the
``H / Hkv`` query heads of a group search the partition of their key-value
head (the grouping of ``repeat_kv`` in Hugging Face models: query head
``i`` belongs to key-value head ``i // (H / Hkv)``).

Gradients flow to the queries and to the local keys and values; what comes
from memory is a constant (the store is detached). Memory logits are computed
again from the retrieved keys, so they carry gradient to the queries and are
exact whatever the backend. Logits and softmax run in float32 whatever the
input dtype (fp32, fp16 or bf16); the output has the dtype of ``value``.

After attending, the chunk's keys and values (the last ``T`` local positions,
aligned with the queries) are written to memory, so the next chunk sees them.

Position modes (:data:`POSITION_MODES`), with ``rope`` a :class:`~kvmem.adapters.rope.Rotary`:

- ``"absolute"``: keys are stored after RoPE at their absolute positions and
  queries search with their absolute rotation. With an exact store and
  ``k >= len(memory)`` this is full causal attention over the whole stream.
- ``"first"``: keys are stored before RoPE, rotated as position 0, and queries
  keep their local rotation (LongLLaMA).
- ``"none"``: memory is scored with unrotated queries and keys.

Concurrency: a call reads the store and then (``write=True``) adds to it; do
not run two calls on the same store at once.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kvmem.errors import InvalidInputError
from kvmem.inputs import check_rows

from . import dense
from .rope import Rotary

__all__ = ["POSITION_MODES", "MemoryAttentionConfig", "MemoryAttention", "memory_attention", "check_k", "check_4d"]

POSITION_MODES = ("absolute", "first", "none")
ALL = "all"  # k: attend to every memory row (dense memory attention)


def check_k(k: Any) -> int | str:
    """``k`` as given if it is an int >= 0 or ``"all"``; else :class:`InvalidInputError`."""
    if k == ALL and isinstance(k, str):
        return k
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InvalidInputError(f'k: expected an int >= 0 or "all", got {k!r}')
    return k


def memory_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    store: Any,
    k: int | str,
    *,
    memory_query: torch.Tensor | None = None,
    memory_key: torch.Tensor | None = None,
    scaling: float | None = None,
    gate: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    write: bool = True,
    search_params: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Attend to local keys and to the top-k memory keys, then write the chunk.

    Args:
        query: ``(B, H, T, d)`` queries, position-encoded as the local keys are.
        key, value: ``(B, Hkv, Tl, d)`` / ``(B, Hkv, Tl, dv)`` local keys and
            values, ``Tl >= T``; the last ``T`` positions are the chunk's own.
        store: a kvmem store with ``B * Hkv`` partitions, ``dim == d``,
            ``value_dim == dv``.
        k: memory keys retrieved per query (0: local attention only), or ``"all"``: every row
            of the query's partition, streamed in blocks (stores whose ``streams_rows`` is True).
            A ``k`` at least the largest partition takes that dense path too on such stores.
            On the dense path memory logits carry no gradient (the streamed softmax is inference-only).
        memory_query: ``(B, H, T, d)`` queries used against memory (search and
            logits); defaults to ``query``. The position mode decides it.
        memory_key: ``(B, Hkv, Tl, d)`` keys written to memory; defaults to ``key``.
        scaling: logit scale; ``d ** -0.5`` when None.
        gate: ``(H,)`` gate logits; None for one joint softmax (FoT).
        attention_mask: boolean ``(B or 1, H or 1, T, Tl)``, True where a query
            may attend a local key; None for the causal mask aligned at the end
            (query ``i`` sees local keys ``0 .. Tl - T + i``).
        write: add the chunk's memory keys and values to the store afterwards.
        search_params: per-call search parameters for the store (``nprobe``, ``ef``).

    Returns:
        ``(B, H, T, dv)`` attention output in ``value``'s dtype.
    """
    B, H, T, d, Hkv, Tl, dv = _check(query, key, value, store, k, memory_query, memory_key, gate)
    if search_params is not None and not isinstance(search_params, Mapping):
        raise InvalidInputError(f"search_params: expected a mapping or None, got {search_params!r}")
    G = H // Hkv
    P = B * Hkv
    scaling = d**-0.5 if scaling is None else float(scaling)
    memory_query = query if memory_query is None else memory_query
    f32 = torch.float32

    # Local logits without materialising repeat_kv: the G heads of a group share a key head.
    q_groups = query.to(f32).reshape(B, Hkv, G * T, d)  # (B, Hkv, G*T, d)
    local = torch.matmul(q_groups, key.to(f32).transpose(-1, -2)) * scaling  # (B, Hkv, G*T, Tl)
    local = local.view(B, H, T, Tl)
    allowed = _local_mask(attention_mask, B, H, T, Tl, query.device)  # (B|1, H|1, T, Tl)
    local = local.masked_fill(~allowed, -math.inf)

    # Memory: each partition is searched by the queries of its group, or streamed whole.
    mem_logits, mem_values, streamed = None, None, None
    held = max((store.count(p) for p in range(P)), default=0) if k else 0
    if k and not held:
        store.observe(memory_query.detach().reshape(P, G * T, d))  # the first chunk's queries: what an
        #                                                            approximate store calibrates on
    v_groups = value.to(f32)  # (B, Hkv, Tl, dv)
    if held and (k == ALL or (k >= held and store.streams_rows)):
        streamed = dense.dense_memory(memory_query, store, scaling, Hkv)
    elif held:
        search_q = memory_query.detach().reshape(P, G * T, d)  # (P, G*T, d); the store ranks in fp32
        res = store.search(search_q, k, **dict(search_params or {}))
        kk = res.ids.shape[-1]
        ids = res.ids.to(query.device).view(B, H, T, kk)  # (B, H, T, k)
        mem_keys = res.keys.to(query.device, f32).view(B, H, T, kk, d)  # (B, H, T, k, d)
        mem_values = res.values.to(query.device, f32).view(B, H, T, kk, dv)  # (B, H, T, k, dv)
        mem_logits = torch.einsum("bhtd,bhtkd->bhtk", memory_query.to(f32), mem_keys) * scaling
        mem_logits = mem_logits.masked_fill(ids < 0, -math.inf)  # (B, H, T, k)

    if gate is None and streamed is not None:
        out = dense.merge_local(streamed, local, v_groups)
    elif gate is None:
        logits = local if mem_logits is None else torch.cat([mem_logits, local], dim=-1)
        weights = _softmax(logits)  # (B, H, T, k + Tl)
        w_local = weights[..., -Tl:]
        out = torch.matmul(w_local.reshape(B, Hkv, G * T, Tl), v_groups).view(B, H, T, dv)
        if mem_logits is not None:
            w_mem = weights[..., : mem_logits.shape[-1]]
            out = out + torch.einsum("bhtk,bhtkv->bhtv", w_mem, mem_values)
    else:
        w_local = _softmax(local)
        out = torch.matmul(w_local.reshape(B, Hkv, G * T, Tl), v_groups).view(B, H, T, dv)
        g = torch.sigmoid(gate.to(f32)).view(1, H, 1, 1)
        mem_out = torch.zeros_like(out)
        if streamed is not None:
            mem_out = dense.normalised(streamed)
        elif mem_logits is not None:
            mem_out = torch.einsum("bhtk,bhtkv->bhtv", _softmax(mem_logits), mem_values)
        out = g * mem_out + (1 - g) * out

    if write:
        new_keys = (key if memory_key is None else memory_key)[:, :, Tl - T :]  # (B, Hkv, T, d)
        new_values = value[:, :, Tl - T :]  # (B, Hkv, T, dv)
        store.add(new_keys.detach().reshape(P, T, d), new_values.detach().reshape(P, T, dv))
    return out.to(value.dtype)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; a row with nothing to attend gives zeros, not NaN."""
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def _local_mask(mask, B, H, T, Tl, device) -> torch.Tensor:
    if mask is None:
        i = torch.arange(T, device=device).unsqueeze(-1)  # (T, 1)
        j = torch.arange(Tl, device=device)  # (Tl,)
        return (j <= i + (Tl - T)).view(1, 1, T, Tl)
    if mask.dtype != torch.bool:
        raise InvalidInputError(f"attention_mask: expected a bool tensor (True = attend), got {mask.dtype}")
    ok = mask.ndim == 4 and mask.shape[-2:] == (T, Tl) and mask.shape[0] in (1, B) and mask.shape[1] in (1, H)
    if not ok:
        raise InvalidInputError(
            f"attention_mask: expected shape ({B} or 1, {H} or 1, {T}, {Tl}), got {tuple(mask.shape)}"
        )
    return mask.to(device)


def check_4d(query: Any, key: Any, value: Any) -> None:
    """``query``, ``key`` and ``value`` must be 4-D floating tensors; else :class:`InvalidInputError` naming one."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4 or not t.is_floating_point():
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidInputError(f"{name}: expected a 4-D floating tensor, got {got}")


def _check(query, key, value, store, k, memory_query, memory_key, gate):
    check_4d(query, key, value)
    B, H, T, d = query.shape
    Bk, Hkv, Tl, dk = key.shape
    if (Bk, dk) != (B, d) or Hkv == 0 or H % Hkv:
        raise InvalidInputError(
            f"key: expected ({B}, Hkv dividing {H}, Tl, {d}), got {tuple(key.shape)}"
        )
    if value.shape[:3] != key.shape[:3]:
        raise InvalidInputError(f"value: expected ({B}, {Hkv}, {Tl}, dv), got {tuple(value.shape)}")
    if Tl < T:
        raise InvalidInputError(f"key: expected at least T={T} local positions, got {Tl}")
    dv = value.shape[-1]
    if memory_query is not None and memory_query.shape != query.shape:
        raise InvalidInputError(
            f"memory_query: expected {tuple(query.shape)}, got {tuple(memory_query.shape)}"
        )
    if memory_key is not None and memory_key.shape != key.shape:
        raise InvalidInputError(f"memory_key: expected {tuple(key.shape)}, got {tuple(memory_key.shape)}")
    if gate is not None and tuple(gate.shape) != (H,):
        raise InvalidInputError(f"gate: expected shape ({H},), got {tuple(gate.shape)}")
    if check_k(k) == ALL and not store.streams_rows:
        raise InvalidInputError(
            f'k="all": expected a store that streams its rows (exact, lmdb), got the {store.backend} backend'
        )
    want = (B * Hkv, d, dv)
    have = (store.partitions, store.dim, store.value_dim)
    if have != want:
        raise InvalidInputError(
            f"store: expected (partitions, dim, value_dim) = {want} for B={B}, Hkv={Hkv}, got {have}"
        )
    return B, H, T, d, Hkv, Tl, dv


def _position_ids(positions: Any, name: str, B: int, T: int, device: torch.device) -> torch.Tensor:
    """Integer positions ``(T,)`` or ``(1 or B, T)`` as a long tensor on ``device``."""
    t = positions if isinstance(positions, torch.Tensor) else None
    if t is None and isinstance(positions, (list, tuple, np.ndarray)):
        try:
            t = torch.as_tensor(np.asarray(positions))
        except (TypeError, ValueError):
            t = None
    ok = t is not None and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool and (
        tuple(t.shape) == (T,) or (t.ndim == 2 and t.shape[1] == T and t.shape[0] in (1, B)))
    if not ok:
        got = f"{t.dtype} {tuple(t.shape)}" if t is not None else repr(positions)[:80]
        raise InvalidInputError(f"{name}: expected integer positions ({T},) or (1 or {B}, {T}), got {got}")
    return t.to(device=device, dtype=torch.long)


@dataclass(frozen=True)
class MemoryAttentionConfig:
    num_heads: int  # query heads H; the store has B * Hkv partitions
    k: int | str = 32  # memory keys retrieved per query, or "all"
    positions: str = "absolute"  # "absolute" | "first" | "none", see the module docstring
    gate: bool = False  # learned per-head gate between local and memory attention
    scaling: float | None = None  # logit scale; head_dim ** -0.5 when None

    def __post_init__(self):
        if not isinstance(self.positions, str) or self.positions not in POSITION_MODES:
            raise InvalidInputError(f"positions: expected one of {POSITION_MODES}, got {self.positions!r}")
        check_k(self.k)
        if isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads <= 0:
            raise InvalidInputError(f"num_heads: expected an int > 0, got {self.num_heads!r}")
        check_rows("MemoryAttention", "num_heads", self.num_heads, 1, 4, torch.device("cpu"), rows="gate logits")
        if not isinstance(self.gate, (bool, np.bool_)):
            raise InvalidInputError(f"gate: expected a bool, got {self.gate!r}")
        ok = self.scaling is None or (isinstance(self.scaling, numbers.Real) and not isinstance(self.scaling, bool)
                                      and math.isfinite(self.scaling) and self.scaling > 0)
        if not ok:
            raise InvalidInputError(f"scaling: expected a finite number > 0 or None, got {self.scaling!r}")


class MemoryAttention(nn.Module):
    """Attention core with a kvmem memory: ``forward(query, key, value) -> (B, H, T, dv)``.

    Takes queries and keys *before* RoPE when ``rope`` is given (it rotates
    them at ``position_ids`` for the local attention and derives the memory
    views from the position mode), or already position-encoded when ``rope``
    is None (then ``"absolute"`` and ``"none"`` coincide and ``"first"`` is
    refused). The store is not a parameter and is not in ``state_dict``;
    the gate is.

    Not thread-safe: one forward at a time per store.
    """

    def __init__(
        self,
        store: Any,
        *,
        num_heads: int,
        k: int | str = 32,
        positions: str = "absolute",
        gate: bool = False,
        scaling: float | None = None,
        rope: Rotary | None = None,
    ):
        super().__init__()
        self.config = MemoryAttentionConfig(num_heads, k, positions, gate, scaling)
        if positions == "first" and rope is None:
            raise InvalidInputError('positions="first": expected a rope (Rotary), got None')
        if rope is not None and not isinstance(rope, Rotary):
            raise InvalidInputError(f"rope: expected a kvmem.adapters.Rotary (or None), got {type(rope).__name__}")
        if rope is not None and rope.head_dim != getattr(store, "dim", rope.head_dim):
            raise InvalidInputError(f"rope: expected head_dim {store.dim} (the store's dim), got {rope.head_dim}")
        self.store = store
        self.rope = rope
        self.gate = nn.Parameter(torch.zeros(num_heads)) if gate else None  # (H,) logits, sigmoid(0) = 0.5

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        key_position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        write: bool = True,
        search_params: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """query (B, H, T, d), key/value (B, Hkv, Tl, d|dv) -> (B, H, T, dv).

        ``position_ids`` (T,) or (B, T) are the queries' positions (local ones
        for ``"first"``, absolute ones for ``"absolute"``; default
        ``arange(T)``); ``key_position_ids`` default to the ``Tl`` positions
        ending at the last query's.
        """
        check_4d(query, key, value)
        if query.shape[1] != self.config.num_heads:
            raise InvalidInputError(
                f"query: expected (B, {self.config.num_heads}, T, d), got {tuple(query.shape)}"
            )
        if not isinstance(write, (bool, np.bool_)):
            raise InvalidInputError(f"write: expected a bool, got {write!r}")
        q_mem, k_mem = query, key
        if self.rope is not None:
            B, T, Tl = query.shape[0], query.shape[2], key.shape[2]
            if position_ids is None:
                position_ids = torch.arange(T, device=query.device)
            position_ids = _position_ids(position_ids, "position_ids", B, T, query.device)
            if key_position_ids is not None:
                key_position_ids = _position_ids(key_position_ids, "key_position_ids", B, Tl, query.device)
            if key_position_ids is None:
                last = position_ids[..., -1:]  # (1|B, 1)
                key_position_ids = last - (Tl - 1) + torch.arange(Tl, device=query.device)
            query_rot = self.rope.rotate(query, position_ids)
            key_rot = self.rope.rotate(key, key_position_ids)
            mode = self.config.positions
            if mode == "absolute":
                q_mem, k_mem = query_rot, key_rot
            elif mode == "first":
                zeros = torch.zeros(1, Tl, dtype=torch.long, device=key.device)
                q_mem, k_mem = query_rot, self.rope.rotate(key, zeros)
            query, key = query_rot, key_rot
        return memory_attention(
            query,
            key,
            value,
            self.store,
            self.config.k,
            memory_query=q_mem,
            memory_key=k_mem,
            scaling=self.config.scaling,
            gate=self.gate,
            attention_mask=attention_mask,
            write=write,
            search_params=search_params,
        )

    def reset(self) -> None:
        """Forget every row of memory (between documents)."""
        self.store.clear()

    def extra_repr(self) -> str:
        c = self.config
        return f"num_heads={c.num_heads}, k={c.k}, positions={c.positions!r}, gate={c.gate}"
