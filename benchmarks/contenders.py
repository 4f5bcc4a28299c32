"""What ``kvmem bench`` measures: kvmem backends and the raw libraries they wrap.

A :class:`Contender` builds itself on a dataset and answers batched top-k
queries with ids; everything is built from the same float32 base rows so the
rows measured side by side in one run are comparable.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

import kvmem
from kvmem.errors import InvalidInputError

from .datasets import Dataset

__all__ = ["Built", "Contender", "CONTENDERS", "contender", "add_rows", "batches", "learn", "prepared"]

ADD_BATCH = 65536


class Built(Protocol):
    """A contender after its build: answers ``search`` and says how many bytes it holds."""

    nbytes: int

    def search(self, queries: np.ndarray, k: int, **params: Any) -> np.ndarray:
        """Ids ``(q, k)`` of the best rows, ``-1`` padded."""

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str                                  # "exact", "faiss-flat", ...
    build: Callable[[Dataset, Mapping[str, Any]], Built]
    kvmem: bool = False                        # a kvmem backend (takes the storage dtype) or a raw library
    peer: str | None = None                    # the raw library this one is compared with
    sweep_param: str | None = None             # "nprobe", "ef": the search knob a sweep varies
    description: str = ""


def batches(base: np.ndarray) -> Iterator[np.ndarray]:
    """A (possibly memory-mapped) base as contiguous float32 batches of ``ADD_BATCH`` rows."""
    for start in range(0, len(base), ADD_BATCH):
        yield np.ascontiguousarray(base[start:start + ADD_BATCH], dtype=np.float32)


def add_rows(store: kvmem.MemoryStore, base: np.ndarray) -> None:
    """Add a base to a one-partition store in batches."""
    for rows in batches(base):
        store.add(torch.from_numpy(rows), torch.zeros(len(rows), 1))


def learn(store: kvmem.MemoryStore, data: Dataset, k: int = 32) -> None:
    """Ask a store that learns from its queries (ivf, hnsw) the dataset's held-apart ``asked`` queries, in
    batches of 100 as a model would, then freeze it: the queries it is measured on must never join its
    sample, or its hub would hold their exact neighbours and the recall measured on them would be the
    recall of questions it has seen answered. Without ``asked`` queries it stays calibrated on its keys.
    Stores that do not learn (exact, lmdb) are left as they are."""
    if "query_sample" not in kvmem.registry.resolve(store.backend).defaults:
        return
    if data.asked is not None:
        asked = np.ascontiguousarray(data.asked, dtype=np.float32)
        for lo in range(0, len(asked), 100):
            store.search(torch.from_numpy(asked[lo:lo + 100]), min(k, len(store)))
        store._settle()
    store.freeze()


class _Kvmem:
    def __init__(self, backend: str, data: Dataset, options: Mapping[str, Any]) -> None:
        opts = dict(options)
        dtype = opts.pop("dtype", "float32")
        self.directory = None
        if backend in C_ON_DISK:                                # a store kept on disk: a scratch directory
            self.directory = tempfile.mkdtemp(prefix=f"kvmem-bench-{backend}-")
            opts = {**C_ON_DISK[backend], **opts, "path": f"{self.directory}/store"}
            backend = "lmdb"
        self.store = kvmem.create(backend, dim=data.dim, value_dim=1, metric=data.metric, dtype=dtype, **opts)
        add_rows(self.store, data.base)
        learn(self.store, data)

    @property
    def nbytes(self) -> int:
        return self.store.nbytes()

    def search(self, queries: np.ndarray, k: int, **params: Any) -> np.ndarray:
        return self.store.search(torch.from_numpy(queries), k, **params).ids.numpy()

    def close(self) -> None:
        self.store.close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


C_ON_DISK: dict[str, dict[str, Any]] = {"lmdb": {}, "lmdb-hnsw": {"index": "hnsw"}}   # contender -> lmdb options


def prepared(x: np.ndarray, metric: str) -> np.ndarray:
    """float32 rows as a raw library is given them: unit length for ``cos``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cos":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    return x


class _FaissFlat:
    """faiss ``IndexFlatIP`` / ``IndexFlatL2``: the brute-force reference library."""

    def __init__(self, data: Dataset, options: Mapping[str, Any]) -> None:
        import faiss

        self.metric = data.metric
        self.index = faiss.IndexFlatL2(data.dim) if data.metric == "l2" else faiss.IndexFlatIP(data.dim)
        for rows in batches(data.base):
            self.index.add(prepared(rows, data.metric))
        self.nbytes = self.index.ntotal * data.dim * 4

    def search(self, queries: np.ndarray, k: int, **params: Any) -> np.ndarray:
        return self.index.search(prepared(queries, self.metric), k)[1]

    def close(self) -> None:
        self.index.reset()


class _TorchNaive:
    """``torch.topk(q @ K.T)``: what a model's code does without a memory library."""

    def __init__(self, data: Dataset, options: Mapping[str, Any]) -> None:
        self.metric = data.metric
        self.keys = torch.from_numpy(prepared(data.base, data.metric))
        self.sqnorm = self.keys.pow(2).sum(1)
        self.nbytes = self.keys.numel() * 4

    def search(self, queries: np.ndarray, k: int, **params: Any) -> np.ndarray:
        q = torch.from_numpy(prepared(queries, self.metric))
        out = []
        for start in range(0, len(q), 256):        # bound the q x N matrix to 256 rows at a time
            scores = q[start:start + 256] @ self.keys.T
            if self.metric == "l2":
                scores = 2 * scores - self.sqnorm
            out.append(scores.topk(min(k, len(self.keys)), 1).indices)
        return torch.cat(out).numpy()

    def close(self) -> None:
        self.keys = torch.empty(0)


class _RawIVF:
    """Raw faiss IndexIVFFlat, nlist 4 sqrt(N) (at most N/39); nprobe per call (faiss's default 1 without one)."""

    def __init__(self, data: Dataset, options: Mapping[str, Any]) -> None:
        from kvmem.stores.ivf import index_nbytes

        from .ann import build_faiss_ivf

        nlist = options.get("nlist") or max(1, min(round(4 * math.sqrt(data.size)), data.size // 39))
        self.index, _ = build_faiss_ivf(data, nlist)
        self.nbytes, self.metric = index_nbytes(self.index), data.metric

    def search(self, queries: np.ndarray, k: int, nprobe: int = 1) -> np.ndarray:
        import faiss

        params = faiss.SearchParametersIVF(nprobe=nprobe)
        return self.index.search(prepared(queries, self.metric), k, params=params)[1]

    def close(self) -> None:
        self.index.reset()


class _RawHNSW:
    """Raw hnswlib with kvmem's M (16) and ef_construction (500 for ip); ef per call (hnswlib's 10 without one)."""

    def __init__(self, data: Dataset, options: Mapping[str, Any]) -> None:
        from kvmem.stores.hnsw import build_beam, graph_nbytes

        from .ann import build_hnswlib

        beam = build_beam(data.metric, options.get("ef_construction"))
        self.index, _ = build_hnswlib(data, options.get("M", 16), beam)
        self.nbytes = graph_nbytes(self.index)

    def search(self, queries: np.ndarray, k: int, ef: int = 10) -> np.ndarray:
        self.index.set_ef(ef)                       # one caller at a time: kvmem bench is serial
        return self.index.knn_query(queries, min(k, self.index.get_current_count()))[0].astype(np.int64)

    def close(self) -> None:
        self.index = None


def _kvmem(backend: str) -> Callable[[Dataset, Mapping[str, Any]], Built]:
    return lambda data, options: _Kvmem(backend, data, options)


CONTENDERS: dict[str, Contender] = {
    c.name: c for c in (
        Contender("exact", _kvmem("exact"), kvmem=True, peer="faiss-flat",
                  description="kvmem exact (torch, blocked top-k)"),
        Contender("faiss-flat", _FaissFlat, description="raw faiss IndexFlat"),
        Contender("ivf", _kvmem("ivf"), kvmem=True, peer="faiss-ivf", sweep_param="nprobe",
                  description="kvmem ivf (faiss IVF-Flat; target_recall 0.95 unless nprobe is given)"),
        Contender("faiss-ivf", _RawIVF, sweep_param="nprobe", description="raw faiss IndexIVFFlat"),
        Contender("hnsw", _kvmem("hnsw"), kvmem=True, peer="hnswlib", sweep_param="ef",
                  description="kvmem hnsw (hnswlib; target_recall 0.95 unless ef is given)"),
        Contender("hnswlib", _RawHNSW, sweep_param="ef", description="raw hnswlib"),
        Contender("lmdb", _kvmem("lmdb"), kvmem=True, peer="exact",
                  description="kvmem lmdb: exact, streamed from the memory map (vs the in-RAM exact store)"),
        Contender("lmdb-hnsw", _kvmem("lmdb-hnsw"), kvmem=True, sweep_param="ef",
                  description="kvmem lmdb with an hnswlib index beside the data"),
        Contender("torch-naive", _TorchNaive, description="torch.topk(q @ K.T)"),
    )
}


def contender(name: str) -> Contender:
    try:
        return CONTENDERS[name]
    except KeyError:
        raise InvalidInputError(f"backend must be one of {sorted(CONTENDERS)}; got {name!r}") from None


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls (after one warm-up call) and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def names(spec: str | Sequence[str]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [contender(n.strip()).name for n in items if n.strip()]
