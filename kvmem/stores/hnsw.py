"""``hnsw``: an hnswlib graph per partition.

- **Growth**: each graph starts at 1024 elements and ``resize_index`` grows
  it 1.5x (never past ``capacity``) when an add needs more room.
- **Removal and eviction** mark rows deleted (``mark_deleted``); the graph is
  built with ``allow_replace_deleted`` and adds fill deleted elements first, so
  a FIFO memory at capacity never grows. ``clear`` drops the graph.
- **k larger than the rows held** returns ``-1`` padding (hnswlib would raise).
  If the graph cannot return k live rows (possible after heavy deletion) the
  partition is searched exactly instead.
- **Metrics**: ``ip`` and ``l2`` are hnswlib's spaces; ``cos`` normalises keys
  and queries here and uses ``ip``, so the stored vectors are exactly ours.
- **Per-call ef**: hnswlib has one ``ef`` per graph (``set_ef``), read by every
  search. A per-graph gate lets any number of searches with the graph's current
  ef run together; a search wanting another ef waits until those finish,
  switches it, and runs (with others wanting the same value). No thread ever
  searches with an ef it did not ask for, so results equal those of serial
  calls; searches at the default ef never wait unless someone asked for a
  different one. Copies of the graph per ef would avoid the wait at the price
  of memory; a memory layer uses one ef almost always.

Options:
    M: graph degree (default 16; hnswlib's default).
    ef_construction: build beam; None (default): 500 for ip, 200 (hnswlib's default) for l2
        and cos. An ip graph needs the wider beam to stay navigable (ip is not a metric): on
        1M clustered keys x 128 with M 16, recall@32 tops out at 0.89 with 200 (0.90 with
        M 32) and reaches 0.955 at ef 1024 with 500, for a build 2.5x as long.
    ef: search beam; None (default): calibrated per partition to ``target_recall``,
        between 32 and max(256, rows / 512), past which the graph is no faster than
        exact search; a target out of that reach searches the partition exactly. Once the
        store has a hub (asked queries, :mod:`kvmem.stores._hub`), a query also scores
        2 * max(1, ef // 64) of its lists: on queries unlike the keys the beam alone gains little.
    target_recall: recall@32 ef is calibrated for (default 0.95 when ef is None), on the
        queries the store is asked (see :mod:`kvmem.stores._ann`).
    query_sample, monitor: the asked-query sample and the recall monitor (:mod:`kvmem.stores._ann`).

Search parameter: ``ef`` (per call). Thread-safe with other search calls; add,
remove and clear take the write lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
import torch

from kvmem.config import StoreConfig
from kvmem.errors import CorruptStoreError, InvalidInputError, map_errors
from kvmem.stores._ann import ANN_DEFAULTS, AnnStore, check_ann_options, check_int, check_recall, meta_int
from kvmem.stores._hnswfile import check_hnsw_file
from kvmem.stores._hub import PROBES

__all__ = ["HNSWStore", "add_to_graph", "build_beam", "graph_nbytes", "remove_from_graph"]

_FIRST_SIZE = 1024
_GROWTH = 1.5
_EF_FLOOR = 64             # ef before any calibration
_EF_LOW = 32               # the smallest ef calibration tries (k = 32 is hnswlib's own floor for recall@32)
_EF_PER_PROBE = 16         # one more hub list per this much ef above _EF_LOW (see HNSWStore._hub_probes)
_HUB_PROBES_MAX = 16       # and no more hub lists than this
_EF_ROWS = 512              # calibration's ef stays below rows / 512 (and 256): on 1M keys x 128, 1000 queries,
_EF_CEILING = 256           # hnswlib at ef 600 (Gaussian keys) to 2500 (clustered) is no faster than exact search
_SEED = 100                 # hnswlib's default random_seed
_BEAM = {"ip": 500}         # ef_construction by metric when the option is None; else hnswlib's 200


class _EfGate:
    """Searches with equal ef share the graph; a different ef waits for them (see the module docstring)."""

    def __init__(self, index: hnswlib.Index, ef: int) -> None:
        self._index = index
        self._cond = threading.Condition()
        self._ef = ef
        index.set_ef(ef)
        self._active = 0        # searches running at self._ef
        self._waiting = 0       # searches waiting for another ef

    @contextlib.contextmanager
    def use(self, ef: int) -> Iterator[None]:
        with self._cond:
            if not (self._ef == ef and self._waiting == 0):
                self._waiting += 1
                while self._active and (self._ef != ef or self._waiting > 1):
                    self._cond.wait()
                self._waiting -= 1
            if self._ef != ef:
                self._index.set_ef(ef)
                self._ef = ef
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()


def _prepare(metric: str, x: np.ndarray) -> np.ndarray:
    """Vectors ``(n, dim)`` float32 as the graph stores them (unit length for cos)."""
    if metric != "cos":
        return x
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


class _HNSWPart:
    """One partition's graph. Writes are serialised by the store's lock."""

    def __init__(self, store: HNSWStore, index: hnswlib.Index | None = None, live: int = 0) -> None:
        self.metric = store.metric
        if index is None:
            index = hnswlib.Index(space="l2" if store.metric == "l2" else "ip", dim=store.dim)
            size = min(_FIRST_SIZE, store.capacity or _FIRST_SIZE)
            with map_errors("hnsw init"):
                index.init_index(max_elements=size, M=store.options["M"],
                                 ef_construction=store.ef_construction, random_seed=_SEED,
                                 allow_replace_deleted=True)
        self.index = index
        self.capacity = store.capacity
        self.live = live
        self.gate = _EfGate(index, _EF_FLOOR)

    @property
    def indexed(self) -> bool:
        return self.live > 0

    def add(self, ids: np.ndarray, keys: np.ndarray, threads: int) -> None:
        add_to_graph(self.index, ids, _prepare(self.metric, keys), self.live, self.capacity, threads)
        self.live += len(ids)

    def remove(self, ids: np.ndarray) -> None:
        remove_from_graph(self.index, ids)
        self.live -= len(ids)

    def search(self, queries: np.ndarray, k: int, value: int) -> np.ndarray | None:
        try:
            with self.gate.use(value):
                labels, _ = self.index.knn_query(_prepare(self.metric, queries), k=min(k, self.live), num_threads=1)
        except RuntimeError as exc:
            if "contiguous 2D array" in str(exc):
                return None                                         # fewer than k reachable: search exactly
            with map_errors("hnsw search"):
                raise
        return labels.astype(np.int64)

    def nbytes(self) -> int:
        return graph_nbytes(self.index)


def add_to_graph(index: hnswlib.Index, ids: np.ndarray, vectors: np.ndarray, live: int, capacity: int | None,
                 threads: int = 0) -> None:
    """Add prepared ``vectors`` under ``ids``, reusing deleted elements first and growing the graph
    1.5x (never past ``capacity``) when it needs more room. ``live``: elements not deleted."""
    free = index.element_count - live                               # deleted elements, reused first
    need = index.element_count + max(0, len(ids) - free)
    if need > index.max_elements:
        grown = max(need, int(index.max_elements * _GROWTH))
        with map_errors("hnsw resize"):
            index.resize_index(min(grown, max(need, capacity or grown)))
    with map_errors("hnsw add"):
        index.add_items(vectors, ids, num_threads=threads or -1, replace_deleted=True)


def remove_from_graph(index: hnswlib.Index, ids: np.ndarray) -> None:
    """Mark ``ids`` deleted; later adds reuse their elements."""
    with map_errors("hnsw remove"):
        for label in ids.tolist():
            index.mark_deleted(label)


def first_graph_bytes(dim: int, M: int, capacity: int | None) -> int:
    """RAM a new graph holds: hnswlib's 65536 label locks (40-byte mutexes) and ``_FIRST_SIZE`` slots."""
    return 65536 * 40 + min(_FIRST_SIZE, capacity or _FIRST_SIZE) * ((2 * M + 1) * 4 + dim * 4 + 60)


def build_beam(metric: str, option: int | None) -> int:
    """ef_construction: the option, else 500 for ip and hnswlib's 200 otherwise (module docstring)."""
    return option or _BEAM.get(metric, 200)


def graph_nbytes(index: hnswlib.Index) -> int:
    """RAM an hnswlib graph holds, from its layout (hnswlib reports none)."""
    level0 = (2 * index.M + 1) * 4 + index.dim * 4 + 8              # links, vector, label
    per_slot = level0 + 40 + 8 + 4                                   # + a mutex, a link pointer, a level
    per_element = (index.M + 1) * 4 / (index.M - 1) + 48             # expected upper links + the label map
    return int(index.max_elements * per_slot + index.element_count * per_element)


class HNSWStore(AnnStore):
    """Memory searched through hnswlib graphs; see the module docstring."""

    backend = "hnsw"
    param = "ef"
    floor = _EF_LOW
    search_params = frozenset({"ef"})
    defaults = {"M": 16, "ef_construction": None, "ef": None, "target_recall": None, **ANN_DEFAULTS}

    def __init__(self, config: StoreConfig, device: torch.device) -> None:
        super().__init__(config, device)

    @classmethod
    def partition_bytes(cls, config: StoreConfig) -> int:
        """hnswlib's 65536 label locks (40-byte mutexes) and a first graph of ``_FIRST_SIZE`` slots."""
        return first_graph_bytes(config.dim, config.options["M"], config.capacity) + super().partition_bytes(config)

    @classmethod
    def check_options(cls, options: Mapping[str, Any], device: torch.device) -> None:
        check_int("hnsw", "M", options["M"], low=2, allow_none=False)
        if options["M"] > 2048:
            raise InvalidInputError(f"hnsw option M must be an int in [2, 2048]; got {options['M']!r}")
        check_int("hnsw", "ef_construction", options["ef_construction"])
        check_int("hnsw", "ef", options["ef"])
        check_recall("hnsw", options["target_recall"])
        check_ann_options("hnsw", options)
        if options["ef"] is not None and options["target_recall"] is not None:
            raise InvalidInputError("hnsw: give ef (fixed) or target_recall (calibrated), not both")

    @property
    def ef_construction(self) -> int:
        """The build beam: the option, else the metric's default (see the module docstring)."""
        return build_beam(self.metric, self.options["ef_construction"])

    # ------------------------------------------------------------------ AnnStore hooks
    def _new_part(self, partition: int) -> _HNSWPart:
        return _HNSWPart(self)

    def _default_value(self, partition: int) -> int:
        return _EF_FLOOR

    def _hub_probes(self, value: int) -> int:
        """A graph built on keys gains little from a wider beam on queries unlike its keys (it routes by the
        keys that look like the query), so ef buys hub lists faster than beam: 2 at ef 32 and below, one more
        per 16 of ef, up to 16 lists. On 1M attention keys, 1,000 queries: ef 48 with 3 lists reaches recall
        0.973 at 17x exact; ef 130 with 4 lists (the old 2 per 64 of ef) reached 0.980 at 9x."""
        return min(_HUB_PROBES_MAX, PROBES + max(0, value - _EF_LOW) // _EF_PER_PROBE)

    def _value_range(self, partition: int) -> tuple[int, int]:
        live = self._parts[partition].live
        return _EF_LOW, max(_EF_LOW, min(live, max(_EF_CEILING, live // _EF_ROWS)))

    # ------------------------------------------------------------------ persistence
    def _part_state(self, partition: int, directory: Path, tag: str) -> tuple[dict[str, Any], str | None]:
        part = self._parts[partition]
        state = {"elements": int(part.index.element_count), "live": part.live}
        if not part.index.element_count:
            return state, None
        name = f"index.{tag}.p{partition}.hnsw"
        with map_errors("hnsw save"):
            part.index.save_index(str(directory / name))
        return state, name

    def _part_load(self, partition: int, state: Mapping[str, Any], file: Path | None) -> _HNSWPart:
        count = int(self._book.counts[partition])
        elements = meta_int(state, "elements", count, (self.capacity or 1 << 62))
        live = meta_int(state, "live", count, count)
        if (file is None) != (elements == 0):
            raise CorruptStoreError(f"hnsw partition {partition}: state says {elements} elements "
                                    f"but index file is {file}")
        if file is None:
            return _HNSWPart(self)
        ids = self._table.rows("ids", partition, count).numpy()
        keys = _prepare(self.metric, self._table.rows("keys", partition, count).float().numpy())
        check_hnsw_file(file, dim=self.dim, M=self.options["M"], ef_construction=self.ef_construction,
                        elements=elements, ids=ids, keys=keys)
        index = hnswlib.Index(space="l2" if self.metric == "l2" else "ip", dim=self.dim)
        with map_errors(f"reading hnsw index {file.name}", corrupt=True):
            index.load_index(str(file), max_elements=elements, allow_replace_deleted=True)
        return _HNSWPart(self, index, live)
