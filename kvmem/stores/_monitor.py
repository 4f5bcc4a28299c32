"""The recall an approximate store delivers, estimated from a sample of its live searches.

With ``monitor=rate`` (a fraction in (0, 1]; 0, the default, turns it off)
each query row of a search is checked with probability ``rate``: its returned
scores go, with the query, to one background thread, which searches it
exactly (under the store's read lock) and counts the returned rows that reach
the true k-th score (ties within a relative 1e-5 are hits, as calibration
counts them). The estimate is the mean over the rows checked since the last
calibration, with a 95% normal interval (mean +- 1.96 standard errors), in
``store.stats()["monitor"]``. When its upper bound falls below the target
(at least :data:`MIN_CHECKED` rows), the store recalibrates every partition.

Cost: a checked row costs one exact search of its partition, on another
thread, so the CPU spent grows by about ``rate`` times (exact search time /
approximate search time) -- at ``rate=0.01`` and an index 20x faster than
exact search, a fifth more CPU. The search itself only draws one random number
per query row and copies the rows picked; a full queue (:data:`QUEUE`
batches waiting) drops new ones rather than wait.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvmem.stores.exact import TableKeys
from kvmem.topk import blocked_search

if TYPE_CHECKING:
    from kvmem.stores._ann import AnnStore

__all__ = ["Monitor", "MIN_CHECKED"]

MIN_CHECKED = 100       # rows checked before a low estimate triggers recalibration
QUEUE = 64              # batches of rows waiting to be checked, at most
_TIE_RTOL = 1e-5


class Monitor:
    """A running estimate of delivered recall@k; see the module docstring. Thread-safe."""

    def __init__(self, rate: float, seed: int = 0) -> None:
        self.rate = rate
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = queue.Queue(QUEUE)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.checked, self._sum, self._sq = 0, 0.0, 0.0

    def offer(self, store: AnnStore, queries: torch.Tensor, scores: torch.Tensor) -> None:
        """Pick rows of a search (``queries (P, q, dim)``, its ``scores (P, q, k)``) to check later."""
        if not self.rate or not queries.shape[1]:
            return
        with self._lock:
            picked = np.flatnonzero(self._rng.random(queries.shape[0] * queries.shape[1]) < self.rate)
        if not len(picked):
            return
        rows = torch.from_numpy(picked)
        flat = queries.reshape(-1, queries.shape[-1]).index_select(0, rows)             # (m, dim)
        found = scores.reshape(-1, scores.shape[-1]).index_select(0, rows)              # (m, k)
        try:
            self._queue.put_nowait((picked // queries.shape[1], flat.float(), found.float()))
        except queue.Full:
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, args=(store,), name="kvmem-monitor")
            self._thread.start()

    def wait(self) -> None:
        """Until every row offered so far is checked."""
        self._queue.join()

    def _work(self, store: AnnStore) -> None:
        while True:
            try:
                parts, queries, found = self._queue.get(timeout=0.5)
            except queue.Empty:
                return
            try:
                with store._lock.read():
                    if not store._closed:
                        self._check(store, parts, queries, found)
            finally:
                self._queue.task_done()

    def _check(self, store: AnnStore, parts: np.ndarray, queries: torch.Tensor, found: torch.Tensor) -> None:
        k = found.shape[1]
        per_row = []
        for p in np.unique(parts):
            count = int(store._book.counts[p])
            if not count:
                continue
            mine = torch.from_numpy(np.flatnonzero(parts == p))
            want = min(k, count)
            truth, _ = blocked_search(TableKeys(store, [int(p)]), queries[mine][None], want, store.metric)
            kth = truth[0, :, want - 1]                                                 # (m,)
            hits = (found[mine] >= (kth - _TIE_RTOL * (1 + kth.abs()))[:, None]).sum(-1).clamp(max=want)
            per_row.append(hits.double() / want)
        if per_row:
            r = torch.cat(per_row)
            with self._lock:
                self.checked += len(r)
                self._sum += float(r.sum())
                self._sq += float(r.square().sum())

    def estimate(self) -> dict[str, Any]:
        """``rate``, rows ``checked``, ``recall`` and its 95% interval ``low`` / ``high`` (None before any)."""
        with self._lock:
            n, s, sq = self.checked, self._sum, self._sq
        if not n:
            return {"rate": self.rate, "checked": 0, "recall": None, "low": None, "high": None}
        mean = s / n
        var = max(0.0, sq / n - mean * mean) * n / max(1, n - 1)
        half = 1.96 * math.sqrt(var / n)
        return {"rate": self.rate, "checked": n, "recall": mean, "low": max(0.0, mean - half),
                "high": min(1.0, mean + half)}

    def below(self, target: float) -> bool:
        """Whether the delivered recall is below ``target`` with confidence."""
        est = self.estimate()
        return est["checked"] >= MIN_CHECKED and est["high"] < target
