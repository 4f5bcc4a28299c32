"""What the approximate backends (``ivf``, ``hnsw``) share: written once here.

- One index per partition (a :class:`PartIndex`), labelled with kvmem ids,
  written from one process-wide thread pool (:mod:`kvmem.stores._threads`).
- A search cuts its query rows (all partitions' queries, flattened) into one
  span per core; each span, on one thread, asks the index of every partition
  it covers for candidates, rescores them and fetches their ids, keys and
  values straight into the result (:class:`_Found`).
- A partition without a usable index (``ivf`` before training, or after a
  library error) is searched exactly with :func:`kvmem.topk.blocked_search`
  over its stored keys.
- Candidates are rescored exactly from the stored keys, so index
  approximations (SQ, PQ, graph search) never reach the scores. The keys
  gathered for that are the ones ``search`` returns (the result is kept per
  thread between ``_search`` and ``_rows``), so the key column is read once.
- ``target_recall``: the per-call knob (``nprobe``, ``ef``) is calibrated per
  partition against exact search (:mod:`kvmem.stores._calibrate`) on the
  queries it is asked (a reservoir sample of ``query_sample`` per partition,
  :mod:`kvmem.stores._asked`), or on its stored keys until
  :data:`~kvmem.stores._asked.MIN_ASKED` queries have been asked; after each
  (re)build of the index, as the sample of asked queries turns over (each time
  it has taken half as many new queries as the last calibration rested on;
  at the end of the search that made it due, under the read lock, so other
  searches go on and results depend only on the calls made), and
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
- Options both backends take: ``query_sample`` (asked queries kept per
  partition, default 1024; 0: none, calibration on stored keys only; a larger
  sample makes tighter hub lists, each query keeping fewer neighbours, at the
  cost of a longer calibration: :func:`kvmem.stores._hub.depth_for`) and
  ``monitor`` (fraction of live query rows checked against exact search in the
  background, for a running recall estimate in ``stats()``; the store
  recalibrates when it falls below the target; default 0: off; cost in
  :mod:`kvmem.stores._monitor`).
- Around a search, this thread's torch ops run on one thread
  (:func:`torch_threads`), except the exact search of partitions without a
  usable index, which runs as the exact backend's, on the caller's torch
  threads: torch's OpenMP workers spin for milliseconds after a parallel op
  and fight the spans for the cores (a 500-query hnswlib search took 1.4x as
  long right after a parallel torch op on a 2-core machine). A search uses at
  most the caller's ``torch.get_num_threads()`` cores.
- Asked queries also build the hub (:class:`kvmem.stores._hub.Hub`): lists
  of the true neighbours of clustered sampled queries; a search's query scores
  the lists of the clusters nearest it and their best join the index's
  candidates, which is what lets an index built on keys reach queries unlike
  them. Calibration uses the hub only as far as it pays
  (:mod:`kvmem.stores._calibrate`): the plain index may serve without it, or
  the hub without the index (``Calibration.index`` False: a graph whose beam
  finds next to nothing of these queries is not searched at the calibrated
  knob; a knob given per call or by option searches it).
- Persistence: the native index files, ``ann.<tag>.json`` (per-partition
  state and calibration) and ``asked.<tag>.safetensors`` (samples and hubs),
  all checksummed by :mod:`kvmem.persist`.

Thread-safe with other search calls; add, remove and clear take the write lock
(and so does the maintenance an add triggers: training, calibration); a
calibration a search triggers runs in that search's call under the read lock.
"""

from __future__ import annotations

import json
import numbers
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from kvmem import kernels
from kvmem.config import StoreConfig
from kvmem.errors import CorruptStoreError, InvalidInputError
from kvmem.store import SearchResult
from kvmem.stores._asked import AskedQueries, load_asked, save_asked
from kvmem.stores._calibrate import Calibration
from kvmem.stores._hub import PROBES, Hub, merge
from kvmem.stores._monitor import Monitor
from kvmem.stores._threads import parallel, spread, torch_threads, workers
from kvmem.stores._tuning import Tuning, check_recall
from kvmem.stores.exact import TableKeys, sqnorm_column, sqnorm_rows
from kvmem.tablestore import TableStore
from kvmem.topk import NEG_INF, blocked_search, exact_scores, rank_dtype_for

__all__ = ["AnnStore", "PartIndex", "ANN_DEFAULTS", "check_ann_options", "check_int", "check_recall", "read_meta"]

_META_LIMIT = 16 << 20      # bytes; the state file is a few KB per thousand partitions
ANN_DEFAULTS = {"query_sample": 1024, "monitor": 0.0}   # options both backends take (see AnnStore)

# ---------------------------------------------------------------------------------------------- validation
def check_int(backend: str, name: str, value: Any, *, low: int = 1, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise InvalidInputError(f"{backend} option {name} must be an int >= {low}"
                                f"{' or None' if allow_none else ''}; got {value!r}")


def check_ann_options(backend: str, options: Mapping[str, Any]) -> None:
    sample = options.get("query_sample", ANN_DEFAULTS["query_sample"])
    check_int(backend, "query_sample", sample, low=0, allow_none=False)
    rate = options.get("monitor", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= float(rate) <= 1:
        raise InvalidInputError(f"{backend} option monitor must be a fraction in [0, 1]; got {rate!r}")


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

    def search(self, queries: np.ndarray, k: int, value: int) -> np.ndarray | None:
        """Candidate ids ``(q, c)`` int64 (``-1`` pads) of ``queries (q, dim)`` at knob ``value``, searched
        on this thread alone (the store spreads queries over threads). Safe beside other searches.

        None: the library could not answer (search this partition exactly).
        """

    def nbytes(self) -> int:
        """Bytes the index holds in RAM (approximately)."""


class _Found:
    """What one search returns, over its ``P * q`` flat query rows, filled span by span from each
    span's candidate slots (:meth:`fill`: one thread per span, disjoint rows).

    A span's candidates are gathered straight into the returned keys when there are ``k`` of them,
    scored exactly, and only the rows whose index order disagrees with the exact scores (near-ties)
    are reordered; of more than ``k`` candidates (ivf's ``refine``) the best ``k`` are kept.
    ``queries (P', q, dim)`` are those of partitions ``first .. first + P'`` (a search: all of them).
    """

    def __init__(self, store: AnnStore, queries: torch.Tensor, k: int, first: int = 0) -> None:
        P, q, dim = queries.shape
        self.table, self.metric, self.q, self.k, self.first = store._table, store.metric, q, k, first
        self.queries = queries.reshape(P * q, dim)
        keys, values = self.table.data["keys"], self.table.data["values"]
        self.slots_per_part = keys.shape[1]
        n = P * q
        self.scores = torch.empty(n, k)
        self.best = torch.empty(n, k, dtype=torch.int64)                               # slots, -1 pads
        self.ids = torch.empty(n, k, dtype=torch.int64)
        self.keys = torch.empty(n, k, dim, dtype=keys.dtype)
        self.values = torch.empty(n, k, *values.shape[2:], dtype=values.dtype)
        self.exact: dict[int, torch.Tensor] = {}                                      # partition -> slots (q, k)

    def empty(self) -> None:
        """Nothing found anywhere (no row reserved yet)."""
        self.scores.fill_(NEG_INF)
        for t in (self.best, self.ids):
            t.fill_(-1)
        for t in (self.keys, self.values):
            t.zero_()

    def fill(self, lo: int, hi: int, slots: torch.Tensor) -> None:
        """Results of flat query rows ``[lo, hi)`` from their candidate slots ``(hi - lo, c)``, c >= k."""
        n, c = slots.shape
        k, dim = self.k, self.keys.shape[-1]
        where = self.table.flat_rows(slots, self.first + torch.arange(lo, hi) // self.q)   # rows of the flat columns
        got = self.keys[lo:hi] if c == k else torch.empty(n, c, dim, dtype=self.keys.dtype)
        table = self.table.flat("keys")
        zeroed = kernels.applies(table)                             # one pass: keys copied, scored, zeros where none
        if zeroed:
            scores = kernels.gather(table, where, slots, self.queries[lo:hi], self.metric, got)
        else:
            torch.index_select(table, 0, where.view(-1), out=got.view(-1, dim))
            scores = exact_scores(self.queries[None, lo:hi], got[None], self.metric)[0].masked_fill_(slots < 0, NEG_INF)
        if c > k:
            scores, order = scores.topk(k, -1)
            pick = (order + torch.arange(n)[:, None] * c).view(-1)
            torch.index_select(got.view(-1, dim), 0, pick, out=self.keys[lo:hi].view(-1, dim))
            where = where.gather(-1, order)
        else:
            moved = (scores[:, 1:] > scores[:, :-1]).any(-1).nonzero().view(-1)      # near-ties the index
            if len(moved):                                                          # ordered otherwise
                scores[moved], order = scores[moved].sort(dim=-1, descending=True, stable=True)
                where[moved] = where[moved].gather(-1, order)
                pick = (order + moved[:, None] * k).view(-1)
                got.index_copy_(0, moved, got.view(-1, dim).index_select(0, pick).view(-1, k, dim))
        missing = scores == NEG_INF
        self.scores[lo:hi] = scores
        self.best[lo:hi] = where.remainder(self.slots_per_part).masked_fill_(missing, -1)
        torch.index_select(self.table.flat("ids"), 0, where.view(-1), out=self.ids[lo:hi].view(-1))
        values = self.table.flat("values")
        if values.shape[1] == 1:                                # a column: a 1-D gather is 5x faster
            values = values.view(-1)
        torch.index_select(values, 0, where.view(-1), out=self.values[lo:hi].view(n * k, *values.shape[1:]))
        if bool(missing.any()):                                 # padded rows: only their entries are zeroed
            self.ids[lo:hi].masked_fill_(missing, -1)
            if not zeroed:
                self.keys[lo:hi][missing] = 0
            self.values[lo:hi][missing] = 0


class AnnStore(Tuning, TableStore):
    """An in-RAM store ranked by one approximate index per partition; see the module docstring.

    Subclasses set ``param`` (the per-call knob) and implement the ``_part_*`` hooks.
    """

    param: ClassVar[str] = ""
    floor: ClassVar[int] = 1        # smallest knob value calibration tries
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})   # the index is faiss / hnswlib in RAM

    def __init__(self, config: StoreConfig, device: torch.device) -> None:
        if device.type != "cpu":
            raise InvalidInputError(f"{self.backend} keeps its index in RAM; device must be 'cpu'; got {device}")
        super().__init__(config, device)
        self._parts = [self._new_part(p) for p in range(config.partitions)]
        self._calibrations: list[Calibration | None] = [None] * config.partitions
        self._added = np.zeros(config.partitions, np.int64)    # rows added since the last calibration
        self._last = threading.local()                           # this thread's last (best slots, their keys)
        sample = int(config.options.get("query_sample", ANN_DEFAULTS["query_sample"]))    # a save from before: default
        self._asked = AskedQueries(config.partitions, config.dim, sample)
        self._hubs: list[Hub | None] = [None] * config.partitions
        self._target: float | None = None                        # a target given to calibrate(), kept
        self._monitor = Monitor(float(config.options.get("monitor", ANN_DEFAULTS["monitor"])))

    @property
    def exact(self) -> bool:
        return False

    def search(self, queries: Any, k: int, **params: Any) -> SearchResult:
        self._last.threads = torch.get_num_threads()          # what the index library's search gets back
        with torch_threads(1):
            result = super().search(queries, k, **params)
        self._after_search()
        return result

    def save(self, path: Any) -> None:
        self._settle()
        super().save(path)

    def close(self) -> None:
        self._monitor.wait()
        super().close()

    def _caller_threads(self) -> int:
        """The torch threads of this search's caller (:meth:`search` runs the small ops on one)."""
        return getattr(self._last, "threads", torch.get_num_threads())

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

    def _hub_probes(self, value: int) -> int:
        """The hub lists a query scores when the index searches at knob ``value``."""
        return PROBES

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

    def _hub_alone(self, partition: int, params: Mapping[str, Any]) -> bool:
        """Whether the partition's hub answers without its index: calibration found the index adds too
        little for its cost, and no knob is given (a knob given per call or by option searches the index)."""
        cal = self._calibrations[partition]
        return not self._knob_given(params) and cal is not None and not cal.index and self._hubs[partition] is not None

    def _knob_given(self, params: Mapping[str, Any]) -> bool:
        """Whether this call or the store's options fix the knob (else calibration chooses it)."""
        return params.get(self.param) is not None or self.options[self.param] is not None

    def _ranks(self, partition: int, params: Mapping[str, Any]) -> bool:
        """Whether the partition's index ranks this search (else it is searched exactly): it has one,
        and a knob is given (call or option) or its calibration reached the target."""
        if not self._parts[partition].indexed:
            return False
        cal = self._calibrations[partition]
        return self._knob_given(params) or cal is None or not cal.exact

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
        for p, hub in enumerate(self._hubs):
            if hub is not None:
                hub.forget(torch.from_numpy(evicted[p]))
                hub.extend(torch.from_numpy(ids[p]), keys[p])

    def _index_remove(self, removed: list[np.ndarray]) -> None:
        for p, gone in enumerate(removed):
            if len(gone):
                self._parts[p].remove(gone)
                if self._hubs[p] is not None:
                    self._hubs[p].forget(torch.from_numpy(gone))

    def _index_clear(self, partitions: list[int]) -> None:
        for p in partitions:
            self._parts[p] = self._new_part(p)
            self._calibrations[p] = self._hubs[p] = None
            self._added[p] = 0
        self._asked.clear(partitions)

    def _after_add(self) -> None:
        target = self.target_recall
        counts = self._book.counts
        due = []
        for p in range(self.partitions):
            rebuilt = self._maintain(p)
            if target is None or not self._parts[p].indexed or counts[p] < 2:
                continue
            if self._due(p, rebuilt):
                due.append(p)
        if due:
            self._recalibrate(due, target)

    def _index_nbytes(self) -> int:
        return sum(part.nbytes() for part in self._parts) + sum(hub.nbytes() for hub in self._hubs if hub)

    # ------------------------------------------------------------------ search
    def _search(self, queries: torch.Tensor, k: int, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank, rescore and fetch in spans of query rows spread over the cores (see :class:`_Found`)."""
        P, q, _ = queries.shape
        counts = self._book.counts
        held = [p for p in range(P) if counts[p] and q]
        ranked = {p: self._value(p, params) for p in held if self._ranks(p, params)}
        alone = {p for p in ranked if self._hub_alone(p, params)}
        exact = [p for p in held if p not in ranked]
        self._asked.record(queries)
        found = _Found(self, queries, k)
        if not self._table.data["keys"].shape[1]:                 # no row reserved yet: nothing to find
            found.empty()
        elif P * q:
            if exact:                                             # searched as the exact backend, all cores
                with torch_threads(self._caller_threads()):
                    found.exact = dict(zip(exact, self.exact_slots(queries[exact], exact, k)))
            q32 = queries.numpy()
            spread(lambda lo, hi: found.fill(lo, hi, self._candidates(q32, queries, found, ranked, alone, k, lo, hi)),
                   P * q, workers(self._caller_threads()))
        best = found.best.view(P, q, k)
        self._last.result = (best, found)
        self._monitor.offer(self, queries, found.scores.view(P, q, k))
        return found.scores.view(P, q, k), best

    def _candidates(self, q32: np.ndarray, queries: torch.Tensor, found: _Found, ranked: Mapping[int, int],
                    alone: set[int], k: int, lo: int, hi: int) -> torch.Tensor:
        """Candidate slots ``(hi - lo, c)`` (``-1`` pads) of the flat query rows ``[lo, hi)``: each ranked
        partition's by its index and hub (``alone``: by its hub alone), the others' from the exact search
        done before."""
        q = q32.shape[1]
        pieces = []
        for p in range(lo // q, (hi - 1) // q + 1):
            a, b = max(lo, p * q) - p * q, min(hi, (p + 1) * q) - p * q              # this partition's queries
            if p in ranked:
                got = self._part_candidates(p, q32[p, a:b], queries[p, a:b], k, ranked[p], self._hubs[p],
                                            p not in alone)
                pieces.append(got if got is not None                # None: the library could not answer
                              else self.exact_slots(queries[p:p + 1, a:b], [p], k)[0])
            else:                                                 # searched exactly before, or empty
                pieces.append(found.exact[p][a:b] if p in found.exact else torch.full((b - a, k), -1))
        width = max(k, *(c.shape[1] for c in pieces))
        if len(pieces) == 1 and pieces[0].shape[1] == width:
            return pieces[0]
        return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=-1) for c in pieces])

    def _part_candidates(self, p: int, q32: np.ndarray, queries: torch.Tensor, k: int, value: int,
                         hub: Hub | None, index: bool) -> torch.Tensor | None:
        """Candidate slots ``(n, c)`` of ``queries (n, dim)`` in partition ``p``: the index's at knob ``value``
        (unless not ``index``) joined by the hub's (with a hub); None when the library could not answer."""
        labels = self._parts[p].search(q32, k, value) if index else np.empty((len(q32), 0), np.int64)
        if labels is None:
            return None
        slots = torch.from_numpy(self._book.slots_in(p, labels))
        return slots if hub is None else merge(slots, hub.candidates(self, p, queries, k,
                                                                     probes=self._hub_probes(value)))

    def _search_as(self, p: int, queries: torch.Tensor, k: int, hub: Hub | None, index: bool, value: int) -> bool:
        """Search ``queries (n, dim)`` in partition ``p`` as a search would with this hub, index and knob (spans
        over the caller's threads, exact rescoring, results dropped), for calibration to time; False when
        the library could not answer."""
        q32, found = queries.numpy(), _Found(self, queries[None], k, first=p)     # this partition's rows alone

        def span(lo: int, hi: int) -> bool:
            got = self._part_candidates(p, q32[lo:hi], queries[lo:hi], k, value, hub, index)
            if got is not None:
                found.fill(lo, hi, got)
            return got is not None

        return all(spread(span, len(queries), workers(self._caller_threads())))

    def _rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        last, self._last.result = getattr(self._last, "result", None), None
        if last is None or last[0] is not slots:                                        # get(), or another caller
            return super()._rows(slots)
        found, shape = last[1], slots.shape
        return found.ids.view(shape), found.keys.view(*shape, -1), found.values.view(*shape, -1)

    def exact_slots(self, queries: torch.Tensor, partitions: list[int], k: int) -> torch.Tensor:
        """Slots ``(len(partitions), q, k)`` of the exact top-k of ``queries (len(partitions), q, dim)``,
        searched as the ``exact`` backend searches (certified bfloat16 ranking where it pays, spans of
        queries over the caller's threads)."""
        rank = rank_dtype_for("auto", queries.shape[1], self.dtype, self.metric, self.device)
        _, slots = blocked_search(TableKeys(self, partitions), queries, k, self.metric, rank_dtype=rank,
                                  spans=workers(torch.get_num_threads()))
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
            state["target"] = self._target
            states.append(state)
            if name is not None:
                files[f"index.p{p}"] = name
        meta = f"ann.{tag}.json"
        (directory / meta).write_text(json.dumps({"backend": self.backend, "partitions": states}))
        return {"ann": meta, "asked": save_asked(self, directory, tag), **files}

    def _index_load(self, directory: Path, files: Mapping[str, Any]) -> None:
        if "ann" not in files:
            raise CorruptStoreError(f"the manifest lists no ann state file for this {self.backend} store")
        known = {"rows", "ann", "asked"} | {f"index.p{p}" for p in range(self.partitions)}
        if set(files) - known:
            raise CorruptStoreError(f"the manifest lists unexpected files: {sorted(set(files) - known)}")
        states = read_meta(directory / files["ann"]["name"], self.backend, self.partitions)
        for p, state in enumerate(states):
            entry = files.get(f"index.p{p}")
            self._parts[p] = self._part_load(p, state, None if entry is None else directory / entry["name"])
            self._calibrations[p] = Calibration.from_dict(state.get("calibration"), self._value_range(p))
            self._added[p] = meta_int(state, "added")
            target = state.get("target")
            if target is not None and not (isinstance(target, float) and 0 < target <= 1):
                raise CorruptStoreError(f"index state: target must be a number in (0, 1] or null; got {target!r}")
            self._target = target
        load_asked(self, directory / files["asked"]["name"] if "asked" in files else None)
