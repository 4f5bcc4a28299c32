"""What ``attach`` chose, and from where: arguments, a LongLLaMA config, or kvmem's defaults.

A LongLLaMA checkpoint loads into ``LlamaForCausalLM`` with its config's
extra fields kept as attributes: ``mem_layers`` (the memory layers),
``max_position_embeddings`` (the window it was trained on),
``last_context_length`` (the tokens of a long input kept as local context),
``mem_dtype`` (the dtype of stored keys and values) and ``mem_positionals``
(False: no RoPE at all in memory layers). A config with ``mem_layers`` is
read as LongLLaMA's; an argument given to ``attach`` always wins.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from kvmem.errors import InvalidInputError

from .attention import POSITION_MODES, check_k

__all__ = ["Settings", "choose_layers", "positive", "resolve"]

DEFAULT_CHUNK = 512


@dataclass(frozen=True)
class Settings:
    """The adapter's settings; ``sources[name]`` says where each came from."""

    backend: str
    layers: tuple[int, ...]  # decoder layers with a memory
    k: int | str  # memory keys per query, or "all"
    positions: str  # "first" | "absolute" | "none"
    chunk_size: int  # the window: feed reads windows this long; a rolling local context stays within it
    last_context_length: int  # feed keeps this many last tokens as local context
    rolling: bool  # the local context moves into memory when it reaches the window
    store_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    search_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInputError(f"{name}: expected an int > 0, got {value!r}")
    return value


def _longllama(config: Any) -> dict[str, tuple[Any, str]]:
    """name -> (value, source) for the settings a LongLLaMA config fixes; {} for other configs."""
    if getattr(config, "mem_layers", None) is None:
        return {}
    found: dict[str, tuple[Any, str]] = {}
    if list(config.mem_layers):
        found["layers"] = (list(config.mem_layers), "config.mem_layers")
    if getattr(config, "max_position_embeddings", None) is not None:
        found["chunk_size"] = (config.max_position_embeddings, "config.max_position_embeddings")
    if getattr(config, "last_context_length", None) is not None:
        found["last_context_length"] = (config.last_context_length, "config.last_context_length")
    mem_dtype = getattr(config, "mem_dtype", None)
    if mem_dtype is not None:
        dtype = getattr(torch, str(mem_dtype), None)
        if not isinstance(dtype, torch.dtype):
            raise InvalidInputError(f"config.mem_dtype: expected a torch dtype name, got {mem_dtype!r}")
        found["dtype"] = (dtype, "config.mem_dtype")
    if getattr(config, "mem_positionals", True) is False:
        found["positions"] = (None, "config.mem_positionals")
    else:
        found["positions"] = ("first", "config.mem_positionals")
    return found


def resolve(config: Any, given: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Chosen values and their sources for ``attach``'s arguments ``given`` (None: not given)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    from_config = _longllama(text)
    defaults = {"layers": "all", "positions": "first", "chunk_size": DEFAULT_CHUNK, "last_context_length": 0}
    chosen: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, default in defaults.items():
        if given.get(name) is not None:
            chosen[name], sources[name] = given[name], "argument"
        elif name in from_config:
            chosen[name], sources[name] = from_config[name]
        else:
            chosen[name], sources[name] = default, "default"
    if chosen["positions"] is None:
        raise InvalidInputError(
            "config.mem_positionals=False (memory layers without RoPE, local attention included) is not "
            'supported by kvmem; pass positions="first", "none" or "absolute" to attach this model anyway'
        )
    if not isinstance(chosen["positions"], str) or chosen["positions"] not in POSITION_MODES:
        raise InvalidInputError(f"positions: expected one of {POSITION_MODES}, got {chosen['positions']!r}")
    check_k(given["k"])
    chosen["chunk_size"] = positive(chosen["chunk_size"], "chunk_size")
    last = chosen["last_context_length"]
    if isinstance(last, bool) or not isinstance(last, int) or not 0 <= last <= chosen["chunk_size"]:
        raise InvalidInputError(
            f"last_context_length: expected an int in [0, chunk_size={chosen['chunk_size']}], got {last!r}"
        )
    rolling = given.get("rolling")
    if rolling is None:
        chosen["rolling"], sources["rolling"] = chosen["positions"] != "absolute", "default"
    elif not isinstance(rolling, bool):
        raise InvalidInputError(f"rolling: expected True, False or None, got {rolling!r}")
    else:
        chosen["rolling"], sources["rolling"] = rolling, "argument"
    store_options = dict(given.get("store_options") or {})
    if "dtype" in store_options:
        sources["dtype"] = "argument"
    elif "dtype" in from_config:
        store_options["dtype"], sources["dtype"] = from_config["dtype"][0], from_config["dtype"][1]
    else:
        sources["dtype"] = "default (the model's key dtype)"
    chosen["store_options"] = store_options
    return chosen, sources


def choose_layers(layers: str | Sequence[int], modules: Mapping[int, Any]) -> list[int]:
    """The decoder layers ``layers`` names among ``modules`` (layer index -> attention module), sorted."""
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
