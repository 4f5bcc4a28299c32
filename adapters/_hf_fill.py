"""How the Hugging Face adapter reads a long input: ``MemoryAdapter.feed``.

The searching feed runs the model on windows of ``window`` tokens without a
KV cache; in each memory layer a window's queries attend to the causal window
and to memory, then its keys and values are written to memory. The last
``last`` tokens are not written: they become the local context (a
:mod:`._hf_context` cache the next forward or ``generate`` continues).

The write-only feed (``search=False``) reads windows that do not search
memory. Such a window does not depend on the windows before it, so ``ROWS``
windows run at a time as the rows of one forward. Each memory layer attends
causally within each window and writes the windows' keys and values to its
store in stream order (the rows of document ``b`` go to partitions
``b * Hkv ...``), as reading them one at a time would.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from kvmem.errors import InvalidInputError

from . import _hf_context as ctx
from ._hf_layer import MEMORY_ATTR, _bool_mask
from ._hf_settings import positive
from .attention import _local_mask, _softmax

ROWS = 256  # windows per forward of the write-only feed


@dataclass(frozen=True)
class Request:
    """A checked ``feed`` call."""

    ids: torch.Tensor  # (B, N) token ids
    window: int  # tokens per window
    last: int  # last tokens kept as local context
    held: torch.Tensor | None  # (B, N) bool, False for padding; None: no padding
    return_logits: str  # "last" | "all"
    search: bool  # windows attend to memory before they are written to it


def check(adapter: Any, input_ids, chunk_size, return_logits, last_context_length, attention_mask, search) -> Request:
    """``feed``'s arguments as a :class:`Request`; raises :class:`InvalidInputError`, changing nothing."""
    try:
        ids = torch.as_tensor(input_ids)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise InvalidInputError(
            f"input_ids: expected integer token ids (B, N), got {input_ids!r:.80} ({exc})") from None
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InvalidInputError(
            f"input_ids: expected integer token ids (B, N) with N > 0, got {ids.dtype} {tuple(ids.shape)}"
        )
    if not isinstance(search, bool):
        raise InvalidInputError(f"search: expected a bool, got {search!r}")
    vocab = adapter.model.get_input_embeddings().num_embeddings
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
        raise InvalidInputError(
            f"input_ids: expected token ids in [0, {vocab}), got {int(ids.min())} .. {int(ids.max())}")
    if not isinstance(return_logits, str) or return_logits not in ("last", "all"):
        raise InvalidInputError(f'return_logits: expected "last" or "all", got {return_logits!r}')
    window = adapter.chunk_size if chunk_size is None else positive(chunk_size, "chunk_size")
    last = adapter.settings.last_context_length if last_context_length is None else last_context_length
    if isinstance(last, bool) or not isinstance(last, int) or not 0 <= last <= window:
        raise InvalidInputError(f"last_context_length: expected an int in [0, window={window}], got {last!r}")
    held = ctx.padding_mask(attention_mask, ids.shape)
    if adapter._context is not None:
        adapter._context.check_step(ids.shape[0], 0)
    if not search and (held is not None or last_context_length):
        raise InvalidInputError("search=False writes every token to memory: it takes no attention_mask "
                                f"and no last_context_length; got {last_context_length!r} and a mask")
    return Request(ids, window, 0 if not search else last, held, return_logits, search)


def feed(adapter: Any, request: Request):
    """Read ``request.ids`` into memory and the local context; returns a ``CausalLMOutput``."""
    from transformers.modeling_outputs import CausalLMOutput

    if not request.search:
        return feed_write_only(adapter, request.ids, request.window, request.return_logits)
    ids, held, window, return_logits = request.ids, request.held, request.window, request.return_logits
    model = adapter.model
    device = next(model.parameters()).device
    B, N = ids.shape
    absolute = adapter.settings.positions == "absolute"
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    state, kept, head = adapter._state, [], max(N - request.last, 0)

    def run(chunk, mask, **kwargs):
        if keep:
            kwargs["logits_to_keep"] = 0 if return_logits == "all" else 1
        if mask is not None:
            kwargs["attention_mask"] = mask.to(device)
        calls = {i: m.calls for i, m in adapter._memories.items()}
        out = model(input_ids=chunk.to(device), **kwargs)
        adapter._check_dispatched(calls)
        kept.append(out.logits if return_logits == "all" else out.logits[:, -1:])

    try:
        with torch.no_grad():
            for start in range(0, head, window):
                stop = min(start + window, head)
                mask = None if held is None else held[:, start:stop]
                state.writing, state.held = True, mask
                first = state.tokens if absolute else 0
                pos = torch.arange(first, first + stop - start, device=device).expand(B, -1)
                run(ids[:, start:stop], mask, position_ids=pos, use_cache=False)
                state.tokens += stop - start
            state.writing, state.held = False, None
            if head < N:
                adapter._context = adapter._new_context(pending=True)
                cache = {adapter._cache_arg: adapter._context}
                run(ids[:, head:], None if held is None else held[:, head:], use_cache=True, **cache)
    finally:
        state.writing, state.held = False, None
    logits = torch.cat(kept, dim=1) if return_logits == "all" else kept[-1]
    return CausalLMOutput(logits=logits)


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
    state.writing = True
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
