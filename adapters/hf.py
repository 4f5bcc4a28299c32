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
softmax to the causal window and to their top-k memory keys (or all of them,
``k="all"``), then the window's keys and values are written to memory. The
last ``last_context_length`` tokens instead become the local context: a KV
cache (:mod:`._hf_context`) that a forward pre-hook hands to the next forward
or ``generate``. A forward given a cache (``generate``) continues the local
context; with ``rolling`` (the default for "first" and "none") the local
context moves into memory whenever a step would make it longer than the
window, and positions restart, as LongLLaMA does. The next caller or
``flush()`` moves what is left into memory. A forward without a cache reads
memory and writes nothing.

Positions: with ``"absolute"`` token n of the stream is at position n, so
with an exact store and ``k >= tokens`` (or ``k="all"``) feeding equals full
attention. With ``"first"`` and ``"none"`` positions are local (every window
and every local context starts at 0, as LongLLaMA).

Concurrency: an adapter and its model run one forward at a time. Durability:
memory lives in the stores; ``save`` writes a complete snapshot and switches
to it atomically (a crash leaves the previous save or the new one).
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import kvmem
import kvmem.devices
from kvmem import inputs
from kvmem.errors import BackendUnavailableError, CorruptStoreError, InvalidInputError, KvmemError

from . import _hf_context as ctx
from . import _hf_fill as fill
from . import _hf_layer as hfl
from . import _hf_persist as persist
from ._hf_settings import Settings, choose_layers, resolve

__all__ = ["attach", "load", "MemoryAdapter", "Settings"]

MIN_TRANSFORMERS = (4, 56)  # as pyproject's kvmem[hf]


def attach(
    model: Any,
    backend: str = "exact",
    layers: str | Sequence[int] | None = None,
    k: int | str = 32,
    positions: str | None = None,
    store_options: Mapping[str, Any] | None = None,
    chunk_size: int | None = None,
    search_options: Mapping[str, Any] | None = None,
    last_context_length: int | None = None,
    rolling: bool | None = None,
) -> MemoryAdapter:
    """Hang a kvmem memory on the attention modules of ``model`` and return its adapter.

    Settings left as None come from a LongLLaMA config when the model has one
    (:mod:`._hf_settings`), else from kvmem's defaults; ``adapter.settings``
    shows what was chosen and ``adapter.settings.sources`` from where.

    Args:
        model: a transformers decoder whose attention dispatches through
            ``AttentionInterface`` (Llama, Mistral, Qwen2, ...), loaded with
            ``attn_implementation`` "sdpa" (the default) or "eager".
        backend: kvmem backend name for every layer's store.
        layers: "all", or the decoder layer indices that get a memory (LongLLaMA: ``mem_layers``).
        k: memory keys retrieved per query, or "all" for dense memory attention (exact, lmdb).
        positions: "first" (LongLLaMA), "absolute" or "none"; see the module docstring.
        store_options: extra ``kvmem.create`` arguments (``dtype``, ``capacity``,
            ``device``, backend options); a ``path`` gets one ``layer-<i>`` folder per layer.
            Stores live on the model's device where the backend can (``exact``, ``lmdb``),
            else on the CPU; a ``device`` the backend cannot live on raises here.
        chunk_size: the window: ``feed`` reads windows this long, and a rolling local
            context stays within it (LongLLaMA: ``max_position_embeddings``; else 512).
        search_options: per-call search parameters (``nprobe``, ``ef``).
        last_context_length: default of ``feed``'s (LongLLaMA: its config's; else 0).
        rolling: whether the local context moves into memory when it reaches the window
            (default: True for "first" and "none", False for "absolute").
    """
    _require_transformers()
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise InvalidInputError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    for name, options in (("store_options", store_options), ("search_options", search_options)):
        if options is not None and not isinstance(options, Mapping):
            raise InvalidInputError(f"{name}: expected a mapping or None, got {options!r}")
    chosen, sources = resolve(model.config, {
        "layers": layers, "positions": positions, "chunk_size": chunk_size, "k": k,
        "last_context_length": last_context_length, "rolling": rolling, "store_options": store_options,
    })
    positions = chosen["positions"]
    _check_backend(backend)
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
    modules = hfl.attention_modules(model)
    chosen_layers = choose_layers(chosen["layers"], modules)
    some = modules[chosen_layers[0]]
    rope = hfl.model_rotary(model, some, some.head_dim)
    if rope is None and positions == "first":
        raise InvalidInputError('positions="first": expected a model with rotary embeddings, found none')

    settings = Settings(
        backend=backend,
        layers=tuple(chosen_layers),
        k=k,
        positions=positions,
        chunk_size=chosen["chunk_size"],
        last_context_length=chosen["last_context_length"],
        rolling=chosen["rolling"],
        store_options=MappingProxyType(chosen["store_options"]),
        search_options=MappingProxyType(dict(search_options or {})),
        sources=MappingProxyType(sources),
    )
    return MemoryAdapter(model, settings, modules, rope, original)


class MemoryAdapter:
    """The memory attached to one model: feed, reset, save, detach.

    Not thread-safe: one call at a time, and no model forward during a call.
    """

    def __init__(self, model, settings: Settings, modules, rope, original):
        self.model = model
        self.settings = settings
        self.chunk_size = settings.chunk_size
        self._state = hfl.StreamState()
        self._context: Any = None  # the local context (a ContextCache), made on the first forward that needs one
        self._layer_count = max(modules) + 1
        self._cache_arg = ctx.cache_argument(model.forward)
        self._cache_positions = "cache_position" in inspect.signature(model.forward).parameters  # transformers 4.x
        layer_settings = hfl.LayerSettings(
            backend=settings.backend, k=settings.k, positions=settings.positions,
            store_options=settings.store_options, search_options=settings.search_options,
        )
        self._modules = {i: modules[i] for i in settings.layers}
        self._memories = {i: hfl.LayerMemory(i, layer_settings, self._state, rope) for i in settings.layers}
        self._configs = hfl.configs_of(model, modules.values())
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
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

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
        """Tokens per sequence read since the last reset: fed, or run through the local context."""
        return self._state.tokens

    @property
    def context(self) -> int:
        """Tokens per sequence in the local context (the KV cache the next forward or ``generate`` continues)."""
        return 0 if self._context is None else self._context.local

    def feed(
        self,
        input_ids: Any,
        chunk_size: int | None = None,
        return_logits: str = "last",
        last_context_length: int | None = None,
        attention_mask: Any = None,
        search: bool = True,
    ):
        """Read ``input_ids`` (B, N) window by window into memory.

        The last ``last_context_length`` tokens (default: the adapter's) are
        not written to memory: they become the local context of the next
        forward or ``generate``, as LongLLaMA leaves them. A local context left
        by earlier calls moves into memory first. ``attention_mask`` (B, N),
        1 / True for real tokens, marks padding, which is neither written to
        memory nor attended.

        With ``search=False`` each window attends to itself only and is
        written to memory without searching it; windows then run many at a
        time (:mod:`._hf_fill`), which fills a large memory fast. Padding and
        the last ``last_context_length`` tokens are handled as in the
        searching feed: memory holds the same rows at the same positions,
        and the last tokens (which search memory) make the same local context.

        Returns a ``CausalLMOutput`` whose ``logits`` are (B, 1, V) for the
        last token ("last") or (B, N, V) for every fed token ("all"). On an
        error part of a window may be in memory: call ``reset()``.
        """
        self._check_attached()
        request = fill.check(self, input_ids, chunk_size, return_logits, last_context_length, attention_mask, search)
        self.flush()
        return fill.feed(self, request)

    def flush(self) -> None:
        """Move the local context into memory now (memory layers write it; the others drop it)."""
        self._check_attached()
        if self._context is not None:
            self._context.flush()
            self._context = None

    def reset(self) -> None:
        """Forget every row of every layer's memory and the local context (between documents)."""
        self._check_attached()
        self._context = None
        for memory in self._memories.values():
            if memory.store is not None:
                memory.store.clear()
        self._state.tokens = 0

    def _new_context(self, pending: bool = False) -> Any:
        base = self._state.tokens if self.settings.positions == "absolute" else 0
        window = self.chunk_size if self.settings.rolling else None
        context = ctx.new_context(self._layer_count, window, base, self._rolled)
        context.pending = pending  # made by feed: the next caller continues it
        return context

    def _rolled(self, layer, key, value, positions, held) -> None:
        """What leaves the local context: memory layers remember it."""
        if layer in self._memories:
            self._memories[layer].remember(key, value, positions, held)

    def _before_forward(self, module, args, kwargs):
        """Forward pre-hook: see :func:`._hf_context.prepare_forward`."""
        return ctx.prepare_forward(self, args, kwargs)

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
            "last_context_length": self.settings.last_context_length,
            "rolling": self.settings.rolling,
            "store_options": persist.jsonable(self.settings.store_options),
            "search_options": dict(self.settings.search_options),
            "model": persist.fingerprint(self.model),
        })

    def detach(self) -> None:
        """Remove the memory and restore the model's attention exactly; closes the stores."""
        if not self._attached:
            return
        self._hook.remove()
        self._context = None
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
        last_context_length=manifest.get("last_context_length", 0),
        rolling=manifest.get("rolling", manifest["positions"] != "absolute"),
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
    return adapter


def _require_transformers() -> None:
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as exc:
        raise BackendUnavailableError(
            "kvmem.adapters.hf needs transformers: pip install 'kvmem[hf]'"
        ) from exc
    from packaging.version import Version

    if Version(transformers.__version__).release < MIN_TRANSFORMERS:
        raise BackendUnavailableError(
            f"kvmem.adapters.hf needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} (the cache layers "
            f"its local context builds on), found {transformers.__version__}: pip install -U 'kvmem[hf]'")


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
