"""``target_recall``: choose ``nprobe`` / ``ef`` by measuring recall on the store's own keys.

Neither faiss nor hnswlib offers this. For one partition:

1. sample up to :data:`QUERIES` of its stored keys as queries (seeded by the
   partition and its row count, so a store built the same way calibrates the same way);
2. find their exact top-``k+1`` with :func:`kvmem.topk.blocked_search` and drop
   each query's own row (leave-one-out: a stored key is not its own neighbour);
3. search the index at growing knob values (doubling, then bisection) and keep
   the smallest value at which recall@k, after exact rescoring, reaches the
   target with confidence: its mean over the sampled queries minus two
   standard errors must be at least the target (about a 97.5% one-sided bound;
   the sample's mean alone would land half the stores below their target).

What it measures is recall for queries distributed like the stored keys. In
a model, queries come from another projection than keys; when they sit
elsewhere (ip search is sensitive to that), the recall they get can differ,
so choose the target with some room, or fix ``nprobe`` / ``ef`` after
measuring on real queries.

Recall counts a returned row as a hit when its exact score is within a
relative 1e-5 of the true k-th score (ties are not misses), as ann-benchmarks
does. ``k`` is :data:`K` (32: a typical memory-attention top-k), or fewer when
the partition is small. Recall is close to monotone in both knobs (IVF: more
lists probed is a superset of candidates; HNSW: a larger beam), which the
bisection assumes.

If the target is out of reach -- the knob's range ends (each backend caps it
where its index stops being faster than a full exact scan), or recall stops
improving (an HNSW graph under ip can plateau short of 1) -- the calibration
says so (``exact=True``, with the recall the index got at the value where it
stopped) and the partition is searched exactly until a later calibration
reaches the target: a user who asked for a recall gets it, from the exact
search, rather than the index's best at any price. A per-call or fixed knob
still searches the index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvmem.errors import CorruptStoreError
from kvmem.stores._threads import cpus, spread
from kvmem.topk import NEG_INF, exact_scores

if TYPE_CHECKING:
    from kvmem.stores._ann import AnnStore

__all__ = ["Calibration", "calibrate", "smallest_value", "K", "QUERIES"]

K = 32              # recall@K is what a calibration measures
QUERIES = 512       # stored keys sampled as queries per calibration (standard error ~0.005 at recall 0.95)
_TIE_RTOL = 1e-5
_PLATEAU = 0.1      # a doubling that adds less than this fraction of the misses and of the recall: a plateau


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The outcome of calibrating one partition."""

    value: int          # the nprobe / ef chosen
    recall: float       # recall@k measured on the sample at that value
    rows: int           # rows the partition held when it was measured
    k: int              # the k of that recall (K, or fewer for a small partition)
    exact: bool = False  # the target is out of the index's reach: the partition is searched exactly

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, value_range: tuple[int, int]) -> Calibration | None:
        """From a saved state; None stays None. Raises CorruptStoreError when malformed."""
        if data is None:
            return None
        ints = ("value", "rows", "k")
        if isinstance(data, dict) and "exact" not in data:
            data = {**data, "exact": False}         # saved before the flag: the index was always searched
        ok = (isinstance(data, dict) and set(data) == {*ints, "recall", "exact"}
              and all(isinstance(data[n], int) and not isinstance(data[n], bool) and data[n] >= 0 for n in ints)
              and isinstance(data["recall"], (int, float)) and 0 <= data["recall"] <= 1
              and isinstance(data["exact"], bool) and value_range[0] <= data["value"] <= value_range[1])
        if not ok:
            raise CorruptStoreError(f"index state: calibration is malformed or out of range {value_range}: {data!r}")
        return cls(data["value"], float(data["recall"]), data["rows"], data["k"], data["exact"])


def reaches(measured: tuple[float, float], target: float) -> bool:
    """Whether a recall ``(mean, standard error)`` reaches ``target`` with confidence (mean less two errors)."""
    return measured[0] - 2 * measured[1] >= target


def smallest_value(recall_at: Callable[[int], tuple[float, float]], low: int, high: int,
                   target: float) -> tuple[int, tuple[float, float]]:
    """The smallest value in ``[low, high]`` (to within 1/16) whose recall, less two standard errors,
    reaches ``target``; ``recall_at(value)`` gives ``(mean, standard error)``. Returns the value and its pair.

    Doubling stops early when a doubling removes less than a tenth of the misses and adds less than
    a tenth to the recall: the index has plateaued (an ip graph can stop short of recall 1 at any ef)
    and the smaller value is kept. (At a low recall a doubling removes few misses but doubles the
    recall: IVF on unstructured data, where recall grows with the fraction of lists probed.)
    """

    def enough(measured: tuple[float, float]) -> bool:
        return reaches(measured, target)

    value, failed = low, low - 1
    recall = recall_at(value)
    while not enough(recall) and value < high:
        bigger = min(high, 2 * value)
        measured = recall_at(bigger)
        gain = measured[0] - recall[0]
        if gain < _PLATEAU * min(1 - recall[0], recall[0]) and not enough(measured):
            return value, recall                    # plateau: more of the knob buys next to nothing
        failed, value, recall = value, bigger, measured
    if not enough(recall):
        return value, recall                        # out of reach: the largest value
    while value - failed > max(1, value // 16):
        middle = (failed + value) // 2
        measured = recall_at(middle)
        if enough(measured):
            value, recall = middle, measured
        else:
            failed = middle
    return value, recall


def calibrate(store: AnnStore, partition: int, target: float, low: int, high: int) -> Calibration:
    """Calibrate the knob of one partition of ``store``; see the module docstring. Caller holds the write lock."""
    p = partition
    count = int(store._book.counts[p])
    k = min(K, count - 1)
    rng = np.random.default_rng([p, count])
    slots = np.sort(rng.choice(count, min(QUERIES, count), replace=False))          # (S,)
    queries = store._table.data["keys"][p, torch.from_numpy(slots)].float()        # (S, dim)
    own = torch.from_numpy(slots)[:, None]                                           # (S, 1)

    truth = store.exact_slots(queries[None], [p], k + 1)[0]                          # (S, k+1)
    true_scores = _scores(store, p, queries, truth, own)
    kth = true_scores.sort(-1, descending=True).values[:, k - 1]                     # (S,) k-th best, self excluded
    tol = _TIE_RTOL * (1 + kth.abs())
    q32 = queries.numpy()

    def recall_at(value: int) -> tuple[float, float]:
        spans = spread(lambda lo, hi: store._parts[p].search(q32[lo:hi], k + 1, value), len(q32), cpus())
        if any(f is None for f in spans):
            return 0.0, 0.0
        found = np.concatenate(spans)
        got = torch.from_numpy(store._book.slots_in(p, found))                      # (S, c)
        best = _scores(store, p, queries, got, own).topk(k, -1).values              # (S, k) after rescoring
        per_query = (best >= (kth - tol)[:, None]).double().mean(-1)                 # (S,)
        error = float(per_query.std()) / len(per_query) ** 0.5 if len(per_query) > 1 else 0.0
        return float(per_query.mean()), error

    value, measured = smallest_value(recall_at, low, max(low, high), target)
    return Calibration(value=value, recall=measured[0], rows=count, k=k, exact=not reaches(measured, target))


def _scores(store: AnnStore, p: int, queries: torch.Tensor, slots: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Exact scores ``(S, c)`` of ``slots (S, c)`` for ``queries (S, dim)``; -inf at -1 and at the query's own row."""
    keys = store._table.data["keys"][p][slots.clamp(min=0)]                          # (S, c, dim)
    scores = exact_scores(queries[None], keys[None], store.metric)[0]
    return scores.masked_fill((slots < 0) | (slots == own), NEG_INF)
