"""Assertions comparing a store's answers with the oracle's."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvmem.store import SearchResult
from kvmem.testing.model import BruteForceMemory, rounded

__all__ = ["check_search", "check_get", "score_error", "snapshot", "same"]

RTOL = 1e-4            # approximate stores: returned scores against the oracle's (rescored, any path)
_U32 = 2.0 ** -24      # unit roundoff of float32


def score_error(queries: Any, model: BruteForceMemory, scale: np.ndarray) -> np.ndarray:
    """A bound ``(P, q, 1)`` on the float32 rounding error of one score, for scores of size ``scale (P, q, 1)``.

    A store scores float32 queries against its stored keys in float32; the oracle scores the same
    numbers in float64. Standard bounds (Higham, ch. 3) on a length-``d`` sum: ``ip``
    ``d u |q| |k|``, ``l2`` ``(d + 3) u |s|`` (a sum of squares of differences: relative to the
    score itself, not to ``|k|^2``), ``cos`` ``(2d + 4) u``; doubled for slack. This is the
    resolution of an exact answer: two rows whose true scores differ by more must come out in order.
    """
    q = rounded(queries, torch.float32)                                                  # (P, q, d)
    d = model.dim
    if model.metric == "l2":
        return 2 * (d + 3) * _U32 * scale
    if model.metric == "cos":
        return np.full(scale.shape, 2 * (2 * d + 4) * _U32)
    knorm = np.array([max((np.linalg.norm(key) for key, _ in rows.values()), default=0.0)
                      for rows in model.rows])                                           # (P,)
    return 2 * d * _U32 * np.linalg.norm(q, axis=-1, keepdims=True) * knorm[:, None, None]


def _top_scale(*scores: np.ndarray) -> np.ndarray:
    """The largest finite ``|score|`` of each query among ``scores (P, q, c)``, ``(P, q, 1)``."""
    finite = [np.where(np.isfinite(s), np.abs(s), 0).max(-1, keepdims=True) for s in scores]
    return np.maximum.reduce(finite)


def check_search(result: SearchResult, model: BruteForceMemory, queries: Any, k: int, *,
                 exact: bool) -> tuple[int, int]:
    """Assert ``result`` (3-D) is a correct answer; return ``(hits, wanted)`` for recall.

    Every backend: shapes and dtypes, padding only at the tail, ids live and
    unique, scores sorted and equal to the oracle's scores of the returned ids,
    keys and values equal to the stored rows. Exact backends: ``min(k, rows held)``
    ids, every one of them in the float64 top-k, and every row whose true score
    beats the k-th by more than float32 resolution (:func:`score_error`) returned;
    the scores equal the oracle's top-k to that resolution. Rows closer to the
    k-th than that are ties, and either may be returned.
    """
    P, nq = result.scores.shape[:2]
    assert result.scores.shape == (P, nq, k) and result.scores.dtype == torch.float32
    assert result.ids.shape == (P, nq, k) and result.ids.dtype == torch.int64
    assert result.keys.shape == (P, nq, k, model.dim) and result.keys.dtype == model.dtype
    assert result.values.shape == (P, nq, k, model.value_dim) and result.values.dtype == model.dtype
    ids = result.ids.cpu().numpy()
    got = result.scores.cpu().double().numpy()
    pad = ids < 0
    assert (np.diff(pad.astype(int), axis=-1) >= 0).all(), "padding (-1) must only trail the real ids"
    assert np.isneginf(got[pad]).all(), "padded scores must be -inf"
    assert np.isfinite(got[~pad]).all(), "real scores must be finite"
    for p in range(P):
        live = set(model.live_ids(p).tolist())
        for j in range(nq):
            real = ids[p, j][ids[p, j] >= 0].tolist()
            assert len(set(real)) == len(real), f"duplicate ids in partition {p} query {j}: {real}"
            assert set(real) <= live, f"partition {p} returned ids it does not hold: {sorted(set(real) - live)}"
    truth = model.scores_of(queries, ids)                                                # (P, q, k) float64
    best, best_ids = model.search(queries, k)
    tol = score_error(queries, model, _top_scale(truth, best))                           # (P, q, 1)
    err = np.abs(np.where(pad, 0, got - np.where(pad, 0, truth)))
    assert (err <= (tol if exact else np.maximum(tol, RTOL * (1 + _top_scale(truth))))).all(), (
        f"returned scores must be the exact scores of the returned keys; worst error {err.max():.3g}")
    both = ~pad[..., 1:]
    rise = np.where(both, got[..., 1:] - np.where(both, got[..., :-1], 0), 0)
    assert (rise <= 2 * tol).all(), "scores must be sorted best first"
    keys, values = model.get(ids)
    np.testing.assert_array_equal(result.keys.cpu().double().numpy(), keys)
    np.testing.assert_array_equal(result.values.cpu().double().numpy(), values)
    wanted = np.minimum(k, [model.count(p) for p in range(P)])[:, None] * np.ones((1, nq), int)
    kth = np.where(np.isfinite(best), best, np.inf).min(-1, keepdims=True)               # (P, q, 1)
    hits = np.minimum((~pad & (truth >= kth - 2 * tol)).sum(-1), wanted)
    if exact:
        real = (~pad).sum(-1)
        assert (real == wanted).all(), f"an exact store returns min(k, rows held) ids; got {real} for {wanted}"
        assert (hits == wanted).all(), (
            f"exact search returned rows outside the true top-{k}: {int((wanted - hits).sum())} of {int(wanted.sum())}")
        must = np.isfinite(best) & (best > kth + 2 * tol)                                # clear winners, not ties
        for p, j, c in zip(*np.nonzero(must)):
            assert best_ids[p, j, c] in ids[p, j], (
                f"partition {p} query {j}: id {best_ids[p, j, c]} (true score {best[p, j, c]:.9g}) beats the "
                f"k-th ({kth[p, j, 0]:.9g}) by more than float32 resolution ({tol[p, j, 0]:.3g}) and is missing")
        ranked = -np.sort(-truth, -1)                                                    # (P, q, k) best first
        finite = np.isfinite(best)
        gap = np.abs(np.where(finite, ranked - np.where(finite, best, 0), 0))
        assert (gap <= 2 * tol).all(), (
            f"exact search must return the true top-k scores; worst difference {gap.max():.3g}")
    return int(hits.sum()), int(wanted.sum())


def check_get(store_keys: torch.Tensor, store_values: torch.Tensor, model: BruteForceMemory,
              ids: np.ndarray) -> None:
    keys, values = model.get(ids)
    np.testing.assert_array_equal(store_keys.cpu().double().numpy(), keys)
    np.testing.assert_array_equal(store_values.cpu().double().numpy(), values)


def snapshot(store: Any, queries: Any, k: int = 5) -> dict[str, Any]:
    """Everything observable about a store, to assert a failed call changed nothing."""
    counts = [store.count(p) for p in range(store.partitions)]
    res = store.search(queries, k)
    return {"counts": counts, "len": len(store), "scores": res.scores.clone(), "ids": res.ids.clone(),
            "keys": rounded(res.keys, torch.float32), "next": store._book.next_ids.tolist()}


def same(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether two :func:`snapshot` s agree exactly."""
    return before.keys() == after.keys() and all(
        torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else np.array_equal(v, after[k])
        for k, v in before.items())
