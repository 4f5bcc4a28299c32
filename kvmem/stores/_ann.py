"""What the approximate backends (``ivf``, ``hnsw``) share: written once here.

- One index per partition (a :class:`PartIndex`), labelled with kvmem ids.
  Partitions are searched and written from one process-wide thread pool; faiss
  and hnswlib release the GIL, and each task is told how many threads of its
  own it may use, so P partitions never start P x cores threads.
- A partition without a usable index (``ivf`` before training, or after a
  library error) is searched exactly with :func:`kvmem.topk.blocked_search`
  over its stored keys.
- Candidates are rescored exactly from the stored keys, so index
  approximations (SQ, PQ, graph search) never reach the scores. The keys
  gathered for that are the ones ``search`` returns (kept per thread between
  ``_search`` and ``_rows``), so the key column is read once per search.
- ``target_recall``: the per-call knob (``nprobe``, ``ef``) is calibrated per
  partition on a sample of its stored keys against exact search
  (:mod:`kvmem.stores._calibrate`) after each (re)build of the index and
  whenever the rows added since the last calibration reach a quarter of the
  rows held then (every 1.25x of a growing memory, every quarter turnover of
  a FIFO one): recall at a fixed knob falls as a memory grows (an ef
  calibrated at 16k rows gave 0.005 less recall at 20k), so between
  calibrations it can sag by a few thousandths; :meth:`AnnStore.calibrate`
  recalibrates at once (after a bulk load, say). Over a growing memory's life
  automatic calibration costs about 5 calibrations at its final size.
  A partition whose index cannot reach the target within the knob's range
  (capped where the index stops beating exact search) is searched exactly,
  with a ``RuntimeWarning``, until a recalibration reaches it; a knob given
  per call or fixed by option always searches the index.
- Around a search, this thread's torch ops run on one thread
  (:func:`torch_threads`), the index library's search, and the exact search
  of partitions without a usable index, on all of them:
  torch's OpenMP workers spin for milliseconds after a parallel op and fight
  the library's threads for the cores (a 500-query hnswlib search took 1.4x
  as long right after a parallel torch op on a 2-core machine). The ops
  around an index search are small.
- Persistence: the native index files plus ``ann.<tag>.json`` (per-partition
  state and calibration), all checksummed by :mod:`kvmem.persist`.

Thread-safe with other search calls; add, remove and clear take the write lock
(and so does the maintenance an add triggers: training, calibration).
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch

from kvmem.config import StoreConfig
from kvmem.errors import CorruptStoreError, InvalidInputError
from kvmem.store import SearchResult
from kvmem.stores._calibrate import Calibration, K, calibrate
from kvmem.stores.exact import TableKeys, sqnorm_column, sqnorm_rows
from kvmem.tablestore import TableStore
from kvmem.topk import NEG_INF, blocked_search, exact_scores, rank_dtype_for

__all__ = ["AnnStore", "PartIndex", "parallel", "check_int", "check_recall", "read_meta"]

T = TypeVar("T")
DEFAULT_TARGET = 0.95       # recall@32 aimed at when the user fixes neither the knob nor target_recall
RECALIBRATE_AFTER = 0.25    # rows added since the last calibration, as a fraction of the rows held then
_META_LIMIT = 16 << 20      # bytes; the state file is a few KB per thousand partitions
_RESCORE_CHUNK = 1 << 18    # key elements (1 MB of float32) per rescoring task, at least

# ---------------------------------------------------------------------------------------------- threads
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _shared_pool() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():   # a forked child gets a pool of its own
            _pool = ThreadPoolExecutor(max_workers=cpus(), thread_name_prefix="kvmem-ann")
            _pool_pid = os.getpid()
        return _pool


def parallel(fn: Callable[[int, int], T], items: list[int]) -> list[T]:
    """``[fn(item, threads) for item in items]``, run in the shared pool when there are several.

    ``threads`` is how many threads ``fn`` may use itself: 0 (the library's
    default, every core) for a single item, else ``cores // len(items)``.
    """
    if len(items) <= 1:
        return [fn(item, 0) for item in items]
    threads = max(1, cpus() // len(items))
    return list(_shared_pool().map(lambda item: fn(item, threads), items))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run this thread's torch CPU ops (and OpenMP regions, faiss's too) on ``n`` threads inside.

    The count is per thread (OpenMP's ``nthreads-var``), so other threads are not affected.
    """
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- validation
def check_int(backend: str, name: str, value: Any, *, low: int = 1, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise InvalidInputError(f"{backend} option {name} must be an int >= {low}"
                                f"{' or None' if allow_none else ''}; got {value!r}")


def check_recall(backend: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) <= 1:
        raise InvalidInputError(f"{backend} option target_recall must be a number in (0, 1] or None; got {value!r}")


def read_meta(path: Path, backend: str, partitions: int) -> list[dict[str, Any]]:
    """The per-partition states of ``ann.<tag>.json``; raises CorruptStoreError when malformed."""
    if path.stat().st_size > _META_LIMIT:
        raise CorruptStoreError(f"{path.name} is over the {_META_LIMIT}-byte limit")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptStoreError(f"{path.name} is not valid JSON: {exc}") from None
    ok = (isinstance(meta, dict) and meta.get("backend") == backend and isinstance(meta.get("partitions"), list)
          and len(meta["partitions"]) == partitions and all(isinstance(p, dict) for p in meta["partitions"]))
    if not ok:
        raise CorruptStoreError(f"{path.name} must describe {partitions} {backend} partitions")
    return meta["partitions"]


def meta_int(state: Mapping[str, Any], name: str, low: int = 0, high: int | None = None) -> int:
    value = state.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise CorruptStoreError(f"index state: {name} must be an int in [{low}, {high}]; got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------- indexes
class PartIndex(Protocol):
    """The index of one partition. Not thread-safe for writes: the store's lock serialises them."""

    @property
    def indexed(self) -> bool:
        """Whether :meth:`search` can answer (else the partition is searched exactly)."""

    def add(self, ids: np.ndarray, keys: np.ndarray, threads: int) -> None:
        """Index ``keys (n, dim)`` float32 (as stored) under ``ids (n,)``."""

    def remove(self, ids: np.ndarray) -> None:
        """Unindex ``ids`` (all present)."""

    def search(self, queries: np.ndarray, k: int, value: int, threads: int) -> np.ndarray | None:
        """Candidate ids ``(q, c)`` int64 (``-1`` pads) of ``queries (q, dim)`` at knob ``value``.

        None: the library could not answer (search this partition exactly).
        """

    def nbytes(self) -> int:
        """Bytes the index holds in RAM (approximately)."""


class AnnStore(TableStore):
    """An in-RAM store ranked by one approximate index per partition; see the module docstring.

    Subclasses set ``param`` (the per-call knob) and implement the ``_part_*`` hooks.
    """

    param: ClassVar[str] = ""
    floor: ClassVar[int] = 1        # smallest knob value calibration tries

    def __init__(self, config: StoreConfig, device: torch.device) -> None:
        if device.type != "cpu":
            raise InvalidInputError(f"{self.backend} keeps its index in RAM; device must be 'cpu'; got {device}")
        super().__init__(config, device)
        self._parts = [self._new_part(p) for p in range(config.partitions)]
        self._calibrations: list[Calibration | None] = [None] * config.partitions
        self._added = np.zeros(config.partitions, np.int64)    # rows added since the last calibration
        self._last = threading.local()                           # this thread's last (best slots, their keys)

    @property
    def exact(self) -> bool:
        return False

    def search(self, queries: Any, k: int, **params: Any) -> SearchResult:
        self._last.threads = torch.get_num_threads()          # what the index library's search gets back
        with torch_threads(1):
            return super().search(queries, k, **params)

    def _caller_threads(self) -> int:
        """The torch threads of this search's caller (:meth:`search` runs the small ops on one)."""
        return getattr(self._last, "threads", torch.get_num_threads())

    @property
    def target_recall(self) -> float | None:
        """The recall@32 calibration aims for; None when the knob is fixed by an option."""
        if self.options["target_recall"] is not None:
            return float(self.options["target_recall"])
        return None if self.options[self.param] is not None else DEFAULT_TARGET

    def calibration(self) -> list[Calibration | None]:
        """Per partition, the last calibration (knob value, recall measured on the sample, rows then)."""
        return list(self._calibrations)

    def calibrate(self) -> list[Calibration | None]:
        """Calibrate every indexed partition now to ``target_recall``; takes the write lock.

        Raises InvalidInputError when the knob is fixed by an option (no target to calibrate for).
        """
        self._check_open()
        target = self.target_recall
        if target is None:
            raise InvalidInputError(f"{self.backend} has a fixed {self.param}={self.options[self.param]}; "
                                    "create it with target_recall to calibrate")
        with self._lock.write():
            self._recalibrate([p for p in range(self.partitions)
                               if self._parts[p].indexed and self._book.counts[p] >= 2], target)
        return self.calibration()

    def _recalibrate(self, partitions: list[int], target: float) -> None:
        """Calibrate ``partitions``; warn about those whose index newly falls short of the target."""
        short = []
        for p in partitions:
            last = self._calibrations[p]
            self._calibrations[p] = cal = calibrate(self, p, target, *self._value_range(p))
            self._added[p] = 0
            if cal.exact and (last is None or not last.exact):
                short.append(f"{p} ({cal.recall:.3f} at {self.param} {cal.value})")
        if short:
            warnings.warn(f"{self.backend}: the index cannot reach recall@{K} {target} within the {self.param} "
                          f"range where it beats exact search; partition (best recall) {', '.join(short[:8])}"
                          f"{' ...' if len(short) > 8 else ''} is searched exactly until a recalibration reaches "
                          f"it. Lower target_recall, or fix {self.param}, to search the index.",
                          RuntimeWarning, stacklevel=4)

    def _extra_columns(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return sqnorm_column()                                  # for exact search, as the exact backend's

    def _extra_rows(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        return sqnorm_rows(keys)

    # ------------------------------------------------------------------ backend hooks
    def _new_part(self, partition: int) -> PartIndex:
        raise NotImplementedError

    def _maintain(self, partition: int) -> bool:
        """(Re)build the partition's index if its policy says so; True when it was rebuilt."""
        return False

    def _default_value(self, partition: int) -> int:
        """The knob when neither the call, the options nor a calibration set it."""
        raise NotImplementedError

    def _value_range(self, partition: int) -> tuple[int, int]:
        """Smallest and largest knob value calibration may choose."""
        raise NotImplementedError

    # ------------------------------------------------------------------ knob
    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        value = params.get(self.param)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise InvalidInputError(f"{self.backend} search parameter {self.param} must be a positive int; "
                                    f"got {value!r}")
        return params

    def _value(self, partition: int, params: Mapping[str, Any]) -> int:
        """The knob for one partition: this call's, else the option's, else the calibrated one."""
        for value in (params.get(self.param), self.options[self.param]):
            if value is not None:
                return int(value)
        cal = self._calibrations[partition]
        return cal.value if cal is not None else self._default_value(partition)

    def _ranks(self, partition: int, params: Mapping[str, Any]) -> bool:
        """Whether the partition's index ranks this search (else it is searched exactly): it has one,
        and a knob is given (call or option) or its calibration reached the target."""
        if not self._parts[partition].indexed:
            return False
        cal = self._calibrations[partition]
        knob = params.get(self.param) is not None or self.options[self.param] is not None
        return knob or cal is None or not cal.exact

    # ------------------------------------------------------------------ TableStore index hooks
    def _index_add(self, ids: np.ndarray, keys: torch.Tensor, evicted: list[np.ndarray]) -> None:
        keys32 = keys.float().numpy()                                                   # (P, n, dim)

        def write(p: int, threads: int) -> None:
            if len(evicted[p]):
                self._parts[p].remove(evicted[p])
            if ids.shape[1]:
                self._parts[p].add(ids[p], keys32[p], threads)

        parallel(write, list(range(self.partitions)))
        self._added += ids.shape[1]

    def _index_remove(self, removed: list[np.ndarray]) -> None:
        for p, gone in enumerate(removed):
            if len(gone):
                self._parts[p].remove(gone)

    def _index_clear(self, partitions: list[int]) -> None:
        for p in partitions:
            self._parts[p] = self._new_part(p)
            self._calibrations[p] = None
            self._added[p] = 0

    def _after_add(self) -> None:
        target = self.target_recall
        counts = self._book.counts
        due = []
        for p in range(self.partitions):
            rebuilt = self._maintain(p)
            if target is None or not self._parts[p].indexed or counts[p] < 2:
                continue
            last = self._calibrations[p]
            if rebuilt or last is None or self._added[p] >= RECALIBRATE_AFTER * last.rows:
                due.append(p)
        if due:
            self._recalibrate(due, target)

    def _index_nbytes(self) -> int:
        return sum(part.nbytes() for part in self._parts)

    # ------------------------------------------------------------------ search
    def _search(self, queries: torch.Tensor, k: int, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        P, q, _ = queries.shape
        counts = self._book.counts
        held = [p for p in range(P) if counts[p] and q]
        ranked = [p for p in held if self._ranks(p, params)]
        q32 = queries.numpy()                                                           # (P, q, dim)
        with torch_threads(self._caller_threads()):
            found = parallel(lambda p, threads: self._parts[p].search(q32[p], k, self._value(p, params), threads),
                             ranked)
        width = max([k, *(f.shape[1] for f in found if f is not None)])
        ids = np.full((P, q, width), -1, np.int64)                                      # (P, q, c)
        for p, f in zip(ranked, found):
            if f is not None:
                ids[p, :, :f.shape[1]] = f
        slots = torch.from_numpy(self._book.slots_of(ids.reshape(P, q * width)).reshape(P, q, width))
        exact = [p for p in held if p not in ranked] + [p for p, f in zip(ranked, found) if f is None]
        if exact:
            with torch_threads(self._caller_threads()):                                # as the exact backend
                slots[exact, :, :k] = self.exact_slots(queries[exact], exact, k)
        scores, best, keys = self._rescore_keys(queries, slots, k)
        self._last.result = (best, keys)
        return scores, best

    def _rescore_keys(self, queries: torch.Tensor, slots: torch.Tensor,
                      k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact scores ``(P, q, k)`` of candidate ``slots (P, q, c)``, best first, the best slots
        (``-1`` padded) and their keys ``(P, q, k, dim)``.

        Each query's candidates are gathered (straight into the result when there are k), scored and
        ranked in one pass over chunks of queries, and only the queries whose order changed are
        reordered. The chunks are spread over the shared pool: pool threads, not torch's OpenMP
        workers, whose spinning would slow the index library's next search.
        """
        P, q, c = slots.shape
        if c < k:
            slots = torch.cat([slots, slots.new_full((P, q, k - c), -1)], -1)
            c = k
        col = self._table.data["keys"]                                                 # (P, S, dim)
        S, dim = col.shape[1], col.shape[2]
        rows = slots.reshape(P * q, c)
        where = self._table.flat_rows(slots).reshape(P * q, c)                          # rows of flat
        flat, qs = self._table.flat("keys"), queries.reshape(P * q, dim)
        if not S:                                                   # no row reserved yet: all candidates are -1
            flat, where = torch.zeros(1, dim, dtype=col.dtype), torch.zeros_like(rows)
        scores, best = torch.empty(P * q, k), torch.empty(P * q, k, dtype=torch.int64)
        keys = torch.empty(P * q, k, dim, dtype=col.dtype)

        def chunk(lo: int, hi: int) -> None:
            with torch_threads(1):
                n = hi - lo
                got = keys[lo:hi] if c == k else torch.empty(n, c, dim, dtype=col.dtype)   # k candidates: in place
                torch.index_select(flat, 0, where[lo:hi].reshape(-1), out=got.view(-1, dim))
                missing = rows[lo:hi] < 0
                part = exact_scores(qs[None, lo:hi], got[None], self.metric)[0].masked_fill(missing, NEG_INF)
                top, order = part.topk(k, -1)                                          # (n, k)
                scores[lo:hi] = top
                best[lo:hi] = rows[lo:hi].gather(-1, order).masked_fill(top == NEG_INF, -1)
                if c > k:
                    pick = (order + torch.arange(n)[:, None] * c).reshape(-1)
                    torch.index_select(got.view(-1, dim), 0, pick, out=keys[lo:hi].view(-1, dim))
                    return
                moved = (order != torch.arange(k)).any(-1).nonzero().view(-1)          # near-ties the index
                if len(moved):                                                          # ordered otherwise
                    pick = (order.index_select(0, moved) + torch.arange(len(moved))[:, None] * k).reshape(-1)
                    fixed = got.index_select(0, moved).view(-1, dim).index_select(0, pick)
                    got.index_copy_(0, moved, fixed.view(len(moved), k, dim))

        n = P * q
        pieces = min(cpus(), max(1, n * c * dim // _RESCORE_CHUNK))
        bounds = [n * i // pieces for i in range(pieces + 1)]
        if pieces == 1:
            chunk(0, n)
        else:
            list(_shared_pool().map(lambda i: chunk(bounds[i], bounds[i + 1]), range(pieces)))
        best, keys = best.view(P, q, k), keys.view(P, q, k, dim)
        if bool((best < 0).any()):
            keys.masked_fill_((best < 0)[..., None], 0)
        return scores.view(P, q, k), best, keys

    def _rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        last, self._last.result = getattr(self._last, "result", None), None
        if last is None or last[0] is not slots:                                        # get(), or another caller
            return super()._rows(slots)
        ids = self._table.gather("ids", slots).masked_fill(slots < 0, -1)
        return ids, last[1], self._table.gather("values", slots)

    def exact_slots(self, queries: torch.Tensor, partitions: list[int], k: int) -> torch.Tensor:
        """Slots ``(len(partitions), q, k)`` of the exact top-k of ``queries (len(partitions), q, dim)``,
        searched as the ``exact`` backend searches (certified bfloat16 ranking where it pays)."""
        rank = rank_dtype_for("auto", queries.shape[1], self.dtype, self.metric, self.device)
        _, slots = blocked_search(TableKeys(self, partitions), queries, k, self.metric, rank_dtype=rank)
        return slots

    # ------------------------------------------------------------------ persistence
    def _part_state(self, partition: int, directory: Path, tag: str) -> tuple[dict[str, Any], str | None]:
        """Write one partition's index file (or none); return its JSON state and the file name."""
        raise NotImplementedError

    def _part_load(self, partition: int, state: Mapping[str, Any], file: Path | None) -> PartIndex:
        """Rebuild one partition's index from its validated state and file; raise CorruptStoreError."""
        raise NotImplementedError

    def _index_save(self, directory: Path, tag: str) -> dict[str, str]:
        files, states = {}, []
        for p in range(self.partitions):
            state, name = self._part_state(p, directory, tag)
            cal = self._calibrations[p]
            state["calibration"] = None if cal is None else cal.to_dict()
            state["added"] = int(self._added[p])
            states.append(state)
            if name is not None:
                files[f"index.p{p}"] = name
        meta = f"ann.{tag}.json"
        (directory / meta).write_text(json.dumps({"backend": self.backend, "partitions": states}))
        return {"ann": meta, **files}

    def _index_load(self, directory: Path, files: Mapping[str, Any]) -> None:
        if "ann" not in files:
            raise CorruptStoreError(f"the manifest lists no ann state file for this {self.backend} store")
        known = {"rows", "ann"} | {f"index.p{p}" for p in range(self.partitions)}
        if set(files) - known:
            raise CorruptStoreError(f"the manifest lists unexpected files: {sorted(set(files) - known)}")
        states = read_meta(directory / files["ann"]["name"], self.backend, self.partitions)
        for p, state in enumerate(states):
            entry = files.get(f"index.p{p}")
            self._parts[p] = self._part_load(p, state, None if entry is None else directory / entry["name"])
            self._calibrations[p] = Calibration.from_dict(state.get("calibration"), self._value_range(p))
            self._added[p] = meta_int(state, "added")
