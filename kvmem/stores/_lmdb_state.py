"""The two meta records of an ``lmdb`` store: what it is (``format``) and where it stands (``state``).

Both are checksummed msgpack (:func:`._lmdb_format.pack_record`) and validated
field by field on read: a damaged record raises :class:`CorruptStoreError`.
The ``state`` record is rewritten in the transaction of every change, so the
rows and the id bookkeeping on disk always agree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from kvmem.config import StoreConfig
from kvmem.errors import CorruptStoreError, KvmemError
from kvmem.stores._lmdb_format import FORMAT, FORMAT_VERSION, pack_record, unpack_record

__all__ = ["State", "format_record", "read_config"]

FORMAT_KEY = b"format"
STATE_KEY = b"state"


def format_record(config: StoreConfig) -> bytes:
    from kvmem import __version__

    return pack_record({"format": FORMAT, "format_version": FORMAT_VERSION, "backend": "lmdb",
                        "kvmem_version": __version__, "config": config.to_dict()})


def read_config(txn: Any, meta_db: Any) -> tuple[StoreConfig, dict[str, Any]]:
    """The store's config and its whole ``format`` record; CorruptStoreError if it is not one kvmem reads."""
    record = unpack_record(txn.get(FORMAT_KEY, db=meta_db), "format")
    if record.get("format") != FORMAT:
        raise CorruptStoreError(f"meta record 'format': format must be {FORMAT!r}; got {record.get('format')!r}")
    version = record.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CorruptStoreError(f"lmdb store format_version {version!r} is not one this kvmem reads "
                                f"(1..{FORMAT_VERSION}); upgrade kvmem")
    if record.get("backend") != "lmdb":
        raise CorruptStoreError(f"meta record 'format': backend must be 'lmdb'; got {record.get('backend')!r}")
    try:
        config = StoreConfig.from_dict(record.get("config"))
    except (KvmemError, TypeError) as exc:
        raise CorruptStoreError(f"meta record 'format': config: {exc}") from None
    from kvmem.stores.lmdb import LMDBStore

    if set(config.options) != set(LMDBStore.defaults):
        raise CorruptStoreError(f"meta record 'format': options must be {sorted(LMDBStore.defaults)}; "
                                f"got {sorted(config.options)}")
    try:
        LMDBStore.check_options(config.options, None)
    except KvmemError as exc:
        raise CorruptStoreError(f"meta record 'format': {exc}") from None
    return config, record


@dataclasses.dataclass(frozen=True)
class State:
    """Where a store stands after its last committed change."""

    seq: int                  # number of committed changes; a reader whose book is at another seq catches up
    counts: np.ndarray        # (P,) int64 rows held per partition
    next_ids: np.ndarray      # (P,) int64 next id each partition issues
    max_sqnorm: np.ndarray    # (P,) float64 an upper bound of |key|^2 over the rows held

    @classmethod
    def empty(cls, partitions: int) -> State:
        zeros = np.zeros(partitions, np.int64)
        return cls(0, zeros, zeros.copy(), np.zeros(partitions))

    def record(self) -> bytes:
        return pack_record({"seq": self.seq, "counts": self.counts.tolist(), "next_ids": self.next_ids.tolist(),
                            "max_sqnorm": [float(x) for x in self.max_sqnorm]})

    def after(self, **changes: np.ndarray) -> State:
        """The state one committed change later."""
        return dataclasses.replace(self, seq=self.seq + 1, **changes)

    @classmethod
    def read(cls, txn: Any, meta_db: Any, config: StoreConfig) -> State:
        record = unpack_record(txn.get(STATE_KEY, db=meta_db), "state")
        fields = {"seq", "counts", "next_ids", "max_sqnorm"}
        if set(record) != fields:
            raise CorruptStoreError(f"meta record 'state' must have the fields {sorted(fields)}; got {sorted(record)}")
        P = config.partitions
        seq = record["seq"]
        if not _is_count(seq):
            raise CorruptStoreError(f"meta record 'state': seq must be a non-negative int; got {seq!r}")
        counts, next_ids = (_ints(record[name], P, name) for name in ("counts", "next_ids"))
        sq = record["max_sqnorm"]
        if not (isinstance(sq, list) and len(sq) == P and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in sq)):
            raise CorruptStoreError(f"meta record 'state': max_sqnorm must be {P} finite floats >= 0")
        if (counts > next_ids).any():
            raise CorruptStoreError("meta record 'state': a partition holds more rows than ids it issued")
        if config.capacity is not None and (counts > config.capacity).any():
            raise CorruptStoreError("meta record 'state': a partition holds more rows than its capacity")
        return cls(seq, counts, next_ids, np.asarray(sq, np.float64))


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


def _ints(value: Any, n: int, name: str) -> np.ndarray:
    if not (isinstance(value, list) and len(value) == n and all(_is_count(v) for v in value)):
        raise CorruptStoreError(f"meta record 'state': {name} must be {n} non-negative ints; got {str(value)[:80]}")
    return np.asarray(value, np.int64)
