"""Backend registry: name -> store class, imported on first use.

Built-in backends are listed below with the libraries they need and the pip
extra that installs them. Third-party packages add backends through the
entry-point group ``kvmem.backends``::

    [project.entry-points."kvmem.backends"]
    mystore = "mypackage.store:MyStore"     # a MemoryStore subclass

``registry`` is a read-only mapping; reading a name imports its module, and a
missing library raises :class:`BackendUnavailableError` saying what to install.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, Mapping
from importlib import metadata
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

from kvmem.errors import BackendUnavailableError, InvalidInputError

if TYPE_CHECKING:
    from kvmem.store import MemoryStore

__all__ = ["BackendSpec", "BackendInfo", "registry", "specs"]

ENTRY_POINT_GROUP = "kvmem.backends"


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str                     # "module:Class"
    requires: tuple[str, ...] = ()  # importable libraries it needs
    extra: str | None = None        # ``pip install "kvmem[extra]"`` installs them
    marker: str | None = None       # a file marking a directory this backend opens in place


class BackendInfo(NamedTuple):
    available: bool
    reason: str | None   # why not, and what to install


_BUILTIN = (
    BackendSpec("exact", "kvmem.stores.exact:ExactStore"),
    BackendSpec("ivf", "kvmem.stores.ivf:IVFStore", ("faiss",), "ivf"),
    BackendSpec("hnsw", "kvmem.stores.hnsw:HNSWStore", ("hnswlib",), "hnsw"),
    BackendSpec("lmdb", "kvmem.stores.lmdb:LMDBStore", ("lmdb", "msgpack"), "lmdb", marker="data.mdb"),
    BackendSpec("sharded", "kvmem.stores.sharded:ShardedStore", ("torch.distributed",)),
)


def _discover() -> dict[str, BackendSpec]:
    found = {spec.name: spec for spec in _BUILTIN}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, BackendSpec(ep.name, ep.value))
    return found


class _Registry(Mapping[str, "type[MemoryStore]"]):
    """Read-only mapping of backend name -> store class, imported lazily."""

    def __init__(self) -> None:
        self._specs: dict[str, BackendSpec] | None = None
        self._classes: dict[str, type[MemoryStore]] = {}

    @property
    def specs(self) -> Mapping[str, BackendSpec]:
        if self._specs is None:
            self._specs = _discover()
        return MappingProxyType(self._specs)

    def __getitem__(self, name: str) -> type[MemoryStore]:
        if name in self._classes:
            return self._classes[name]
        spec = self.specs.get(name) if isinstance(name, str) else None
        if spec is None:
            raise KeyError(name)
        for lib in spec.requires:
            try:
                importlib.import_module(lib)
            except ImportError as exc:
                hint = f'pip install "kvmem[{spec.extra}]"' if spec.extra else f"install {lib}"
                raise BackendUnavailableError(
                    f"backend {name!r} needs {lib}, which cannot be imported ({exc}); {hint}") from exc
        module, _, attr = spec.target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        self._classes[name] = cls
        return cls

    def resolve(self, name: str) -> type[MemoryStore]:
        """Like ``registry[name]`` but an unknown name raises InvalidInputError listing the known ones."""
        try:
            return self[name]
        except KeyError:
            raise InvalidInputError(f"backend must be one of {sorted(self.specs)}; got {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def info(self) -> dict[str, BackendInfo]:
        out = {}
        for name in self.specs:
            try:
                self[name]
                out[name] = BackendInfo(True, None)
            except (ImportError, AttributeError) as exc:
                out[name] = BackendInfo(False, str(exc))
        return out


registry = _Registry()


def specs() -> Mapping[str, BackendSpec]:
    return registry.specs
