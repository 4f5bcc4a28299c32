"""The approximate indexes an ``lmdb`` store can keep beside its data: one per partition.

Each part mirrors the rows of one partition (labels are kvmem ids) and is
derived data: LMDB is the source of truth, so a part can always be rebuilt
from the stored keys. Written on hnswlib and faiss directly, with the
interface of the in-RAM ``hnsw``/``ivf`` backends' partition indexes:
``add``, ``remove``, ``search`` (candidate ids or None: search exactly),
``save``/``load``. Writes are serialised by the caller; searches may run
together (hnswlib's one ``ef`` per graph is switched under a lock).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kvmem.errors import map_errors

__all__ = ["HnswPart", "IvfPart", "PARTS", "prepare"]

_FIRST_SIZE = 1024
_EF_FLOOR = 64
_PER_LIST = 39              # faiss wants at least this many training rows per list
_TRAIN_AT = 1 << 15         # rows before an ivf part trains, unless nlist is fixed
_RETRAIN = 4                # an ivf part retrains when it holds this many times the rows it trained on


def prepare(metric: str, keys: np.ndarray) -> np.ndarray:
    """Keys or queries ``(n, dim)`` float32 as an index stores them: unit length for cos."""
    keys = np.ascontiguousarray(keys, np.float32)
    if metric != "cos":
        return keys
    norms = np.linalg.norm(keys, axis=1, keepdims=True)
    return np.divide(keys, norms, out=np.zeros_like(keys), where=norms > 0)


class HnswPart:
    """One partition's hnswlib graph; removed rows are marked deleted and their elements reused."""

    kind = "hnsw"
    param = "ef"

    def __init__(self, dim: int, metric: str, options: Mapping[str, Any], capacity: int | None,
                 index: Any = None, live: int = 0) -> None:
        import hnswlib

        self.metric, self.capacity, self.live = metric, capacity, live
        if index is None:
            from kvmem.stores.hnsw import build_beam

            index = hnswlib.Index(space="l2" if metric == "l2" else "ip", dim=dim)
            with map_errors("hnsw init"):
                index.init_index(max_elements=min(_FIRST_SIZE, capacity or _FIRST_SIZE), M=options["M"],
                                 ef_construction=build_beam(metric, options["ef_construction"]), random_seed=100,
                                 allow_replace_deleted=True)
        self.index = index
        self._ef_lock = threading.Lock()

    accepts = True                  # rows can be added (a graph grows from nothing)

    @property
    def indexed(self) -> bool:
        return self.live > 0

    def needs_training(self, rows: int) -> bool:
        return False

    def add(self, ids: np.ndarray, keys: np.ndarray) -> None:
        from kvmem.stores.hnsw import add_to_graph

        add_to_graph(self.index, ids, prepare(self.metric, keys), self.live, self.capacity)
        self.live += len(ids)

    def remove(self, ids: np.ndarray) -> None:
        from kvmem.stores.hnsw import remove_from_graph

        remove_from_graph(self.index, ids)
        self.live -= len(ids)

    def search(self, queries: np.ndarray, k: int, ef: int | None) -> np.ndarray | None:
        ef = max(_EF_FLOOR, 2 * k) if ef is None else ef
        try:
            with self._ef_lock:
                self.index.set_ef(ef)
                labels, _ = self.index.knn_query(prepare(self.metric, queries), k=min(k, self.live))
        except RuntimeError as exc:
            if "contiguous 2D array" in str(exc):
                return None                              # fewer than k reachable: the caller searches exactly
            with map_errors("hnsw search"):
                raise
        return labels.astype(np.int64)

    def state(self) -> dict[str, int]:
        return {"elements": int(self.index.element_count), "live": self.live}

    def save(self, path: Path) -> None:
        with map_errors("hnsw save"):
            self.index.save_index(str(path))

    @classmethod
    def load(cls, path: Path, dim: int, metric: str, options: Mapping[str, Any], capacity: int | None,
             state: Mapping[str, Any]) -> HnswPart:
        import hnswlib

        index = hnswlib.Index(space="l2" if metric == "l2" else "ip", dim=dim)
        with map_errors(f"reading {path.name}", corrupt=True):
            index.load_index(str(path), max_elements=int(state["elements"]), allow_replace_deleted=True)
        return cls(dim, metric, options, capacity, index, int(state["live"]))


class IvfPart:
    """One partition's faiss IVF-Flat index, trained once the partition holds enough rows
    (``nlist`` about 4 sqrt(N)), retrained when it has grown fourfold; exact until then.
    ``nprobe`` defaults to a sixteenth of the lists (at least 16)."""

    kind = "ivf"
    param = "nprobe"

    def __init__(self, dim: int, metric: str, options: Mapping[str, Any], capacity: int | None,
                 index: Any = None, trained_rows: int = 0) -> None:
        self.dim, self.metric, self.nlist = dim, metric, options["nlist"]
        self.index, self.trained_rows = index, trained_rows

    @property
    def indexed(self) -> bool:
        return self.index is not None

    accepts = indexed

    def train_at(self) -> int:
        return _PER_LIST * self.nlist if self.nlist else _TRAIN_AT

    def needs_training(self, rows: int) -> bool:
        """Whether a partition of ``rows`` rows should (re)build this index from all its rows."""
        if self.index is None:
            return rows >= self.train_at()
        return self.nlist is None and rows >= _RETRAIN * self.trained_rows

    def train(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """Build a fresh index over every row of the partition."""
        import faiss

        keys = prepare(self.metric, keys)
        nlist = self.nlist or max(1, min(int(4 * math.sqrt(len(keys))), len(keys) // _PER_LIST))
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        quantizer = faiss.IndexFlatL2(self.dim) if metric == faiss.METRIC_L2 else faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, metric)
        index.own_fields = True
        quantizer.this.disown()
        sample = keys[np.random.default_rng(0).permutation(len(keys))[:64 * nlist]]
        with map_errors("ivf train"):
            index.train(sample)
            index.add_with_ids(keys, ids)
        self.index, self.trained_rows = index, len(keys)

    def add(self, ids: np.ndarray, keys: np.ndarray) -> None:
        with map_errors("ivf add"):
            self.index.add_with_ids(prepare(self.metric, keys), ids)

    def remove(self, ids: np.ndarray) -> None:
        import faiss

        with map_errors("ivf remove"):
            self.index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(np.ascontiguousarray(ids))))

    def search(self, queries: np.ndarray, k: int, nprobe: int | None) -> np.ndarray | None:
        import faiss

        if self.index is None:
            return None
        nlist = self.index.nlist
        nprobe = min(nlist, max(16, nlist // 16) if nprobe is None else nprobe)
        with map_errors("ivf search"):
            _, labels = self.index.search(prepare(self.metric, queries), k,
                                          params=faiss.SearchParametersIVF(nprobe=nprobe))
        return labels

    def state(self) -> dict[str, int]:
        return {"trained_rows": self.trained_rows}

    def save(self, path: Path) -> None:
        import faiss

        with map_errors("ivf save"):
            faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, dim: int, metric: str, options: Mapping[str, Any], capacity: int | None,
             state: Mapping[str, Any]) -> IvfPart:
        import faiss

        with map_errors(f"reading {path.name}", corrupt=True):
            index = faiss.read_index(str(path))
        if not isinstance(index, faiss.IndexIVFFlat) or index.d != dim:
            raise ValueError(f"{path.name} is not an IVF-Flat index of dim {dim}")
        return cls(dim, metric, options, capacity, index, int(state["trained_rows"]))


PARTS = {"hnsw": HnswPart, "ivf": IvfPart}
