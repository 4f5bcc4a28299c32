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
``b * Hkv ...``), as reading them one at a time would. Both feeds give a
token the same positions, write no padding, and read the last ``last``
tokens the same way (they search memory), so after a write-only feed memory
and the local context hold what the searching feed would leave in a model
whose memory layers' inputs do not depend on memory (one memory layer, or
``k=0``).
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
    return Request(ids, window, last, held, return_logits, search)


def feed(adapter: Any, request: Request):
    """Read ``request.ids`` into memory and the local context; returns a ``CausalLMOutput``."""
    from transformers.modeling_outputs import CausalLMOutput

    ids, held = request.ids, request.held
    N = ids.shape[1]
    head = max(N - request.last, 0)
    run = _Runner(adapter, request.return_logits)
    read = _searching if request.search else _write_only
    state = adapter._state
    try:
        with torch.no_grad():
            if head:
                read(adapter, run, ids[:, :head], None if held is None else held[:, :head], request.window)
            if head < N:  # the last tokens: read as the searching feed reads them, into the local context
                adapter._context = adapter._new_context(pending=True)
                mask = None if held is None else held[:, head:]
                run(ids[:, head:], mask, use_cache=True, **{adapter._cache_arg: adapter._context})
    finally:
        state.writing, state.held = False, None
    logits = torch.cat(run.kept, dim=1) if request.return_logits == "all" else run.kept[-1]
    return CausalLMOutput(logits=logits)


class _Runner:
    """One forward of the model on a span of the input; keeps the logits ``feed`` returns."""

    def __init__(self, adapter: Any, return_logits: str):
        self.adapter, self.return_logits, self.kept = adapter, return_logits, []
        self.device = next(adapter.model.parameters()).device
        self.keep = "logits_to_keep" in inspect.signature(adapter.model.forward).parameters

    def __call__(self, ids, mask, docs=None, **kwargs):
        """Run ``ids (R, T)``; ``docs``: the rows are ``docs`` documents' windows, document-major."""
        adapter = self.adapter
        if self.keep:
            kwargs["logits_to_keep"] = 0 if self.return_logits == "all" else 1
        if mask is not None:
            kwargs["attention_mask"] = mask.to(self.device)
        calls = {i: m.calls for i, m in adapter._memories.items()}
        logits = adapter.model(input_ids=ids.to(self.device), **kwargs).logits  # (R, T or 1, V)
        adapter._check_dispatched(calls)
        if docs is not None:
            logits = logits.reshape(docs, -1, logits.shape[-1])  # (B, m*T or m, V)
        self.kept.append(logits if self.return_logits == "all" else logits[:, -1:])


def _searching(adapter: Any, run: _Runner, ids: torch.Tensor, held: torch.Tensor | None, window: int) -> None:
    """Read ``ids (B, n)`` window by window: each searches memory, then is written to it."""
    state, device = adapter._state, run.device
    B, n = ids.shape
    absolute = adapter.settings.positions == "absolute"
    for start in range(0, n, window):
        stop = min(start + window, n)
        mask = None if held is None else held[:, start:stop]
        state.writing, state.held = True, mask
        first = state.tokens if absolute else 0
        pos = torch.arange(first, first + stop - start, device=device).expand(B, -1)
        run(ids[:, start:stop], mask, position_ids=pos, use_cache=False)
        state.tokens += stop - start
    state.writing, state.held = False, None


def _write_only(adapter: Any, run: _Runner, ids: torch.Tensor, held: torch.Tensor | None, window: int) -> None:
    """Write ``ids (B, n)`` to memory without searching it, ``ROWS`` windows per forward."""
    state, device = adapter._state, run.device
    B, n = ids.shape
    absolute = adapter.settings.positions == "absolute"
    full = n // window * window
    spans = [(s, min(s + ROWS * window, full), window) for s in range(0, full, ROWS * window)]
    if full < n:
        spans.append((full, n, n - full))
    saved = {i: getattr(m, MEMORY_ATTR) for i, m in adapter._modules.items()}
    try:
        for i, m in adapter._modules.items():
            setattr(m, MEMORY_ATTR, _WriteOnly(saved[i], B))
        for first, last, W in spans:
            m = (last - first) // W
            mask = None if held is None else held[:, first:last]  # (B, m*W)
            state.writing, state.held = True, mask
            pos = torch.arange(W, device=device).expand(B, m, W)  # the positions the searching feed gives
            if absolute:
                pos = pos + state.tokens + W * torch.arange(m, device=device).view(1, m, 1)
            rows = ids[:, first:last].reshape(B * m, W)  # (B*m, W), document-major
            run(rows, None if mask is None else mask.reshape(B * m, W), docs=B,
                position_ids=pos.reshape(B * m, W), use_cache=False)
            state.tokens += last - first
    finally:
        for i, m in adapter._modules.items():
            setattr(m, MEMORY_ATTR, saved[i])
        state.writing, state.held = False, None


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
        held = memory.state.held  # (B, m*W) bool or None
        memory._write(store, _stream(mem_key, B, m), _stream(value, B, m), held)  # padding is not kept
        f32 = torch.float32
        scaling = d**-0.5 if scaling is None else float(scaling)
        G = H // Hkv
        logits = torch.matmul(query.to(f32).reshape(R, Hkv, G * W, d), key.to(f32).transpose(-1, -2))
        logits = (logits * scaling).view(R, H, W, W)
        logits = logits.masked_fill(~_local_mask(_bool_mask(attention_mask, W), R, H, W, W, query.device), -math.inf)
        out = torch.matmul(_softmax(logits).reshape(R, Hkv, G * W, W), value.to(f32)).view(R, H, W, dv)
        return out.to(value.dtype).transpose(1, 2).contiguous(), None  # (R, W, H, dv)


def _stream(x: torch.Tensor, B: int, m: int) -> torch.Tensor:
    """(B*m, Hkv, W, e) window rows -> (B, Hkv, m*W, e): each partition's windows in stream order."""
    _, Hkv, W, e = x.shape
    return x.detach().view(B, m, Hkv, W, e).transpose(1, 2).reshape(B, Hkv, m * W, e)
