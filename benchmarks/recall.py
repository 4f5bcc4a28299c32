"""Exact ground truth and recall@k, measured the way ann-benchmarks measures it.

Scores follow kvmem's convention, higher is better: ``ip`` -> q.x,
``l2`` -> -||q - x||^2, ``cos`` -> cosine (0 against a zero vector).

:func:`ground_truth` scans the base in blocks with a running top-k, so its
memory is O(query block x base block), never O(q x N); the survivors are
re-scored in float64 and sorted by (score, id), so the result does not depend
on the block size.

:func:`recall_at_k` follows ann-benchmarks' ``knn`` metric: a returned id is a
hit when its true distance is within ``epsilon`` (default 1e-3) of the true
k-th distance, so a backend that returns a different member of a tie at the
boundary is not penalised. Distances are the ones ann-benchmarks uses:
euclidean ``sqrt(-score)``, angular ``1 - score``, dot ``-score``. True
scores of the returned ids are recomputed here from the vectors, never taken
from the backend (whose stored keys may be fp16). ``-1`` padding and repeated
ids count as misses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from kvmem.errors import InvalidInputError

from .datasets import METRICS, Dataset

__all__ = ["GroundTruth", "ground_truth", "exact_scores", "truth_from_neighbors",
           "dataset_truth", "knn_hits", "recall_at_k"]

_BLOCK_ELEMENTS = 1 << 22  # scores per (query block x base block): 16 MiB of float32


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """The true top-k of every query."""

    ids: np.ndarray  # (q, k) int64, best first; -1 where the base has fewer than k rows
    scores: np.ndarray  # (q, k) float64 exact scores; -inf where ids is -1
    metric: str  # "ip" | "l2" | "cos"

    @property
    def k(self) -> int:
        return self.ids.shape[1]


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise InvalidInputError(f"metric must be one of {METRICS}, got {metric!r}")


def _as_2d(name: str, a: np.ndarray, dim: int | None = None) -> None:
    if not isinstance(a, np.ndarray) or a.ndim != 2 or a.shape[0] == 0:
        raise InvalidInputError(f"{name} must be a non-empty 2-D array, got {type(a).__name__} "
                                f"{getattr(a, 'shape', '')}")
    if dim is not None and a.shape[1] != dim:
        raise InvalidInputError(f"{name} has dim {a.shape[1]}, expected {dim}")


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def _block_scores(q: np.ndarray, x: np.ndarray, metric: str) -> np.ndarray:
    """(qb, d) x (B, d) -> (qb, B) scores in q's dtype; ``q`` is already normalized for cos."""
    if metric == "cos":
        x = _normalize(x)
    s = q @ x.T  # (qb, B)
    if metric == "l2":  # -||q - x||^2 = 2 q.x - ||x||^2 - ||q||^2
        s *= 2
        s -= np.einsum("bd,bd->b", x, x)[None, :]
        s -= np.einsum("qd,qd->q", q, q)[:, None]
    return s


def exact_scores(base: np.ndarray, queries: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
    """Float64 scores of ``queries[i]`` against ``base[ids[i, j]]`` -> (q, m); -inf where ids is -1.

    Raises :class:`InvalidInputError` on an id outside [-1, N).
    """
    _check_metric(metric)
    ids = np.asarray(ids)
    integer = np.issubdtype(ids.dtype, np.integer)
    if ids.ndim != 2 or ids.shape[0] != queries.shape[0] or not integer:
        raise InvalidInputError(f"ids must be ({queries.shape[0]}, m) integers, got "
                                f"shape {ids.shape} dtype {ids.dtype}")
    n = base.shape[0]
    if ids.size and (ids.min() < -1 or ids.max() >= n):
        raise InvalidInputError(
            f"ids must lie in [-1, {n}), got values in [{ids.min()}, {ids.max()}]")
    out = np.full(ids.shape, -np.inf)  # (q, m)
    step = max(1, _BLOCK_ELEMENTS // max(1, ids.shape[1] * base.shape[1]))
    for lo in range(0, ids.shape[0], step):
        blk = ids[lo:lo + step]  # (qb, m)
        valid = blk >= 0
        q = np.asarray(queries[lo:lo + step], dtype=np.float64)  # (qb, d)
        x = np.asarray(base[np.where(valid, blk, 0)], dtype=np.float64)  # (qb, m, d)
        if metric == "l2":
            s = -np.sum((q[:, None, :] - x) ** 2, axis=-1)
        elif metric == "cos":
            s = np.einsum("qd,qmd->qm", _normalize(q), _normalize(x))
        else:
            s = np.einsum("qd,qmd->qm", q, x)
        out[lo:lo + step] = np.where(valid, s, -np.inf)
    return out


def _sort_best_first(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by score descending, ties by id ascending, -1 last."""
    tiebreak = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((tiebreak, -scores), axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(scores, order, -1)


def ground_truth(base: np.ndarray, queries: np.ndarray, k: int, metric: str = "ip", *,
                 base_block: int | None = None, progress: bool = False) -> GroundTruth:
    """The exact top-``k`` of every query over ``base`` (any float/int dtype, memmaps welcome).

    Blocks over queries and base rows; keeps ``k + slack`` float32 candidates
    per query and re-scores them in float64, so rounding in the blocked
    float32 pass cannot change the answer beyond near-exact ties.
    """
    _check_metric(metric)
    _as_2d("base", base)
    _as_2d("queries", queries, base.shape[1])
    if not isinstance(k, (int, np.integer)) or k <= 0:
        raise InvalidInputError(f"k must be a positive integer, got {k!r}")
    n, nq = base.shape[0], queries.shape[0]
    keep = min(n, k + max(8, k // 4))  # candidates kept per query
    q_block = min(nq, 1024)
    base_block = base_block or max(keep, _BLOCK_ELEMENTS // q_block)

    qs = np.asarray(queries, dtype=np.float32)
    if metric == "cos":
        qs = _normalize(qs)
    best_s = np.full((nq, keep), -np.inf, dtype=np.float32)  # (q, keep)
    best_i = np.full((nq, keep), -1, dtype=np.int64)  # (q, keep)
    starts: Iterable[int] = range(0, n, base_block)
    if progress:
        from .report import progress as _progress
        starts = _progress(starts, "ground truth", total=-(-n // base_block))
    for start in starts:
        x = np.asarray(base[start:start + base_block], dtype=np.float32)  # (B, d)
        if not np.isfinite(x).all():
            raise InvalidInputError(f"base rows {start}..{start + len(x) - 1} hold NaN or Inf")
        row_ids = np.arange(start, start + len(x), dtype=np.int64)  # (B,)
        for lo in range(0, nq, q_block):
            s = _block_scores(qs[lo:lo + q_block], x, metric)  # (qb, B)
            cand_s = np.concatenate([best_s[lo:lo + q_block], s], axis=1)  # (qb, keep + B)
            cand_i = np.concatenate(
                [best_i[lo:lo + q_block], np.broadcast_to(row_ids, s.shape)], axis=1)
            top = np.argpartition(-cand_s, keep - 1, axis=1)[:, :keep]  # (qb, keep)
            best_s[lo:lo + q_block] = np.take_along_axis(cand_s, top, 1)
            best_i[lo:lo + q_block] = np.take_along_axis(cand_i, top, 1)
    scores = exact_scores(base, queries, best_i, metric)  # (q, keep) float64
    ids, scores = _sort_best_first(best_i, scores)
    ids, scores = ids[:, :k], scores[:, :k]
    if keep < k:  # fewer base rows than k: pad
        pad = k - keep
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return GroundTruth(ids, scores, metric)


def truth_from_neighbors(base: np.ndarray, queries: np.ndarray, neighbors: np.ndarray,
                         metric: str) -> GroundTruth:
    """Ground truth from ids a file supplied (ann-benchmarks ``neighbors``, TEXMEX groundtruth).

    Their scores are recomputed in float64 from the vectors, so the tolerance
    of :func:`recall_at_k` compares like with like.
    """
    ids = np.asarray(neighbors, dtype=np.int64)
    scores = exact_scores(base, queries, ids, metric)  # (q, k_gt)
    return GroundTruth(ids, scores, metric)


def dataset_truth(dataset: Dataset, k: int, *, progress: bool = False) -> GroundTruth:
    """The dataset's own ground truth when it covers ``k``, else computed exactly."""
    if dataset.neighbors is not None and dataset.neighbors.shape[1] >= k:
        gt = truth_from_neighbors(dataset.base, dataset.queries, dataset.neighbors[:, :k],
                                  dataset.metric)
        return GroundTruth(*_sort_best_first(gt.ids, gt.scores), dataset.metric)
    return ground_truth(dataset.base, dataset.queries, k, dataset.metric, progress=progress)


def _distance(scores: np.ndarray, metric: str) -> np.ndarray:
    """kvmem score -> ann-benchmarks distance (lower is better; +inf for -inf)."""
    if metric == "l2":
        return np.sqrt(np.maximum(-scores, 0.0))
    if metric == "cos":
        return 1.0 - scores
    return -scores


def knn_hits(found_ids: np.ndarray, truth: GroundTruth, base: np.ndarray, queries: np.ndarray,
             k: int | None = None, epsilon: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Per-query (hits, wanted): how many of the first k returned ids are true neighbours.

    ``wanted`` is min(k, N) per query; ``found_ids`` may have fewer or more
    than k columns (missing ones are misses, extra ones are ignored).
    """
    k = truth.k if k is None else k
    if not isinstance(k, (int, np.integer)) or not 0 < k <= truth.k:
        raise InvalidInputError(f"k must be in 1..{truth.k} (the ground truth's k), got {k!r}")
    found = np.asarray(found_ids)
    if found.ndim != 2 or found.shape[0] != truth.ids.shape[0] or found.dtype.kind not in "iu":
        raise InvalidInputError(f"found ids must be ({truth.ids.shape[0]}, k) integers, "
                                f"got shape {found.shape} dtype {found.dtype}")
    found = found[:, :k].astype(np.int64)  # (q, <=k)
    # a repeated id is a miss: keep only its first occurrence
    srt = np.sort(found, axis=1)
    dup_sorted = np.zeros_like(srt, dtype=bool)
    dup_sorted[:, 1:] = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if dup_sorted.any():
        found = found.copy()
        for row in np.flatnonzero(dup_sorted.any(axis=1)):
            _, first = np.unique(found[row], return_index=True)
            mask = np.ones(found.shape[1], bool)
            mask[first] = False
            found[row, mask] = -1
    wanted = np.count_nonzero(truth.ids[:, :k] >= 0, axis=1)  # (q,)
    kth = truth.scores[np.arange(len(wanted)), np.maximum(wanted, 1) - 1]  # (q,)
    got = _distance(exact_scores(base, queries, found, truth.metric), truth.metric)  # (q, <=k)
    threshold = _distance(kth, truth.metric)[:, None] + epsilon  # (q, 1)
    hits = np.count_nonzero(got <= threshold, axis=1)
    return np.minimum(hits, wanted), wanted


def recall_at_k(found_ids: np.ndarray, truth: GroundTruth, base: np.ndarray, queries: np.ndarray,
                k: int | None = None, epsilon: float = 1e-3) -> float:
    """Mean recall@k over the queries (ann-benchmarks ``knn``; see the module docstring)."""
    hits, wanted = knn_hits(found_ids, truth, base, queries, k, epsilon)
    return float(hits.sum() / wanted.sum())
