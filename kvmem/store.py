"""The ``MemoryStore`` contract every backend implements.

The public methods live here, written once: they validate every argument
before anything changes, take the store's lock, plan id bookkeeping with
:class:`~kvmem.idbook.IdBook`, and call a handful of backend hooks
(``_write``, ``_delete``, ``_clear``, ``_search``, ``_rows``, ``_save_files``,
``_open_saved``). A backend declares what differs as class attributes and
properties (``backend``, ``exact``, ``search_params``, ``defaults``).

Every call's work on the book and the hooks runs inside ``_session(write)``,
where a backend shared between processes (``lmdb``) catches up with what
other processes committed; the in-RAM backends do nothing there.

Concurrency: searches and gets run concurrently with each other; ``add``,
``remove`` and ``clear`` take the write lock and run alone.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from kvmem import devices, inputs
from kvmem._lock import RWLock
from kvmem.config import StoreConfig, dtype_name
from kvmem.errors import InvalidInputError, KvmemError
from kvmem.idbook import AddPlan, IdBook, RemovePlan

__all__ = ["MemoryStore", "SearchResult"]


class SearchResult(NamedTuple):
    """What ``search`` returns, all on the queries' device."""

    scores: torch.Tensor  # (P, q, k) float32, best first; -inf where the partition holds fewer than k rows
    ids: torch.Tensor     # (P, q, k) int64; -1 there
    keys: torch.Tensor    # (P, q, k, dim) store dtype; zeros there
    values: torch.Tensor  # (P, q, k, value_dim) store dtype; zeros there


class MemoryStore(ABC):
    """A key-value memory of ``partitions`` independent parts, searched by similarity.

    Thread-safe: ``search``, ``get`` and ``count`` run concurrently;
    ``add``, ``remove``, ``clear`` and ``save`` take the lock and run alone
    (``save`` holds it shared: searches continue during a save).
    """

    backend: ClassVar[str] = ""
    search_params: ClassVar[frozenset[str]] = frozenset()   # names ``search`` accepts as ``**params``
    defaults: ClassVar[Mapping[str, Any]] = {}              # backend options ``create`` accepts, with defaults
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})  # device types the store can live on

    def __init__(self, config: StoreConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self._book = IdBook(config.partitions, config.capacity)
        self._lock = RWLock()
        self._closed = False

    # ------------------------------------------------------------------ description
    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def value_dim(self) -> int:
        return self.config.value_dim

    @property
    def partitions(self) -> int:
        return self.config.partitions

    @property
    def metric(self) -> str:
        return self.config.metric

    @property
    def dtype(self) -> torch.dtype:
        return self.config.dtype

    @property
    def capacity(self) -> int | None:
        return self.config.capacity

    @property
    def options(self) -> Mapping[str, Any]:
        return self.config.options

    @property
    @abstractmethod
    def exact(self) -> bool:
        """Whether ``search`` returns the true top-k (else: the index's best guess, exactly rescored)."""

    @property
    def persistent(self) -> bool:
        """Whether every change is on disk when the call returns."""
        return False

    @property
    def streams_rows(self) -> bool:
        """Whether :meth:`scan_rows` can visit every row (dense memory attention, ``k="all"``)."""
        return False

    def nbytes(self) -> int:
        """Bytes the store holds (RAM for in-memory backends, disk for persistent ones)."""
        return 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backend={self.backend!r}, dim={self.dim}, value_dim={self.value_dim}, "
                f"partitions={self.partitions}, metric={self.metric!r}, dtype={dtype_name(self.dtype)}, "
                f"capacity={self.capacity}, rows={len(self)})")

    # ------------------------------------------------------------------ public API
    def add(self, keys: Any, values: Any) -> torch.Tensor:
        """Append rows; returns their ids ``(P, n)`` int64 (``(n,)`` for 2-D input).

        Past ``capacity`` the oldest rows of a partition are evicted first.
        """
        self._check_open()
        keys, squeezed = inputs.vectors(keys, "keys", self.partitions, self.dim, "dim")
        values, _ = inputs.vectors(values, "values", self.partitions, self.value_dim, "value_dim",
                                   n=keys.shape[1])
        inputs.check_rows("add", "n", keys.shape[1], self.partitions, self._row_bytes, self.device)
        keys, values = self._rounded(keys, "keys"), self._rounded(values, "values")
        with self._lock.write(), self._session(write=True):
            plan = self._book.plan_add(keys.shape[1])
            kept = slice(keys.shape[1] - plan.keep, keys.shape[1])
            self._write(plan, keys[:, kept], values[:, kept])
            self._book.commit_add(plan)
            self._after_add()
        ids = torch.from_numpy(plan.ids)
        return ids[0] if squeezed else ids

    def search(self, queries: Any, k: int, **params: Any) -> SearchResult:
        """The top-``k`` rows of each query's partition; see :class:`SearchResult`.

        ``params`` are per call (``nprobe``, ``ef``, ...) and never change shared state.
        Runs with TF32 and reduced-precision reductions off (:func:`kvmem.devices.exact_matmuls`).
        """
        self._check_open()
        where = inputs.out_device(queries)
        queries, squeezed = inputs.vectors(queries, "queries", self.partitions, self.dim, "dim")
        k = inputs.check_k(k)
        P, q = queries.shape[:2]                                    # no queries: k as for one
        inputs.check_rows(f"search of [{P}, {q}] queries", "k", k, P * max(q, 1), self._row_bytes, self.device)
        params = self._check_params(params)
        queries = self._rounded(queries, "queries", torch.float32)
        if q == 0:                                                  # nothing to search: no backend sees it
            result = self._empty_result(k, where)
        else:
            with self._lock.read(), self._session(write=False), devices.exact_matmuls():
                found = self._search_rows(queries, k, params)
            result = SearchResult(*(t.to(where) for t in found))
        return SearchResult(*(t[0] for t in result)) if squeezed else result

    def observe(self, queries: Any) -> None:
        """Tell the store of queries ``(P, q, dim)`` it will be asked, without searching (a model's first
        chunk, before memory holds anything). Approximate stores add them to the sample their recall is
        calibrated on; the default does nothing. Raises InvalidInputError on bad queries."""
        self._check_open()
        inputs.vectors(queries, "queries", self.partitions, self.dim, "dim")

    def get(self, ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``(P, m, dim)`` and values ``(P, m, value_dim)`` of live ids ``(P, m)``; ``-1`` gives zeros."""
        self._check_open()
        ids, squeezed = inputs.ids_array(ids, "ids", self.partitions)
        inputs.check_rows("get", "m", ids.shape[1], self.partitions, self._row_bytes, self.device)
        if not ids.shape[1]:                                        # no ids: no backend sees it
            keys, values = (torch.empty(self.partitions, 0, width, dtype=self.dtype, device=self.device)
                            for width in (self.dim, self.value_dim))
        else:
            with self._lock.read(), self._session(write=False):
                slots = torch.from_numpy(self._book.slots_of(ids)).to(self.device)
                _, keys, values = self._rows(slots)
        return (keys[0], values[0]) if squeezed else (keys, values)

    def scan_rows(self, visit: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
                  block_rows: int = 4096) -> None:
        """Call ``visit(keys (P, n, dim), values (P, n, value_dim), held (P, n) bool)`` on every block of
        at most ``block_rows`` slots, in slot order, under the read lock; ``held`` is False where a
        partition holds no row (its keys and values there are zeros or stale). Tensors are on the
        store's device in the store dtype and valid only during the call (they may view the store).

        Only for stores whose :attr:`streams_rows` is True; others raise :class:`InvalidInputError`.
        """
        self._check_open()
        if not self.streams_rows:
            raise InvalidInputError(f"the {self.backend} backend cannot stream its rows (streams_rows is False); "
                                    "use exact or lmdb for dense memory attention")
        if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
            raise InvalidInputError(f"block_rows: expected an int >= 1, got {block_rows!r}")
        with self._lock.read(), self._session(write=False):
            counts = torch.as_tensor(self._book.counts, device=self.device)[:, None]           # (P, 1)
            for first, keys, values in self._row_blocks(block_rows):
                slots = torch.arange(first, first + keys.shape[1], device=self.device)[None, :]  # (1, n)
                visit(keys, values, slots < counts)

    def remove(self, ids: Any) -> None:
        """Delete live ids ``(P, m)``; ``-1`` entries are padding. Unknown ids raise and remove nothing."""
        self._check_open()
        ids, _ = inputs.ids_array(ids, "ids", self.partitions)
        with self._lock.write(), self._session(write=True):
            plan = self._book.plan_remove(ids)
            self._delete(plan)
            self._book.commit_remove(plan)

    def clear(self, partitions: int | Iterable[int] | None = None) -> None:
        """Delete every row of the given partitions (all when None); ids keep counting."""
        self._check_open()
        parts = inputs.partition_list(partitions, self.partitions)
        with self._lock.write(), self._session(write=True):
            self._clear(parts)
            self._book.clear(parts)

    def count(self, partition: int | None = None) -> int:
        """Rows held in one partition, or in all of them."""
        part = None if partition is None else inputs.partition_index(partition, self.partitions)
        with self._lock.read(), self._session(write=False):
            counts = self._book.counts
        return int(counts.sum() if part is None else counts[part])

    def __len__(self) -> int:
        return self.count()

    def save(self, path: str | os.PathLike) -> None:
        """Write the store to directory ``path`` atomically (see :mod:`kvmem.persist`)."""
        from kvmem import persist

        self._check_open()
        path = inputs.path(path, "save path")
        with self._lock.read(), self._session(write=False):
            persist.save(self, path)

    def close(self) -> None:
        """Release the store's resources; later calls raise. Idempotent."""
        self._closed = True

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ shared helpers
    def _check_open(self) -> None:
        if self._closed:
            raise KvmemError(f"the {self.backend} store is closed")

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - self.search_params)
        if unknown:
            accepted = ", ".join(sorted(self.search_params)) or "none"
            raise InvalidInputError(f"{self.backend} search accepts parameters ({accepted}); got {unknown[0]!r}")
        return params

    def _rounded(self, x: torch.Tensor, what: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x`` rounded to ``dtype`` (default: the storage dtype) on the store's device; overflow raises."""
        dtype = self.dtype if dtype is None else dtype
        out = x.to(device=self.device, dtype=dtype)
        if out.dtype != x.dtype:
            inputs.check_finite(out, f"{what} rounded to {dtype_name(dtype)}")
        return out

    @property
    def _row_bytes(self) -> int:
        return inputs.row_bytes(self.dim, self.value_dim, self.dtype)

    def _empty_result(self, k: int, device: torch.device) -> SearchResult:
        """The result of a search of no queries: ``(P, 0, k)``."""
        P = self.partitions
        return SearchResult(torch.empty(P, 0, k, device=device), torch.empty(P, 0, k, dtype=torch.int64, device=device),
                            torch.empty(P, 0, k, self.dim, dtype=self.dtype, device=device),
                            torch.empty(P, 0, k, self.value_dim, dtype=self.dtype, device=device))

    def _id_rows(self, plan: AddPlan) -> torch.Tensor:
        """Ids ``(P, keep)`` of the rows an add stores."""
        return torch.from_numpy(np.ascontiguousarray(plan.ids[:, plan.ids.shape[1] - plan.keep:]))

    # ------------------------------------------------------------------ backend hooks
    def _session(self, write: bool) -> contextlib.AbstractContextManager[None]:
        """Entered under the store's lock around each call's use of ``self._book`` and the hooks.

        ``write`` is True for ``add``/``remove``/``clear`` (write lock held). A
        backend whose rows can change in another process brings the book up to
        date here and holds the snapshot its hooks read; the default does nothing.
        """
        return contextlib.nullcontext()

    @abstractmethod
    def _write(self, plan: AddPlan, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the kept rows ``keys (P, keep, dim)`` at ``plan.slots`` and drop ``plan.evicted``."""

    def _after_add(self) -> None:
        """Maintenance once an add is committed (rows and ids in place), still under the write lock.

        Approximate backends train, retrain or calibrate their index here. Default: nothing.
        """
        return None

    @abstractmethod
    def _delete(self, plan: RemovePlan) -> None:
        """Drop ``plan.removed`` and apply ``plan.moves`` (from slots -> to slots)."""

    @abstractmethod
    def _clear(self, partitions: list[int]) -> None:
        """Drop every row of ``partitions``."""

    @abstractmethod
    def _search(self, queries: torch.Tensor, k: int, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact scores ``(P, q, k)`` float32 best first and slots ``(P, q, k)`` (``-1``: none)."""

    def _search_rows(self, queries: torch.Tensor, k: int,
                     params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores, ids, keys and values of the top-``k`` (see :class:`SearchResult`); default: ``_search``
        then ``_rows``. A backend that finds the rows with their ranks (``sharded``) answers in one step."""
        scores, slots = self._search(queries, k, params)
        return (scores, *self._rows(slots))

    @abstractmethod
    def _rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ids, keys and values at ``slots (P, *shape)``; ``-1`` slots give id -1 and zero rows."""

    def _row_blocks(self, rows: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(first slot, keys (P, n, dim), values (P, n, value_dim))`` over slots ``[0, max count)``,
        ``n <= rows``; for backends whose :attr:`streams_rows` is True."""
        raise NotImplementedError

    @abstractmethod
    def _save_files(self, directory: Path, tag: str) -> dict[str, str]:
        """Write the data files into ``directory`` (names containing ``tag``); return role -> file name."""

    @classmethod
    @abstractmethod
    def _open_saved(cls, config: StoreConfig, directory: Path, manifest: Mapping[str, Any],
                    device: torch.device) -> MemoryStore:
        """Rebuild a store from a validated save (files already checksummed)."""

    @classmethod
    def _create(cls, config: StoreConfig, device: torch.device, path: Path | None) -> MemoryStore:
        """A new store; persistent backends create their directory at ``path``."""
        if path is not None:
            raise InvalidInputError(f"{cls.backend} keeps its rows in RAM and takes no path; use save(path)")
        return cls(config, device)

    @classmethod
    def _open_directory(cls, path: Path, device: torch.device) -> MemoryStore:
        """Open a store kept in place at ``path`` (persistent backends only)."""
        raise InvalidInputError(f"{cls.backend} stores are opened from a save, not in place")

    @classmethod
    def _describe_directory(cls, path: Path) -> dict[str, Any]:
        """``kvmem info`` of a store kept in place (persistent backends only)."""
        raise InvalidInputError(f"{cls.backend} stores are described from a save, not in place")

    @classmethod
    def partition_bytes(cls, config: StoreConfig) -> int:
        """RAM an empty partition takes (bookkeeping, index): ``create`` refuses partitions that do not fit."""
        return 64 << 10

    @classmethod
    def check_options(cls, options: Mapping[str, Any], device: torch.device) -> None:
        """Validate backend option values (names are checked against ``defaults``); raise InvalidInputError."""
        return None
