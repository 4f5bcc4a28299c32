"""The oracle: a brute-force NumPy memory with kvmem's exact semantics.

Rows are kept in float64 after rounding to the store's dtype (as a store
keeps them), ids follow the same rules (per partition, insertion order, never
reused, FIFO past capacity), and search scores every row in float64. Slow and
obviously right — which is the point.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["BruteForceMemory", "rounded"]


def rounded(x: Any, dtype: torch.dtype) -> np.ndarray:
    """``x`` rounded to a storage dtype, as float64."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().cpu().to(dtype).double().numpy()


def scores(queries: np.ndarray, keys: np.ndarray, metric: str) -> np.ndarray:
    """float64 scores ``(q, n)`` of ``queries (q, d)`` against ``keys (n, d)``; higher is better."""
    if metric == "l2":
        return -((queries[:, None, :] - keys[None]) ** 2).sum(-1)
    dots = queries @ keys.T
    if metric == "cos":
        norms = np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(keys, axis=1)[None]
        dots = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return dots


class BruteForceMemory:
    """Reference memory with ``partitions`` independent dicts id -> (key, value)."""

    def __init__(self, dim: int, value_dim: int, partitions: int = 1, metric: str = "ip",
                 dtype: torch.dtype = torch.float16, capacity: int | None = None) -> None:
        self.dim, self.value_dim, self.partitions = dim, value_dim, partitions
        self.metric, self.dtype, self.capacity = metric, dtype, capacity
        self.rows: list[dict[int, tuple[np.ndarray, np.ndarray]]] = [{} for _ in range(partitions)]
        self.next_id = [0] * partitions

    def add(self, keys: Any, values: Any) -> np.ndarray:
        """``keys (P, n, dim)``, ``values (P, n, value_dim)`` -> ids ``(P, n)``."""
        keys, values = rounded(keys, self.dtype), rounded(values, self.dtype)
        ids = np.empty(keys.shape[:2], np.int64)
        for p, rows in enumerate(self.rows):
            for i in range(keys.shape[1]):
                ids[p, i] = self.next_id[p]
                rows[self.next_id[p]] = (keys[p, i], values[p, i])
                self.next_id[p] += 1
                if self.capacity is not None and len(rows) > self.capacity:
                    del rows[min(rows)]
        return ids

    def remove(self, ids: np.ndarray) -> None:
        for p, row in enumerate(np.asarray(ids)):
            for i in row[row >= 0]:
                self.rows[p].pop(int(i), None)

    def clear(self, partitions: list[int] | None = None) -> None:
        for p in range(self.partitions) if partitions is None else partitions:
            self.rows[p].clear()

    def count(self, partition: int | None = None) -> int:
        if partition is None:
            return sum(len(r) for r in self.rows)
        return len(self.rows[partition])

    def live_ids(self, partition: int) -> np.ndarray:
        return np.array(sorted(self.rows[partition]), np.int64)

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``ids (P, ...)``; ``-1`` gives zeros. Unknown ids raise KeyError."""
        ids = np.asarray(ids)
        keys = np.zeros((*ids.shape, self.dim))
        values = np.zeros((*ids.shape, self.value_dim))
        for index in zip(*np.nonzero(ids >= 0)):
            keys[index], values[index] = self.rows[index[0]][int(ids[index])]
        return keys, values

    def scores_of(self, queries: Any, ids: np.ndarray) -> np.ndarray:
        """float64 scores ``(P, q, c)`` of each query with its own ``ids (P, q, c)``; ``-inf`` at ``-1``."""
        q = rounded(queries, torch.float32)
        out = np.full(ids.shape, -np.inf)
        for p in range(self.partitions):
            for j in range(ids.shape[1]):
                sel = ids[p, j] >= 0
                if sel.any():
                    keys = np.stack([self.rows[p][int(i)][0] for i in ids[p, j][sel]])
                    out[p, j, sel] = scores(q[p, j:j + 1], keys, self.metric)[0]
        return out

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ``(scores, ids)``, each ``(P, q, k)``, best first; ``-inf``/``-1`` padding."""
        q = rounded(queries, torch.float32)
        P, nq = q.shape[:2]
        best = np.full((P, nq, k), -np.inf)
        ids = np.full((P, nq, k), -1, np.int64)
        for p, rows in enumerate(self.rows):
            if not rows:
                continue
            live = np.fromiter(rows, np.int64, len(rows))
            s = scores(q[p], np.stack([rows[int(i)][0] for i in live]), self.metric)   # (q, n)
            order = np.argsort(-s, axis=1, kind="stable")[:, :k]
            best[p, :, :order.shape[1]] = np.take_along_axis(s, order, 1)
            ids[p, :, :order.shape[1]] = live[order]
        return best, ids
