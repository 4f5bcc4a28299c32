"""One rank's shard: an inner store holding the rows whose global id is ``rank (mod world)``.

Global id ``g`` lives on rank ``g % world`` under the inner store's own id
``g // world``. The inner store issues its ids in insertion order, so the
shard adds its rows in global-id order and, where the driver skipped ids
(an add larger than the capacity keeps only its last rows), adds and at once
removes placeholder rows to keep the two numberings aligned.

The inner store has no capacity: the driver plans FIFO eviction over the
whole partition and sends each shard the ids to drop.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvmem import persist
from kvmem.errors import CorruptStoreError, KvmemError, path_error
from kvmem.store import MemoryStore

__all__ = ["Shard", "shard_dir", "local_next"]

_SHARD_DIR = re.compile(r"^shard-([0-9]+)\.([0-9a-f]{12})$")


def shard_dir(path: Path, rank: int, tag: str) -> Path:
    return path / f"shard-{rank}.{tag}"


def local_next(next_global: int, rank: int, world: int) -> int:
    """How many global ids below ``next_global`` belong to ``rank``: the inner store's next id."""
    return max(0, -(-(next_global - rank) // world))


class Shard:
    """The rows of one rank, and the operations the driver asks of it (``handle``)."""

    def __init__(self, inner: MemoryStore, rank: int, world: int) -> None:
        self.inner, self.rank, self.world = inner, rank, world

    # ------------------------------------------------------------------ id mapping
    def local(self, ids: np.ndarray) -> np.ndarray:
        """Inner ids of global ``ids`` that live here; others (and -1) become -1."""
        mine = (ids >= 0) & (ids % self.world == self.rank)
        return np.where(mine, ids // self.world, -1)

    def global_(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.where(ids >= 0, ids * self.world + self.rank, ids)

    @property
    def next_local(self) -> int:
        return int(self.inner._book.next_ids[0])

    # ------------------------------------------------------------------ operations
    def handle(self, meta: dict[str, Any], tensors: list[torch.Tensor]) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Run one operation; answer ``({"ok": True, "busy": seconds, ...}, tensors)``, or ``ok: False``
        with the error's type and message when it raised: a shard never lets an error end its rank's loop."""
        start = time.perf_counter()
        try:
            extra, out = getattr(self, "_" + meta["op"])(meta, *tensors)
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which raises it
            extra, out = {"ok": False, "error": type(exc).__name__, "message": str(exc)}, []
        return {"ok": True, **extra, "busy": time.perf_counter() - start}, out

    def _add(self, meta: dict[str, Any], keys: torch.Tensor, values: torch.Tensor, evicted: torch.Tensor
             ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        drop = self.local(evicted.cpu().numpy())
        if (drop >= 0).any():
            self.inner.remove(drop)
        if keys.shape[1]:
            first = meta["first"] // self.world
            gap = first - self.next_local
            if gap > 0:                                           # ids the driver skipped: keep the numbering
                P = self.inner.partitions
                skipped = self.inner.add(torch.zeros(P, gap, self.inner.dim), torch.zeros(P, gap, self.inner.value_dim))
                self.inner.remove(skipped)
            ids = self.inner.add(keys, values)
            if int(ids[0, 0]) != first:
                raise KvmemError(f"shard {self.rank}: inner ids start at {int(ids[0, 0])}, expected {first}")
        return {}, []

    def _search(self, meta: dict[str, Any], queries: torch.Tensor) -> tuple[dict[str, Any], list[torch.Tensor]]:
        res = self.inner.search(queries, meta["k"], **meta["params"])
        return {}, [res.scores, self.global_(res.ids), res.keys, res.values]

    def _get(self, meta: dict[str, Any], ids: torch.Tensor) -> tuple[dict[str, Any], list[torch.Tensor]]:
        keys, values = self.inner.get(self.local(ids.cpu().numpy()))
        return {}, [keys, values]

    def _remove(self, meta: dict[str, Any], ids: torch.Tensor) -> tuple[dict[str, Any], list[torch.Tensor]]:
        gone = self.local(ids.cpu().numpy())
        if (gone >= 0).any():
            self.inner.remove(gone)
        return {}, []

    def _clear(self, meta: dict[str, Any]) -> tuple[dict[str, Any], list[torch.Tensor]]:
        self.inner.clear(meta["partitions"])
        return {}, []

    def _count(self, meta: dict[str, Any]) -> tuple[dict[str, Any], list[torch.Tensor]]:
        return {"counts": self.inner._book.counts.tolist(), "nbytes": self.inner.nbytes()}, []

    def _ids(self, meta: dict[str, Any]) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Every global id held, partition after partition, and the counts (rebuilding the driver's book)."""
        per = [self.inner._book.ids_in_slots(p) for p in range(self.inner.partitions)]
        flat = torch.from_numpy(np.concatenate(per)) if per else torch.empty(0, dtype=torch.int64)
        return {"counts": [len(a) for a in per], "next": self.next_local}, [self.global_(flat)]

    def _save(self, meta: dict[str, Any]) -> tuple[dict[str, Any], list[torch.Tensor]]:
        path = Path(meta["path"])          # the driver checked it is free or a save
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:             # a file on the way, no permission, a full disk (on this rank)
            raise path_error(exc, f"rank {self.rank} cannot save to {path}") from exc
        self.inner.save(shard_dir(path, self.rank, meta["tag"]))
        return {}, []

    def _commit(self, meta: dict[str, Any]) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Second step of a save: write the manifest beside the shard, then drop this rank's older shards."""
        path = Path(meta["path"])
        persist.write_manifest(path, meta["manifest"], meta["tag"] + f"{self.rank:x}")
        tidy = meta.get("tidy_above")
        for entry in path.iterdir():
            found = _SHARD_DIR.match(entry.name)
            if found and found.group(2) != meta["tag"] and entry.is_dir():
                owner = int(found.group(1))
                if owner == self.rank or (tidy is not None and owner >= tidy):
                    shutil.rmtree(entry, ignore_errors=True)
        return {}, []

    def _close(self, meta: dict[str, Any]) -> tuple[dict[str, Any], list[torch.Tensor]]:
        self.inner.close()
        return {}, []

    # ------------------------------------------------------------------ opening a save
    @staticmethod
    def open_saved(path: Path, rank: int, world: int, tag: str, next_global: int, device: torch.device) -> Shard:
        """This rank's shard of a save; raises CorruptStoreError when it is missing or from another save."""
        from kvmem.api import load

        where = shard_dir(path, rank, tag)
        if not where.is_dir():
            raise CorruptStoreError(f"shard {rank} of the save at {path} ({where.name}) is missing on this rank")
        inner = load(where, device=device)
        want = local_next(next_global, rank, world)
        got = set(inner._book.next_ids.tolist())
        if got != {want}:
            inner.close()
            raise CorruptStoreError(f"{where.name}: its next id is {sorted(got)}, the manifest implies {want}")
        return Shard(inner, rank, world)
