"""Raw hnswlib graphs of one dataset built several ways: recall@k and QPS along ``ef``.

What chose ``hnsw``'s ``ef_construction`` default for ``ip`` (500)::

    python -m kvmem.benchmarks.hnsw_beam --size 1000000 --variants ip:16:200,ip:32:200,ip:16:500,lift:16:200

A variant is ``space:M:ef_construction``; ``space`` is ``ip``, ``l2``, ``cosine`` (the graph of
normalised keys; its ``ef`` candidates rescored by the dataset's metric) or ``lift`` (the
MIPS-to-L2 reduction: keys get sqrt(B^2 - |k|^2), queries 0, an ``l2`` graph).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .datasets import Dataset, load_dataset
from .recall import dataset_truth, recall_at_k
from .report import markdown_table

__all__ = ["build", "search", "run", "main"]


def build(data: Dataset, space: str, M: int, ef_construction: int) -> tuple[Any, float]:
    """The graph of ``data.base`` for one variant (every row in one ``add_items``) and its build seconds."""
    import hnswlib

    base = np.ascontiguousarray(data.base, np.float32)
    if space == "lift":
        norms = np.linalg.norm(base, axis=1)
        base = np.hstack([base, np.sqrt((1.05 * norms.max()) ** 2 - norms ** 2)[:, None]]).astype(np.float32)
    start = time.perf_counter()
    index = hnswlib.Index(space="l2" if space == "lift" else space, dim=base.shape[1])
    index.init_index(max_elements=len(base), M=M, ef_construction=ef_construction, random_seed=100)
    index.add_items(base, np.arange(len(base)))
    return index, time.perf_counter() - start


def search(index: Any, data: Dataset, space: str, ef: int, k: int) -> np.ndarray:
    """Ids ``(q, k)`` found at ``ef``; a cosine graph's ``ef`` candidates are rescored by the dataset's metric."""
    queries = np.ascontiguousarray(data.queries, np.float32)
    if space == "lift":
        queries = np.hstack([queries, np.zeros((len(queries), 1), np.float32)])
    index.set_ef(ef)
    if space != "cosine":
        return index.knn_query(queries, k)[0].astype(np.int64)
    ids = index.knn_query(queries, ef)[0].astype(np.int64)                            # (q, ef)
    keys = np.asarray(data.base, np.float32)[ids]                                      # (q, ef, dim)
    scores = (-((keys - queries[:, None]) ** 2).sum(-1) if data.metric == "l2"
              else np.einsum("qd,qcd->qc", queries, keys))
    return np.take_along_axis(ids, np.argsort(-scores, 1)[:, :k], 1)


def run(data: Dataset, variants: Sequence[str], efs: Sequence[int], k: int = 32) -> list[dict[str, Any]]:
    truth = dataset_truth(data, k)
    rows = []
    for variant in variants:
        space, M, beam = variant.split(":")
        index, build_s = build(data, space, int(M), int(beam))
        for ef in efs:
            start = time.perf_counter()
            ids = search(index, data, space, ef, k)
            secs = time.perf_counter() - start
            rows.append({"variant": variant, "build_s": build_s, "ef": ef, "qps": len(ids) / secs,
                         "recall": recall_at_k(ids, truth, data.base, data.queries, k)})
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m kvmem.benchmarks.hnsw_beam", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="clustered")
    parser.add_argument("--metric", default="ip")
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--variants", default="ip:16:200,ip:32:200,ip:16:500,lift:16:200")
    parser.add_argument("--efs", default="64,128,256,512,1024,2048")
    args = parser.parse_args(argv)
    data = load_dataset(args.dataset, n=args.size, dim=args.dim, queries=args.queries, metric=args.metric)
    rows = run(data, args.variants.split(","), [int(e) for e in args.efs.split(",")], args.k)
    print(markdown_table(["variant (space:M:ef_construction)", "build s", "ef", "recall", "QPS"],
                         [[r["variant"], r["build_s"], r["ef"], r["recall"], r["qps"]] for r in rows]))
    return rows


if __name__ == "__main__":
    main()
