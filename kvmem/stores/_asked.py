"""The queries an approximate store is asked: a bounded sample per partition, and what it is used for.

- :class:`AskedQueries` keeps, per partition, a uniform sample of at most
  ``size`` of the queries searched so far (reservoir sampling, Vitter's
  algorithm R, seeded): calibration measures recall on it
  (:mod:`kvmem.stores._calibrate`). Recording a search's queries costs one
  small random draw per query row and a copy of the rows taken, under its own
  lock (not the store's).
- :func:`save_asked` / :func:`load_asked` keep the samples and each
  partition's hub (:class:`kvmem.stores._hub.Hub`, built from the sample when
  it was last calibrated on) in ``asked.<tag>.safetensors``.

Neither the sample nor a hub is thread-safe for writes beyond what its
docstring says: the store serialises calibration (which installs a hub) and
adds and removes (which extend and prune it) with its lock.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvmem.errors import CorruptStoreError
from kvmem.stores._hub import Hub

if TYPE_CHECKING:
    from kvmem.stores._ann import AnnStore

__all__ = ["AskedQueries", "MIN_ASKED", "save_asked", "load_asked"]

MIN_ASKED = 64      # asked queries a partition needs before calibration rests on them


class AskedQueries:
    """A reservoir sample of asked queries per partition. ``record`` is thread-safe with itself."""

    def __init__(self, partitions: int, dim: int, size: int, seed: int = 0) -> None:
        self.size, self.dim = size, dim
        self.rows = [torch.empty(0, dim) for _ in range(partitions)]      # (n_p <= size, dim) float32
        self.seen = np.zeros(partitions, np.int64)                        # queries offered so far
        self.fresh = np.zeros(partitions, np.int64)                       # taken since the last calibration
        self.frozen = False                                               # record nothing (AnnStore.freeze)
        self._seed = seed
        self._lock = threading.Lock()

    def record(self, queries: torch.Tensor) -> None:
        """Offer a search's queries ``(P, q, dim)`` float32 to each partition's sample."""
        if not self.size or not queries.shape[1] or self.frozen:
            return
        with self._lock:
            for p in range(queries.shape[0]):
                self._offer(p, queries[p])

    def _offer(self, p: int, q: torch.Tensor) -> None:
        rows, seen, n = self.rows[p], int(self.seen[p]), q.shape[0]
        fill = min(n, max(0, self.size - len(rows)))
        if fill:
            rows = self.rows[p] = torch.cat([rows, q[:fill].float()])
        rest = n - fill
        if rest:                                                         # algorithm R for the others
            at = seen + fill + np.arange(rest)                           # each query's 0-based arrival
            rng = np.random.default_rng([self._seed, p, seen])          # a function of the queries seen,
            pick = (rng.random(rest) * (at + 1)).astype(np.int64)      # so a reloaded store draws the same
            taken = np.flatnonzero(pick < self.size)
            if len(taken):
                rows[torch.from_numpy(pick[taken])] = q[fill + torch.from_numpy(taken)].float()
            fill += len(taken)
        self.seen[p] += n
        self.fresh[p] += fill

    def sample(self, p: int) -> torch.Tensor:
        with self._lock:
            return self.rows[p].clone()                                   # (n_p, dim)

    def take(self, p: int) -> torch.Tensor:
        """The sample, for a calibration: what it takes from now on counts as fresh."""
        with self._lock:
            self.fresh[p] = 0
            return self.rows[p].clone()

    def replace(self, p: int, queries: torch.Tensor) -> None:
        """Make ``queries (n, dim)`` partition p's sample (a seeded subsample when n > size)."""
        with self._lock:
            if len(queries) > self.size:                                  # seeded by what it is given, so a
                rng = np.random.default_rng([self._seed, p, len(queries)])    # reloaded store draws the same
                keep = np.sort(rng.choice(len(queries), self.size, replace=False))
                queries = queries[torch.from_numpy(keep)]
            self.rows[p] = queries.float().clone()
            self.seen[p], self.fresh[p] = len(queries), len(self.rows[p])

    def clear(self, partitions: list[int]) -> None:
        with self._lock:
            for p in partitions:
                self.rows[p] = torch.empty(0, self.dim)
                self.seen[p] = self.fresh[p] = 0


# ---------------------------------------------------------------------------------------------- files
def save_asked(store: AnnStore, directory: Path, tag: str) -> str:
    """Write the samples and hubs of ``store`` to ``asked.<tag>.safetensors``; return the name.

    Tensors: ``seen``, ``fresh`` ``(P,)``; per partition p ``queries.p{p}`` (its sample) and, once it has a
    hub, ``hub.queries.p{p}`` ``(S, dim)``, ``hub.ids.p{p}`` ``(S, depth)`` (their exact nearest ids, -1 pads),
    ``hub.centroids.p{p}`` ``(C, dim)`` and the lists as they are now: ``hub.list_ids.p{p}`` (concatenated),
    ``hub.list_sizes.p{p}`` ``(C,)``, ``hub.sole.p{p}`` (the one sampled query that brought each id, or -1).
    """
    from safetensors.torch import save_file

    asked = store._asked
    with asked._lock:
        tensors: dict[str, torch.Tensor] = {"seen": torch.from_numpy(asked.seen.copy()),
                                            "fresh": torch.from_numpy(asked.fresh.copy())}
        for p in range(store.partitions):
            tensors[f"queries.p{p}"] = asked.rows[p].clone()
            hub = store._hubs[p]
            if hub is not None:
                tensors[f"hub.queries.p{p}"], tensors[f"hub.ids.p{p}"] = hub.queries.contiguous(), hub.ids.contiguous()
                tensors[f"hub.centroids.p{p}"] = hub.centroids.contiguous()
                tensors.update({f"hub.{name}.p{p}": t.contiguous() for name, t in hub.flat().items()})
    name = f"asked.{tag}.safetensors"
    save_file(tensors, str(directory / name))
    return name


def load_asked(store: AnnStore, file: Path | None) -> None:
    """Restore what :func:`save_asked` wrote (nothing when ``file`` is None: a save from before it).
    Validates every tensor's shape, dtype and values; raises CorruptStoreError."""
    if file is None:
        return
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors: Mapping[str, Any] = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptStoreError(f"{file.name}: not a readable safetensors file: {exc}") from None
    P, dim, size = store.partitions, store.dim, store._asked.size

    def get(name: str, shape: tuple[int | None, ...], dtype: torch.dtype) -> torch.Tensor:
        t = tensors.get(name)
        if (t is None or t.dtype != dtype or t.dim() != len(shape)
                or any(want is not None and got != want for got, want in zip(t.shape, shape))):
            found = None if t is None else (tuple(t.shape), t.dtype)
            raise CorruptStoreError(f"{file.name}: {name} should be {shape} {dtype}; found {found}")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise CorruptStoreError(f"{file.name}: {name} holds NaN or Inf")
        return t

    parts = ("queries", "hub.queries", "hub.ids", "hub.centroids", "hub.list_ids", "hub.list_sizes", "hub.sole")
    known = {"seen", "fresh"} | {f"{w}.p{p}" for p in range(P) for w in parts}
    if set(tensors) - known:
        raise CorruptStoreError(f"{file.name}: unexpected tensors {sorted(set(tensors) - known)[:4]}")
    seen, fresh = get("seen", (P,), torch.int64).numpy(), get("fresh", (P,), torch.int64).numpy()
    rows, hubs = [], []
    for p in range(P):
        q = get(f"queries.p{p}", (None, dim), torch.float32)
        if len(q) > size or not 0 <= fresh[p] <= seen[p] or len(q) > seen[p]:
            raise CorruptStoreError(f"{file.name}: partition {p} holds {len(q)} queries (at most {size}), "
                                    f"seen {seen[p]}, fresh {fresh[p]}")
        rows.append(q)
        if f"hub.queries.p{p}" not in tensors:
            hubs.append(None)
            continue
        hq = get(f"hub.queries.p{p}", (None, dim), torch.float32)
        ids = get(f"hub.ids.p{p}", (len(hq), None), torch.int64)
        if len(hq) > size or (ids.numel() and int(ids.min()) < -1):
            raise CorruptStoreError(f"{file.name}: partition {p}'s hub is malformed")
        centroids = None                                          # a save from before the lists: learn them again
        if f"hub.centroids.p{p}" in tensors:
            centroids = get(f"hub.centroids.p{p}", (None, dim), torch.float32)
        if centroids is not None and not 1 <= len(centroids) <= max(1, len(hq)):
            raise CorruptStoreError(f"{file.name}: partition {p}'s hub has {len(centroids)} centroids "
                                    f"for {len(hq)} queries")
        hub = Hub(store, p, hq, ids, centroids)
        if f"hub.list_ids.p{p}" in tensors:                       # the lists as extended and pruned since
            if centroids is None:
                raise CorruptStoreError(f"{file.name}: partition {p}'s hub lists come without their centroids")
            lists = get(f"hub.list_ids.p{p}", (None,), torch.int64)
            sizes = get(f"hub.list_sizes.p{p}", (len(centroids),), torch.int64)
            sole = get(f"hub.sole.p{p}", (len(lists),), torch.int64)
            if (sizes.numel() and not 0 <= int(sizes.min()) <= int(sizes.max()) <= len(lists)) or (
                    int(sizes.sum()) != len(lists)) or (
                    sole.numel() and not (-1 <= int(sole.min()) and int(sole.max()) < len(hq))):
                raise CorruptStoreError(f"{file.name}: partition {p}'s hub lists are malformed")
            try:
                hub.restore(store, p, lists, sizes, sole)
            except ValueError as exc:
                raise CorruptStoreError(f"{file.name}: partition {p}: {exc}") from None
        hubs.append(hub)
    store._asked.rows, store._asked.seen, store._asked.fresh = rows, seen.copy(), fresh.copy()
    store._hubs = hubs
