"""Assertions comparing a store's answers with the oracle's."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvmem.store import SearchResult
from kvmem.testing.model import BruteForceMemory, rounded

__all__ = ["check_search", "check_get", "snapshot", "same"]

RTOL = 1e-4


def _tol(reference: np.ndarray) -> np.ndarray:
    finite = np.where(np.isfinite(reference), np.abs(reference), 0)
    return RTOL * (1 + finite.max(axis=-1, keepdims=True))


def check_search(result: SearchResult, model: BruteForceMemory, queries: Any, k: int, *,
                 exact: bool) -> tuple[int, int]:
    """Assert ``result`` (3-D) is a correct answer; return ``(hits, wanted)`` for recall.

    Every backend: shapes and dtypes, padding only at the tail, ids live and
    unique, scores sorted and equal to the oracle's scores of the returned ids,
    keys and values equal to the stored rows. Exact backends: the score list
    equals the oracle's top-k (so ids agree up to ties).
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
    both = ~pad[..., 1:]
    rise = np.where(both, got[..., 1:] - np.where(both, got[..., :-1], 0), 0)
    assert (rise <= 1e-6 * (1 + np.abs(np.where(pad, 0, got)).max())).all(), "scores must be sorted best first"
    for p in range(P):
        live = set(model.live_ids(p).tolist())
        for j in range(nq):
            real = ids[p, j][ids[p, j] >= 0].tolist()
            assert len(set(real)) == len(real), f"duplicate ids in partition {p} query {j}: {real}"
            assert set(real) <= live, f"partition {p} returned ids it does not hold: {sorted(set(real) - live)}"
    truth = model.scores_of(queries, ids)
    np.testing.assert_allclose(got[~pad], truth[~pad], rtol=RTOL, atol=float(_tol(truth).max()),
                               err_msg="returned scores must be the exact scores of the returned keys")
    keys, values = model.get(ids)
    np.testing.assert_array_equal(result.keys.cpu().double().numpy(), keys)
    np.testing.assert_array_equal(result.values.cpu().double().numpy(), values)
    best, _ = model.search(queries, k)
    wanted = np.minimum(k, [model.count(p) for p in range(P)])[:, None] * np.ones((1, nq), int)
    kth = np.where(np.isfinite(best), best, np.inf).min(-1, keepdims=True)
    hits = np.minimum((~pad & (truth >= kth - _tol(best))).sum(-1), wanted)
    if exact:
        assert ((~pad).sum(-1) == wanted).all(), "an exact store returns min(k, rows held) ids"
        np.testing.assert_allclose(np.where(pad, 0, got), np.where(np.isinf(best), 0, best),
                                   rtol=RTOL, atol=float(_tol(best).max()),
                                   err_msg="exact search must return the true top-k scores")
        assert (hits == wanted).all()
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
