"""The compiled kernels of the CPU search path (``kvmem/_kernels.c``), with tensors in and out.

- the exact search's running top-k (``push``, used by :mod:`kvmem.topk` on NumPy views), and
- :func:`best`: each row's best few columns of a small score matrix (ivf's nearest lists), and
- :func:`gather`: candidates' keys gathered and scored exactly in one pass, and :func:`scores`,
  the same scores of keys already gathered (:func:`kvmem.topk.exact_scores` on the CPU).

Every CPU score of a returned row comes from the same arithmetic (products summed in eight float32
lanes, the lanes in float64), so ``exact``, ``ivf``, ``hnsw``, ``lmdb`` and ``sharded`` give one key
the same score, whatever the other candidates are.

The extension is optional (``setup.py``): without a C compiler, or with ``KVMEM_NATIVE=0`` in the
environment at import, :func:`available` is False and callers use torch ops.
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:
    from kvmem import _kernels as native
except ImportError:                     # pragma: no cover - an install without a C compiler
    native = None
if os.environ.get("KVMEM_NATIVE", "") == "0":
    native = None

__all__ = ["available", "best", "gather", "scores"]

_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_METRICS = {"ip": 0, "l2": 1, "cos": 2}


def available() -> bool:
    """Whether the compiled kernels are in use (False: torch ops, same results up to rounding, slower)."""
    return native is not None


def applies(table: torch.Tensor) -> bool:
    """Whether :func:`gather` can read ``table``: kernels built, a CPU tensor of float32/float16/bfloat16."""
    return native is not None and table.device.type == "cpu" and table.dtype in _KINDS


def _raw(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def gather(table: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, queries: torch.Tensor, metric: str,
           keys: torch.Tensor | None) -> torch.Tensor:
    """Exact float32 scores ``(n, c)`` of ``queries (n, d)`` against the ``table (N, d)`` rows ``rows (n, c)``,
    ``-inf`` where ``slots (n, c)`` is -1; each key is also written into ``keys (n, c, d)`` (zeros where
    -1) unless it is None. All contiguous CPU tensors; ``table`` and ``keys`` of one :func:`applies` dtype."""
    out = torch.empty(rows.shape, dtype=torch.float32)
    native.gather(_raw(table), _KINDS[table.dtype], rows.contiguous().numpy(), slots.contiguous().numpy(),
                  queries.float().contiguous().numpy(), _METRICS[metric], None if keys is None else _raw(keys),
                  out.numpy())
    return out


def scores(queries: torch.Tensor, keys: torch.Tensor, metric: str) -> torch.Tensor:
    """:func:`gather`'s scores of ``queries (P, q, d)`` against their own ``keys (P, q, c, d)`` -> ``(P, q, c)``."""
    P, q, c, d = keys.shape
    n = P * q
    rows = torch.arange(n * c).view(n, c)
    flat = queries.reshape(n, d).float().contiguous()
    return gather(keys.reshape(n * c, d).contiguous(), rows, rows, flat, metric, None).view(P, q, c)


def best(scores: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``keep`` largest of ``scores (n, m)`` float32, best first: ``(values, columns)`` ``(n, keep)``.

    One pass through the heaps where the kernels are built (0.1 ms for 200 x 1,265, where
    ``torch.topk`` on one thread takes 0.7-1.4 ms and ``np.argpartition`` 2.2 ms); else ``torch.topk``.
    """
    if native is None:
        values, columns = torch.from_numpy(scores).topk(keep, -1)
        return values.numpy(), columns.numpy()
    values = np.full((len(scores), keep), -np.inf, dtype=np.float32)
    columns = np.full((len(scores), keep), -1, dtype=np.int64)
    native.push(np.ascontiguousarray(scores, dtype=np.float32), 0, None, values, columns)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(values, order, 1), np.take_along_axis(columns, order, 1)
