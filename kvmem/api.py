"""The three entry points: ``create``, ``load`` and ``backends``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kvmem import persist
from kvmem.config import StoreConfig
from kvmem.errors import InvalidInputError
from kvmem.registry import BackendInfo, registry
from kvmem.store import MemoryStore

__all__ = ["create", "load", "backends"]


def _device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(
            f"device must be a torch device or its name (e.g. 'cpu', 'cuda:0'); got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r} was asked for, but torch.cuda.is_available() is False")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"device must be a CPU or CUDA device; got {device!r}")
    return dev


def create(backend: str = "exact", *, dim: int, value_dim: int | None = None, partitions: int = 1,
           metric: str = "ip", dtype: Any = torch.float16, capacity: int | None = None,
           device: Any = None, path: str | os.PathLike | None = None, **options: Any) -> MemoryStore:
    """A new, empty store.

    ``value_dim`` defaults to ``dim``. ``options`` are the backend's own
    (``kvmem.registry.registry[backend].defaults`` lists them). ``path`` is for
    persistent backends (``lmdb``); in-RAM stores are written with ``save``.
    """
    cls = registry.resolve(backend)
    unknown = sorted(set(options) - set(cls.defaults))
    if unknown:
        accepted = ", ".join(sorted(cls.defaults)) or "none"
        raise InvalidInputError(f"{backend} accepts options ({accepted}); got {unknown[0]!r}")
    config = StoreConfig(dim=dim, value_dim=dim if value_dim is None else value_dim, partitions=partitions,
                         metric=metric, dtype=dtype, capacity=capacity, options={**cls.defaults, **options})
    dev = _device(device)
    cls.check_options(config.options, dev)
    return cls._create(config, dev, None if path is None else Path(path))


def load(path: str | os.PathLike, device: Any = None) -> MemoryStore:
    """Open anything ``save`` wrote, or a store directory a persistent backend keeps in place."""
    path = Path(path)
    dev = _device(device)
    if not (path / persist.MANIFEST).exists():
        for name, spec in registry.specs.items():
            if spec.marker and (path / spec.marker).exists():
                return registry[name]._open_directory(path, dev)
    manifest, config = persist.read_manifest(path)
    cls = registry.resolve(manifest["backend"])
    persist.verify_files(path, manifest)
    return cls._open_saved(config, path, manifest, dev)


def backends() -> dict[str, BackendInfo]:
    """Every known backend, whether it can be used here, and if not why and what to install."""
    return registry.info()
