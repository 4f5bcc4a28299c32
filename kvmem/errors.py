"""kvmem's exceptions: one tree, so callers can catch what they can act on.

::

    KvmemError
    ├── InvalidInputError (also ValueError)       wrong shape/dtype, NaN/Inf, bad k, unknown id
    ├── CorruptStoreError                         a saved store fails validation
    ├── StoreFullError                            disk or map full; nothing half-written
    └── BackendUnavailableError (also ImportError) optional dependency missing

Every message names what was expected and what was received. Library errors
(faiss and hnswlib ``RuntimeError``, ``lmdb.Error``, ``OSError`` of a full
disk) are mapped into this tree by :func:`map_errors`, never leaked raw.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

__all__ = [
    "KvmemError",
    "InvalidInputError",
    "CorruptStoreError",
    "StoreFullError",
    "BackendUnavailableError",
    "map_errors",
    "path_error",
]


class KvmemError(Exception):
    """Base of every error kvmem raises on purpose."""


class InvalidInputError(KvmemError, ValueError):
    """An argument has the wrong shape, dtype or value; the store is unchanged."""


class CorruptStoreError(KvmemError):
    """A saved or on-disk store failed validation; nothing was loaded from it."""


class StoreFullError(KvmemError):
    """The disk or the memory map is full; the operation wrote nothing."""


class BackendUnavailableError(KvmemError, ImportError):
    """A backend's library is not installed; the message says what to install."""


DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})   # OSError errnos that mean a full disk


def path_error(exc: OSError, what: str) -> KvmemError:
    """The error for an ``OSError`` met on a path the caller gave (a name too long, a file on the way,
    no permission): :class:`StoreFullError` for a full disk, else :class:`InvalidInputError`."""
    if exc.errno in DISK_FULL:
        return StoreFullError(f"{what}: disk full ({exc})")
    return InvalidInputError(f"{what}: {exc.strerror or exc}")


@contextlib.contextmanager
def map_errors(what: str, *, corrupt: bool = False) -> Iterator[None]:
    """Map library errors raised inside the block into kvmem's tree.

    ``what`` names the operation for the message ("hnsw add", "faiss load").
    With ``corrupt=True`` (loaders) any library error means the file is bad and
    becomes :class:`CorruptStoreError`; otherwise it becomes :class:`KvmemError`.
    kvmem's own errors pass through unchanged.
    """
    try:
        yield
    except KvmemError:
        raise
    except MemoryError:
        raise
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise StoreFullError(f"{what}: disk full ({exc})") from exc
        if corrupt:
            raise CorruptStoreError(f"{what}: {exc}") from exc
        raise
    except Exception as exc:  # faiss/hnswlib RuntimeError, lmdb.Error, ...
        name = type(exc).__name__
        if name == "MapFullError":
            raise StoreFullError(f"{what}: LMDB map full ({exc})") from exc
        if name == "DiskError" or getattr(exc, "code", None) in DISK_FULL:  # lmdb's ENOSPC, EFBIG, EDQUOT
            raise StoreFullError(f"{what}: disk full ({exc})") from exc
        if corrupt or name in {"CorruptedError", "PageNotFoundError", "InvalidError",
                               "VersionMismatchError", "BadValsizeError"}:
            raise CorruptStoreError(f"{what}: {name}: {exc}") from exc
        raise KvmemError(f"{what}: {name}: {exc}") from exc
