"""``target_recall``: choose ``nprobe`` / ``ef`` by measuring recall against exact search.

Neither faiss nor hnswlib offers this. For one partition:

1. take the queries it rests on: the partition's sample of asked queries
   (:class:`kvmem.stores._asked.AskedQueries`) once it holds
   :data:`~kvmem.stores._asked.MIN_ASKED` of them; before that, up to
   :data:`QUERIES` of its stored keys (seeded by the partition and its row
   count), which stand in for queries until real ones arrive -- attention
   queries lie elsewhere in the space than keys, and recall on keys used as
   queries can be far from theirs, in either direction;
2. find their exact top-``k`` with :func:`kvmem.topk.blocked_search` (for
   stored keys, top-``k+1`` less each query's own row: a stored key is not its
   own neighbour);
3. search the index at growing knob values (doubling, then bisection) and keep
   the smallest value at which recall@k, after exact rescoring, reaches the
   target with confidence: its mean over the queries minus two standard errors
   must be at least the target (about a 97.5% one-sided bound; the sample's
   mean alone would land half the stores below their target).

On asked queries the candidates include the hub's
(:class:`~kvmem.stores._hub.Hub`), no sampled query handed the ids only it brought,
and the calibration's exact neighbours become the partition's new hub. The
hub is used only as far as it pays: the plain index alone, and the hub's
lists alone (the index not searched at all), are calibrated on the same asked
queries too, and of those that reach the target the fastest serves (timed as
a search runs it; either reduced form only when faster than both together by
:data:`_MARGIN`). At 100k attention keys the lists hold nearly every key and
plain ivf serves; where a graph built on keys cannot reach the queries, its
beam costs more than it finds and the hub answers alone (``index=False`` in
the record; a knob given per call or by option always searches the index).
The record also carries the recall of stored keys used as queries at the
chosen value (``key_recall``), beside the recall of the asked queries.

Recall counts a returned row as a hit when its exact score is within a
relative 1e-5 of the true k-th score (ties are not misses), as ann-benchmarks
does. ``k`` is :data:`K` (32: a typical memory-attention top-k), or fewer when
the partition is small. Recall is close to monotone in both knobs (IVF: more
lists probed is a superset of candidates; HNSW: a larger beam), which the
bisection assumes.

If the target is out of reach -- the knob's range ends (each backend caps it
where its index stops being faster than a full exact scan), or recall stops
improving (an HNSW graph under ip can plateau short of 1; a doubling that seems
to level off is checked against the top of the range before it is believed:
queries whose top-k is mostly a few "sink" keys gain little per doubling at
first and much later) -- the calibration says so (``exact=True``, with the
recall the index got at the value where it stopped) and the partition is
searched exactly until a later calibration reaches the target: a user who
asked for a recall gets it, from the exact search, rather than the index's
best at any price. A per-call or fixed knob still searches the index.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvmem.errors import CorruptStoreError
from kvmem.stores._hub import Hub, depth_for, merge
from kvmem.stores._threads import cpus, spread
from kvmem.topk import NEG_INF, exact_scores

if TYPE_CHECKING:
    from kvmem.stores._ann import AnnStore

__all__ = ["Calibration", "calibrate", "smallest_value", "K", "QUERIES"]

_Option = tuple["Hub | None", bool, int, tuple[float, float]]   # hub, index, value, (recall, error)

K = 32              # recall@K is what a calibration measures
QUERIES = 512       # stored keys sampled as queries per calibration (standard error ~0.005 at recall 0.95)
_TIE_RTOL = 1e-5
_MARGIN = 1.25      # the plain index, or the hub alone, serves only when this much faster than both together
_PLATEAU = 0.1      # a doubling that adds less than this fraction of the misses and of the recall: a plateau


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The outcome of calibrating one partition."""

    value: int          # the nprobe / ef chosen
    recall: float       # recall@k measured on the calibration's queries at that value
    rows: int           # rows the partition held when it was measured
    k: int              # the k of that recall (K, or fewer for a small partition)
    exact: bool = False  # the target is out of the index's reach: the partition is searched exactly
    queries: int = 0    # asked queries the recall rests on; 0: stored keys used as queries
    key_recall: float | None = None  # recall of stored keys used as queries at that value
    index: bool = True  # the index's own candidates join the hub's; False: the hub's lists alone answer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, value_range: tuple[int, int]) -> Calibration | None:
        """From a saved state; None stays None. Raises CorruptStoreError when malformed."""
        if data is None:
            return None
        ints = ("value", "rows", "k", "queries")
        if isinstance(data, dict):                  # saved before a field: exact=False, measured on keys, index
            data = {"exact": False, "queries": 0, "key_recall": data.get("recall"), "index": True, **data}
        ok = (isinstance(data, dict) and set(data) == {*ints, "recall", "exact", "key_recall", "index"}
              and all(isinstance(data[n], int) and not isinstance(data[n], bool) and data[n] >= 0 for n in ints)
              and _fraction(data["recall"]) and (data["key_recall"] is None or _fraction(data["key_recall"]))
              and isinstance(data["exact"], bool) and isinstance(data["index"], bool)
              and value_range[0] <= data["value"] <= value_range[1])
        if not ok:
            raise CorruptStoreError(f"index state: calibration is malformed or out of range {value_range}: {data!r}")
        return cls(data["value"], float(data["recall"]), data["rows"], data["k"], data["exact"], data["queries"],
                   None if data["key_recall"] is None else float(data["key_recall"]), data["index"])


def _fraction(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1


def reaches(measured: tuple[float, float], target: float) -> bool:
    """Whether a recall ``(mean, standard error)`` reaches ``target`` with confidence (mean less two errors)."""
    return measured[0] - 2 * measured[1] >= target


def smallest_value(recall_at: Callable[[int], tuple[float, float]], low: int, high: int,
                   target: float) -> tuple[int, tuple[float, float]]:
    """The smallest value in ``[low, high]`` (to within 1/16) whose recall, less two standard errors,
    reaches ``target``; ``recall_at(value)`` gives ``(mean, standard error)``. Returns the value and its pair.

    A doubling that removes less than a tenth of the misses and adds less than a tenth to the
    recall looks like a plateau (an ip graph can stop short of recall 1 at any ef); it is checked
    once at ``high``: if that reaches the target the search bisects below it, else the smaller
    value is kept. (At a low recall a doubling removes few misses but doubles the recall: IVF on
    unstructured data, where recall grows with the fraction of lists probed.)
    """

    def enough(measured: tuple[float, float]) -> bool:
        return reaches(measured, target)

    value, failed = low, low - 1
    recall = recall_at(value)
    while not enough(recall) and value < high:
        bigger = min(high, 2 * value)
        measured = recall_at(bigger)
        gain = measured[0] - recall[0]
        if gain < _PLATEAU * min(1 - recall[0], recall[0]) and not enough(measured) and bigger < high:
            top = recall_at(high)
            if not enough(top):
                return value, recall                # a plateau: more of the knob buys next to nothing
            failed, value, recall = bigger, high, top
            break
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


class _Recall:
    """``recall_at(value)`` of one partition's index for a set of queries, against their exact top-k."""

    def __init__(self, store: AnnStore, p: int, queries: torch.Tensor, k: int, own: torch.Tensor | None,
                 hub: Hub | None, leave_out: bool, truth: torch.Tensor | None = None, alone: bool = False,
                 handed: dict[int, torch.Tensor] | None = None) -> None:
        self.store, self.p, self.queries, self.k, self.own = store, p, queries, k, own
        if truth is None:                                                                # (S, k[+1]), best first
            truth = store.exact_slots(queries[None], [p], k + (own is not None))[0]
        self.truth = truth[:, :k + (own is not None)]
        true_scores = _scores(store, p, queries, self.truth, own)
        kth = true_scores.sort(-1, descending=True).values[:, k - 1]                    # (S,) k-th best
        self.floor = kth - _TIE_RTOL * (1 + kth.abs())
        self.hub, self.leave_out, self.alone = hub, leave_out, alone
        self._handed = {} if handed is None else handed       # probes -> the hub's (S, r*k), shareable

    def __call__(self, value: int) -> tuple[float, float]:
        store, p, q32, k = self.store, self.p, self.queries.numpy(), self.k
        width = k + (self.own is not None)
        if self.alone:                                                                  # the hub's lists alone
            got = torch.empty(len(q32), 0, dtype=torch.long)
        else:
            spans = spread(lambda lo, hi: store._parts[p].search(q32[lo:hi], width, value), len(q32), cpus())
            if any(f is None for f in spans):
                return 0.0, 0.0
            got = torch.from_numpy(store._book.slots_in(p, np.concatenate(spans)))    # (S, c)
        if self.hub is not None:
            probes = store._hub_probes(value)
            if probes not in self._handed:
                self._handed[probes] = self.hub.candidates(store, p, self.queries, k, self.leave_out, probes)
            got = merge(got, self._handed[probes])
        best = _scores(store, p, self.queries, got, self.own).topk(k, -1).values      # (S, k) after rescoring
        per_query = (best >= self.floor[:, None]).double().mean(-1)                   # (S,)
        error = float(per_query.std()) / len(per_query) ** 0.5 if len(per_query) > 1 else 0.0
        return float(per_query.mean()), error


def calibrate(store: AnnStore, partition: int, target: float, low: int, high: int,
              asked: torch.Tensor | None = None) -> tuple[Calibration, Hub | None]:
    """Calibrate the knob of one partition of ``store`` on ``asked (S, dim)`` queries, or on stored keys
    when None; see the module docstring. Returns the record and the new hub (None on keys).
    Caller holds the store's lock (read or write)."""
    p = partition
    count = int(store._book.counts[p])
    rng = np.random.default_rng([p, count])
    slots = torch.from_numpy(np.sort(rng.choice(count, min(QUERIES, count), replace=False)))       # (S,)
    keys = store._table.data["keys"][p, slots].float()                                             # (S, dim)
    hub, index, high = None, True, max(low, high)
    if asked is None:
        k = min(K, count - 1)
        value, measured = smallest_value(_Recall(store, p, keys, k, slots[:, None], None, False), low, high, target)
    else:
        k = min(K, count)
        truth = store.exact_slots(asked[None], [p], max(k, depth_for(count, len(asked))))[0]      # (S, depth), -1 pads
        truth_ids = store._table.data["ids"][p][truth.clamp(min=0)].masked_fill(truth < 0, -1)
        hub = Hub(store, p, asked, truth_ids, seed=count)
        options: list[_Option] = []                           # the hub with the index, the hub alone, the index
        handed: dict[int, torch.Tensor] = {}                  # the hub's candidates, found once per probe count
        for with_hub, with_index in ((True, True), (True, False), (False, True)):
            recall = _Recall(store, p, asked, k, None, hub if with_hub else None, leave_out=with_hub, truth=truth,
                             alone=not with_index, handed=handed)
            options.append((hub if with_hub else None, with_index, *smallest_value(recall, low, high, target)))
        hub, index, value, measured = _fastest(store, p, asked, k, options, target)
    key_recall = measured[0]
    if asked is not None and count >= 2:
        key_recall = _Recall(store, p, keys, min(K, count - 1), slots[:, None], hub, False, alone=not index)(value)[0]
    cal = Calibration(value=value, recall=measured[0], rows=count, k=k, exact=not reaches(measured, target),
                      queries=0 if asked is None else len(asked), key_recall=key_recall, index=index)
    return cal, hub


def _fastest(store: AnnStore, p: int, asked: torch.Tensor, k: int, options: list[_Option],
             target: float) -> _Option:
    """Of the ``(hub, index, value, measured)`` that reach ``target``, the one that searches ``asked`` fastest
    as a search would (:meth:`AnnStore._search_as`: over the caller's threads, with its rescoring; best of
    three timings; timed on one thread, the hub's Python loop per list looked cheaper than it is on two).
    The first, the hub with the index's candidates, is the reference: one without the hub (``hub`` None) or
    without the index (``index`` False) serves only when faster by :data:`_MARGIN`. None reaching it: the
    one that came nearest."""
    reached = [option for option in options if reaches(option[3], target)]
    if len(reached) < 2:
        return reached[0] if reached else max(options, key=lambda option: option[3][0])

    def cost(option: _Option) -> float:
        hub, index, value, _ = option
        answered: list[bool] = []
        seconds = _seconds(lambda: answered.append(store._search_as(p, asked, k, hub, index, value)))
        return seconds * (1.0 if hub is not None and index else _MARGIN) if all(answered) else float("inf")

    costs = [cost(option) for option in reached]
    return reached[int(np.argmin(costs))]                     # ties: the first


def _seconds(fn: Callable[[], None], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _scores(store: AnnStore, p: int, queries: torch.Tensor, slots: torch.Tensor,
            own: torch.Tensor | None) -> torch.Tensor:
    """Exact scores ``(S, c)`` of ``slots (S, c)`` for ``queries (S, dim)``; -inf at -1 and at the query's
    own row (``own (S, 1)``, for stored keys used as queries)."""
    keys = store._table.data["keys"][p][slots.clamp(min=0)]                          # (S, c, dim)
    scores = exact_scores(queries[None], keys[None], store.metric)[0]
    gone = slots < 0 if own is None else (slots < 0) | (slots == own)
    return scores.masked_fill(gone, NEG_INF)
