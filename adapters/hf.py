"""Give a Hugging Face decoder an external memory: ``attach(model) -> MemoryAdapter``.

>>> adapter = attach(model, backend="exact", k=32, positions="first")
>>> adapter.feed(long_ids, chunk_size=512)      # read a long input window by window
>>> model.generate(prompt_ids, max_new_tokens=20)   # attends to its window and to memory
>>> adapter.save("mem/"); adapter.reset(); adapter.detach()

How it plugs in: kvmem registers one attention function through
``transformers.AttentionInterface`` and its mask function through
``AttentionMaskInterface`` (see :mod:`kvmem.adapters._hf_layer`), sets the
model's ``attn_implementation`` to it, and hangs a memory on each chosen
attention module. No model source is copied or patched; layers without memory
run the model's original ``sdpa`` or ``eager`` attention with its own mask.

The stream: ``feed`` runs the model on windows of ``chunk_size`` tokens
without a KV cache. In each memory layer the window's queries attend with one
softmax to the causal window and to their top-k memory keys, then the
window's keys and values are written to memory. Any other forward
(``generate``, ``model(...)``) reads memory but does not write it.

Positions: with ``"absolute"`` ``feed`` gives the model absolute position ids
(token n of the stream is at position n), so with an exact store and
``k >= tokens`` feeding equals full attention; later forwards start at
position 0 and their memory queries are moved by the number of fed tokens.
With ``"first"`` and ``"none"`` every window starts at position 0 (local
positions, as LongLLaMA), so positions never exceed ``chunk_size`` plus the
generated length.

Concurrency: an adapter and its model run one forward at a time. Durability:
memory lives in the stores; ``save`` writes a complete snapshot and switches
to it atomically (a crash leaves the previous save or the new one).
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch

import kvmem
import kvmem.devices
from kvmem import inputs
from kvmem.errors import BackendUnavailableError, CorruptStoreError, InvalidInputError, KvmemError

from . import _hf_layer as hfl
from . import _hf_persist as persist
from .attention import POSITION_MODES

__all__ = ["attach", "load", "MemoryAdapter"]

DEFAULT_CHUNK = 512


def attach(
    model: Any,
    backend: str = "exact",
    layers: str | Sequence[int] = "all",
    k: int = 32,
    positions: str = "first",
    store_options: Mapping[str, Any] | None = None,
    chunk_size: int | None = None,
    search_options: Mapping[str, Any] | None = None,
) -> MemoryAdapter:
    """Hang a kvmem memory on the attention modules of ``model`` and return its adapter.

    Args:
        model: a transformers decoder whose attention dispatches through
            ``AttentionInterface`` (Llama, Mistral, Qwen2, ...), loaded with
            ``attn_implementation`` "sdpa" (the default) or "eager".
        backend: kvmem backend name for every layer's store.
        layers: "all", or the decoder layer indices that get a memory.
        k: memory keys retrieved per query.
        positions: "first" (LongLLaMA), "absolute" or "none"; see the module docstring.
        store_options: extra ``kvmem.create`` arguments (``dtype``, ``capacity``,
            ``device``, backend options); a ``path`` gets one ``layer-<i>`` folder per layer.
            Stores live on the model's device where the backend can (``exact``, ``lmdb``),
            else on the CPU; a ``device`` the backend cannot live on raises here.
        chunk_size: default window of ``feed`` (512 when None).
        search_options: per-call search parameters (``nprobe``, ``ef``).
    """
    _require_transformers()
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise InvalidInputError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    if positions not in POSITION_MODES:
        raise InvalidInputError(f"positions: expected one of {POSITION_MODES}, got {positions!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InvalidInputError(f"k: expected an int >= 0, got {k!r}")
    chunk_size = DEFAULT_CHUNK if chunk_size is None else _positive(chunk_size, "chunk_size")
    _check_backend(backend)
    for name, options in (("store_options", store_options), ("search_options", search_options)):
        if options is not None and not isinstance(options, Mapping):
            raise InvalidInputError(f"{name}: expected a mapping or None, got {options!r}")
    fixed = sorted({"dim", "value_dim", "partitions"} & set(store_options or {}))
    if fixed:
        raise InvalidInputError(f"store_options: {fixed[0]!r} is set by the model's attention shape; got {fixed[0]}="
                                f"{store_options[fixed[0]]!r}")
    _check_device(backend, (store_options or {}).get("device"))

    if not type(model)._can_set_attn_implementation():
        raise InvalidInputError(
            f"model: expected a model whose attention dispatches through transformers' AttentionInterface, "
            f"got {type(model).__name__}, which computes attention in its own code; kvmem cannot attach to it"
        )
    original = model.config._attn_implementation
    if hfl.original_of(model.config) is not None or original == hfl.ATTN_NAME:
        raise InvalidInputError("model: a kvmem adapter is already attached; detach() it first")
    if original not in hfl.SUPPORTED_ORIGINALS:
        raise InvalidInputError(
            f"model: expected attn_implementation in {hfl.SUPPORTED_ORIGINALS}, got {original!r}; "
            'load the model with attn_implementation="sdpa"'
        )
    modules = _attention_modules(model)
    chosen = _choose(layers, modules)
    some = modules[chosen[0]]
    rope = hfl.model_rotary(model, some, some.head_dim)
    if rope is None and positions == "first":
        raise InvalidInputError('positions="first": expected a model with rotary embeddings, found none')

    settings = hfl.LayerSettings(
        backend=backend,
        k=k,
        positions=positions,
        store_options=MappingProxyType(dict(store_options or {})),
        search_options=MappingProxyType(dict(search_options or {})),
    )
    return MemoryAdapter(model, settings, chosen, modules, rope, original, chunk_size)


class MemoryAdapter:
    """The memory attached to one model: feed, reset, save, detach.

    Not thread-safe: one call at a time, and no model forward during a call.
    """

    def __init__(self, model, settings, chosen, modules, rope, original, chunk_size):
        self.model = model
        self.settings = settings
        self.chunk_size = chunk_size
        self._state = hfl.StreamState()
        self._modules = {i: modules[i] for i in chosen}
        self._memories = {i: hfl.LayerMemory(i, settings, self._state, rope) for i in chosen}
        self._configs = _configs_of(model, modules.values())
        self._saved_impl = [(c, c._attn_implementation) for c in self._configs]
        self._original = original
        self._attached = True
        hfl.register()
        for config in self._configs:
            hfl.remember_original(config, original)
        try:
            model.set_attn_implementation(hfl.ATTN_NAME)
        except BaseException:
            for config, impl in self._saved_impl:
                config._attn_implementation_internal = impl
                hfl.forget_original(config)
            raise
        for i, module in self._modules.items():
            setattr(module, hfl.MEMORY_ATTR, self._memories[i])

    @property
    def layers(self) -> tuple[int, ...]:
        """Decoder layer indices that have a memory."""
        return tuple(self._memories)

    @property
    def stores(self) -> Mapping[int, Any]:
        """Layer index -> its store (made on the first forward; partitions = batch * kv heads)."""
        return MappingProxyType({i: m.store for i, m in self._memories.items() if m.store is not None})

    @property
    def tokens(self) -> int:
        """Tokens fed per sequence since the last reset."""
        return self._state.tokens

    def feed(self, input_ids: Any, chunk_size: int | None = None, return_logits: str = "last",
             search: bool = True):
        """Read ``input_ids`` (B, N) window by window into memory.

        With ``search=False`` each window attends to itself only and is
        written to memory without searching it; windows then run many at a
        time (:mod:`._hf_fill`), which fills a large memory fast.
        Returns a ``CausalLMOutput`` whose ``logits`` are (B, 1, V) for the
        last token ("last") or (B, N, V) for every fed token ("all"). On an
        error part of a window may be in memory: call ``reset()``.
        """
        self._check_attached()
        from transformers.modeling_outputs import CausalLMOutput

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
        vocab = self.model.get_input_embeddings().num_embeddings
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
            raise InvalidInputError(
                f"input_ids: expected token ids in [0, {vocab}), got {int(ids.min())} .. {int(ids.max())}")
        if not isinstance(return_logits, str) or return_logits not in ("last", "all"):
            raise InvalidInputError(f'return_logits: expected "last" or "all", got {return_logits!r}')
        window = self.chunk_size if chunk_size is None else _positive(chunk_size, "chunk_size")
        if not search:
            from ._hf_fill import feed_write_only

            return feed_write_only(self, ids, window, return_logits)
        device = next(self.model.parameters()).device
        B, N = ids.shape
        absolute = self.settings.positions == "absolute"
        keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        state, kept = self._state, []
        state.writing, state.offset = True, 0
        try:
            with torch.no_grad():
                for start in range(0, N, window):
                    chunk = ids[:, start : start + window].to(device)  # (B, W)
                    first = state.tokens if absolute else 0
                    pos = torch.arange(first, first + chunk.shape[1], device=device).expand(B, -1)
                    kwargs: dict[str, Any] = {"input_ids": chunk, "position_ids": pos, "use_cache": False}
                    if keep:
                        kwargs["logits_to_keep"] = 0 if return_logits == "all" else 1
                    calls = {i: m.calls for i, m in self._memories.items()}
                    out = self.model(**kwargs)
                    self._check_dispatched(calls)
                    kept.append(out.logits if return_logits == "all" else out.logits[:, -1:])
                    state.tokens += chunk.shape[1]
        finally:
            state.writing = False
            state.offset = state.tokens if absolute else 0
        logits = torch.cat(kept, dim=1) if return_logits == "all" else kept[-1]
        return CausalLMOutput(logits=logits)

    def reset(self) -> None:
        """Forget every row of every layer's memory (between documents)."""
        self._check_attached()
        for memory in self._memories.values():
            if memory.store is not None:
                memory.store.clear()
        self._state.tokens = self._state.offset = 0

    def crossbatch(self, d: int = 2, window: int | None = None):
        """A context in which the model trains with CrossBatch (:class:`.crossbatch.CrossBatchTraining`)."""
        from .crossbatch import CrossBatchTraining

        return CrossBatchTraining(self, d, self.chunk_size if window is None else window)

    def save(self, path: str | os.PathLike) -> None:
        """Save every layer's memory under the folder ``path``; see :func:`load`.

        Writes a new snapshot, then switches the manifest to it atomically: a
        crash leaves the previous save or the new one (:mod:`._hf_persist`).
        """
        self._check_attached()
        stores = {i: m.store for i, m in self._memories.items() if m.store is not None}
        persist.write(inputs.path(path, "path"), stores, {
            "tokens": self._state.tokens,
            "layers": list(self._memories),
            "backend": self.settings.backend,
            "k": self.settings.k,
            "positions": self.settings.positions,
            "chunk_size": self.chunk_size,
            "store_options": persist.jsonable(self.settings.store_options),
            "search_options": dict(self.settings.search_options),
            "model": persist.fingerprint(self.model),
        })

    def detach(self) -> None:
        """Remove the memory and restore the model's attention exactly; closes the stores."""
        if not self._attached:
            return
        for module in self._modules.values():
            if getattr(module, hfl.MEMORY_ATTR, None) is not None:
                delattr(module, hfl.MEMORY_ATTR)
        self.model.set_attn_implementation(self._original)
        for config, impl in self._saved_impl:
            config._attn_implementation_internal = impl
            hfl.forget_original(config)
        for memory in self._memories.values():
            if memory.store is not None:
                memory.store.close()
                memory.store = None
        self._attached = False

    def __enter__(self) -> MemoryAdapter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _check_attached(self) -> None:
        if not self._attached:
            raise KvmemError("this adapter was detached; attach() the model again")

    def _check_dispatched(self, before: Mapping[int, int]) -> None:
        silent = [i for i, m in self._memories.items() if m.calls == before[i]]
        if silent:
            raise KvmemError(
                f"layers {silent} did not call the attention function registered in transformers' "
                f"AttentionInterface; {type(self.model).__name__} does not dispatch through it"
            )


def load(model: Any, path: str | os.PathLike, device: Any = None) -> MemoryAdapter:
    """Attach to ``model`` the memory that :meth:`MemoryAdapter.save` wrote at ``path``.

    ``device``: where every layer's store goes; None puts each back on the device
    it was saved from (on the CPU, with a ``RuntimeWarning``, where this machine lacks it).

    Raises :class:`CorruptStoreError` for a damaged save and
    :class:`InvalidInputError` for a model of another shape.
    """
    root = inputs.path(path, "path")
    manifest = persist.read(root)
    want, got = manifest["model"], persist.fingerprint(model)
    if want != got:
        raise InvalidInputError(f"model: expected a model shaped like {want}, got {got}")
    store_options = persist.device_options(manifest["store_options"], device)
    adapter = attach(
        model,
        backend=manifest["backend"],
        layers=manifest["layers"],
        k=manifest["k"],
        positions=manifest["positions"],
        store_options=store_options,
        chunk_size=manifest["chunk_size"],
        search_options=manifest["search_options"],
    )
    try:
        for i in manifest["saved_layers"]:
            if i not in adapter._memories:
                raise CorruptStoreError(f"{root}: saved layer {i} is not among layers {manifest['layers']}")
            store = kvmem.load(root / manifest["snapshot"] / f"layer-{i}", device=device)
            adapter._memories[i].store = store
    except BaseException:
        adapter.detach()
        raise
    adapter._state.tokens = manifest["tokens"]
    adapter._state.offset = manifest["tokens"] if manifest["positions"] == "absolute" else 0
    return adapter


def _require_transformers() -> None:
    try:
        importlib.import_module("transformers")
    except ImportError as exc:
        raise BackendUnavailableError(
            "kvmem.adapters.hf needs transformers: pip install 'kvmem[hf]'"
        ) from exc


def _check_backend(backend: Any) -> None:
    known = kvmem.backends()
    if not isinstance(backend, str) or backend not in known:
        raise InvalidInputError(f"backend: expected one of {sorted(known)}, got {backend!r}")
    if not known[backend].available:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable here: {known[backend].reason}")


def _check_device(backend: str, device: Any) -> None:
    """A store device given to ``attach`` is one the backend lives on and this machine has."""
    if device is not None:
        kvmem.devices.resolve(device, backend, kvmem.registry[backend].devices)


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInputError(f"{name}: expected an int > 0, got {value!r}")
    return value


def _attention_modules(model: Any) -> dict[int, Any]:
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


def _choose(layers: str | Sequence[int], modules: Mapping[int, Any]) -> list[int]:
    if isinstance(layers, str):
        if layers != "all":
            raise InvalidInputError(f'layers: expected "all" or a list of layer indices, got {layers!r}')
        return list(modules)
    if not isinstance(layers, Iterable):
        raise InvalidInputError(f'layers: expected "all" or a list of layer indices, got {layers!r}')
    chosen = list(itertools.islice(layers, len(modules) + 1))
    ints = all(isinstance(i, int) and not isinstance(i, bool) for i in chosen)
    if not chosen or not ints or len(set(chosen)) != len(chosen) or any(i not in modules for i in chosen):
        raise InvalidInputError(
            f"layers: expected distinct indices among {list(modules)}, got {chosen}"
        )
    return sorted(chosen)


def _configs_of(model: Any, modules: Any) -> list[Any]:
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
