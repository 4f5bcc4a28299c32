"""Base of the in-RAM backends (``exact``, ``ivf``, ``hnsw``): rows live in a RowTable.

A subclass only ranks. ``exact`` ranks by brute force over the key column;
the approximate backends keep an index whose labels are kvmem ids, override
the ``_index_*`` hooks, and recompute their candidates' scores exactly from the
stored keys (:class:`kvmem.stores._ann.AnnStore`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvmem.config import StoreConfig
from kvmem.errors import CorruptStoreError, map_errors
from kvmem.idbook import AddPlan, RemovePlan
from kvmem.store import MemoryStore
from kvmem.table import RowTable

__all__ = ["TableStore"]


class TableStore(MemoryStore):
    """A store whose keys, values and ids live in RAM (CPU, or CUDA for ``exact``)."""

    def __init__(self, config: StoreConfig, device: torch.device) -> None:
        super().__init__(config, device)
        columns = {"keys": ((config.dim,), config.dtype), "values": ((config.value_dim,), config.dtype),
                   "ids": ((), torch.int64), **self._extra_columns()}
        self._table = RowTable(config.partitions, columns, device, config.capacity)

    # ------------------------------------------------------------------ hooks for subclasses
    def _extra_columns(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-row columns beyond keys, values and ids."""
        return {}

    def _extra_rows(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """Values of the extra columns for stored ``keys (P, n, dim)``."""
        return {}

    def _index_add(self, ids: np.ndarray, keys: torch.Tensor, evicted: list[np.ndarray]) -> None:
        """Index rows ``ids (P, n)`` with ``keys (P, n, dim)`` (as stored); unindex ``evicted``."""

    def _index_remove(self, removed: list[np.ndarray]) -> None:
        """Unindex the ids removed from each partition."""

    def _index_clear(self, partitions: list[int]) -> None:
        """Empty the index of ``partitions``."""

    def _index_save(self, directory: Path, tag: str) -> dict[str, str]:
        """Write index files; return role -> file name."""
        return {}

    def _index_load(self, directory: Path, files: Mapping[str, Any]) -> None:
        """Restore the index after the rows are back (checksums already verified)."""

    def _index_nbytes(self) -> int:
        return 0

    # ------------------------------------------------------------------ MemoryStore hooks
    def _write(self, plan: AddPlan, keys: torch.Tensor, values: torch.Tensor) -> None:
        if plan.keep:
            self._table.reserve(int(plan.slots.max()) + 1)
        ids = self._id_rows(plan)
        self._index_add(ids.numpy(), keys, plan.evicted)
        self._table.write(plan.slots, plan.contiguous_from, keys=keys, values=values, ids=ids,
                          **self._extra_rows(keys))

    def _delete(self, plan: RemovePlan) -> None:
        self._index_remove(plan.removed)
        for p, (src, dst) in enumerate(plan.moves):
            self._table.move(p, src, dst)

    def _clear(self, partitions: list[int]) -> None:
        self._index_clear(partitions)

    def _rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slots = slots.to(self.device)
        ids = self._table.gather("ids", slots).masked_fill(slots < 0, -1)
        return ids, self._table.gather("keys", slots), self._table.gather("values", slots)

    def nbytes(self) -> int:
        return self._table.nbytes() + self._index_nbytes()

    # ------------------------------------------------------------------ persistence
    def _save_files(self, directory: Path, tag: str) -> dict[str, str]:
        from safetensors.torch import save_file

        counts = self._book.counts
        rows = {name: torch.cat([self._table.rows(name, p, int(c)) for p, c in enumerate(counts)]).cpu()
                for name in ("keys", "values", "ids")}
        name = f"rows.{tag}.safetensors"
        save_file({n: t.contiguous() for n, t in rows.items()}, str(directory / name))
        return {"rows": name, **self._index_save(directory, tag)}

    @classmethod
    def _open_saved(cls, config: StoreConfig, directory: Path, manifest: Mapping[str, Any],
                    device: torch.device) -> TableStore:
        from safetensors.torch import load_file

        counts, next_ids = manifest["counts"], manifest["next_ids"]
        with map_errors("reading rows", corrupt=True):
            rows = load_file(str(directory / manifest["files"]["rows"]["name"]))
        n = sum(counts)
        want = {"keys": ((n, config.dim), config.dtype), "values": ((n, config.value_dim), config.dtype),
                "ids": ((n,), torch.int64)}
        for name, (shape, dtype) in want.items():
            got = rows.get(name)
            if got is None or tuple(got.shape) != shape or got.dtype != dtype:
                found = None if got is None else (tuple(got.shape), got.dtype)
                raise CorruptStoreError(f"rows file: {name} should be {shape} {dtype}; found {found}")
        bounds = np.cumsum([0, *counts])
        store = cls(config, device)
        try:
            store._book.restore(np.asarray(next_ids), [rows["ids"][a:b].numpy() for a, b in zip(bounds, bounds[1:])])
        except ValueError as exc:
            raise CorruptStoreError(f"rows file: {exc}") from None
        store._table.reserve(max(counts, default=0))
        for p, (a, b) in enumerate(zip(bounds, bounds[1:])):
            part = {name: rows[name][a:b] for name in ("keys", "values", "ids")}
            extra = store._extra_rows(part["keys"][None].to(device))
            store._table.fill(p, **part, **{name: value[0] for name, value in extra.items()})
        store._index_load(directory, manifest["files"])
        return store
