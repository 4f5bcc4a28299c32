"""Checks on a saved hnswlib graph, made before ``hnswlib`` loads it.

The manifest's SHA-256 already rules out damage; these checks rule out a
*foreign* file (a valid graph of another width, degree or memory, given a
recomputed manifest), which hnswlib would load without question and then read
out of bounds. hnswlib's ``saveIndex`` writes (little-endian)::

    header, 96 bytes: offsetLevel0, max_elements, cur_element_count, size_data_per_element,
                      label_offset, offsetData (u64), maxlevel (i32), enterpoint (u32),
                      maxM, maxM0, M (u64), mult (f64), ef_construction (u64)
    level 0, one record per element: link count (u16), deleted flag (u8), 0 (u8),
                      maxM0 neighbours (u32), the vector (dim f32), the label (u64)
    upper levels, per element: byte size (u32), then per level: count (u32), maxM neighbours (u32)

Checked: every header field against the store (dim, M, ef_construction, element
count); every neighbour of every level names an existing element that has
that level; the upper-level lists fill the file exactly; the live labels are the
partition's ids, and each live vector equals the stored key it stands for.
Everything is read through a read-only memory map and checked with NumPy.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kvmem.errors import CorruptStoreError

__all__ = ["check_hnsw_file"]

_HEADER = np.dtype([("offset_level0", "<u8"), ("max_elements", "<u8"), ("count", "<u8"), ("record", "<u8"),
                    ("label_offset", "<u8"), ("data_offset", "<u8"), ("max_level", "<i4"), ("entry", "<u4"),
                    ("max_m", "<u8"), ("max_m0", "<u8"), ("m", "<u8"), ("mult", "<f8"), ("ef_construction", "<u8")])
_MAX_LEVEL = 64


def _fail(path: Path, why: str) -> CorruptStoreError:
    return CorruptStoreError(f"{path.name} is not the hnswlib graph this store saved: {why}")


def check_hnsw_file(path: Path, *, dim: int, M: int, ef_construction: int, elements: int,
                    ids: np.ndarray, keys: np.ndarray) -> None:
    """Raise CorruptStoreError unless ``path`` is a graph of ``elements`` elements whose live
    labels are ``ids (n,)`` with vectors ``keys (n, dim)`` (as the graph stores them)."""
    size = path.stat().st_size
    if size < _HEADER.itemsize:
        raise _fail(path, f"{size} bytes is shorter than its header")
    data = np.memmap(path, np.uint8, mode="r")
    h = data[:_HEADER.itemsize].view(_HEADER)[0]
    links0 = 2 * M * 4 + 4
    want = {"offset_level0": 0, "count": elements, "record": links0 + dim * 4 + 8, "label_offset": links0 + dim * 4,
            "data_offset": links0, "max_m": M, "max_m0": 2 * M, "m": M, "ef_construction": ef_construction}
    wrong = {name: int(h[name]) for name, value in want.items() if int(h[name]) != value}
    if wrong or not math.isclose(float(h["mult"]), 1 / math.log(M), rel_tol=1e-9) or h["max_elements"] < elements:
        raise _fail(path, f"header fields {wrong or dict(mult=float(h['mult']))} disagree with "
                          f"dim={dim}, M={M}, ef_construction={ef_construction}, {elements} elements")
    record = int(h["record"])
    end0 = _HEADER.itemsize + elements * record
    if size < end0 or (size - end0) % 4:
        raise _fail(path, f"{size} bytes cannot hold {elements} level-0 records of {record} bytes")
    level0 = data[_HEADER.itemsize:end0].reshape(elements, record)
    levels = _check_upper(path, data[end0:].view("<u4"), elements, M, int(h["max_level"]))
    if elements and (h["entry"] >= elements or levels[h["entry"]] != h["max_level"]):
        raise _fail(path, f"entry point {int(h['entry'])} is not an element of the top level {int(h['max_level'])}")
    live = _check_level0(path, level0, 2 * M, elements)
    _check_rows(path, level0, live, links0, dim, ids, keys)


def _check_links(path: Path, lists: np.ndarray, width: int, elements: int, levels: np.ndarray,
                 level: np.ndarray | int) -> np.ndarray:
    """Check link lists ``(n, 1 + width)`` u32 (header word, neighbours); return the header words."""
    head = lists[:, 0]
    count = head & 0xFFFF
    if (count > width).any():
        raise _fail(path, f"a link list holds {int(count.max())} neighbours; at most {width} fit")
    used = np.arange(width)[None, :] < count[:, None]
    neighbours = lists[:, 1:]
    if (neighbours[used] >= elements).any():
        raise _fail(path, "a link names an element that does not exist")
    reach = np.broadcast_to(np.asarray(level)[..., None] if np.ndim(level) else level, neighbours.shape)
    if (levels[np.minimum(neighbours, max(elements - 1, 0))][used] < reach[used]).any():
        raise _fail(path, "a link names an element below that level")
    return head


def _check_level0(path: Path, level0: np.ndarray, max_m0: int, elements: int) -> np.ndarray:
    """Level-0 links; returns the live (not deleted) mask ``(elements,)``."""
    lists = np.ascontiguousarray(level0[:, :4 * (1 + max_m0)]).view("<u4")
    head = _check_links(path, lists, max_m0, elements, np.zeros(elements, np.int64), 0)
    flag, spare = (head >> 16) & 0xFF, head >> 24
    if (flag > 1).any() or spare.any():
        raise _fail(path, "a level-0 record has a malformed deleted flag")
    return flag == 0


def _check_upper(path: Path, words: np.ndarray, elements: int, M: int, max_level: int) -> np.ndarray:
    """Walk the upper-level lists; return each element's level."""
    if not -1 <= max_level <= _MAX_LEVEL or (elements and max_level < 0):
        raise _fail(path, f"max level {max_level} is out of range")
    per_level = M + 1                                               # words: count, then M neighbours
    levels = np.zeros(elements, np.int64)
    starts, pos, e = [], 0, 0
    nonzero = np.flatnonzero(words)
    while e < elements:
        j = int(np.searchsorted(nonzero, pos))
        run = min((int(nonzero[j]) if j < len(nonzero) else len(words)) - pos, elements - e)
        e, pos = e + run, pos + run                                 # elements without upper levels
        if e == elements:
            break
        if pos >= len(words):
            raise _fail(path, "the upper levels end before the last element")
        nbytes = int(words[pos])
        level, rest = divmod(nbytes, 4 * per_level)
        if rest or level > max_level or pos + 1 + nbytes // 4 > len(words):
            raise _fail(path, f"element {e} has an upper-level block of {nbytes} bytes")
        levels[e] = level
        starts.append((e, pos + 1))
        e, pos = e + 1, pos + 1 + nbytes // 4
    if pos != len(words):
        raise _fail(path, f"{4 * (len(words) - pos)} bytes follow the last element")
    if starts:
        who, first = np.array(starts).T
        n = levels[who]
        lvl = np.concatenate([np.arange(1, c + 1) for c in n])                       # (lists,)
        at = np.repeat(first, n) + (lvl - 1) * per_level                              # (lists,) word offsets
        lists = words[at[:, None] + np.arange(per_level)[None, :]]                    # (lists, 1 + M)
        _check_links(path, lists, M, elements, levels, lvl)
    return levels


def _check_rows(path: Path, level0: np.ndarray, live: np.ndarray, links0: int, dim: int,
                ids: np.ndarray, keys: np.ndarray) -> None:
    """The live labels are ``ids`` and each live vector equals its stored key."""
    labels = np.ascontiguousarray(level0[:, links0 + dim * 4:links0 + dim * 4 + 8]).view("<u8")[:, 0]
    if len(np.unique(labels)) != len(labels) or (labels >= 1 << 63).any():
        raise _fail(path, "its labels repeat or are out of range")
    mine = labels[live].astype(np.int64)
    if len(mine) != len(ids):
        raise _fail(path, f"{len(mine)} live elements; the partition holds {len(ids)} rows")
    order = np.argsort(ids)
    where = np.searchsorted(ids[order], mine)
    if len(mine) and not np.array_equal(ids[order][np.minimum(where, len(ids) - 1)], mine):
        raise _fail(path, "its live labels are not the partition's ids")
    vectors = np.ascontiguousarray(level0[live, links0:links0 + dim * 4]).view("<f4")
    if not np.array_equal(vectors, keys[order[where]]):
        raise _fail(path, "its vectors are not the stored keys")
