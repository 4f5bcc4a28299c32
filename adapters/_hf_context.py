"""The local context of an attached model: a transformers ``Cache`` that rolls into memory.

LongLLaMA keeps, in every layer, a local context (KV cache) of at most the
window's length; when a forward would make it longer, the whole local
context leaves it (memory layers move it into memory, other layers drop it)
and positions restart at 0 with the new tokens. :class:`ContextCache` is that
cache. The adapter hands it to the model through a forward pre-hook
(:func:`prepare_forward`), which also gives the model its positions and
padding mask in the coordinates of the local context:

- ``position_ids``: ``base + `` the token's index in the local context
  (``base`` is 0, or for ``positions="absolute"`` the stream position of the
  local context's first token);
- ``attention_mask``: ``(B, local tokens)``, True for real tokens;
- the mask sizes (``get_mask_sizes``, ``get_query_offset``) are those of the
  local context, while ``get_seq_length`` counts the tokens the caller passed
  since it began using the cache (what ``generate`` slices its inputs by);
- ``cache_position`` (transformers 4.x, whose masks place queries by it, not
  by ``get_query_offset``): the step's indices in the local context.

A step is planned once per forward (:meth:`ContextCache.begin`), before the
model makes its masks; each layer's ``update`` then applies the plan.
Not thread-safe: one forward at a time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from kvmem.errors import InvalidInputError

# (layer index, keys (B, Hkv, n, d) as the model rotated them, values (B, Hkv, n, dv),
#  positions (1, n), held (B, n) bool) -> None: what leaves the local context
Rollover = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _cache_classes():
    from transformers.cache_utils import Cache, DynamicLayer

    return Cache, DynamicLayer


def new_context(layers: int, window: int | None, base: int, on_roll: Rollover) -> Any:
    """A :class:`ContextCache` for a model of ``layers`` decoder layers (``window`` None: never rolls)."""
    Cache, DynamicLayer = _cache_classes()
    init_args = len(inspect.signature(DynamicLayer.lazy_initialization).parameters) - 1  # 4.x: keys; 5.x: + values

    class ContextLayer(DynamicLayer):
        """One layer's local keys and values; rolls when its cache's plan says so."""

        def __init__(self, owner: Any, index: int) -> None:
            super().__init__()
            self.owner, self.index = owner, index

        def update(self, key_states, value_states, *args, **kwargs):
            if not _initialized(self):
                self.lazy_initialization(*(key_states, value_states)[:init_args])
            owner = self.owner
            if owner.rolls and self.keys.numel():
                owner.on_roll(self.index, self.keys, self.values, owner.positions(owner.dropped, self.keys),
                              owner.dropped)
                self.keys, self.values = key_states, value_states
            else:
                self.keys = torch.cat([self.keys, key_states], dim=-2)
                self.values = torch.cat([self.values, value_states], dim=-2)
            return self.keys, self.values

        def get_mask_sizes(self, query: Any) -> tuple[int, int]:  # query: its length (5.x), cache_position (4.x)
            return self.owner.local, 0

        def get_seq_length(self) -> int:
            return self.owner.seen

    class ContextCache(Cache):
        """Every layer's local context; see the module docstring."""

        def __init__(self) -> None:
            super().__init__(layers=[ContextLayer(self, i) for i in range(layers)])
            self.window, self.base, self.on_roll = window, base, on_roll
            self.local = 0  # tokens in the local context (after the planned step)
            self.seen = 0  # tokens the current caller passed since it began using the cache
            self.offset = 0  # local index of the step's first token
            self.rolls = False  # the planned step moves the local context out first
            self.held: torch.Tensor | None = None  # (B, local) bool: real tokens
            self.dropped: torch.Tensor | None = None  # (B, n) bool: held of what the step moves out

        @property
        def batch_size(self) -> int | None:
            return None if self.held is None else self.held.shape[0]

        def get_query_offset(self, layer_idx: int = 0) -> int:
            return self.offset

        def check_step(self, batch: int, length: int) -> None:
            """Raise :class:`InvalidInputError` if a forward of ``(batch, length)`` cannot continue this context."""
            if self.local and batch != self.batch_size:
                raise InvalidInputError(
                    f"input: expected batch size {self.batch_size}, the batch of the local context "
                    f"({self.local} tokens), got {batch}; call reset() first"
                )

        def positions(self, held: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
            """Positions ``(B, n)`` (or ``(1, n)`` without padding) of a local context whose tokens are
            ``held (B, n)``: ``base`` plus the real tokens before each, so that a left-padded row sits
            where it would sit unpadded."""
            if held is None:
                return torch.arange(keys.shape[-2], device=keys.device)[None] + self.base
            return (held.long().cumsum(1) - 1).clamp(min=0).to(keys.device) + self.base

        def begin(self, held: torch.Tensor) -> torch.Tensor:
            """Plan a forward of tokens ``held (B, T)`` (True: real); returns their positions ``(B, T)``."""
            T = held.shape[1]
            self.rolls = self.window is not None and self.local > 0 and self.local + T > self.window
            if self.rolls:
                self.dropped, self.held, self.offset = self.held, held, 0
            else:
                self.dropped = None
                self.held = held if self.held is None else torch.cat([self.held, held.to(self.held.device)], 1)
                self.offset = self.local
            self.local = self.offset + T
            self.seen += T
            return self.positions(self.held, held)[:, self.offset:self.offset + T].expand(held.shape[0], -1)

        def mask(self) -> torch.Tensor | None:
            """The 2-D padding mask ``(B, local)`` of the planned step, or None when nothing is padding."""
            return None if bool(self.held.all()) else self.held

        def flush(self) -> None:
            """Move the whole local context out (memory layers remember it) and empty it."""
            if self.local:
                for layer in self.layers:
                    if _initialized(layer) and layer.keys.numel():
                        self.on_roll(layer.index, layer.keys, layer.values, self.positions(self.held, layer.keys),
                                     self.held)
            for layer in self.layers:
                layer.reset()
            self.local = self.seen = self.offset = 0
            self.rolls, self.held, self.dropped = False, None, None

    return ContextCache()


def _initialized(layer: Any) -> bool:
    """Whether a cache layer holds tensors yet (``is_initialized`` from transformers 4.57; 4.56: keys not None)."""
    ready = getattr(layer, "is_initialized", None)
    return getattr(layer, "keys", None) is not None if ready is None else ready


def is_context(cache: Any) -> bool:
    return type(cache).__name__ == "ContextCache" and hasattr(cache, "begin")


def cache_argument(forward: Callable) -> str:
    """The name under which ``forward`` takes its cache (``cache`` in transformers 5, else ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def step_input(args: tuple, kwargs: dict) -> tuple[int, int, torch.device, torch.Tensor | None]:
    """``(batch, length, device, 2-D attention mask or None)`` of a forward's inputs."""
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None:
        raise InvalidInputError("input: expected input_ids or inputs_embeds")
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2):
        mask = None  # a prepared 4-D mask: the model's own business
    return x.shape[0], x.shape[1], x.device, mask


def prepare_forward(adapter: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The adapter's forward pre-hook: hand a forward that keeps a cache the local context, with its
    positions and padding mask; a forward without one gets (``"absolute"``) stream positions only."""
    name = adapter._cache_arg
    cache = kwargs.get(name)
    if adapter._state.writing or (cache is None and kwargs.get("use_cache") is False):
        return None
    if cache is not None and not is_context(cache) and cache.get_seq_length() > 0:
        return None  # the caller's own cache: positions and memory are the caller's business
    B, T, device, mask = step_input(args, kwargs)
    context = adapter._context
    if cache is None and (context is None or not context.pending):  # a read-only forward
        if adapter.settings.positions != "absolute" or kwargs.get("position_ids") is not None:
            return None
        positions = torch.arange(T, device=device) + adapter._state.tokens
        return args, {**kwargs, "position_ids": positions.expand(B, -1)}
    if context is not None and cache is not context:  # a new caller: generate, or a plain forward
        if context.pending:
            context.check_step(B, T)
            context.pending = False
        else:
            context.flush()
            context = None
    if context is None:
        context = adapter._context = adapter._new_context()
    held = torch.ones(B, T, dtype=torch.bool, device=device)
    if mask is not None:
        held = mask[:, -T:].to(device, torch.bool)
    if cache is not context:
        context.seen = 0
    positions = context.begin(held)
    kwargs = {**kwargs, name: context, "use_cache": True, "position_ids": positions,
              "attention_mask": context.mask()}
    if adapter._cache_positions:
        kwargs["cache_position"] = torch.arange(context.offset, context.local, device=device)
    adapter._state.tokens += T
    return args, kwargs


def padding_mask(mask: Any, shape: torch.Size) -> torch.Tensor | None:
    """``attention_mask`` (B, N) of 0/1 or bool -> bool (True: a real token), or None when nothing is padding."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != tuple(shape) or mask.dtype.is_floating_point:
        raise InvalidInputError(
            f"attention_mask: expected 0/1 or bool {tuple(shape)} like input_ids, got {mask.dtype} {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise InvalidInputError("attention_mask: expected only 0 and 1")
    mask = mask.bool()
    return None if bool(mask.all()) else mask
