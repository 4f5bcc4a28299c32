"""Checks on a saved faiss IVF file, made before ``faiss.read_index`` sees it.

The manifest's SHA-256 already rules out damage; these checks rule out a
*foreign* file (a valid faiss index of another type, width, metric or size,
saved elsewhere and given a recomputed manifest). From the bytes:

- the index header: type fourcc (the one our options produce), ``d``,
  ``ntotal``, trained, metric L2;
- the inverted lists at the end of the file are plain in-memory lists
  (``ilar``: faiss reads nothing outside the file) whose sizes add up to
  ``ntotal`` and whose data fill the file exactly.

After loading, :func:`list_ids` lets the caller compare the labels with the
partition's ids.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from kvmem.errors import CorruptStoreError

__all__ = ["check_faiss_file", "list_ids"]

_HEADER = np.dtype([("fourcc", "S4"), ("d", "<i4"), ("ntotal", "<i8"), ("dummy", "<i8", 2),
                    ("trained", "u1"), ("metric", "<i4")])          # faiss write_index_header, 37 bytes


def _fail(path: Path, why: str) -> CorruptStoreError:
    return CorruptStoreError(f"{path.name} is not the faiss index this store saved: {why}")


def check_faiss_file(path: Path, reference: faiss.IndexIVF, ntotal: int) -> None:
    """Raise CorruptStoreError unless ``path`` holds an index like ``reference`` with ``ntotal`` rows."""
    size = path.stat().st_size
    if size < _HEADER.itemsize:
        raise _fail(path, f"{size} bytes is shorter than a faiss header")
    data = np.memmap(path, np.uint8, mode="r")
    head = data[:_HEADER.itemsize].view(_HEADER)[0]
    want = bytes(faiss.serialize_index(reference)[:4])
    if head["fourcc"] != want:
        raise _fail(path, f"index type {head['fourcc']!r}; expected {want!r} ({type(reference).__name__})")
    if head["d"] != reference.d or head["ntotal"] != ntotal or head["trained"] != 1 \
            or head["metric"] != faiss.METRIC_L2:
        raise _fail(path, f"d={head['d']}, ntotal={head['ntotal']}, trained={head['trained']}, "
                          f"metric={head['metric']}; expected d={reference.d}, ntotal={ntotal}, trained, L2")
    _check_lists(path, data, reference.nlist, reference.code_size, ntotal)


def _check_lists(path: Path, data: np.ndarray, nlist: int, code_size: int, ntotal: int) -> None:
    """The file ends with ``ilar`` lists of ``nlist`` lists, ``ntotal`` codes of ``code_size`` bytes and ids."""
    body = ntotal * (code_size + 8)

    def at(offset: int, dtype: str, n: int = 1) -> np.ndarray:
        return data[offset:offset + n * np.dtype(dtype).itemsize].view(dtype)

    # full: sizes of every list; sparse: (list, size) pairs of the non-empty ones, at most nlist / 2
    for kind, pairs in [(b"full", None), *((b"sprs", n) for n in range(nlist // 2 + 1))]:
        count = nlist if pairs is None else 2 * pairs
        start = len(data) - body - (4 + 8 + 8 + 4 + 8 + 8 * count)
        if start < _HEADER.itemsize:
            break
        if bytes(data[start:start + 4]) != b"ilar" or bytes(data[start + 20:start + 24]) != kind:
            continue
        if at(start + 4, "<u8")[0] != nlist or at(start + 12, "<u8")[0] != code_size \
                or at(start + 24, "<u8")[0] != count:
            continue
        sizes = at(start + 32, "<u8", count).astype(np.int64)
        if pairs is not None:
            lists, sizes = sizes[0::2], sizes[1::2]
            if len(lists) and (lists.max() >= nlist or (np.diff(lists) <= 0).any() or (sizes <= 0).any()):
                continue
        if sizes.sum() == ntotal:
            return
    raise _fail(path, f"its inverted lists are not {nlist} in-memory lists holding {ntotal} rows")


def list_ids(index: faiss.IndexIVF) -> np.ndarray:
    """Every label held in the inverted lists of ``index``."""
    lists = faiss.downcast_InvertedLists(index.invlists)
    if not isinstance(lists, faiss.ArrayInvertedLists):
        raise CorruptStoreError(f"faiss index holds {type(lists).__name__}, not in-memory lists")
    out = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
           for i in range(index.nlist) if lists.list_size(i)]
    return np.concatenate(out) if out else np.empty(0, np.int64)
