"""The row table: keys, values and ids of every row, in dense slots, on one device.

Written once for the in-RAM backends. ``exact`` searches its key column
directly; ``ivf`` and ``hnsw`` rank with their index and use the table to
rescore exactly and to return keys and values. Slots come from :class:`IdBook`.
"""

from __future__ import annotations

import numpy as np
import torch

from kvmem import devices

__all__ = ["RowTable"]


class RowTable:
    """Named columns of shape ``(P, slots, *tail)``, grown geometrically.

    Columns: ``keys (dim,)`` and ``values (value_dim,)`` in the store dtype,
    ``ids ()`` int64, plus any a backend declares (``exact`` keeps
    ``sqnorm ()`` float32). Not thread-safe: the store locks around it.
    """

    def __init__(self, partitions: int, columns: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 device: torch.device, capacity: int | None = None) -> None:
        self.partitions = partitions
        self.device = device
        self.capacity = capacity
        self.columns = dict(columns)
        self.data = {name: torch.zeros((partitions, 0, *tail), dtype=dt, device=device)
                     for name, (tail, dt) in self.columns.items()}

    @property
    def allocated(self) -> int:
        return next(iter(self.data.values())).shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())

    def reserve(self, slots: int) -> None:
        """Make room for ``slots`` slots per partition (geometric growth, capped at capacity)."""
        if slots <= self.allocated:
            return
        size = max(slots, int(self.allocated * 1.5), 1024)
        if self.capacity is not None:
            size = max(slots, min(size, self.capacity))
        for name in list(self.data):                      # one column at a time has an old and a new copy
            old = self.data[name]
            new = torch.empty((self.partitions, size, *old.shape[2:]), dtype=old.dtype, device=self.device)
            new[:, :old.shape[1]] = old
            new[:, old.shape[1]:].zero_()                 # only the new slots are zeroed, not the copied ones
            self.data[name] = new
            del old

    def write(self, slots: np.ndarray, contiguous_from: int | None = None, **rows: torch.Tensor) -> None:
        """Write ``rows[name] (P, n, *tail)`` into ``slots (P, n)``. Call :meth:`reserve` first."""
        for name, value in rows.items():
            col = self.data[name]
            value = value.to(device=self.device, dtype=col.dtype)
            if contiguous_from is not None:
                col[:, contiguous_from:contiguous_from + slots.shape[1]] = value
            else:
                part = torch.arange(self.partitions, device=self.device).repeat_interleave(slots.shape[1])
                col[part, torch.as_tensor(slots.reshape(-1), device=self.device)] = value.reshape(-1, *col.shape[2:])

    def fill(self, partition: int, **rows: torch.Tensor) -> None:
        """Write ``rows[name] (n, *tail)`` into slots ``[0, n)`` of one partition (loading a save)."""
        for name, value in rows.items():
            self.data[name][partition, :len(value)] = value.to(device=self.device, dtype=self.data[name].dtype)

    def move(self, partition: int, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy rows ``src`` to ``dst`` of one partition (compaction after a removal)."""
        if not len(src):
            return
        s = torch.as_tensor(src, device=self.device)
        d = torch.as_tensor(dst, device=self.device)
        for col in self.data.values():
            col[partition, d] = col[partition, s]

    def flat(self, name: str) -> torch.Tensor:
        """The column as ``(P * S, *tail)`` rows (a view): row ``p * S + slot`` is slot ``slot`` of partition ``p``."""
        col = self.data[name]
        return col.reshape(col.shape[0] * col.shape[1], *col.shape[2:])

    def flat_rows(self, slots: torch.Tensor, partitions: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of :meth:`flat` for ``slots (P', *shape)`` of ``partitions`` (default all); ``-1`` maps
        to the partition's slot 0 (mask it)."""
        S = next(iter(self.data.values())).shape[1]
        base = torch.arange(self.partitions, device=slots.device) if partitions is None else partitions.to(slots.device)
        return (slots.clamp(min=0) + (base * S).view(-1, *([1] * (slots.dim() - 1)))).to(self.device)

    def gather(self, name: str, slots: torch.Tensor, partitions: torch.Tensor | None = None) -> torch.Tensor:
        """Column rows at ``slots (P', *shape)`` of ``partitions`` (default all; ``-1``: zeros)
        -> ``(P', *shape, *tail)``."""
        col = self.data[name]
        if col.shape[1] == 0:
            return torch.zeros((*slots.shape, *col.shape[2:]), dtype=col.dtype, device=self.device)
        index = self.flat_rows(slots, partitions)
        out = self.flat(name).index_select(0, index.reshape(-1))                       # flat[index]: 6x slower
        out = out.reshape(*slots.shape, *col.shape[2:])
        missing = (slots < 0).to(self.device).view(*slots.shape, *([1] * (col.dim() - 2)))
        if not devices.cuda_like(self.device) and not bool(missing.any()):
            return out                  # on the CPU asking costs less than filling (4M keys: 0.3 against 5 ms)
        return out.masked_fill_(missing, 0)                                            # no host sync

    def rows(self, name: str, partition: int, count: int) -> torch.Tensor:
        """The first ``count`` rows of one partition's column (a view)."""
        return self.data[name][partition, :count]
