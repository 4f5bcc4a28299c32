"""CrossBatch training of memory layers (Focused Transformer, arXiv 2307.03170, section 3.2).

A training batch holds ``B`` documents of ``N`` tokens, each cut into
``n = N / W`` consecutive windows of ``W`` tokens. All windows run as one
batch of ``B * n`` rows, row ``b * n + j`` being window ``j`` of document
``b``, so every layer sees its window only, as at inference with memory. In a
memory layer each query of window ``j`` of document ``b`` attends, with one
softmax, to

- its causal window (the local keys),
- the ``W`` keys and values of window ``j - 1`` of document ``b``: the
  positives, what memory holds at inference;
- those of window ``j - 1`` of documents ``b + 1, ..., b + d - 1`` (mod ``B``):
  the negatives, distractors the layer learns to tell from the positives.

``d = 1`` attends to the own previous window only. Window 0 has no previous
window and attends to its window only. The memory keys are those of the same
forward pass, so gradients reach the queries and every key and value in the
softmax (at inference memory is a constant). The memory is attended densely
(no top-k): it holds ``d * W`` keys. Logits and softmax run in float32 (float64
for float64 inputs); the output has the dtype of ``value``. With a large ``d``
(many negatives, as a large memory needs) the queries of each window column
are scored against every document's previous window in one matmul and the
documents outside a row's memory are masked; with a small ``d`` each row's
blocks are copied out. Both give the same attention.

Position modes are those of inference (:data:`~kvmem.adapters.attention.POSITION_MODES`):
windows run at local positions ``0 .. W - 1``; ``"first"`` scores memory keys
rotated as position 0 against queries at their local position (FoT /
LongLLaMA), ``"none"`` scores both unrotated, ``"absolute"`` scores the
previous window as if it sat ``W`` positions before the queries.

Entry points: :func:`crossbatch_attention` (the functional core, on windows),
:func:`crossbatch_forward` (a :class:`~kvmem.adapters.MemoryAttention` on whole
sequences) and :class:`CrossBatchTraining` (a Hugging Face model with a kvmem
adapter: ``with adapter.crossbatch(d=8, window=256) as train: train(ids).loss.backward()``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kvmem.errors import InvalidInputError, KvmemError

from .attention import POSITION_MODES, _local_mask, _softmax, check_4d
from .rope import Rotary

__all__ = ["crossbatch_attention", "crossbatch_forward", "memory_sources", "CrossBatchTraining"]


def memory_sources(docs: int, windows: int, d: int) -> torch.Tensor:
    """``(docs * windows, d, 2)`` int64: the (document, window) of each memory block of each row.

    Block ``i`` of row ``b * windows + j`` is window ``j - 1`` of document
    ``(b + i) % docs``; window ``-1`` (for ``j = 0``) means no block.
    """
    _check_settings(docs, windows, d)
    b = torch.arange(docs).view(docs, 1, 1)
    j = torch.arange(windows).view(1, windows, 1)
    i = torch.arange(d).view(1, 1, d)
    doc = ((b + i) % docs).expand(docs, windows, d)
    win = (j - 1).expand(docs, windows, d)
    return torch.stack([doc, win], dim=-1).reshape(docs * windows, d, 2)


def crossbatch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    docs: int,
    d: int,
    memory_query: torch.Tensor | None = None,
    memory_key: torch.Tensor | None = None,
    scaling: float | None = None,
    gate: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend to the causal window and to the previous windows of ``d`` documents.

    Args:
        query: ``(R, H, W, dh)`` position-encoded queries, ``R = docs * windows``
            rows ordered document-major (row ``b * windows + j``).
        key, value: ``(R, Hkv, W, dh)`` / ``(R, Hkv, W, dv)``, ``Hkv`` dividing ``H``.
        docs: documents in the batch; ``d``: documents each row's memory holds (1 .. docs).
        memory_query: ``(R, H, W, dh)`` queries scored against memory; defaults to ``query``.
        memory_key: ``(R, Hkv, W, dh)`` keys as memory holds them; defaults to ``key``.
        scaling: logit scale; ``dh ** -0.5`` when None.
        gate: ``(H,)`` logits mixing two softmaxes (Memorizing Transformers);
            None for one joint softmax (FoT).
        attention_mask: boolean ``(R or 1, H or 1, W, W)`` local mask; None for causal.

    Returns:
        ``(R, H, W, dv)`` in ``value``'s dtype.
    """
    R, H, W, dh, Hkv, dv = _check(query, key, value, memory_query, memory_key, gate)
    windows = _windows_of(R, docs)
    _check_settings(docs, windows, d)
    G = H // Hkv
    scaling = dh**-0.5 if scaling is None else float(scaling)
    memory_query = query if memory_query is None else memory_query
    memory_key = key if memory_key is None else memory_key
    f32 = torch.promote_types(query.dtype, torch.float32)  # fp16/bf16 -> fp32; fp64 stays

    q = query.to(f32).reshape(R, Hkv, G * W, dh)  # (R, Hkv, G*W, dh): the G heads of a group share keys
    local = (torch.matmul(q, key.to(f32).transpose(-1, -2)) * scaling).view(R, H, W, W)
    local = local.masked_fill(~_local_mask(attention_mask, R, H, W, W, query.device), -math.inf)
    v = value.to(f32)  # (R, Hkv, W, dv)

    def later(x):  # rows of windows 1 .. n-1, which have a previous window: (docs * (n-1), ...)
        return x.view(docs, windows, *x.shape[1:])[:, 1:].reshape(-1, *x.shape[1:])

    def earlier(x):  # windows 0 .. n-2, what those rows' memory holds
        return x.view(docs, windows, *x.shape[1:])[:, :-1].reshape(-1, *x.shape[1:])

    # window 0 attends to itself only: with a gate, its memory half is zero
    g = None if gate is None else torch.sigmoid(gate.to(f32)).view(1, H, 1, 1)
    alone = _mix(_softmax(local.view(docs, windows, H, W, W)[:, 0]), v.view(docs, windows, Hkv, W, -1)[:, 0],
                 docs, Hkv, G, W)  # (docs, H, W, dv)
    alone = alone if g is None else (1 - g) * alone
    if windows == 1:
        return alone.to(value.dtype)
    mq, mk, mv = later(memory_query.to(f32)), earlier(memory_key.to(f32)), earlier(v)
    memory = _column_memory if _by_columns(docs, d, G, dh, v.shape[-1]) else _gathered_memory
    mem, mix_memory = memory(mq, mk, mv, docs, d, scaling)  # (R', H, W, M): R' = docs * (windows - 1)
    M, loc, lv, Rl = mem.shape[-1], later(local), later(v), mq.shape[0]
    if g is None:
        weights = _softmax(torch.cat([mem, loc], dim=-1))  # (R', H, W, M + W)
        out = _mix(weights[..., M:], lv, Rl, Hkv, G, W) + mix_memory(weights[..., :M])
    else:
        out = g * mix_memory(_softmax(mem)) + (1 - g) * _mix(_softmax(loc), lv, Rl, Hkv, G, W)
    out = torch.cat([alone.unsqueeze(1), out.view(docs, windows - 1, H, W, -1)], dim=1).view(R, H, W, -1)
    return out.to(value.dtype)


def crossbatch_forward(
    attn: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    window: int,
    d: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A :class:`~kvmem.adapters.MemoryAttention` trained with CrossBatch on whole documents.

    ``query`` ``(B, H, N, dh)`` and ``key`` / ``value`` ``(B, Hkv, N, dh|dv)``
    are ``B`` documents of ``N = windows * window`` tokens, before RoPE when
    ``attn.rope`` is set (as ``attn.forward`` takes them). Uses ``attn``'s
    position mode, scaling and gate; reads and writes no store. Returns
    ``(B, H, N, dv)``.
    """
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise InvalidInputError(
            f"query, key, value: expected 4-D tensors, got {tuple(query.shape)}, {tuple(key.shape)}, "
            f"{tuple(value.shape)}"
        )
    B, N = query.shape[0], query.shape[2]
    if key.shape[2] != N or value.shape[2] != N:
        raise InvalidInputError(f"key, value: expected {N} positions as query, got {key.shape[2]}, {value.shape[2]}")
    windows = _window_count(N, window)
    _check_settings(B, windows, d)
    q, k, v = (_to_windows(t, windows, window) for t in (query, key, value))  # (B*n, *, W, *)
    rope = attn.rope
    positions = torch.arange(window, device=query.device)
    if rope is not None:
        q, k = rope.rotate(q, positions), rope.rotate(k, positions)
    mq, mk = memory_views(rope, attn.config.positions, q, k, positions.unsqueeze(0))
    out = crossbatch_attention(q, k, v, docs=B, d=d, memory_query=mq, memory_key=mk,
                               scaling=attn.config.scaling, gate=attn.gate, attention_mask=attention_mask)
    return _from_windows(out, B)


def memory_views(rope: Rotary | None, mode: str, query: torch.Tensor, key: torch.Tensor,
                 position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory query and key for windows rotated at their local ``position_ids`` ``(R or 1, W)``."""
    if not isinstance(mode, str) or mode not in POSITION_MODES:
        raise InvalidInputError(f"positions: expected one of {POSITION_MODES}, got {mode!r}")
    if rope is None:
        return query, key
    if mode == "absolute":  # the previous window sits W positions before the queries
        return rope.shift(query, query.shape[-2]), key
    if mode == "first":
        zeros = torch.zeros_like(position_ids)
        return query, rope.rotate(rope.unrotate(key, position_ids), zeros)
    return rope.unrotate(query, position_ids), rope.unrotate(key, position_ids)


class CrossBatchTraining:
    """A context in which a Hugging Face model with a kvmem adapter trains with CrossBatch.

    >>> with adapter.crossbatch(d=8, window=256) as train:
    ...     out = train(input_ids)          # (B, N) documents, N a multiple of window
    ...     out.loss.backward()

    Inside the context the adapter's memory layers attend to their window and
    the previous windows of ``d`` documents of the batch (module docstring);
    the other layers run the model's own attention on the window. Stores are
    neither read nor written. On exit the layers are handed back to the
    adapter. Not thread-safe: one forward at a time.
    """

    def __init__(self, adapter: Any, d: int, window: int):
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise InvalidInputError(f"d: expected an int >= 1, got {d!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise InvalidInputError(f"window: expected an int >= 1, got {window!r}")
        self.adapter, self.d, self.window = adapter, d, window
        self._docs: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> CrossBatchTraining:
        from ._hf_layer import MEMORY_ATTR

        self.adapter._check_attached()
        if self._saved:
            raise KvmemError("this CrossBatch context is already entered")
        for i, module in self.adapter._modules.items():
            self._saved[i] = getattr(module, MEMORY_ATTR)
            setattr(module, MEMORY_ATTR, _CrossBatchLayer(self._saved[i], self))
        return self

    def __exit__(self, *exc: Any) -> None:
        from ._hf_layer import MEMORY_ATTR

        for i, memory in self._saved.items():
            setattr(self.adapter._modules[i], MEMORY_ATTR, memory)
        self._saved.clear()

    def __call__(self, input_ids: Any, labels: Any = None):
        """Forward ``B`` documents ``(B, N)``; returns a ``CausalLMOutput`` with ``logits`` ``(B, N, V)``.

        ``loss`` is the next-token cross-entropy over the whole documents
        (across window boundaries), against ``labels`` ``(B, N)`` (default the
        ids; -100 is ignored).
        """
        from transformers.modeling_outputs import CausalLMOutput

        if not self._saved:
            raise KvmemError("CrossBatchTraining: call it inside its with-block")
        ids = torch.as_tensor(input_ids)
        if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise InvalidInputError(f"input_ids: expected integer token ids (B, N), got {ids.dtype} {tuple(ids.shape)}")
        B, N = ids.shape
        windows = _window_count(N, self.window)
        _check_settings(B, windows, self.d)
        labels = ids if labels is None else torch.as_tensor(labels)
        if labels.shape != ids.shape:
            raise InvalidInputError(f"labels: expected shape {tuple(ids.shape)}, got {tuple(labels.shape)}")
        device = next(self.adapter.model.parameters()).device
        rows = ids.reshape(B * windows, self.window).to(device)  # (B*n, W), document-major
        pos = torch.arange(self.window, device=device).expand(B * windows, -1)
        self._docs = B
        calls = {i: m.calls for i, m in self._saved.items()}
        try:
            out = self.adapter.model(input_ids=rows, position_ids=pos, use_cache=False)
        finally:
            self._docs = None
        self.adapter._check_dispatched(calls)
        logits = out.logits.reshape(B, N, -1)  # (B, N, V)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1).to(device),
            ignore_index=-100,
        )
        return CausalLMOutput(loss=loss, logits=logits)


class _CrossBatchLayer:
    """Stands in for a layer's memory inside a :class:`CrossBatchTraining` context."""

    def __init__(self, memory: Any, training: CrossBatchTraining):
        self.memory, self.training = memory, training

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        from ._hf_layer import _bool_mask

        memory, training = self.memory, self.training
        memory.calls += 1
        if training._docs is None:
            raise KvmemError("inside a CrossBatch context, run the model through the context: train(input_ids)")
        position_ids = kwargs.get("position_ids")
        if position_ids is None and memory.rope is not None:
            raise KvmemError(f"layer {memory.layer_idx}: CrossBatch needs the position_ids the model passes")
        mq, mk = memory_views(memory.rope, memory.settings.positions, query, key, position_ids)
        out = crossbatch_attention(query, key, value, docs=training._docs, d=training.d, memory_query=mq,
                                   memory_key=mk, scaling=scaling,
                                   attention_mask=_bool_mask(attention_mask, key.shape[2]))  # (R, H, W, dv)
        return out.transpose(1, 2).contiguous(), None  # (R, W, H, dv)


def _mix(weights, values, R, Hkv, G, W):
    """weights (R, H, W, M) @ values (R, Hkv, M, dv) per key-value group -> (R, H, W, dv)."""
    return torch.matmul(weights.reshape(R, Hkv, G * W, -1), values).view(R, Hkv * G, W, -1)


def _memory_blocks(x: torch.Tensor, docs: int, d: int) -> torch.Tensor:
    """x (R, Hkv, W, e), rows document-major -> (R, Hkv, d*W, e): for row ``b * n + j``, window ``j`` of
    documents b, b+1, ..., b+d-1 (mod docs)."""
    R, Hkv, W, e = x.shape
    per_doc = x.view(docs, R // docs, Hkv, W, e)
    which = (torch.arange(docs, device=x.device).unsqueeze(1) + torch.arange(d, device=x.device)) % docs
    blocks = per_doc[which]  # (docs, d, n, Hkv, W, e)
    return blocks.permute(0, 2, 3, 1, 4, 5).reshape(R, Hkv, d * W, e)


def _by_columns(docs: int, d: int, G: int, dh: int, dv: int) -> bool:
    """Score against every document's previous window (masked) rather than copy each row's ``d`` blocks?

    The gathered copies cost ``d * (dh + dv)`` numbers per row and key
    position; the columns cost ``docs * G`` extra scores. With many documents
    in memory (large ``d``) the copies dominate and training slows with d².
    """
    return d * (dh + dv) >= docs * G


def _gathered_memory(mq, mk, v, docs, d, scaling):
    """Each row's memory blocks copied out: scores ``(R, H, W, d*W)`` and the mix of their values.

    ``mq`` ``(R, H, W, dh)``: the queries of rows ``b * n + j``; ``mk`` / ``v``
    ``(R, Hkv, W, *)``: the windows their memory holds, row ``c * n + j``
    being what documents ``b`` with ``c`` in ``b .. b + d - 1`` (mod docs) see.
    """
    R, Hkv, W, _ = mk.shape
    G = mq.shape[1] // Hkv
    mem_k = _memory_blocks(mk, docs, d)  # (R, Hkv, d*W, dh)
    mem_v = _memory_blocks(v, docs, d)  # (R, Hkv, d*W, dv)
    q = mq.reshape(R, Hkv, G * W, -1)
    scores = (torch.matmul(q, mem_k.transpose(-1, -2)) * scaling).view(R, Hkv * G, W, d * W)
    return scores, lambda weights: _mix(weights, mem_v, R, Hkv, G, W)


def _column_memory(mq, mk, v, docs, d, scaling):
    """Every row against column ``j`` of every document, the ``docs - d`` not in its memory masked.

    Arguments as :func:`_gathered_memory`. Scores ``(R, H, W, docs*W)``;
    one matmul per window column.
    """
    R, Hkv, W, dh = mk.shape
    H, n = mq.shape[1], R // docs
    G = H // Hkv

    def columns(x):  # (R, h, W, e) -> (n, h, docs*W, e): column j holds window j of every document
        e = x.shape[-1]
        return x.reshape(docs, n, x.shape[1], W, e).permute(1, 2, 0, 3, 4).reshape(n, x.shape[1], docs * W, e)

    keys, values = columns(mk), columns(v)  # (n, Hkv, docs*W, *)
    q = mq.reshape(docs, n, Hkv, G * W, dh).permute(1, 2, 0, 3, 4).reshape(n, Hkv, docs * G * W, dh)
    scores = (torch.matmul(q, keys.transpose(-1, -2)) * scaling).view(n, Hkv, docs, G * W, docs, W)
    b = torch.arange(docs, device=mq.device)
    outside = ((b.view(1, -1) - b.view(-1, 1)) % docs >= d).view(1, 1, docs, 1, docs, 1)  # [row doc, memory doc]
    scores = scores.masked_fill(outside, -math.inf)
    scores = scores.permute(2, 0, 1, 3, 4, 5).reshape(R, H, W, docs * W)

    def mix(weights):  # (R, H, W, docs*W) -> (R, H, W, dv)
        w = weights.reshape(docs, n, Hkv, G * W, docs * W).permute(1, 2, 0, 3, 4).reshape(n, Hkv, -1, docs * W)
        out = torch.matmul(w, values)  # (n, Hkv, docs*G*W, dv)
        return out.view(n, Hkv, docs, G * W, -1).permute(2, 0, 1, 3, 4).reshape(R, H, W, -1)

    return scores, mix


def _to_windows(x: torch.Tensor, windows: int, window: int) -> torch.Tensor:
    """(B, h, N, e) -> (B*n, h, W, e), rows document-major."""
    B, h, _, e = x.shape
    return x.view(B, h, windows, window, e).transpose(1, 2).reshape(B * windows, h, window, e)


def _from_windows(x: torch.Tensor, docs: int) -> torch.Tensor:
    """(B*n, h, W, e) -> (B, h, N, e)."""
    R, h, W, e = x.shape
    return x.view(docs, R // docs, h, W, e).transpose(1, 2).reshape(docs, h, -1, e)


def _window_count(N: int, window: int) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InvalidInputError(f"window: expected an int >= 1, got {window!r}")
    if N == 0 or N % window:
        raise InvalidInputError(f"window: expected a divisor of the sequence length {N}, got {window}")
    return N // window


def _windows_of(R: int, docs: Any) -> int:
    if isinstance(docs, bool) or not isinstance(docs, int) or docs < 1 or R % docs:
        raise InvalidInputError(f"docs: expected an int >= 1 dividing the {R} rows, got {docs!r}")
    return R // docs


def _check_settings(docs: int, windows: int, d: Any) -> None:
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise InvalidInputError(f"d: expected an int >= 1, got {d!r}")
    if d > docs:
        raise InvalidInputError(f"d: expected at most the {docs} documents of the batch, got {d}")
    if windows < 1:
        raise InvalidInputError(f"windows: expected at least 1, got {windows}")


def _check(query, key, value, memory_query, memory_key, gate):
    check_4d(query, key, value)
    R, H, W, dh = query.shape
    Hkv = key.shape[1]
    if key.shape[0] != R or key.shape[2:] != (W, dh) or Hkv == 0 or H % Hkv:
        raise InvalidInputError(f"key: expected ({R}, Hkv dividing {H}, {W}, {dh}), got {tuple(key.shape)}")
    if value.shape[:3] != key.shape[:3]:
        raise InvalidInputError(f"value: expected ({R}, {Hkv}, {W}, dv), got {tuple(value.shape)}")
    if memory_query is not None and memory_query.shape != query.shape:
        raise InvalidInputError(f"memory_query: expected {tuple(query.shape)}, got {tuple(memory_query.shape)}")
    if memory_key is not None and memory_key.shape != key.shape:
        raise InvalidInputError(f"memory_key: expected {tuple(key.shape)}, got {tuple(memory_key.shape)}")
    if gate is not None and tuple(gate.shape) != (H,):
        raise InvalidInputError(f"gate: expected shape ({H},), got {tuple(gate.shape)}")
    return R, H, W, dh, Hkv, value.shape[-1]
