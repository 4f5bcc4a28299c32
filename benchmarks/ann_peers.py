"""``ivf``, ``hnsw`` and their raw peers as ``kvmem bench`` contenders (:mod:`kvmem.benchmarks.contenders`).

``contenders()`` returns them keyed by name: ``ivf`` (peer ``faiss-ivf``) and ``hnsw``
(peer ``hnswlib``), each with its sweep knob. The raw peers are built as their
libraries' documentation suggests (:func:`kvmem.benchmarks.ann.build_faiss_ivf`,
:func:`kvmem.benchmarks.ann.build_hnswlib`); without a sweep they search at their
libraries' defaults (nprobe 1, ef 10), so compare them at equal settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .ann import _unit, build_faiss_ivf, build_hnswlib, build_kvmem
from .datasets import Dataset

__all__ = ["contenders"]


class _Store:
    """A kvmem ``ivf`` / ``hnsw`` store as a :class:`kvmem.benchmarks.contenders.Built`."""

    def __init__(self, backend: str, data: Dataset, options: Mapping[str, Any]) -> None:
        self.store, _ = build_kvmem(backend, data, **options)
        self.nbytes = self.store.nbytes()

    def search(self, queries: np.ndarray, k: int, **params: Any) -> np.ndarray:
        return self.store.search(torch.from_numpy(queries), k, **params).ids.numpy()

    def close(self) -> None:
        self.store.close()


class _RawIVF:
    """Raw faiss IndexIVFFlat, nlist 4 sqrt(N) (at most N/39); nprobe per call (faiss's default 1 without one)."""

    def __init__(self, data: Dataset, options: Mapping[str, Any]) -> None:
        from kvmem.stores.ivf import index_nbytes

        nlist = options.get("nlist") or max(1, min(round(4 * math.sqrt(data.size)), data.size // 39))
        self.index, _ = build_faiss_ivf(data, nlist)
        self.nbytes, self.metric = index_nbytes(self.index), data.metric

    def search(self, queries: np.ndarray, k: int, nprobe: int = 1) -> np.ndarray:
        import faiss

        q = _unit(queries) if self.metric == "cos" else queries
        return self.index.search(q, k, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]

    def close(self) -> None:
        self.index.reset()


class _RawHNSW:
    """Raw hnswlib, M 16 and ef_construction 200 (both libraries' defaults); ef per call (10 without one)."""

    def __init__(self, data: Dataset, options: Mapping[str, Any]) -> None:
        from kvmem.stores.hnsw import graph_nbytes

        self.index, _ = build_hnswlib(data, options.get("M", 16), options.get("ef_construction", 200))
        self.nbytes = graph_nbytes(self.index)

    def search(self, queries: np.ndarray, k: int, ef: int = 10) -> np.ndarray:
        self.index.set_ef(ef)                       # one caller at a time: kvmem bench is serial
        return self.index.knn_query(queries, k)[0].astype(np.int64)

    def close(self) -> None:
        self.index = None


def contenders() -> dict[str, Any]:
    """``ivf``, ``hnsw`` and their raw peers as :class:`kvmem.benchmarks.contenders.Contender` s."""
    from .contenders import Contender

    return {c.name: c for c in (
        Contender("ivf", lambda data, options: _Store("ivf", data, options), kvmem=True, peer="faiss-ivf",
                  sweep_param="nprobe", description="kvmem ivf (faiss IVF-Flat, target_recall 0.95)"),
        Contender("faiss-ivf", _RawIVF, sweep_param="nprobe", description="raw faiss IndexIVFFlat"),
        Contender("hnsw", lambda data, options: _Store("hnsw", data, options), kvmem=True, peer="hnswlib",
                  sweep_param="ef", description="kvmem hnsw (hnswlib, target_recall 0.95)"),
        Contender("hnswlib", _RawHNSW, sweep_param="ef", description="raw hnswlib"),
    )}
