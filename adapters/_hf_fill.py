"""Write-only reading for the Hugging Face adapter: ``feed(..., search=False)``.

A window that does not search memory does not depend on the windows before
it, so ``ROWS`` windows run at a time as the rows of one forward. Each memory
layer attends causally within each window and writes the windows' keys and
values to its store in stream order (the rows of document ``b`` go to
partitions ``b * Hkv ...``), as reading them one at a time would.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from ._hf_layer import MEMORY_ATTR, _bool_mask
from .attention import _local_mask, _softmax

ROWS = 256  # windows per forward


def feed_write_only(adapter: Any, ids: torch.Tensor, window: int, return_logits: str):
    """Read ``ids`` (B, N) into memory without searching it; returns a ``CausalLMOutput``."""
    from transformers.modeling_outputs import CausalLMOutput

    model, state = adapter.model, adapter._state
    device = next(model.parameters()).device
    B, N = ids.shape
    absolute = adapter.settings.positions == "absolute"
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    full = N // window * window
    spans = [(s, min(s + ROWS * window, full), window) for s in range(0, full, ROWS * window)]
    if full < N:
        spans.append((full, N, N - full))
    kept = []
    saved = {i: getattr(m, MEMORY_ATTR) for i, m in adapter._modules.items()}
    state.writing, state.offset = True, 0
    try:
        for i, m in adapter._modules.items():
            setattr(m, MEMORY_ATTR, _WriteOnly(saved[i], B))
        with torch.no_grad():
            for first, last, W in spans:
                m = (last - first) // W
                rows = ids[:, first:last].reshape(B * m, W).to(device)  # (B*m, W), document-major
                start = state.tokens if absolute else 0
                pos = torch.arange(W, device=device).expand(B, m, W)
                if absolute:
                    pos = pos + start + W * torch.arange(m, device=device).view(1, m, 1)
                kwargs: dict[str, Any] = {"input_ids": rows, "position_ids": pos.reshape(B * m, W),
                                          "use_cache": False}
                if keep:
                    kwargs["logits_to_keep"] = 0 if return_logits == "all" else 1
                calls = {i: mem.calls for i, mem in saved.items()}
                logits = model(**kwargs).logits
                adapter._check_dispatched(calls)
                logits = logits.reshape(B, m * logits.shape[1], -1)  # (B, m*W or m, V)
                kept.append(logits if return_logits == "all" else logits[:, -1:])
                state.tokens += last - first
    finally:
        for i, m in adapter._modules.items():
            setattr(m, MEMORY_ATTR, saved[i])
        state.writing = False
        state.offset = state.tokens if absolute else 0
    logits = torch.cat(kept, dim=1) if return_logits == "all" else kept[-1]
    return CausalLMOutput(logits=logits)


class _WriteOnly:
    """Stands in for a layer's memory during a write-only feed of ``docs`` documents."""

    def __init__(self, memory: Any, docs: int):
        self.memory, self.docs = memory, docs

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        memory = self.memory
        memory.calls += 1
        R, H, W, d = query.shape  # (B*m, H, W, d)
        Hkv, dv = key.shape[1], value.shape[-1]
        B, m = self.docs, R // self.docs
        store = memory._store(B, Hkv, d, dv, key.dtype, key.device)
        _, mem_key = memory._views(query, key, kwargs.get("position_ids"), True)  # (R, Hkv, W, d)
        store.add(_stream(mem_key, B, m), _stream(value, B, m))
        f32 = torch.float32
        scaling = d**-0.5 if scaling is None else float(scaling)
        G = H // Hkv
        logits = torch.matmul(query.to(f32).reshape(R, Hkv, G * W, d), key.to(f32).transpose(-1, -2))
        logits = (logits * scaling).view(R, H, W, W)
        logits = logits.masked_fill(~_local_mask(_bool_mask(attention_mask, W), R, H, W, W, query.device), -math.inf)
        out = torch.matmul(_softmax(logits).reshape(R, Hkv, G * W, W), value.to(f32)).view(R, H, W, dv)
        return out.to(value.dtype).transpose(1, 2).contiguous(), None  # (R, W, H, dv)


def _stream(x: torch.Tensor, B: int, m: int) -> torch.Tensor:
    """(B*m, Hkv, W, e) window rows -> (B*Hkv, m*W, e): each partition's windows in stream order."""
    _, Hkv, W, e = x.shape
    return x.detach().view(B, m, Hkv, W, e).transpose(1, 2).reshape(B * Hkv, m * W, e)
