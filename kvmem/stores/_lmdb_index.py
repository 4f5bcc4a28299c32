"""The ANN index of an ``lmdb`` store (``index="hnsw"`` or ``"ivf"``), kept in files beside the data.

::

    index.json                 {format, format_version, kind, seq, parts: [{file, ids, state}, ...]}
    index.<tag>.p<p>.<kind>    partition p's index, in its library's format
    index.<tag>.p<p>.ids       the ids it holds, int64 little-endian

``index.json`` names every file with its size and CRC-32 and records ``seq``,
the last committed change the files cover. Files are written under a fresh
tag, fsynced, and ``index.json`` is replaced atomically, so a crash leaves the
old index or the new one. Every file is checked against ``index.json`` before
its library reads it.

LMDB is the source of truth. On open the index is loaded and caught up: rows
committed since it was written are added (keys read from LMDB), rows removed
since are removed. A missing, damaged or foreign index, or one so stale that
catching up would touch more rows than half of those held, is rebuilt from
LMDB instead. The files are rewritten on ``close`` and whenever the rows changed
since the last write reach half of those held (and at least 65536), which
bounds the catching up a crash can leave behind.

Not thread-safe by itself: the store serialises writes and holds :attr:`lock`
(shared by searches, taken alone to catch up with another process's commits).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvmem._lock import RWLock
from kvmem.config import StoreConfig
from kvmem.errors import KvmemError
from kvmem.idbook import IdBook
from kvmem.persist import fsync_dir
from kvmem.stores._lmdb_ann import PARTS
from kvmem.stores._lmdb_rows import BlockKeys, Rows, gather_columns
from kvmem.topk import NEG_INF, blocked_search, exact_scores

__all__ = ["AnnIndex", "KeysOf", "search"]

FORMAT = "kvmem-lmdb-index"
FORMAT_VERSION = 1
MANIFEST = "index.json"
_SAVE_EVERY = 1 << 16        # rows changed, at least, between two writes of the files
_LIMIT = 16 << 20            # bytes of index.json

# (partition, ids (n,) or None for every row held) -> (ids (n,), stored keys (n, dim) float32)
KeysOf = Callable[[int, "np.ndarray | None"], "tuple[np.ndarray, np.ndarray]"]


class AnnIndex:
    """One approximate index per partition, mirroring the rows of one id book."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.kind = config.options["index"]
        self.parts = [self._new() for _ in range(config.partitions)]
        self.lock = RWLock()
        self.changed = 0           # rows added or removed since the files were written
        self.stale = False         # an update failed after LMDB committed: rebuild before the next search

    def _new(self) -> Any:
        c = self.config
        return PARTS[self.kind](c.dim, c.metric, c.options, c.capacity)

    @property
    def param(self) -> str:
        return PARTS[self.kind].param

    # ------------------------------------------------------------------ following the rows
    def update(self, added: list[np.ndarray], keys: KeysOf, removed: list[np.ndarray], counts: np.ndarray) -> None:
        """Rows ``added[p]`` (ids) joined and ``removed[p]`` left partition p, which now holds ``counts[p]``."""
        for p, part in enumerate(self.parts):
            if len(removed[p]) and part.accepts:
                part.remove(removed[p])
            if part.needs_training(int(counts[p])):                     # ivf: (re)train on every row held
                self.parts[p] = part = self._new()
                part.train(*keys(p, None))
            elif len(added[p]) and part.accepts:
                part.add(*keys(p, added[p]))
            self.changed += len(added[p]) + len(removed[p])

    def clear(self, partitions: list[int], rows: int) -> None:
        """Partitions emptied, ``rows`` rows in all."""
        for p in partitions:
            self.parts[p] = self._new()
        self.changed += rows

    def rebuild(self, held: list[np.ndarray], keys: KeysOf) -> None:
        """Index every row from scratch; ``held[p]`` are partition p's ids."""
        self.parts = [self._new() for _ in self.parts]
        self.update(held, keys, [np.empty(0, np.int64)] * len(held), np.array([len(h) for h in held]))
        self.stale = False

    def catch_up(self, before: list[np.ndarray], now: list[np.ndarray], keys: KeysOf) -> None:
        """Follow the rows from ids ``before[p]`` to ids ``now[p]``; rebuild when that is most of them."""
        added = [np.setdiff1d(n, b, assume_unique=True) for b, n in zip(before, now)]
        removed = [np.setdiff1d(b, n, assume_unique=True) for b, n in zip(before, now)]
        moved = sum(len(a) + len(r) for a, r in zip(added, removed))
        if moved > sum(len(n) for n in now) // 2:
            self.rebuild(now, keys)
        else:
            self.update(added, keys, removed, np.array([len(n) for n in now]))

    def follow(self, rows: Rows, before: IdBook | None, book: IdBook) -> None:
        """Catch up with another process's commits: the rows went from ``before`` to ``book`` (through
        ``rows``); without ``before``, or after a failed update, rebuild. Takes :attr:`lock` alone. On a
        library error the index is marked stale (searches go exact) and rebuilt at the next call."""
        now = [book.ids_in_slots(p) for p in range(len(self.parts))]
        with self.lock.write():
            try:
                if before is None or self.stale:
                    self.rebuild(now, keys_from(rows, book))
                else:
                    self.catch_up([before.ids_in_slots(p) for p in range(len(now))], now, keys_from(rows, book))
            except KvmemError as exc:
                self.stale = True
                warnings.warn(f"the lmdb index could not follow the rows ({exc}); searching exactly until it "
                              f"is rebuilt", RuntimeWarning, stacklevel=2)

    @classmethod
    def open(cls, directory: Path, config: StoreConfig, seq: int, rows: Rows, book: IdBook) -> AnnIndex:
        """The index in ``directory`` caught up to change ``seq`` (``book``), or rebuilt through ``rows``;
        its files are rewritten when that took work."""
        now = [book.ids_in_slots(p) for p in range(config.partitions)]
        loaded = cls.load(directory, config)
        index = None
        if loaded is not None:
            index, covered, held = loaded
            try:
                if covered != seq:
                    index.catch_up(held, now, keys_from(rows, book))
            except KvmemError:
                index = None
        if index is None:
            index = cls(config)
            index.rebuild(now, keys_from(rows, book))
        if index.changed:
            index.save(directory, seq, now)
        return index

    def due(self, rows: int) -> bool:
        """Whether the files should be rewritten, the store holding ``rows`` rows."""
        return self.changed >= max(_SAVE_EVERY, rows // 2)

    def search(self, queries: np.ndarray, k: int, value: int | None) -> list[np.ndarray | None]:
        """Candidate ids ``(q, c)`` per partition of ``queries (P, q, dim)`` float32; None: search it exactly."""
        return [part.search(queries[p], k, value) if part.indexed else None for p, part in enumerate(self.parts)]

    # ------------------------------------------------------------------ files
    def save(self, directory: Path, seq: int, held: list[np.ndarray]) -> None:
        """Write every part and ``index.json`` (covering change ``seq``, ids ``held``), then drop old files."""
        tag = secrets.token_hex(6)
        with _locked(directory):
            entries = []
            for p, (part, ids) in enumerate(zip(self.parts, held)):
                entry: dict[str, Any] = {"state": part.state(), "file": None}
                if part.indexed:
                    name = f"index.{tag}.p{p}.{self.kind}"
                    part.save(directory / name)
                    entry["file"] = _describe(directory / name)
                name = f"index.{tag}.p{p}.ids"
                (directory / name).write_bytes(np.ascontiguousarray(ids, "<i8").tobytes())
                entry["ids"] = _describe(directory / name)
                entries.append(entry)
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind, "seq": seq,
                        "parts": entries}
            tmp = directory / f".{MANIFEST}.{tag}.tmp"
            tmp.write_text(json.dumps(manifest))
            _fsync(tmp)
            os.replace(tmp, directory / MANIFEST)
            fsync_dir(directory)
            keep = {e[role]["name"] for e in entries for role in ("file", "ids") if e[role]}
            for file in directory.glob("index.*"):
                if file.name not in keep and file.name != MANIFEST:
                    file.unlink(missing_ok=True)
            for file in directory.glob(f".{MANIFEST}.*.tmp"):
                file.unlink(missing_ok=True)
        self.changed = 0

    @classmethod
    def load(cls, directory: Path, config: StoreConfig) -> tuple[AnnIndex, int, list[np.ndarray]] | None:
        """The index in ``directory``, the change it covers and the ids it holds; None if missing or unusable."""
        try:
            with _locked(directory):
                manifest = _read_manifest(directory, config)
                index = cls(config)
                held = []
                for p, entry in enumerate(manifest["parts"]):
                    held.append(np.frombuffer(_checked(directory, entry["ids"]), "<i8").astype(np.int64))
                    if entry["file"] is not None:
                        _checked(directory, entry["file"], read=False)
                        part = PARTS[index.kind].load(directory / entry["file"]["name"], config.dim, config.metric,
                                                      config.options, config.capacity, entry["state"])
                        index.parts[p] = part
            return index, manifest["seq"], held
        except Exception:  # noqa: BLE001 - missing, damaged, foreign, refused by its library: rebuild from LMDB
            return None


def keys_from(rows: Rows, book: IdBook) -> KeysOf:
    """Stored keys of partition p's ``ids`` (every row when None) as of ``book``, read through ``rows``."""
    counts = book.counts

    def keys(p: int, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if ids is None:
            return book.ids_in_slots(p), rows.keys32(p, int(counts[p]))
        want = np.full((len(counts), len(ids)), -1, np.int64)
        want[p] = ids
        return ids, rows.keys32(p, int(counts[p]), book.slots_of(want)[p])

    return keys


def _crc(file: Path) -> tuple[int, int]:
    """Size and CRC-32 of a file, read in 16 MiB chunks."""
    crc, size = 0, 0
    with open(file, "rb") as f:
        while chunk := f.read(16 << 20):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return size, crc


def _describe(file: Path) -> dict[str, Any]:
    _fsync(file)
    size, crc = _crc(file)
    return {"name": file.name, "bytes": size, "crc32": crc}


def _checked(directory: Path, entry: Any, read: bool = True) -> bytes:
    """A file ``index.json`` names, after its size and CRC-32 match (its bytes with ``read``); ValueError if not."""
    name = entry["name"]
    if not isinstance(name, str) or "/" in name or not name.startswith("index."):
        raise ValueError(f"index.json names a file {name!r}")
    if _crc(directory / name) != (entry["bytes"], entry["crc32"]):
        raise ValueError(f"{name} fails its size or CRC-32 check")
    return (directory / name).read_bytes() if read else b""


def _read_manifest(directory: Path, config: StoreConfig) -> dict[str, Any]:
    file = directory / MANIFEST
    if file.stat().st_size > _LIMIT:
        raise ValueError("index.json is too large")
    manifest = json.loads(file.read_bytes().decode("utf-8"))
    ok = (isinstance(manifest, dict) and manifest.get("format") == FORMAT
          and manifest.get("format_version") == FORMAT_VERSION and manifest.get("kind") == config.options["index"]
          and isinstance(manifest.get("seq"), int) and isinstance(manifest.get("parts"), list)
          and len(manifest["parts"]) == config.partitions)
    if not ok:
        raise ValueError("index.json does not describe this store's index")
    return manifest


def _fsync(file: Path) -> None:
    with open(file, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One process at a time writes or reads the index files of a directory."""
    with open(directory / "index.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def search(index: AnnIndex, rows: Rows, book: IdBook, counts: np.ndarray, max_sqnorm: np.ndarray,
           queries: torch.Tensor, k: int, value: int | None, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` ``(scores, slots)`` of ``queries (P, q, dim)``: ranked by the index, rescored exactly from
    the stored keys; partitions the index cannot answer are searched exactly."""
    P, q, _ = queries.shape
    found = index.search(queries.detach().cpu().float().numpy(), k, value) if q else [None] * P
    width = max([k, *(f.shape[1] for f in found if f is not None)])
    ids = np.full((P, q, width), -1, np.int64)                                          # (P, q, c)
    for p, f in enumerate(found):
        if f is not None:
            ids[p, :, :f.shape[1]] = f
    slots = torch.from_numpy(book.slots_of(ids.reshape(P, q * width)).reshape(P, q, width))
    keys = gather_columns(rows, counts, slots, ("keys",))["keys"].to(queries.device)
    scores = exact_scores(queries, keys, metric).masked_fill(slots.to(queries.device) < 0, NEG_INF)
    scores, order = scores.topk(k, -1)                                                  # (P, q, k)
    slots = slots.to(queries.device).gather(-1, order).masked_fill(scores == NEG_INF, -1)
    exact = [p for p, f in enumerate(found) if f is None and counts[p]]
    if exact and q:
        source = BlockKeys(rows, counts, max_sqnorm, queries.device, partitions=exact)
        scores[exact], slots[exact] = blocked_search(source, queries[exact], k, metric)
    return scores, slots
