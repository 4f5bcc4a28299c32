"""Id bookkeeping shared by every backend: ids, slots, FIFO capacity.

Each partition issues ids 0, 1, 2, ... in insertion order and never reuses one,
whatever is evicted, removed or cleared. The rows a partition holds occupy the
dense slots ``[0, count)`` of that partition, so a backend's storage needs no
holes: a removal moves the last rows into the freed slots, and a FIFO eviction
hands the evicted rows' slots to the rows that push them out.

Every mutation is planned first (pure, may raise) and committed after the
backend has written its data (cannot raise), so a failed call changes nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kvmem.errors import InvalidInputError

__all__ = ["IdBook", "AddPlan", "RemovePlan"]


class _Growable:
    """An int64 array with amortised O(1) append and trim-from-the-front."""

    def __init__(self) -> None:
        self._buf = np.empty(16, np.int64)
        self._lo = 0
        self._hi = 0

    @property
    def view(self) -> np.ndarray:
        return self._buf[self._lo:self._hi]

    def append(self, values: np.ndarray) -> None:
        n = len(values)
        if self._hi + n > len(self._buf):
            live = self.view.copy()
            self._buf = np.empty(max(16, 2 * (len(live) + n)), np.int64)
            self._buf[:len(live)] = live
            self._lo, self._hi = 0, len(live)
        self._buf[self._hi:self._hi + n] = values
        self._hi += n

    def drop_front(self, n: int) -> None:
        self._lo += n


@dataclasses.dataclass
class _Partition:
    next_id: int = 0
    base: int = 0                 # id whose slot is slot_of.view[0]; every id below it is gone
    count: int = 0                # rows held, in slots [0, count)
    slot_of: _Growable = dataclasses.field(default_factory=_Growable)   # id - base -> slot or -1
    id_at: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))  # slot -> id

    def trim(self) -> None:
        """Advance ``base`` past ids that are gone, so FIFO scans start at a live id."""
        view = self.slot_of.view
        skip, step = 0, 64
        while skip < len(view):  # doubling scan: cost is the gap skipped, not the whole view
            live = np.flatnonzero(view[skip:skip + step] >= 0)
            if len(live):
                skip += int(live[0])
                break
            skip, step = min(skip + step, len(view)), 2 * step
        self.slot_of.drop_front(skip)
        self.base += skip


@dataclasses.dataclass(frozen=True)
class AddPlan:
    """Where an ``add`` of ``n`` rows per partition goes."""

    ids: np.ndarray               # (P, n) ids issued, returned to the caller
    keep: int                     # the last ``keep`` rows of the batch are stored (all, without capacity)
    slots: np.ndarray             # (P, keep) slot of each stored row
    evicted: list[np.ndarray]     # per partition, ids pushed out by FIFO; their slots are reused

    @property
    def contiguous_from(self) -> int | None:
        """The common first slot when every partition appends at the same contiguous slots."""
        if self.keep == 0:
            return None
        first = self.slots[0, 0]
        want = first + np.arange(self.keep)
        return int(first) if bool((self.slots == want).all()) else None


@dataclasses.dataclass(frozen=True)
class RemovePlan:
    """What a ``remove`` deletes, and which rows move to keep the slots dense."""

    removed: list[np.ndarray]     # per partition, the ids removed
    moves: list[tuple[np.ndarray, np.ndarray]]  # per partition, (from slots, to slots)


class IdBook:
    """Ids and slots of every partition. Not thread-safe: the store locks around it."""

    def __init__(self, partitions: int, capacity: int | None = None) -> None:
        self.partitions = partitions
        self.capacity = capacity
        self._parts = [_Partition() for _ in range(partitions)]

    # ------------------------------------------------------------------ queries
    @property
    def counts(self) -> np.ndarray:
        return np.array([p.count for p in self._parts], np.int64)

    @property
    def next_ids(self) -> np.ndarray:
        return np.array([p.next_id for p in self._parts], np.int64)

    def ids_in_slots(self, partition: int) -> np.ndarray:
        """The ids held by ``partition``, in slot order."""
        part = self._parts[partition]
        return part.id_at[:part.count].copy()

    def ids_at(self, slots: np.ndarray) -> np.ndarray:
        """Ids held at ``slots (P, ...)``; ``-1`` stays ``-1``."""
        out = np.full(slots.shape, -1, np.int64)
        for p, part in enumerate(self._parts):
            held = slots[p] >= 0
            out[p][held] = part.id_at[slots[p][held]]
        return out

    def slots_of(self, ids: np.ndarray) -> np.ndarray:
        """Slots ``(P, m)`` of live ids ``(P, m)``; ``-1`` stays ``-1``. Unknown ids raise."""
        return np.stack([self.slots_in(p, ids[p]) for p in range(self.partitions)])

    def slots_in(self, partition: int, ids: np.ndarray, strict: bool = True) -> np.ndarray:
        """Slots of live ids ``(...)`` of one partition, same shape; ``-1`` stays ``-1``. Unknown ids raise,
        or give ``-1`` when not ``strict``."""
        part = self._parts[partition]
        table = part.slot_of.view
        rel = ids - part.base
        if rel.size and rel.min() >= 0 and rel.max() < len(table):                   # no -1, all in range
            slots = table[rel]                                                          # the usual case: one gather
        else:
            inside = (rel >= 0) & (rel < len(table))
            slots = np.full(ids.shape, -1, np.int64)
            slots[inside] = table[rel[inside]]
        if strict and (slots < 0).any():
            unknown = (slots < 0) & (ids >= 0)
            if unknown.any():
                bad = int(ids[unknown].flat[0])
                why = "was never added" if bad >= part.next_id else "was removed, evicted or cleared"
                raise InvalidInputError(
                    f"id {bad} of partition {partition} is not in the store: it {why} "
                    f"(partition {partition} holds {part.count} rows, next id {part.next_id})")
        return slots

    # ------------------------------------------------------------------ add
    def plan_add(self, n: int) -> AddPlan:
        keep = n if self.capacity is None else min(n, self.capacity)
        ids = np.array([p.next_id for p in self._parts], np.int64)[:, None] + np.arange(n)
        slots = np.empty((self.partitions, keep), np.int64)
        evicted = []
        for p, part in enumerate(self._parts):
            n_evict = 0 if self.capacity is None else max(0, part.count + keep - self.capacity)
            old = self._oldest(part, n_evict)
            evicted.append(old)
            slots[p, :n_evict] = part.slot_of.view[old - part.base]
            slots[p, n_evict:] = part.count + np.arange(keep - n_evict)
        return AddPlan(ids=ids, keep=keep, slots=slots, evicted=evicted)

    def commit_add(self, plan: AddPlan) -> None:
        n = plan.ids.shape[1]
        for p, part in enumerate(self._parts):
            old = plan.evicted[p]
            part.slot_of.view[old - part.base] = -1
            new_slots = np.full(n, -1, np.int64)
            new_slots[n - plan.keep:] = plan.slots[p]
            part.slot_of.append(new_slots)
            top = part.count + plan.keep - len(old)
            if top > len(part.id_at):
                grown = np.empty(max(top, 2 * len(part.id_at), 16), np.int64)
                grown[:part.count] = part.id_at[:part.count]
                part.id_at = grown
            part.id_at[plan.slots[p]] = plan.ids[p, n - plan.keep:]
            part.count = top
            part.next_id += n
            if len(old) or plan.keep < n:
                part.trim()

    @staticmethod
    def _oldest(part: _Partition, n: int) -> np.ndarray:
        """The ``n`` smallest live ids of ``part``."""
        if n == 0:
            return np.empty(0, np.int64)
        holes = len(part.slot_of.view) - part.count
        window = part.slot_of.view[:n + holes]
        return part.base + np.flatnonzero(window >= 0)[:n]

    # ------------------------------------------------------------------ remove / clear
    def plan_remove(self, ids: np.ndarray) -> RemovePlan:
        """Plan removing live ids ``(P, m)``; ``-1`` and repeats are ignored, unknown ids raise."""
        slots = self.slots_of(ids)
        removed, moves = [], []
        for p, part in enumerate(self._parts):
            gone = np.unique(slots[p][slots[p] >= 0])
            removed.append(part.id_at[gone])
            new_count = part.count - len(gone)
            holes = gone[gone < new_count]
            tail = np.setdiff1d(np.arange(new_count, part.count), gone, assume_unique=True)
            moves.append((tail, holes))
        return RemovePlan(removed=removed, moves=moves)

    def commit_remove(self, plan: RemovePlan) -> None:
        for p, part in enumerate(self._parts):
            gone = plan.removed[p]
            if not len(gone):
                continue
            part.slot_of.view[gone - part.base] = -1
            src, dst = plan.moves[p]
            moved = part.id_at[src]
            part.id_at[dst] = moved
            part.slot_of.view[moved - part.base] = dst
            part.count -= len(gone)
            part.trim()

    def clear(self, partitions: list[int]) -> None:
        for p in partitions:
            part = self._parts[p]
            part.slot_of = _Growable()
            part.base, part.count = part.next_id, 0

    # ------------------------------------------------------------------ persistence
    def restore(self, next_ids: np.ndarray, ids_in_slots: list[np.ndarray]) -> None:
        """Rebuild from what :meth:`next_ids` and :meth:`ids_in_slots` returned.

        Raises :class:`ValueError` when the ids are inconsistent (duplicates,
        out of range, more rows than the capacity); loaders turn it into
        ``CorruptStoreError``.
        """
        if len(next_ids) != self.partitions or len(ids_in_slots) != self.partitions:
            raise ValueError(f"expected {self.partitions} partitions of ids")
        for p in range(self.partitions):
            ids, nxt = np.asarray(ids_in_slots[p], np.int64), int(next_ids[p])
            if len(ids) and (ids.min() < 0 or ids.max() >= nxt):
                raise ValueError(f"partition {p}: ids must be unique and in [0, next id {nxt})")
            if self.capacity is not None and len(ids) > self.capacity:
                raise ValueError(f"partition {p}: {len(ids)} rows exceed capacity {self.capacity}")
            part = _Partition(next_id=nxt, count=len(ids), id_at=ids.copy())
            part.base = int(ids.min()) if len(ids) else nxt
            table = np.full(nxt - part.base, -1, np.int64)
            slots = np.arange(len(ids))
            table[ids - part.base] = slots
            if not np.array_equal(table[ids - part.base], slots):   # a repeated id kept only its last slot
                raise ValueError(f"partition {p}: ids must be unique and in [0, next id {nxt})")
            part.slot_of.append(table)
            self._parts[p] = part
