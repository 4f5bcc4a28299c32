"""The attention function kvmem registers with transformers, and a layer's memory.

transformers calls ``attention_interface(module, query, key, value,
attention_mask, scaling=..., dropout=..., **kwargs)`` with RoPE already
applied to ``query`` and ``key`` and with ``position_ids`` in ``kwargs``.
kvmem registers one function under the name :data:`ATTN_NAME` in
``AttentionInterface`` and one mask function under the same name in
``AttentionMaskInterface``; ``attach`` switches the model's
``attn_implementation`` to it. The function looks for a :class:`LayerMemory`
on the module (attribute :data:`MEMORY_ATTR`): layers without one are handed
to the model's original implementation (``sdpa`` or ``eager``) with the
original mask, untouched.

Pre-RoPE keys and queries ("first" and "none" modes) are recovered by
inverting the model's own rotation: cos and sin come from the model's rotary
module at the ``position_ids`` the model passed, so the inverse matches what
the model applied (exactly up to float rounding; computed in float32). This
needs no hook on ``k_proj`` (which would miss q/k norms and fused qkv
projections) and no copy of model code. A self-check at attach compares
kvmem's rotation with the model's ``apply_rotary_pos_emb``.

Memory layers return no attention weights and apply no attention dropout.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

import kvmem
from kvmem.errors import InvalidInputError, KvmemError

from .attention import memory_attention
from .rope import Rotary, rotate

ATTN_NAME = "kvmem"
MEMORY_ATTR = "kvmem_memory"
SUPPORTED_ORIGINALS = ("sdpa", "eager")

# id(config) -> (weakref to config, original attn_implementation). Configs are not hashable.
_ORIGINALS: dict[int, tuple[weakref.ref, str]] = {}


def remember_original(config: Any, original: str) -> None:
    _ORIGINALS[id(config)] = (weakref.ref(config), original)


def forget_original(config: Any) -> None:
    _ORIGINALS.pop(id(config), None)


def original_of(config: Any) -> str | None:
    entry = _ORIGINALS.get(id(config))
    if entry is None or entry[0]() is not config:
        return None
    return entry[1]


def _require_original(config: Any) -> str:
    original = original_of(config)
    if original is None:
        raise KvmemError(
            f'attn_implementation "{ATTN_NAME}" is set but no kvmem adapter is attached to this model: '
            "call kvmem.adapters.hf.attach(model) or set the model's attn_implementation back"
        )
    return original


def kvmem_mask(*args: Any, config: Any = None, **kwargs: Any):
    """Mask function: the original implementation's mask (sdpa: bool or None; eager: float)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[_require_original(config)](*args, config=config, **kwargs)


def kvmem_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function: memory attention on layers with a memory, the original elsewhere."""
    memory = getattr(module, MEMORY_ATTR, None)
    if memory is not None:
        return memory(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    original = _require_original(module.config)
    return original_attention(module, original)(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def original_attention(module: Any, original: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if original == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise InvalidInputError(
                f"{type(module).__name__}: expected an eager_attention_forward in its module, found none; "
                'load the model with attn_implementation="sdpa"'
            )
        return fn
    return ALL_ATTENTION_FUNCTIONS[original]


def register() -> None:
    """Register kvmem's attention and mask functions (idempotent, process-wide)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, kvmem_attention)
    AttentionMaskInterface.register(ATTN_NAME, kvmem_mask)


def model_rotary(model: Any, module: Any, head_dim: int) -> Rotary | None:
    """A :class:`Rotary` on the model's rotary module, or None when it has none."""
    found = [m for name, m in model.named_modules() if name.split(".")[-1] == "rotary_emb"]
    if not found:
        return None
    if len({id(m) for m in found}) > 1:
        raise InvalidInputError(
            f"model: expected one rotary embedding module, found {len(found)}; kvmem cannot tell which "
            "one a layer uses"
        )
    rotary = found[0]

    def cos_sin(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.empty(0, dtype=torch.float32, device=positions.device)
        return rotary(probe, positions)

    rope = Rotary(cos_sin, head_dim)
    _check_convention(rope, module, head_dim)
    return rope


def _check_convention(rope: Rotary, module: Any, head_dim: int) -> None:
    positions = torch.tensor([[0, 1, 7, 300]])
    try:
        cos, sin = rope.cos_sin(positions)
    except Exception as exc:  # an unusual rotary module signature
        raise InvalidInputError(f"model rotary embedding: could not compute cos/sin ({exc})") from exc
    if cos.shape[-1] != head_dim:
        raise InvalidInputError(
            f"model rotary embedding: expected cos/sin over the whole head ({head_dim}), got "
            f"{cos.shape[-1]} (partial rotary is not supported)"
        )
    apply = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if apply is None:
        return
    x = torch.randn(1, 1, 4, head_dim, generator=torch.Generator().manual_seed(0))
    try:
        theirs, _ = apply(x, x, cos, sin)
    except Exception:
        return  # a different signature: nothing to compare with
    if not torch.allclose(theirs, rotate(x, cos, sin), atol=1e-5):
        raise InvalidInputError(
            "model rotary embedding: expected the rotate-half RoPE of Llama, got another convention"
        )


@dataclass
class StreamState:
    """What every layer of one adapter shares: where the stream is."""

    writing: bool = False  # inside feed: attend, then write the chunk to memory
    tokens: int = 0  # tokens of the stream in memory or in the local context since the last reset
    held: torch.Tensor | None = None  # inside feed: (B, T) bool, False for padding (None: no padding)


@dataclass(frozen=True)
class LayerSettings:
    backend: str
    k: int | str
    positions: str
    store_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    search_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


class LayerMemory:
    """The memory of one attention module: a store with B * Hkv partitions, made on first use.

    Not thread-safe: a model runs one forward at a time.
    """

    def __init__(self, layer_idx: int, settings: LayerSettings, state: StreamState, rope: Rotary | None):
        self.layer_idx = layer_idx
        self.settings = settings
        self.state = state
        self.rope = rope
        self.store: Any = None
        self.calls = 0  # forwards seen; feed checks that the model dispatched to kvmem

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        self.calls += 1
        B, H, T, d = query.shape  # (B, H, T, d)
        Hkv, Tl = key.shape[1], key.shape[2]  # key (B, Hkv, Tl, d)
        writing = self.state.writing
        if writing and Tl != T:
            raise KvmemError(f"layer {self.layer_idx}: feed expects no KV cache, got {Tl - T} cached keys")
        store = self._store(B, Hkv, d, value.shape[-1], key.dtype, key.device)
        mem_query, mem_key = self._views(query, key, kwargs.get("position_ids"), writing)
        held = self.state.held if writing else None
        out = memory_attention(
            query,
            key,
            value,
            store,
            self.settings.k,
            memory_query=mem_query,
            memory_key=mem_key,
            scaling=scaling,
            attention_mask=_bool_mask(attention_mask, Tl),
            write=writing and held is None,
            search_params=self.settings.search_options,
        )  # (B, H, T, dv)
        if held is not None:
            self._write(store, mem_key, value, held)
        return out.transpose(1, 2).contiguous(), None  # (B, T, H, dv), no attention weights

    def remember(self, key, value, positions, held):
        """Write local keys ``(B, Hkv, n, d)`` as the model rotated them at ``positions (1, n)``, and
        values, to memory; ``held (B, n)`` False marks padding, which is not written."""
        B, Hkv, n, d = key.shape
        store = self._store(B, Hkv, d, value.shape[-1], key.dtype, key.device)
        self._write(store, self._memory_key(key, positions), value, held)

    def _write(self, store, key, value, held):
        """Add ``key``/``value`` ``(B, Hkv, n, d|dv)`` to ``store``; drop the rows ``held (B, n)`` marks False."""
        B, Hkv, n, d = key.shape
        P = B * Hkv
        ids = store.add(key.detach().reshape(P, n, d), value.detach().reshape(P, n, -1))  # (P, n)
        if held is not None and not bool(held.all()):
            padding = (~held.to(ids.device, torch.bool))[:, None, :].expand(B, Hkv, n).reshape(P, n)
            store.remove(ids.masked_fill(~padding, -1))

    def _memory_key(self, key, positions):
        """What memory stores of keys rotated at ``positions``: per the position mode."""
        mode, rope = self.settings.positions, self.rope
        if rope is None or mode == "absolute":
            return key
        unrotated = rope.unrotate(key, positions)
        return rope.rotate(unrotated, torch.zeros_like(positions)) if mode == "first" else unrotated

    def _views(self, query, key, position_ids, writing):
        """Memory query (B, H, T, d) and, when writing, memory key (B, Hkv, T, d)."""
        mode, rope = self.settings.positions, self.rope
        if rope is None or mode == "absolute":
            return query, (key if writing else None)
        if position_ids is None:
            raise KvmemError(
                f'layer {self.layer_idx}: positions="{mode}" needs the position_ids the model passes to '
                "its attention function, and this model passes none"
            )
        if mode == "first":
            return query, (self._memory_key(key, position_ids) if writing else None)
        return rope.unrotate(query, position_ids), (self._memory_key(key, position_ids) if writing else None)

    def _store(self, B, Hkv, d, dv, dtype, device):
        partitions = B * Hkv
        store = self.store
        if store is not None and (store.partitions, store.dim, store.value_dim) != (partitions, d, dv):
            if len(store) > 0:
                raise InvalidInputError(
                    f"layer {self.layer_idx}: memory holds batch size {store.partitions // Hkv}, got "
                    f"batch size {B}; call reset() before feeding another batch size"
                )
            store.close()
            store = self.store = None
        if store is None:
            self.store = store = self._create(partitions, d, dv, dtype, device)
        return store

    def _create(self, partitions, d, dv, dtype, device):
        options = dict(self.settings.store_options)
        options.setdefault("dtype", dtype)
        options.setdefault("metric", "ip")
        options.setdefault("device", store_device(self.settings.backend, device))
        if options.get("path") is not None:
            options["path"] = str(Path(options["path"]) / f"layer-{self.layer_idx}")
        return kvmem.create(self.settings.backend, dim=d, value_dim=dv, partitions=partitions, **options)


def store_device(backend: str, model_device: torch.device) -> torch.device:
    """Where a layer's store lives by default: on the model's device where the backend can live there
    (``exact``, ``lmdb``), else on the CPU (``ivf``, ``hnsw``: their indexes are in RAM)."""
    return model_device if model_device.type in kvmem.registry[backend].devices else torch.device("cpu")


def _bool_mask(mask: torch.Tensor | None, kv_length: int) -> torch.Tensor | None:
    """transformers' mask (sdpa bool, eager float, or None) -> bool (B|1, 1, T, Tl) or None."""
    if mask is None:
        return None
    mask = mask[..., :kv_length]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def attention_modules(model: Any) -> dict[int, Any]:
    """layer index -> attention module (modules named *Attention with layer_idx and head_dim)."""
    found: dict[int, Any] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if type(module).__name__.endswith("Attention") and isinstance(idx, int) and hasattr(module, "head_dim"):
            if idx in found and found[idx] is not module:
                raise InvalidInputError(f"model: expected one attention module per layer, layer {idx} has two")
            found[idx] = module
    if not found:
        raise InvalidInputError(
            f"model: expected attention modules with a layer_idx (as Llama/Mistral/Qwen2 have), "
            f"found none in {type(model).__name__}"
        )
    return dict(sorted(found.items()))


def configs_of(model: Any, modules: Any) -> list[Any]:
    """The model's config, its sub-configs, and the configs its attention modules read."""
    found: dict[int, Any] = {}
    todo = [model.config, *(getattr(m, "config", None) for m in modules)]
    while todo:
        config = todo.pop()
        if config is None or id(config) in found:
            continue
        found[id(config)] = config
        todo.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}))
    return list(found.values())
