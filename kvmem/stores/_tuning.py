"""What :class:`~kvmem.stores._ann.AnnStore` does to know and keep its recall: calibration on asked
queries, ``calibrate()``, ``stats()``, the recalibration a search triggers, the monitor's trigger.

A mixin of :class:`~kvmem.stores._ann.AnnStore` (whose docstring tells the policy), kept apart so
that the search path and the tuning read separately. Every method here assumes the store's
attributes (``_parts``, ``_book``, ``_lock``, ``_asked``, ``_hubs``, ``_monitor``, ...).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

from kvmem import inputs
from kvmem.errors import InvalidInputError
from kvmem.stores._asked import MIN_ASKED
from kvmem.stores._calibrate import Calibration, K, calibrate

__all__ = ["Tuning", "check_recall", "DEFAULT_TARGET", "RECALIBRATE_AFTER"]

DEFAULT_TARGET = 0.95       # recall@32 aimed at when the user fixes neither the knob nor target_recall
RECALIBRATE_AFTER = 0.25    # rows added since the last calibration, as a fraction of the rows held then


def check_recall(backend: str, value: Any, what: str = "option target_recall") -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) <= 1:
        raise InvalidInputError(f"{backend} {what} must be a number in (0, 1] or None; got {value!r}")



class Tuning:
    """Calibration, its triggers and its report, for an AnnStore."""

    @property
    def target_recall(self) -> float | None:
        """The recall@32 calibration aims for; None when the knob is fixed by an option."""
        if self.options[self.param] is not None:
            return None
        if self._target is not None:
            return self._target
        return float(self.options["target_recall"] or DEFAULT_TARGET)

    def calibration(self) -> list[Calibration | None]:
        """Per partition, the last calibration: the knob, the recall measured on the asked queries it rests
        on (``queries`` of them; 0: on stored keys, before enough queries were asked), the rows held then,
        and ``key_recall``, the recall of stored keys used as queries at that knob."""
        return list(self._calibrations)

    def stats(self) -> dict[str, Any]:
        """What the store knows of the recall it delivers: target, per partition the calibration (see
        :meth:`calibration`), the asked-query sample (size, queries seen) and the keys in the hub's lists
        (``hub_rows``; 0 where the partition has no hub, or the plain index reached the target faster),
        and the monitor's running estimate (:mod:`kvmem.stores._monitor`; ``checked`` 0 when off)."""
        return {"backend": self.backend, "target_recall": self.target_recall, "param": self.param,
                "partitions": [{"calibration": None if cal is None else cal.to_dict(),
                                "asked_sample": len(self._asked.rows[p]), "asked_seen": int(self._asked.seen[p]),
                                "hub_rows": 0 if hub is None else sum(len(ids) for ids, _, _ in hub.lists)}
                               for p, (cal, hub) in enumerate(zip(self._calibrations, self._hubs))],
                "monitor": self._monitor.estimate()}

    def observe(self, queries: Any) -> None:
        """Add queries ``(P, q, dim)`` to the sample of asked queries, without searching."""
        self._check_open()
        queries, _ = inputs.vectors(queries, "queries", self.partitions, self.dim, "dim")
        self._asked.record(queries.float())

    def freeze(self, frozen: bool = True) -> None:
        """Stop (or, with False, resume) taking asked queries into the sample, and so recalibrating on them:
        to measure the store on held-out queries, or to keep its results at a given knob from changing
        as it learns. Raises InvalidInputError unless ``frozen`` is a bool."""
        if not isinstance(frozen, bool):
            raise InvalidInputError(f"{self.backend}.freeze takes a bool; got {frozen!r}")
        self._asked.frozen = frozen

    def calibrate(self, queries: Any = None, target_recall: float | None = None) -> list[Calibration | None]:
        """Calibrate every indexed partition now; takes the write lock.

        ``queries`` ``(P, n, dim)`` (or ``(n, dim)`` with one partition): a sample of the queries the
        store will be asked, which replaces each partition's sample of asked queries (a seeded subsample
        of ``query_sample`` when n is larger). ``target_recall``: the target from now on (kept, and
        saved); None keeps the store's. Raises InvalidInputError, changing nothing, on a bad argument
        or when the knob is fixed by an option (no target to calibrate for).
        """
        self._check_open()
        if self.options[self.param] is not None:
            raise InvalidInputError(f"{self.backend} has a fixed {self.param}={self.options[self.param]}; "
                                    "create it with target_recall to calibrate")
        check_recall(self.backend, target_recall, "calibrate's target_recall")
        if queries is not None:
            queries, _ = inputs.vectors(queries, "queries", self.partitions, self.dim, "dim")
            if not queries.shape[1] or not self._asked.size:
                raise InvalidInputError(f"{self.backend}.calibrate needs at least one query per partition and a "
                                        f"store with query_sample > 0; got {queries.shape[1]} queries, "
                                        f"query_sample={self._asked.size}")
            queries = queries.float()
        with self._lock.write():
            if queries is not None:
                for p in range(self.partitions):
                    self._asked.replace(p, queries[p])
            if target_recall is not None:
                self._target = float(target_recall)
            self._recalibrate(self._calibrable(range(self.partitions)), self.target_recall,
                              min_asked=1 if queries is not None else MIN_ASKED)
        return self.calibration()

    def _calibrable(self, partitions: Any) -> list[int]:
        return [p for p in partitions if self._parts[p].indexed and self._book.counts[p] >= 2]

    def _recalibrate(self, partitions: list[int], target: float, min_asked: int = MIN_ASKED) -> None:
        """Calibrate ``partitions`` (on their asked queries where there are ``min_asked``); warn about
        those whose index newly falls short of the target. Caller holds the lock (read or write)."""
        short = []
        for p in partitions:
            last = self._calibrations[p]
            asked = self._asked.take(p)
            cal, hub = calibrate(self, p, target, *self._value_range(p), asked if len(asked) >= min_asked else None)
            self._calibrations[p], self._hubs[p] = cal, hub
            self._added[p] = 0
            if cal.exact and (last is None or not last.exact):
                short.append(f"{p} ({cal.recall:.3f} at {self.param} {cal.value})")
        if short:
            warnings.warn(f"{self.backend}: the index cannot reach recall@{K} {target} within the {self.param} "
                          f"range where it beats exact search; partition (best recall) {', '.join(short[:8])}"
                          f"{' ...' if len(short) > 8 else ''} is searched exactly until a recalibration reaches "
                          f"it. Lower target_recall, or fix {self.param}, to search the index.",
                          RuntimeWarning, stacklevel=4)

    def _due(self, p: int, rebuilt: bool = False) -> bool:
        """Whether partition p is due for calibration: never calibrated, rebuilt, grown or turned over by a
        quarter, enough asked queries to replace a calibration on keys, or a sample half renewed."""
        last = self._calibrations[p]
        if rebuilt or last is None or self._added[p] >= RECALIBRATE_AFTER * last.rows:
            return True
        if len(self._asked.rows[p]) < MIN_ASKED:
            return False
        return last.queries == 0 or self._asked.fresh[p] >= max(1, last.queries // 2)

    def _after_search(self) -> None:
        """Calibrate the partitions the asked queries (or the monitor) made due, at the end of the search
        that made them due, under the read lock: results stay a function of the calls made, whatever
        the timing (a model's output must not depend on a thread's)."""
        target = self.target_recall
        if target is None or self._closed:
            return
        force = self._monitor.below(target)                      # delivered recall is short of the target
        if force:
            self._monitor.reset()
        due = [p for p in self._calibrable(range(self.partitions)) if force or self._due(p)]
        if due:
            with self._lock.read():
                self._recalibrate([p for p in self._calibrable(due) if force or self._due(p)], target)

    def _settle(self) -> None:
        """Calibrate what came due (the monitor's checks can make partitions due after their search)."""
        self._after_search()
