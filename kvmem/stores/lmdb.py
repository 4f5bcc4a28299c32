"""``lmdb``: a durable memory on disk, searched exactly by streaming its keys from the memory map.

    store = kvmem.create("lmdb", path="memory", dim=128)   # creates the directory
    store.add(keys, values)                                # committed when it returns
    store = kvmem.load("memory")                           # reopens it, here or in another process

Rows live in blocks of ``block_rows`` rows per partition inside one LMDB
environment, with a ``state`` record (counts, next ids) rewritten in the same
transaction (format: :mod:`kvmem.stores._lmdb_format`). Every ``add``,
``remove``, ``clear`` and eviction is one transaction, committed before the
call returns: its rows survive a ``kill -9``, and a call that fails (a full
disk raises StoreFullError) wrote nothing. The store describes itself, so
``kvmem.load(path)`` needs nothing else; it checks every block's CRC-32.

Search is exact by default, with the ``exact`` backend's own code
(:func:`kvmem.topk.blocked_search`) over key blocks viewed in place in the
memory map inside one read transaction. With ``index=`` an approximate index
per partition is kept in files beside the data, caught up from LMDB on open
(:mod:`kvmem.stores._lmdb_index`); its candidates are rescored exactly.

Options:
    index: None (exact search), ``"hnsw"`` (hnswlib) or ``"ivf"`` (faiss IVF-Flat).
    M, ef_construction: the hnsw graph's degree and build beam (16; None: as the ``hnsw`` backend,
        500 for ip and 200 for l2 / cos).
    ef: hnsw search beam (default max(64, 2k)); nlist: ivf lists (default about 4 sqrt(N), trained
        at 32768 rows, or 39 per list when given); nprobe: ivf lists searched (default nlist/16, at least 16).
    block_rows: rows per block, a multiple of 16 (default 4096). Bigger blocks stream a little
        faster; smaller ones rewrite less when only a few rows are added at a time.
    ranking, block_elems: as for the ``exact`` backend.
    map_size: first size of the memory map in bytes; the map doubles whenever it is full.
    max_map_size: a ceiling for that growth (None: none); past it writes raise StoreFullError.

Search parameters: ``ef`` (hnsw) or ``nprobe`` (ivf), per call.

Concurrency: searches run together, writes alone (as every store). Across
processes: one writer and any number of readers; a call sees every row
committed before it began. An environment belongs to the process that opened
it: a store used after ``fork()`` raises; open it again in the child.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

from kvmem.config import StoreConfig
from kvmem.errors import CorruptStoreError, InvalidInputError, KvmemError, map_errors
from kvmem.idbook import AddPlan, IdBook, RemovePlan
from kvmem.store import MemoryStore
from kvmem.stores._lmdb_env import SharedEnv
from kvmem.stores._lmdb_format import COLUMNS, DATA_FILE, BlockLayout, check_data_file
from kvmem.stores._lmdb_index import AnnIndex, KeysOf
from kvmem.stores._lmdb_index import search as index_search
from kvmem.stores._lmdb_rows import BlockKeys, Rows, gather_columns, row_columns
from kvmem.stores._lmdb_state import FORMAT_KEY, STATE_KEY, State, format_record, read_config
from kvmem.topk import blocked_search, rank_dtype_for

__all__ = ["LMDBStore"]

_RANKINGS = ("auto", "bf16", "fp32")
_INDEXES = (None, "hnsw", "ivf")


def _int_option(options: Mapping[str, Any], name: str, low: int, *, none: bool = False, multiple: int = 1) -> None:
    value = options[name]
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value % multiple:
        want = f"an int >= {low}" + (f", a multiple of {multiple}" if multiple > 1 else "")
        want += " or None" if none else ""
        raise InvalidInputError(f"lmdb option {name} must be {want}; got {value!r}")


class LMDBStore(MemoryStore):
    """A store kept in place in directory ``path``; see the module docstring."""

    backend = "lmdb"
    defaults = {"index": None, "block_rows": 4096, "ranking": "auto", "block_elems": None,
                "map_size": 1 << 28, "max_map_size": None,
                "M": 16, "ef_construction": None, "ef": None, "nlist": None, "nprobe": None}

    def __init__(self, config: StoreConfig, device: torch.device, path: Path, shared: SharedEnv,
                 state: State, ids: list[np.ndarray]) -> None:
        self._local = threading.local()     # per thread, inside a call: the snapshot its hooks read
        super().__init__(config, device)
        self.path = path
        self._shared = shared
        self._layout = BlockLayout(config.dim, config.value_dim, config.dtype, config.options["block_rows"])
        self._sync = threading.Lock()
        self._temporary: Path | None = None   # a working copy of a save, removed on close
        self._index = AnnIndex(config) if config.options["index"] else None
        self._adopt(state, ids)

    # ------------------------------------------------------------------ description
    @property
    def exact(self) -> bool:
        return self.options["index"] is None

    @property
    def search_params(self) -> frozenset[str]:   # type: ignore[override]
        return frozenset() if self._index is None else frozenset({self._index.param})

    @property
    def persistent(self) -> bool:
        return self._temporary is None

    @property
    def streams_rows(self) -> bool:
        return True

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file() and f.name != "lock.mdb")

    @classmethod
    def partition_bytes(cls, config: StoreConfig) -> int:
        if config.options["index"] != "hnsw":
            return super().partition_bytes(config)
        from kvmem.stores.hnsw import first_graph_bytes

        return first_graph_bytes(config.dim, config.options["M"], config.capacity) + super().partition_bytes(config)

    @classmethod
    def check_options(cls, options: Mapping[str, Any], device: torch.device | None) -> None:
        if options["index"] not in _INDEXES:
            raise InvalidInputError(f"lmdb option index must be one of {_INDEXES}; got {options['index']!r}")
        if options["ranking"] not in _RANKINGS:
            raise InvalidInputError(f"lmdb option ranking must be one of {_RANKINGS}; got {options['ranking']!r}")
        _int_option(options, "block_rows", 16, multiple=16)
        _int_option(options, "block_elems", 1024, none=True)
        _int_option(options, "map_size", 1 << 20)
        _int_option(options, "max_map_size", options["map_size"], none=True)
        _int_option(options, "M", 2)
        _int_option(options, "ef_construction", 1, none=True)
        for name in ("ef", "nlist", "nprobe"):
            _int_option(options, name, 1, none=True)

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        for name, value in params.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"lmdb search parameter {name} must be a positive int; got {value!r}")
        return params

    # ------------------------------------------------------------------ the book of the calling thread
    @property
    def _book(self) -> IdBook:
        """Inside a call: the book of the thread's snapshot. Outside: the latest one."""
        book = getattr(self._local, "book", None)
        return self._latest if book is None else book

    @_book.setter
    def _book(self, book: IdBook) -> None:
        self._latest = book

    def _adopt(self, state: State, ids: list[np.ndarray]) -> None:
        """Make ``state`` (and the ``ids`` in slot order it holds) the latest book."""
        book = IdBook(self.partitions, self.capacity)
        try:
            book.restore(state.next_ids, ids)
        except ValueError as exc:
            raise CorruptStoreError(f"lmdb store at {self.path}: ids: {exc}") from None
        self._latest, self._state = book, state

    @contextlib.contextmanager
    def _session(self, write: bool) -> Iterator[None]:
        """Catch up with what other processes committed; a reading call keeps that snapshot open."""
        if self._closed:                       # only count() and repr get here: the last book will do
            yield
            return
        self._shared.check_process()           # before any lock: one held at fork() would never be released
        with contextlib.ExitStack() as stack:
            with self._sync:
                txn = stack.enter_context(self._shared.begin())
                state = State.read(txn, self._shared.meta, self.config)
                if state.seq != self._state.seq:
                    before = self._latest
                    self._adopt(state, Rows(txn, self._shared.blocks, self._layout).scan(state.counts, verify=False))
                    if self._index is not None:
                        self._index.follow(Rows(txn, self._shared.blocks, self._layout), before, self._latest)
                elif self._index is not None and self._index.stale:
                    self._index.follow(Rows(txn, self._shared.blocks, self._layout), None, self._latest)
                book, state = self._latest, self._state
                if self._index is not None and not write:
                    stack.enter_context(self._index.lock.read())   # no catching up while this call searches
            if write:
                stack.close()                  # the write hooks open their own transaction
                txn = None
            self._local.book, self._local.txn, self._local.state = book, txn, state
            try:
                yield
            finally:
                self._local.book = self._local.txn = self._local.state = None
            if write and self._index is not None and self._index.due(int(self._state.counts.sum())):
                self._index_save(warn=True)         # the change is committed: a failed write only warns

    # ------------------------------------------------------------------ create / open / close
    @classmethod
    def _create(cls, config: StoreConfig, device: torch.device, path: Path | None) -> LMDBStore:
        if path is None:
            raise InvalidInputError("lmdb keeps its rows on disk: create it with path=DIR (a new or empty directory)")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            hint = "; it holds an lmdb store: open it with kvmem.load(path)" if (path / DATA_FILE).exists() else ""
            raise InvalidInputError(f"lmdb path must be a new or empty directory; got {str(path)!r}{hint}")
        made = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        try:
            with map_errors(f"creating the lmdb store at {path}"):
                shared = SharedEnv.acquire(path, config.options["map_size"], create=True)
                state = State.empty(config.partitions)
                try:
                    with shared.begin(write=True) as txn:
                        txn.put(FORMAT_KEY, format_record(config), db=shared.meta)
                        txn.put(STATE_KEY, state.record(), db=shared.meta)
                        txn.commit()
                    return cls(config, device, path, shared, state, [np.empty(0, np.int64)] * config.partitions)
                except BaseException:
                    shared.release()
                    raise
        except BaseException:
            for name in (DATA_FILE, "lock.mdb"):
                (path / name).unlink(missing_ok=True)
            if made:
                path.rmdir()
            raise

    @classmethod
    def _open_directory(cls, path: Path, device: torch.device) -> LMDBStore:
        with map_errors(f"opening the lmdb store at {path}", corrupt=True):
            check_data_file(path)
            size = (path / DATA_FILE).stat().st_size
            shared = SharedEnv.acquire(path, max(cls.defaults["map_size"], 2 * size))
            try:
                with shared.begin() as txn:
                    config, _ = read_config(txn, shared.meta)
                    state = State.read(txn, shared.meta, config)
                    layout = BlockLayout(config.dim, config.value_dim, config.dtype, config.options["block_rows"])
                    ids = Rows(txn, shared.blocks, layout).scan(state.counts, verify=True)
                    store = cls(config, device, path, shared, state, ids)
                    if store._index is not None:
                        store._index = AnnIndex.open(path, config, state.seq, Rows(txn, shared.blocks, layout),
                                                     store._latest)
                return store
            except BaseException:
                shared.release()
                raise

    @classmethod
    def _describe_directory(cls, path: Path) -> dict[str, Any]:
        """``kvmem info``: what the meta records say (the blocks are not read)."""
        with map_errors(f"describing the lmdb store at {path}", corrupt=True):
            check_data_file(path)
            shared = SharedEnv.acquire(path, max(cls.defaults["map_size"], 2 * (path / DATA_FILE).stat().st_size))
            try:
                with shared.begin() as txn:
                    config, record = read_config(txn, shared.meta)
                    state = State.read(txn, shared.meta, config)
            finally:
                shared.release()
        return {"path": str(path), "backend": cls.backend, **config.to_dict(), "rows": int(state.counts.sum()),
                "counts": state.counts.tolist(), "next_ids": state.next_ids.tolist(),
                "format_version": record["format_version"], "kvmem_version": record.get("kvmem_version"),
                "bytes_on_disk": sum(f.stat().st_size for f in path.iterdir() if f.is_file())}

    def close(self) -> None:
        """Close the environment (once no other store of this process shares it). Idempotent."""
        with self._lock.write():
            if self._closed:
                return
            if self._index is not None and self._index.changed and self._shared.pid == os.getpid():
                self._index_save(warn=True)
            super().close()
            self._shared.release()
            if self._temporary is not None and self._shared.pid == os.getpid():
                shutil.rmtree(self._temporary, ignore_errors=True)

    # ------------------------------------------------------------------ writing
    def _commit(self, what: str, change: Callable[[Rows, State], State], size_hint: int = 0) -> None:
        """Run ``change(rows, state) -> new state`` in one write transaction and commit it.

        A full map grows and the transaction runs again; a full disk raises
        StoreFullError. Either way nothing is half-written: LMDB commits all or nothing.
        """
        shared, ceiling = self._shared, self.options["max_map_size"]
        shared.reserve(size_hint, ceiling)
        with map_errors(f"lmdb {what}"):
            while True:
                with shared.begin(write=True) as txn:
                    try:
                        state = State.read(txn, shared.meta, self.config)
                        if state.seq != self._state.seq:
                            raise KvmemError(
                                f"lmdb {what}: another process wrote to {self.path} during this call; nothing "
                                f"was written (one writer at a time; retry to write on top of its rows)")
                        new = change(Rows(txn, shared.blocks, self._layout), state)
                        txn.put(STATE_KEY, new.record(), db=shared.meta)
                        txn.commit()
                        break
                    except lmdb.MapFullError:
                        pass
                shared.grow(ceiling, f"lmdb {what}")
        self._state = new

    def _write(self, plan: AddPlan, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = plan.ids.shape[1]
        if n == 0:
            return
        ids = self._id_rows(plan).numpy()
        before = self._state.counts
        after = before + plan.keep - np.array([len(e) for e in plan.evicted])
        columns = [row_columns(keys[p], values[p], ids[p]) for p in range(self.partitions)]
        top = np.array([float(c["sqnorm"].max(initial=0)) for c in columns]) * (1 + 2**-20)   # a bound, rounding up

        def change(rows: Rows, state: State) -> State:
            for p, cols in enumerate(columns):
                rows.rewrite(p, int(before[p]), int(after[p]), plan.slots[p], cols)
            return state.after(counts=after, next_ids=state.next_ids + n,
                               max_sqnorm=np.maximum(state.max_sqnorm, top))

        self._commit("add", change, size_hint=plan.keep * self.partitions * self._layout.nbytes(1))
        if self._index is not None:
            kept = [keys[p].float().cpu().numpy() for p in range(self.partitions)]
            self._index_update([ids[p] for p in range(self.partitions)], plan.evicted, after,
                               lambda p, ids: (ids, kept[p]))

    def _delete(self, plan: RemovePlan) -> None:
        gone = np.array([len(r) for r in plan.removed])
        if not gone.any():
            return
        before = self._state.counts

        def change(rows: Rows, state: State) -> State:
            for p, (src, dst) in enumerate(plan.moves):
                if gone[p]:
                    moved = rows.gather(p, int(before[p]), src, COLUMNS)    # copies, read before any put
                    rows.rewrite(p, int(before[p]), int(before[p] - gone[p]), dst, moved)
            return state.after(counts=before - gone)

        self._commit("remove", change)
        if self._index is not None:
            self._index_update([np.empty(0, np.int64)] * self.partitions, plan.removed, before - gone)

    def _clear(self, partitions: list[int]) -> None:
        before = self._state.counts
        if not before[partitions].any():
            return

        def change(rows: Rows, state: State) -> State:
            counts, top = state.counts.copy(), state.max_sqnorm.copy()
            for p in partitions:
                rows.drop(p, int(before[p]))
            counts[partitions], top[partitions] = 0, 0.0
            return state.after(counts=counts, max_sqnorm=top)

        self._commit("clear", change)
        if self._index is not None:
            self._index.clear(partitions, int(before[partitions].sum()))

    # ------------------------------------------------------------------ reading (inside a session)
    def _rows_here(self) -> Rows:
        return Rows(self._local.txn, self._shared.blocks, self._layout)

    def _search(self, queries: torch.Tensor, k: int, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        state = self._local.state
        if self._index is not None and not self._index.stale:
            value = params.get(self._index.param, self.options[self._index.param])
            return index_search(self._index, self._rows_here(), self._local.book, state.counts, state.max_sqnorm,
                                queries, k, value, self.metric)
        source = BlockKeys(self._rows_here(), state.counts, state.max_sqnorm, self.device)
        rank = rank_dtype_for(self.options["ranking"], queries.shape[1], self.dtype, self.metric, self.device)
        return blocked_search(source, queries, k, self.metric, rank_dtype=rank,
                              block_elems=self.options["block_elems"])

    def _row_blocks(self, rows: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for first, keys, values in self._rows_here().stream(self._local.state.counts, rows):
            yield first, keys.to(self.device), values.to(self.device)

    def _rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        found = gather_columns(self._rows_here(), self._local.state.counts, slots, ("ids", "keys", "values"))
        return tuple(found[name].to(self.device) for name in ("ids", "keys", "values"))

    # ------------------------------------------------------------------ the index beside the data
    def _index_update(self, added: list[np.ndarray], removed: list[np.ndarray], counts: np.ndarray,
                      keys: KeysOf | None = None) -> None:
        """Bring the index along with a change LMDB has just committed (its failure cannot undo that)."""
        def every_row(p: int, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            with self._shared.begin() as txn:                           # after the commit: the new rows
                rows = Rows(txn, self._shared.blocks, self._layout)
                return rows.ids(p, int(counts[p])), rows.keys32(p, int(counts[p]))

        try:
            self._index.update(added, lambda p, ids: every_row(p, ids) if ids is None or keys is None
                               else keys(p, ids), removed, counts)
        except KvmemError as exc:
            self._index.stale = True
            warnings.warn(f"lmdb index at {self.path} failed to follow a committed change ({exc}); searching "
                          f"exactly until it is rebuilt", RuntimeWarning, stacklevel=4)

    def _index_save(self, warn: bool = False) -> None:
        try:
            self._index.save(self.path, self._state.seq,
                             [self._latest.ids_in_slots(p) for p in range(self.partitions)])
        except (OSError, KvmemError) as exc:
            if not warn:
                raise
            warnings.warn(f"lmdb index at {self.path} was not written ({exc}); it is rebuilt from LMDB on open",
                          RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ save() to another place
    def _save_files(self, directory: Path, tag: str) -> dict[str, str]:
        name = f"data.{tag}.mdb"
        with open(directory / name, "wb") as f:
            self._shared.env.copyfd(f.fileno(), compact=True, txn=self._local.txn)
        return {"lmdb": name}

    @classmethod
    def _open_saved(cls, config: StoreConfig, directory: Path, manifest: Mapping[str, Any],
                    device: torch.device) -> LMDBStore:
        """A working copy of the save in a new temporary directory, removed on close (``persistent`` is False)."""
        entry = manifest["files"].get("lmdb")
        if entry is None:
            raise CorruptStoreError(f"{directory}: the manifest names no lmdb file")
        work = Path(tempfile.mkdtemp(prefix="kvmem-lmdb-"))
        try:
            shutil.copyfile(directory / entry["name"], work / DATA_FILE)
            store = cls._open_directory(work, device)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        store._temporary = work
        weakref.finalize(store, shutil.rmtree, work, True)      # also if the store is never closed
        if store.config != config or store._state.counts.tolist() != manifest["counts"] \
                or store._state.next_ids.tolist() != manifest["next_ids"]:
            store.close()
            raise CorruptStoreError(f"{directory}: the lmdb file does not match the manifest")
        return store
