"""The three entry points: ``create``, ``load`` and ``backends``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from kvmem import devices, inputs, persist
from kvmem.config import StoreConfig
from kvmem.errors import CorruptStoreError, InvalidInputError, path_error
from kvmem.registry import BackendInfo, registry
from kvmem.store import MemoryStore

__all__ = ["create", "load", "backends"]


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
    dev = devices.resolve(device, backend, cls.devices)
    cls.check_options(config.options, dev)
    per_row, limit = inputs.row_bytes(config.dim, config.value_dim, config.dtype), inputs.byte_limit(dev)
    if per_row > limit:
        raise InvalidInputError(f"a row of dim={config.dim:,} and value_dim={config.value_dim:,} takes {per_row:,} "
                                f"bytes, over the limit of {limit:,} bytes for one call ({inputs.LIMIT_ENV})")
    inputs.check_rows(f"create({backend!r})", "partitions", config.partitions, 1, cls.partition_bytes(config), dev,
                      rows="partitions")
    path = None if path is None else inputs.path(path, "path")
    try:
        return cls._create(config, dev, path)
    except OSError as exc:                                     # the directory at path cannot be made
        raise path_error(exc, f"cannot create a {backend} store at {path}") from exc


def load(path: str | os.PathLike, device: Any = None) -> MemoryStore:
    """Open anything ``save`` wrote, or a store directory a persistent backend keeps in place.

    ``device=None`` restores a save on the device it was saved from (on the CPU,
    with a ``RuntimeWarning``, where this machine lacks it) and opens a store kept
    in place (``lmdb``) on the CPU; a device given wins.
    """
    path = inputs.path(path, "path")
    kept_in_place = in_place(path)
    if kept_in_place is not None:
        return kept_in_place._open_directory(path, devices.resolve(device, kept_in_place.backend,
                                                                    kept_in_place.devices))
    manifest, config = persist.read_manifest(path)
    cls = registry.resolve(manifest["backend"])
    if device is None:
        dev = devices.restore(manifest["device"], cls.backend, cls.devices)
    else:
        dev = devices.resolve(device, cls.backend, cls.devices)
    persist.verify_files(path, manifest)
    return cls._open_saved(_saved_config(cls, config, dev), path, manifest, dev)


def _saved_config(cls: type[MemoryStore], config: StoreConfig, device: torch.device) -> StoreConfig:
    """``config`` with the backend's options checked (a name it does not know is damage) and defaulted."""
    unknown = sorted(set(config.options) - set(cls.defaults))
    if unknown:
        raise CorruptStoreError(f"manifest.json: {cls.backend} has no option {unknown[0]!r}")
    config = dataclasses.replace(config, options={**cls.defaults, **config.options})
    try:
        cls.check_options(config.options, device)
    except InvalidInputError as exc:
        raise CorruptStoreError(f"manifest.json: {exc}") from None
    return config


def in_place(path: Path) -> type[MemoryStore] | None:
    """The persistent backend keeping a store in place at ``path`` (its marker file, no save manifest)."""
    try:
        if (path / persist.MANIFEST).exists():
            return None
        for name, spec in registry.specs.items():
            if spec.marker and (path / spec.marker).exists():
                return registry[name]
    except OSError as exc:
        raise path_error(exc, f"cannot open {path}") from exc
    return None


def backends() -> dict[str, BackendInfo]:
    """Every known backend, whether it can be used here, and if not why and what to install."""
    return registry.info()
