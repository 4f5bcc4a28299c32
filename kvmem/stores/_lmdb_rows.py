"""The rows of an ``lmdb`` store inside one LMDB transaction: read, rewrite, stream to the search.

Everything here works on a transaction it is handed and must not outlive it:
views of the memory map are valid only while their transaction is open (and,
in a write transaction, only until the next put). Slots follow
:class:`~kvmem.idbook.IdBook`: partition p's rows fill slots ``[0, count_p)``,
slot s lives in block ``s // B`` at row ``s % B`` (see :mod:`._lmdb_format`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kvmem import devices
from kvmem.errors import CorruptStoreError
from kvmem.stores._lmdb_format import COLUMNS, Block, BlockLayout, block_key

__all__ = ["Rows", "BlockKeys", "row_columns", "gather_columns"]


_STAGE_ELEMS = 1 << 22     # keys staged per search step at most (16 MB as float32): stays in cache
_CUDA_STAGE_ELEMS = 1 << 25  # per step towards a CUDA device (64 MB as float16), two such pinned buffers


def _blocks_for(count: int, rows: int) -> int:
    return -(-count // rows)


def _by_block(numbers: np.ndarray) -> dict[int, np.ndarray]:
    """Block number -> the positions in ``numbers`` that fall in it (ascending), in O(m log m)."""
    order = np.argsort(numbers, kind="stable")
    found, starts = np.unique(numbers[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    return {int(b): order[lo:hi] for b, lo, hi in zip(found, starts, ends)}


def row_columns(keys: torch.Tensor, values: torch.Tensor, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row column arrays of rows ``keys (m, dim)``, ``values (m, value_dim)``, ``ids (m,)`` as stored."""
    keys, values = keys.detach().cpu().contiguous(), values.detach().cpu().contiguous()
    sqnorm = torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32).square()    # (m,) |k|^2
    return {"keys": keys.view(torch.uint8).numpy(), "sqnorm": sqnorm.numpy(),
            "ids": np.ascontiguousarray(ids, np.int64), "values": values.view(torch.uint8).numpy()}


class Rows:
    """The ``blocks`` sub-database of one store, seen through transaction ``txn``."""

    def __init__(self, txn, db, layout: BlockLayout) -> None:
        self.txn, self.db, self.layout = txn, db, layout

    def block(self, partition: int, number: int, rows: int) -> Block:
        """Block ``number`` of ``partition``, which must hold ``rows`` rows."""
        buf = self.txn.get(block_key(partition, number), db=self.db)
        if buf is None:
            raise CorruptStoreError(f"block {(partition, number)} is missing: data.mdb is damaged")
        block = Block(buf, self.layout, (partition, number))
        if block.rows != rows:
            raise CorruptStoreError(f"block {(partition, number)} holds {block.rows} rows; the store says {rows}")
        return block

    def _rows_in(self, count: int, number: int) -> int:
        return min(self.layout.rows, max(0, count - number * self.layout.rows))

    # ------------------------------------------------------------------ reading
    def gather(self, partition: int, count: int, slots: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Copies of columns ``names`` at ``slots (m,)`` of one partition; ``-1`` slots give zeros."""
        B = self.layout.rows
        widths = self.layout.widths()
        out = {name: np.zeros((len(slots), widths[name]), np.uint8) for name in names}
        held = np.flatnonzero(slots >= 0)
        for number, where in _by_block(slots[held] // B).items():
            block = self.block(partition, number, self._rows_in(count, number))
            pick = held[where]
            for name in names:
                out[name][pick] = block.array(name).view(np.uint8).reshape(block.rows, -1)[slots[pick] % B]
        return out

    def keys32(self, partition: int, count: int, slots: np.ndarray | None = None) -> np.ndarray:
        """Keys ``(m, dim)`` float32 at ``slots`` of one partition (all ``count`` rows when None)."""
        if slots is None:
            n = _blocks_for(count, self.layout.rows)
            parts = [self.block(partition, b, self._rows_in(count, b)).tensor("keys").float() for b in range(n)]
            return torch.cat(parts).numpy() if parts else np.zeros((0, self.layout.dim), np.float32)
        raw = self.gather(partition, count, slots, ("keys",))["keys"]
        return torch.from_numpy(raw).view(self.layout.dtype).float().numpy()

    def stream(self, counts: np.ndarray, rows: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(first slot, keys (P, n, dim), values (P, n, value_dim))`` over every partition's slots, whole
        stored blocks at a time (at least one, about ``rows`` slots); copied into two reused buffers,
        zeros where a partition holds no row."""
        B, top = self.layout.rows, int(counts.max(initial=0))
        span = max(B, rows // B * B)
        shape = (len(counts), min(span, top))
        keys = torch.zeros((*shape, self.layout.dim), dtype=self.layout.dtype)
        values = torch.zeros((*shape, self.layout.value_dim), dtype=self.layout.dtype)
        for first in range(0, top, span):
            n = min(span, top - first)
            for p, c in enumerate(counts):
                held = max(0, min(n, int(c) - first))
                for at in range(0, held, B):
                    block = self.block(p, (first + at) // B, self._rows_in(int(c), (first + at) // B))
                    keys[p, at:at + block.rows] = block.tensor("keys")
                    values[p, at:at + block.rows] = block.tensor("values")
                keys[p, held:n] = 0
                values[p, held:n] = 0
            yield first, keys[:, :n], values[:, :n]

    def ids(self, partition: int, count: int) -> np.ndarray:
        """The ids of one partition in slot order ``(count,)``."""
        n = _blocks_for(count, self.layout.rows)
        parts = [self.block(partition, b, self._rows_in(count, b)).array("ids") for b in range(n)]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def scan(self, counts: np.ndarray, verify: bool) -> list[np.ndarray]:
        """Check every block (present, sized as the counts say, no strays; with ``verify``, its CRC);
        return the ids of each partition in slot order."""
        expected = sum(_blocks_for(int(c), self.layout.rows) for c in counts)
        entries = self.txn.stat(self.db)["entries"]
        if entries != expected:
            raise CorruptStoreError(f"blocks: {entries} blocks stored; the row counts need {expected}")
        blocks = [self.block(p, b, self._rows_in(int(c), b))
                  for p, c in enumerate(counts) for b in range(_blocks_for(int(c), self.layout.rows))]
        if verify and blocks:
            with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:   # zlib.crc32 releases the GIL
                list(pool.map(Block.verify, blocks))
        out, at = [], 0
        for c in counts:
            n = _blocks_for(int(c), self.layout.rows)
            out.append(np.concatenate([blk.array("ids") for blk in blocks[at:at + n]]) if n
                       else np.empty(0, np.int64))
            at += n
        return out

    # ------------------------------------------------------------------ writing
    def rewrite(self, partition: int, old_count: int, new_count: int, slots: np.ndarray,
                columns: Mapping[str, np.ndarray]) -> None:
        """Put rows ``columns[name] (m, ...)`` at ``slots (m,)``; the partition goes from ``old_count``
        to ``new_count`` rows, and blocks past the new count are deleted. Only touched blocks are rewritten."""
        B = self.layout.rows
        picks = _by_block(slots // B)
        touched = set(picks)
        for b in range(min(old_count, new_count) // B, _blocks_for(max(old_count, new_count), B)):
            if self._rows_in(old_count, b) != self._rows_in(new_count, b):
                touched.add(b)
        for b in sorted(touched):
            n_old, n_new = self._rows_in(old_count, b), self._rows_in(new_count, b)
            if n_new == 0:
                self.txn.delete(block_key(partition, b), db=self.db)
                continue
            pick = picks.get(b, np.empty(0, np.int64))
            rows = slots[pick] - b * B
            fresh = n_old == 0 and len(pick) == n_new and pick[-1] - pick[0] == n_new - 1
            if fresh and bool((rows == np.arange(n_new)).all()):
                cols = {name: columns[name][pick[0]:pick[0] + n_new] for name in COLUMNS}   # a fresh block: views
            else:
                cols = self._merged(partition, b, n_old, n_new, rows, pick, columns)
            self.txn.put(block_key(partition, b), self.layout.encode(cols), db=self.db)

    def _merged(self, partition: int, number: int, n_old: int, n_new: int, rows: np.ndarray, pick: np.ndarray,
                columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Block ``number``'s first ``min(n_old, n_new)`` rows as stored, with ``columns[pick]`` put at ``rows``."""
        widths = self.layout.widths()
        cols = {name: np.empty((n_new, widths[name]), np.uint8) for name in COLUMNS}
        keep = min(n_old, n_new)
        if keep:
            old = self.block(partition, number, n_old)
            for name in COLUMNS:
                cols[name][:keep] = old.array(name).view(np.uint8).reshape(n_old, -1)[:keep]
        for name in COLUMNS:
            cols[name][rows] = np.ascontiguousarray(columns[name][pick]).view(np.uint8).reshape(-1, widths[name])
        return cols

    def drop(self, partition: int, count: int) -> None:
        """Delete every block of a partition holding ``count`` rows."""
        for b in range(_blocks_for(count, self.layout.rows)):
            self.txn.delete(block_key(partition, b), db=self.db)


class BlockKeys:
    """The stored keys as a :class:`~kvmem.topk.KeySource`, streamed block by block.

    When the search asks for steps of at most two stored blocks of one
    partition, it gets zero-copy views of the memory map. Otherwise each step
    copies the stored blocks it covers (of every partition) into one reused
    buffer: one pass over the keys, against a fixed cost per step in the
    search (a matmul call, a top-k merge) that small steps would pay many
    times over. float16 keys are always staged, and converted to float32 in
    that same pass: CPUs compute in float32, so the search would convert them
    anyway (float32 and bfloat16 keys are used as stored).

    Towards a CUDA device (:func:`kvmem.devices.cuda_like`) every step is staged,
    in steps as large as the search's blocks (up to 2**25 elements), into two
    pinned buffers used in turn: one is copied to the device asynchronously
    while the other is filled. Keys travel as stored (float16 too); the device converts.
    Valid only inside the transaction of ``rows``.
    """

    def __init__(self, rows: Rows, counts: np.ndarray, max_sqnorm: np.ndarray, device: torch.device,
                 partitions: list[int] | None = None) -> None:
        self._rows = rows
        self._store_counts, self._store_max_sqnorm = counts, max_sqnorm
        self._which = list(range(len(counts))) if partitions is None else list(partitions)   # our p -> store's
        self._counts = counts[self._which]
        self._max_sqnorm = torch.as_tensor(max_sqnorm[self._which], dtype=torch.float32, device=device)
        self.partitions = len(self._which)
        self.device = device
        self._cuda = devices.cuda_like(device)
        widen = rows.layout.dtype == torch.float16 and not self._cuda
        self.dtype = torch.float32 if widen else rows.layout.dtype                   # of yielded keys

    def counts(self) -> np.ndarray:
        return self._counts

    def subset(self, partitions: list[int]) -> BlockKeys:
        """Some of these partitions as a source of their own."""
        return BlockKeys(self._rows, self._store_counts, self._store_max_sqnorm, self.device,
                         [self._which[p] for p in partitions])

    def blocks(self, rows: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        B = self._rows.layout.rows
        top = int(self._counts.max(initial=0))
        if self._cuda:
            yield from self._blocks_to_device(rows, top)
            return
        if self.partitions == 1 and rows < 2 * B and self.dtype == self._rows.layout.dtype:   # the map's blocks
            for b in range(_blocks_for(top, B)):
                block = self._rows.block(self._which[0], b, self._rows._rows_in(top, b))
                keys, sqnorm = block.tensor("keys")[None], block.tensor("sqnorm")[None]      # (1, n, dim), (1, n)
                for s in range(0, block.rows, rows):
                    yield b * B + s, keys[:, s:s + rows].to(self.device), sqnorm[:, s:s + rows].to(self.device)
            return
        cap = max(B, _STAGE_ELEMS // (self.partitions * self._rows.layout.dim))
        span = max(B, min(rows, cap) // B * B)                        # whole stored blocks per copy
        buffers = None
        for first in range(0, top, span):
            keys, sqnorm, buffers = self._stack(first, span, buffers)  # (P, n, dim), (P, n)
            for s in range(0, keys.shape[1], rows):
                yield first + s, keys[:, s:s + rows].to(self.device), sqnorm[:, s:s + rows].to(self.device)

    def _blocks_to_device(self, rows: int, top: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """The CUDA path of :meth:`blocks`: double-buffered pinned staging, asynchronous copies."""
        B = self._rows.layout.rows
        cap = max(B, _CUDA_STAGE_ELEMS // (self.partitions * self._rows.layout.dim))
        span = max(B, min(max(rows, B), cap) // B * B)
        pin = self.device.type == "cuda"
        buffers: list = [None, None]
        copied: list = [None, None]                         # per buffer: the event its last copy recorded
        for step, first in enumerate(range(0, top, span)):
            turn = step % 2
            if copied[turn] is not None:
                copied[turn].synchronize()                  # its previous copy is done: safe to refill
            keys, sqnorm, buffers[turn] = self._stack(first, span, buffers[turn], pin)
            keys = keys.to(self.device, non_blocking=True)
            sqnorm = sqnorm.to(self.device, non_blocking=True)
            if pin:
                copied[turn] = torch.cuda.Event()
                copied[turn].record()
            for s in range(0, keys.shape[1], rows):
                yield first + s, keys[:, s:s + rows], sqnorm[:, s:s + rows]

    def _stack(self, first: int, span: int, buffers, pin: bool = False):
        """Slots ``[first, first + span)`` of every partition in ``(P, n, dim)`` and ``(P, n)`` buffers
        (pinned with ``pin``); rows a partition does not hold are zero."""
        layout, B = self._rows.layout, self._rows.layout.rows
        if buffers is None:
            size = min(span, int(self._counts.max()))
            buffers = (torch.empty((self.partitions, size, layout.dim), dtype=self.dtype, pin_memory=pin),
                       torch.empty((self.partitions, size), dtype=torch.float32, pin_memory=pin))
        keys, sqnorm = buffers
        n = min(span, int(self._counts.max()) - first)
        for p, c in enumerate(self._counts):
            held = max(0, min(n, int(c) - first))
            for at in range(0, held, B):
                number = (first + at) // B
                block = self._rows.block(self._which[p], number, self._rows._rows_in(int(c), number))
                keys[p, at:at + block.rows] = block.tensor("keys")
                sqnorm[p, at:at + block.rows] = block.tensor("sqnorm")
            keys[p, held:n] = 0
            sqnorm[p, held:n] = 0
        return keys[:, :n], sqnorm[:, :n], buffers

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """Keys at ``slots (P, *shape)`` (``-1``: zeros) -> ``(P, *shape, dim)``."""
        return gather_columns(self._rows, self._counts, slots, ("keys",), self._which)["keys"].to(self.device)

    def max_sqnorm(self) -> torch.Tensor:
        return self._max_sqnorm


def gather_columns(rows: Rows, counts: np.ndarray, slots: torch.Tensor, names: tuple[str, ...],
                   partitions: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Columns ``names`` (of ``ids``, ``keys``, ``values``) at ``slots (P, *shape)``, copied out of the map:
    ``ids (P, *shape)`` int64 (``-1`` at ``-1`` slots), ``keys``/``values`` ``(P, *shape, width)`` (zeros there).
    ``partitions``: the store partition of each row of ``slots`` (default: row p is partition p), counts alike."""
    flat = slots.detach().cpu().reshape(slots.shape[0], -1).numpy()
    which = range(len(flat)) if partitions is None else partitions
    parts = [rows.gather(p, int(counts[i]), flat[i], names) for i, p in enumerate(which)]
    out = {}
    for name in names:
        raw = np.stack([part[name] for part in parts])                               # (P, m, bytes per row)
        if name == "ids":
            ids = raw.view(np.int64)[..., 0]
            ids[flat < 0] = -1
            out[name] = torch.from_numpy(ids).view(slots.shape)
        else:
            width = rows.layout.dim if name == "keys" else rows.layout.value_dim
            out[name] = torch.from_numpy(raw).view(rows.layout.dtype).view(*slots.shape, width)
    return out
