"""``ivf``: a faiss inverted-file index per partition (IVF-Flat by default, SQ / PQ by option).

Life of a partition:

- **Exact until trained.** Below ``train_size`` rows a partition has no index
  and is searched exactly over its stored keys.
- **Training.** The add that brings it to ``train_size`` rows trains k-means on
  up to 64 sampled rows per list (faiss asks for 30-256) with ``nlist`` about
  4 sqrt(N) (at most N/39) unless ``nlist`` is given, then indexes every row.
- **Growth.** A fixed quantizer keeps its recall at a fixed ``nprobe`` while
  lists grow (the probed fraction of the data stays the same), but a search
  costs more with every row, and centroids go stale if the keys drift. So the
  index is retrained (new centroids, nlist for the new size, every row
  re-added) once the rows added since training reach ``(retrain_factor - 1)``
  times the rows it was trained on: a growing memory retrains at 4x, 16x, ...
  its training size (default factor 4, so nlist doubles), a FIFO memory after
  its rows have turned over 3 times. Retraining runs inside that ``add``
  (seconds at a million rows). ``retrain_factor=None`` never retrains: recall at
  a given nprobe holds while the keys keep their distribution; speed does not.
- **Removal, eviction, clear**: ``remove_ids`` (a scan over the lists);
  ``clear`` drops the index and the partition starts exact again.

Metrics: faiss sees L2 distances only. ``l2`` as is; ``cos``: keys and queries
normalised; ``ip``: the MIPS-to-L2 reduction (Bachrach et al. 2014), keys get
an extra coordinate sqrt(B^2 - |k|^2) and queries a 0, with B 1.05x the largest
key norm at training. faiss's own inner-product IVF trains spherical k-means,
which splits keys by direction only; on keys sharing an offset, as attention
keys do, its recall@32 plateaus near 0.85 at any nprobe. A key added later
with a norm above B gets 0: it ranks a little low inside its list until the next
retraining.

Options:
    index: codes stored in the lists: "Flat" (default), "SQ8", "SQ6", "SQ4", "SQfp16",
        "PQ{m}" or "PQ{m}x{bits}"; the faiss factory forms "IVF{nlist},<code>" and
        "IVF4096,<code>" are accepted too (a number there fixes nlist).
    nlist: inverted lists; None: about 4 sqrt(N) when (re)trained.
    nprobe: lists a search visits; None (default): calibrated to ``target_recall`` between 1
        and nlist / 8 (or 16), past which the index is no faster than exact search; a target out of
        that reach searches the partition exactly.
    target_recall: recall@32 nprobe is calibrated for (default 0.95 when nprobe is None), on the
        queries the store is asked (see :mod:`kvmem.stores._ann`).
    query_sample, monitor: the asked-query sample and the recall monitor (:mod:`kvmem.stores._ann`).
    train_size: rows a partition holds before it trains; None: 32768, or 39 per list
        when nlist is fixed, and at least what the codes need (PQ: 39 x 2^bits).
    retrain_factor: see Growth above; a number > 1, or None.
    refine: candidates fetched per result and rescored exactly; None: 1 for Flat, 4 otherwise.

Search parameter: ``nprobe`` (per call, through ``faiss.SearchParametersIVF``;
the shared index is never changed). Thread-safe with other search calls; add,
remove and clear take the write lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from kvmem import kernels
from kvmem.config import StoreConfig
from kvmem.errors import CorruptStoreError, InvalidInputError, KvmemError, map_errors
from kvmem.stores._ann import ANN_DEFAULTS, AnnStore, check_ann_options, check_int, check_recall, meta_int
from kvmem.stores._ivffile import check_faiss_file, list_ids
from kvmem.stores._threads import thread_count
from kvmem.topk import blas_threads

__all__ = ["IVFStore", "index_nbytes"]

_INDEX = re.compile(r"^(?:IVF(\d+|\{nlist\}),)?(Flat|SQ(?:4|6|8|fp16)|PQ(\d+)(?:x(\d+))?)$")
_TRAIN_PER_LIST = 64        # sampled training rows per list
_MIN_PER_LIST = 39          # faiss warns below this many training rows per centroid
_DEFAULT_TRAIN_SIZE = 1 << 15
_BOUND_MARGIN = 1.05        # ip: B is this times the largest key norm at training
_PROBE_SHARE = 8            # calibration probes at most nlist / 8 lists: on 1M keys x 128, 1000 queries,
                            # probing 5% of the lists of Gaussian keys is already as slow as exact search;
_PROBE_MIN = 16             # but up to 16 lists of a small index (under 1000 rows) are always allowed


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What every partition's index is, fixed at creation."""

    metric: str             # the store's metric
    dim: int                # key width
    index_dim: int          # width faiss sees: dim, +1 for ip, padded to a multiple of the PQ m
    code: str               # faiss code string: "Flat", "SQ8", "PQ16x8np", ...
    nlist: int | None       # fixed nlist, or None for 4 sqrt(N)
    train_at: int           # rows that trigger training
    retrain_factor: float | None
    refine: int             # candidates per result
    min_train: int          # training rows the codes need


def _parse(options: Mapping[str, Any], dim: int, metric: str) -> _Spec:
    match = _INDEX.match(options["index"]) if isinstance(options["index"], str) else None
    if match is None:
        raise InvalidInputError("ivf option index must be 'Flat', 'SQ8', 'SQ6', 'SQ4', 'SQfp16', 'PQ{m}' or "
                                f"'PQ{{m}}x{{bits}}', optionally after 'IVF{{nlist}},'; got {options['index']!r}")
    fixed, code, m, bits = match.groups()
    nlist = options["nlist"]
    if fixed not in (None, "{nlist}"):
        if nlist is not None and nlist != int(fixed):
            raise InvalidInputError(f"ivf option index fixes nlist={fixed} but option nlist={nlist}")
        nlist = int(fixed)
    if nlist is not None and nlist < 1:
        raise InvalidInputError(f"ivf nlist must be >= 1; got {nlist}")
    index_dim = dim + (metric == "ip")
    min_train = 1
    if m is not None:
        m, bits = int(m), int(bits or 8)
        if not 1 <= m <= index_dim or not 1 <= bits <= 16:
            raise InvalidInputError(f"ivf index PQ{m}x{bits}: need 1 <= m <= {index_dim} and 1 <= bits <= 16")
        index_dim = -(-index_dim // m) * m
        code, min_train = f"PQ{m}x{bits}np", _MIN_PER_LIST * 2 ** bits     # np: no polysemous training
    train_at = options["train_size"]
    if train_at is None:
        train_at = max(_DEFAULT_TRAIN_SIZE if nlist is None else _MIN_PER_LIST * nlist, min_train)
    train_at = max(train_at, nlist or 1, 2 ** bits if m is not None else 1)   # k-means needs a row per centroid
    refine = options["refine"] or (1 if code == "Flat" else 4)
    return _Spec(metric, dim, index_dim, code, nlist, train_at, options["retrain_factor"], refine, min_train)


def _new_index(spec: _Spec, nlist: int) -> faiss.IndexIVF:
    with map_errors("ivf index"):
        index = faiss.index_factory(spec.index_dim, f"IVF{nlist},{spec.code}", faiss.METRIC_L2)
    index.cp.verbose = False
    return index


class _IVFPart:
    """One partition's index: None until trained. Writes are serialised by the store's lock."""

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec
        self.index: faiss.IndexIVF | None = None
        self.centroids = self.centroid_norms = torch.empty(0)   # (nlist, index_dim), (nlist,): see attach
        self._doubled = np.empty((0, 0), np.float32)             # (index_dim, nlist): 2 c, see attach
        self.trained_rows = 0     # rows held at the last training
        self.added = 0            # rows added since then
        self.bound = 0.0          # ip: B^2

    @property
    def indexed(self) -> bool:
        return self.index is not None

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Keys ``(n, dim)`` float32 as the index sees them ``(n, index_dim)``."""
        spec = self.spec
        if spec.metric == "cos":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
        out = np.zeros((len(x), spec.index_dim), np.float32)
        out[:, :spec.dim] = x
        if spec.metric == "ip":
            out[:, spec.dim] = np.sqrt(np.maximum(self.bound - (x.astype(np.float64) ** 2).sum(1), 0))
        return out

    def prepare_queries(self, q: np.ndarray) -> np.ndarray:
        if self.spec.metric == "cos":
            return self.prepare(q)
        out = np.zeros((len(q), self.spec.index_dim), np.float32)
        out[:, :self.spec.dim] = q
        return out

    def build(self, keys: np.ndarray, ids: np.ndarray, nlist: int, seed: int) -> None:
        """Train on a sample of ``keys (N, dim)`` and index them all under ``ids (N,)``."""
        if self.spec.metric == "ip":
            self.bound = float((_BOUND_MARGIN ** 2) * (keys.astype(np.float64) ** 2).sum(1).max())
        x = self.prepare(keys)
        n_train = min(len(x), max(_TRAIN_PER_LIST * nlist, self.spec.min_train))
        sample = np.sort(np.random.default_rng(seed).choice(len(x), n_train, replace=False))
        index = _new_index(self.spec, nlist)
        with map_errors("ivf training"):
            index.train(x[sample])
            index.add_with_ids(x, ids)
        self.attach(index)
        self.trained_rows, self.added = len(x), 0

    def attach(self, index: faiss.IndexIVF) -> None:
        """Search ``index`` from now on; its centroids are kept as a tensor for the coarse step."""
        centroids = torch.from_numpy(faiss.downcast_index(index.quantizer).reconstruct_n(0, index.nlist))
        self.index, self.centroids, self.centroid_norms = index, centroids, centroids.square().sum(1)
        self._doubled = np.ascontiguousarray(2 * centroids.numpy().T)                       # (index_dim, nlist)

    def add(self, ids: np.ndarray, keys: np.ndarray, threads: int) -> None:
        self.added += len(ids)
        if self.index is not None:
            x = self.prepare(keys)
            with omp_threads(threads or faiss.omp_get_max_threads()), map_errors("ivf add"):
                self.index.add_with_ids(x, ids)

    def remove(self, ids: np.ndarray) -> None:
        if self.index is not None:
            with map_errors("ivf remove"):
                gone = self.index.remove_ids(np.ascontiguousarray(ids, np.int64))
            if gone != len(ids):
                raise KvmemError(f"ivf index held {gone} of the {len(ids)} ids it was asked to remove")

    def search(self, queries: np.ndarray, k: int, value: int) -> np.ndarray | None:
        """faiss's IVF search on this thread, its coarse step done here: ``2 q.c - |c|^2`` for every
        centroid by one GEMM in NumPy's BLAS on this thread, each query's best ``nprobe`` lists picked in
        one pass (:func:`kvmem.kernels.best`), and handed with their L2 distances to ``search_preassigned``
        -- what ``IndexIVF.search`` does, lists and candidates alike. (faiss-cpu's own quantizer search,
        OpenBLAS on 1-500 queries per thread, took up to 1.8x as long; torch's GEMM, MKL on AMD CPUs,
        took 5.5 ms for 400 queries against 1,265 centroids, against 1.8 ms.)"""
        index, x = self.index, self.prepare_queries(queries)
        n, nprobe, width = len(x), min(value, index.nlist), k * self.spec.refine
        with blas_threads(1):
            near = np.matmul(x, self._doubled)                                           # (n, nlist): 2 q.c
        near -= self.centroid_norms.numpy()                                             # 2 q.c - |c|^2
        near, lists = kernels.best(near, nprobe)
        near = np.square(x).sum(1, keepdims=True) - near                                # |q - c|^2
        distances, labels = np.empty((n, width), np.float32), np.empty((n, width), np.int64)
        with omp_threads(1), map_errors("ivf search"):
            index.search_preassigned_c(n, faiss.swig_ptr(x), width, faiss.swig_ptr(lists), faiss.swig_ptr(near),
                                       faiss.swig_ptr(distances), faiss.swig_ptr(labels), False,
                                       faiss.SearchParametersIVF(nprobe=nprobe))
        return labels

    def nbytes(self) -> int:
        return 0 if self.index is None else index_nbytes(self.index)


def omp_threads(n: int) -> contextlib.AbstractContextManager[None]:
    """faiss's OpenMP threads on this thread inside (faiss carries its own libgomp; the setting is per thread)."""
    return thread_count(faiss.omp_get_max_threads, faiss.omp_set_num_threads, n)


def index_nbytes(index: faiss.IndexIVF) -> int:
    """RAM an IVF index holds: codes and ids in the lists, and the centroids."""
    return index.ntotal * (index.code_size + 8) + index.nlist * index.d * 4


class IVFStore(AnnStore):
    """Memory searched through faiss IVF indexes; see the module docstring."""

    backend = "ivf"
    param = "nprobe"
    search_params = frozenset({"nprobe"})
    defaults = {"index": "Flat", "nlist": None, "nprobe": None, "target_recall": None, "train_size": None,
                "retrain_factor": 4.0, "refine": None, **ANN_DEFAULTS}

    def __init__(self, config: StoreConfig, device: torch.device) -> None:
        self._spec = _parse(config.options, config.dim, config.metric)
        with map_errors("ivf index"):
            try:
                _new_index(self._spec, 1)
            except Exception as exc:
                raise InvalidInputError(f"ivf option index={config.options['index']!r} does not fit "
                                        f"dim={config.dim}: {exc}") from None
        super().__init__(config, device)

    @classmethod
    def check_options(cls, options: Mapping[str, Any], device: torch.device) -> None:
        for name in ("nlist", "nprobe", "refine"):
            check_int("ivf", name, options[name])
        check_int("ivf", "train_size", options["train_size"], low=2)
        check_recall("ivf", options["target_recall"])
        check_ann_options("ivf", options)
        if options["nprobe"] is not None and options["target_recall"] is not None:
            raise InvalidInputError("ivf: give nprobe (fixed) or target_recall (calibrated), not both")
        factor = options["retrain_factor"]
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                                   or not math.isfinite(factor) or factor <= 1):
            raise InvalidInputError(f"ivf option retrain_factor must be a number > 1 or None; got {factor!r}")

    # ------------------------------------------------------------------ AnnStore hooks
    def _new_part(self, partition: int) -> _IVFPart:
        return _IVFPart(self._spec)

    def _nlist_for(self, rows: int) -> int:
        if self._spec.nlist is not None:
            return self._spec.nlist
        return max(1, min(round(4 * math.sqrt(rows)), rows // _MIN_PER_LIST))

    def _maintain(self, partition: int) -> bool:
        part, count = self._parts[partition], int(self._book.counts[partition])
        factor = self._spec.retrain_factor
        if part.index is None:
            due = count >= self._spec.train_at
        else:
            due = factor is not None and part.added >= (factor - 1) * part.trained_rows and count >= part.trained_rows
        if not due:
            return False
        keys = self._table.rows("keys", partition, count).float().numpy()
        ids = self._table.rows("ids", partition, count).numpy()
        part.build(keys, ids, self._nlist_for(count), seed=partition + count)
        return True

    def _default_value(self, partition: int) -> int:
        index = self._parts[partition].index
        return max(1, index.nlist // 16) if index is not None else 1

    def _value_range(self, partition: int) -> tuple[int, int]:
        index = self._parts[partition].index
        if index is None:
            return 1, 1 << 20
        return 1, max(index.nlist // _PROBE_SHARE, min(index.nlist, _PROBE_MIN))

    # ------------------------------------------------------------------ persistence
    def _part_state(self, partition: int, directory: Path, tag: str) -> tuple[dict[str, Any], str | None]:
        part = self._parts[partition]
        state = {"trained_rows": part.trained_rows, "rows_added": part.added, "bound": part.bound,
                 "nlist": 0 if part.index is None else int(part.index.nlist)}
        if part.index is None:
            return state, None
        name = f"index.{tag}.p{partition}.faiss"
        with map_errors("ivf save"):
            faiss.write_index(part.index, str(directory / name))
        return state, name

    def _part_load(self, partition: int, state: Mapping[str, Any], file: Path | None) -> _IVFPart:
        part = _IVFPart(self._spec)
        count = int(self._book.counts[partition])
        nlist = meta_int(state, "nlist", 0, max(count, 1))
        part.trained_rows, part.added = meta_int(state, "trained_rows"), meta_int(state, "rows_added")
        bound = state.get("bound")
        if not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound < 0:
            raise CorruptStoreError(f"ivf index state: bound must be a finite number >= 0; got {bound!r}")
        part.bound = float(bound)
        if (file is None) != (nlist == 0):
            raise CorruptStoreError(f"ivf partition {partition}: state says nlist={nlist} but index file is {file}")
        if file is None:
            return part
        reference = _new_index(self._spec, nlist)
        check_faiss_file(file, reference, ntotal=count)
        with map_errors(f"reading ivf index {file.name}", corrupt=True):
            index = faiss.read_index(str(file))
        if type(index) is not type(reference) or index.nlist != nlist or index.code_size != reference.code_size:
            raise CorruptStoreError(f"{file.name} is a {type(index).__name__} with nlist {index.nlist}; "
                                    f"expected {type(reference).__name__} with nlist {nlist}")
        quantizer = faiss.downcast_index(index.quantizer)
        if type(quantizer) is not faiss.IndexFlatL2 or quantizer.ntotal != nlist or quantizer.d != index.d:
            raise CorruptStoreError(f"{file.name}: its coarse quantizer is a {type(quantizer).__name__} of "
                                    f"{quantizer.ntotal} centroids; expected IndexFlatL2 of {nlist}")
        held = np.sort(list_ids(index))
        live = np.sort(self._table.rows("ids", partition, count).numpy())
        if not np.array_equal(held, live):
            raise CorruptStoreError(f"{file.name} does not index the ids of partition {partition}")
        part.attach(index)
        return part
