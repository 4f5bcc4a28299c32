"""The on-disk format of an ``lmdb`` store: records, row blocks, and a pre-flight check of ``data.mdb``.

A store directory holds one LMDB environment (``data.mdb``, ``lock.mdb``)
and, with ``index=``, one index file beside it. The environment has two
sub-databases::

    meta     b"format"  crc32 + msgpack {format, format_version, backend, kvmem_version, config}
             b"state"   crc32 + msgpack {seq, counts, next_ids, max_sqnorm}
    blocks   key  >IQ (partition, block number)   value  one block of rows

Block ``b`` of partition ``p`` holds the rows in slots ``[b*B, min((b+1)*B,
count_p))``, where ``B`` is the store's ``block_rows``; its value is::

    header  16 bytes: b"KVMB", rows n (u32), crc32 of the columns (u32), 4 zero bytes
    keys    (n, dim)        store dtype
    sqnorm  (n,)            float32, |key|^2
    ids     (n,)            int64
    values  (n, value_dim)  store dtype

each column starting on a 16-byte boundary, all little-endian. LMDB puts a
value this large on its own pages, 16 bytes past a page boundary, so the
columns can be viewed in place (zero-copy) from the memory map.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from kvmem.errors import CorruptStoreError

__all__ = ["FORMAT", "FORMAT_VERSION", "BlockLayout", "Block", "block_key", "parse_block_key",
           "pack_record", "unpack_record", "check_data_file"]

FORMAT = "kvmem-lmdb"
FORMAT_VERSION = 1
DATA_FILE = "data.mdb"
COLUMNS = ("keys", "sqnorm", "ids", "values")

_MAGIC = b"KVMB"
_HEADER = struct.Struct("<4sII4x")
_KEY = struct.Struct(">IQ")
_RECORD_LIMIT = 64 << 20                       # bytes; a state record is a few bytes per partition
_UNPACK_LIMITS = {"max_str_len": 1 << 16, "max_bin_len": 0, "max_ext_len": 0,
                  "max_array_len": 1 << 24, "max_map_len": 1 << 10}


def block_key(partition: int, block: int) -> bytes:
    return _KEY.pack(partition, block)


def parse_block_key(key: bytes | memoryview) -> tuple[int, int]:
    if len(key) != _KEY.size:
        raise CorruptStoreError(f"blocks: a key of {len(key)} bytes; block keys have {_KEY.size}")
    return _KEY.unpack(bytes(key))


def _align(n: int) -> int:
    return (n + 15) & ~15


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Where each column of an ``n``-row block lies."""

    dim: int                 # key width
    value_dim: int           # value width
    dtype: torch.dtype       # storage dtype of keys and values
    rows: int                # B: rows in a full block

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def widths(self) -> dict[str, int]:
        """Bytes per row of each column."""
        return {"keys": self.dim * self.itemsize, "sqnorm": 4, "ids": 8, "values": self.value_dim * self.itemsize}

    @functools.lru_cache(maxsize=256)     # noqa: B019 - layouts are few and live as long as their stores
    def spans(self, n: int) -> dict[str, tuple[int, int]]:
        """Column name -> ``(offset, bytes)`` in an ``n``-row block."""
        out, at = {}, _HEADER.size
        for name, width in self.widths().items():
            out[name] = (at, n * width)
            at += _align(n * width)
        return out

    def nbytes(self, n: int) -> int:
        start, size = self.spans(n)["values"]
        return start + _align(size)

    def encode(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """One block from ``columns[name] (n, width)`` uint8 (or any dtype of that many bytes per row)."""
        n = len(columns["ids"])
        buf = np.empty(self.nbytes(n), np.uint8)
        at = _HEADER.size
        for name, (start, size) in self.spans(n).items():
            buf[at:start] = 0                                     # padding before this column
            buf[start:start + size] = np.ascontiguousarray(columns[name]).reshape(-1).view(np.uint8)
            at = start + size
        buf[at:] = 0
        buf[:_HEADER.size] = np.frombuffer(_HEADER.pack(_MAGIC, n, zlib.crc32(buf[_HEADER.size:])), np.uint8)
        return buf


class Block:
    """A view of one stored block, valid while its transaction is open.

    Columns come back as views of ``buf`` (the memory map, zero-copy) unless
    LMDB stored the value at an address too poorly aligned for its dtype
    (small blocks live inside a B-tree page), in which case it is copied once.
    """

    def __init__(self, buf: memoryview, layout: BlockLayout, where: tuple[int, int]) -> None:
        self.where = where
        if len(buf) < _HEADER.size:
            raise CorruptStoreError(f"block {where}: {len(buf)} bytes is shorter than its header")
        magic, n, crc = _HEADER.unpack(bytes(buf[:_HEADER.size]))
        if magic != _MAGIC or n > layout.rows or len(buf) != layout.nbytes(n):
            raise CorruptStoreError(f"block {where}: bad header (magic {magic!r}, {n} rows, {len(buf)} bytes; "
                                    f"want {_MAGIC!r}, at most {layout.rows} rows, {layout.nbytes(n)} bytes)")
        if np.frombuffer(buf, np.uint8, 1).ctypes.data % 16:
            buf = memoryview(np.frombuffer(buf, np.uint8).copy())
        self.buf, self.rows, self.crc, self.layout = buf, n, crc, layout

    def verify(self) -> None:
        """Raise CorruptStoreError unless the columns match the header's checksum."""
        if zlib.crc32(self.buf[_HEADER.size:]) != self.crc:
            raise CorruptStoreError(f"block {self.where} fails its CRC-32 check: data.mdb is damaged")

    def array(self, name: str) -> np.ndarray:
        """Column ``name`` as a NumPy view ``(n, width)`` uint8 (``ids``: ``(n,)`` int64, ``sqnorm``: float32)."""
        start, size = self.layout.spans(self.rows)[name]
        raw = np.frombuffer(self.buf, np.uint8, size, start)
        if name == "ids":
            return raw.view(np.int64)
        if name == "sqnorm":
            return raw.view(np.float32)
        return raw.reshape(self.rows, -1)

    def tensor(self, name: str) -> torch.Tensor:
        """``keys``/``values`` ``(n, width)`` in the store dtype, or ``sqnorm (n,)``, viewing the buffer."""
        start, size = self.layout.spans(self.rows)[name]
        dtype = torch.float32 if name == "sqnorm" else self.layout.dtype
        if size == 0:
            return torch.empty((0,) if name == "sqnorm" else (0, self._width(name)), dtype=dtype)
        flat = torch.frombuffer(self.buf, dtype=dtype, count=size // _itemsize(dtype), offset=start)
        return flat if name == "sqnorm" else flat.view(self.rows, -1)

    def _width(self, name: str) -> int:
        return self.layout.dim if name == "keys" else self.layout.value_dim


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _spend_readonly_warning() -> None:
    """torch warns once per process when a tensor views read-only memory. Block views of the
    LMDB map are never written (the search copies whatever it changes), so spend that one
    warning here, silently, rather than show it to every user of the backend."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.frombuffer(b"\0" * 4, dtype=torch.float32)


_spend_readonly_warning()


# ---------------------------------------------------------------------- records
def pack_record(value: Mapping[str, Any]) -> bytes:
    body = msgpack.packb(dict(value), use_bin_type=True)
    return struct.pack("<I", zlib.crc32(body)) + body


def unpack_record(raw: bytes | memoryview | None, name: str) -> dict[str, Any]:
    """A meta record, checksummed and unpacked with explicit limits; raises CorruptStoreError."""
    if raw is None:
        raise CorruptStoreError(f"meta record {name!r} is missing: not a kvmem lmdb store, or a damaged one")
    if not 4 <= len(raw) <= _RECORD_LIMIT:
        raise CorruptStoreError(f"meta record {name!r} has {len(raw)} bytes (limit {_RECORD_LIMIT})")
    raw = bytes(raw)
    if struct.unpack("<I", raw[:4])[0] != zlib.crc32(raw[4:]):
        raise CorruptStoreError(f"meta record {name!r} fails its CRC-32 check")
    try:
        value = msgpack.unpackb(raw[4:], raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except (ValueError, msgpack.UnpackException, RecursionError) as exc:
        raise CorruptStoreError(f"meta record {name!r} is not valid msgpack: {exc}") from None
    if not isinstance(value, dict):
        raise CorruptStoreError(f"meta record {name!r} must be a map; got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------- data.mdb pre-flight
_META = struct.Struct("<QHHHH II QQ I HH QQQQQ I HH QQQQQ QQ")   # page header + MDB_meta (64-bit, LMDB 0.9)
_P_META = 0x08
_MDB_MAGIC = 0xBEEFC0DE
_SHORT_PAGES = 64      # a valid file may end this many (free) pages before its last page number


def check_data_file(directory: Path) -> None:
    """Raise CorruptStoreError unless ``data.mdb`` is an LMDB file with every page present.

    LMDB maps the file and trusts the page numbers in it: a truncated file
    would kill the process with SIGBUS on first touch, a foreign one makes it
    read garbage. So before LMDB sees the file we read its two meta pages
    ourselves and check the page count against the file's size. LMDB may leave
    a few free pages at the end unwritten (loose pages of the last commit);
    such a short tail is filled with zero pages, which LMDB never reads.
    """
    file = directory / DATA_FILE
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            first = f.read(_META.size)
            metas = [_parse_meta(first, 0)]
            f.seek(metas[0]["psize"])
            metas.append(_parse_meta(f.read(_META.size), 1))
    except OSError as exc:
        raise CorruptStoreError(f"cannot read {file}: {exc}") from None
    meta = max(metas, key=lambda m: m["txnid"])
    need = (meta["last_pg"] + 1) * meta["psize"]
    if size < need:
        if need - size > _SHORT_PAGES * meta["psize"]:
            raise CorruptStoreError(f"{file} is truncated: {size} bytes, but its pages run to {need}")
        try:
            with open(file, "r+b") as f:
                f.truncate(need)
        except OSError as exc:
            raise CorruptStoreError(f"{file} ends {need - size} bytes short and cannot be extended: {exc}") from None


def _parse_meta(page: bytes, number: int) -> dict[str, int]:
    if len(page) < _META.size:
        raise CorruptStoreError(f"data.mdb is too short to hold LMDB meta page {number} ({len(page)} bytes)")
    f = _META.unpack(page)
    flags, magic, version, psize = f[2], f[5], f[6], f[9]
    last_pg, txnid = f[-2], f[-1]
    if not flags & _P_META or magic != _MDB_MAGIC:
        raise CorruptStoreError(f"data.mdb is not an LMDB file (meta page {number}: magic {magic:#x})")
    if version != 1:
        raise CorruptStoreError(f"data.mdb has LMDB data format {version}; kvmem writes format 1 (LMDB 0.9)")
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        raise CorruptStoreError(f"data.mdb meta page {number}: page size {psize} is not a power of two in [512, 65536]")
    return {"psize": psize, "last_pg": last_pg, "txnid": txnid}
