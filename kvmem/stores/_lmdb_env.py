"""One LMDB environment per store directory per process, shared by the stores opened on it.

LMDB forbids opening an environment twice in one process (its fcntl locks
belong to the process), and resizing the memory map is allowed only while
the process has no transaction open. :class:`SharedEnv` answers both: every
store object on a directory shares one environment, and every transaction
goes through :meth:`SharedEnv.begin`, which counts them so :meth:`resize` can
wait for none to be open.

An environment belongs to the process that opened it: after ``fork()`` the
child must open the store again; any use of an inherited one raises.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import lmdb

from kvmem.errors import KvmemError, StoreFullError

__all__ = ["SharedEnv"]

_OPEN: dict[tuple[int, int], SharedEnv] = {}   # (st_dev, st_ino) of data.mdb -> environment
_OPEN_LOCK = threading.Lock()


class SharedEnv:
    """An open LMDB environment with the ``meta`` and ``blocks`` sub-databases."""

    def __init__(self, path: Path, map_size: int, create: bool) -> None:
        self.path = path
        self.pid = os.getpid()
        # lib_version=0: LMDB 0.9's data format, which check_data_file reads and other tools open.
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=2, max_readers=1024, meminit=False,
                             create=create, lib_version=0)
        try:
            self.env.reader_check()          # free reader slots left by killed processes
            # A write transaction, since handles opened in a read one do not outlive it; with
            # create=False it changes nothing in the file (a foreign one stays as it was).
            with self.env.begin(write=True) as txn:
                self.meta = self.env.open_db(b"meta", txn=txn, create=create)
                self.blocks = self.env.open_db(b"blocks", txn=txn, create=create)
        except BaseException:
            self.env.close()
            raise
        self.users = 0
        self._cond = threading.Condition()
        self._open_txns = 0
        self._resizing = False

    # ------------------------------------------------------------------ registry
    @classmethod
    def acquire(cls, path: Path, map_size: int, create: bool = False) -> SharedEnv:
        """The environment at ``path``, opened here or shared with the stores already open on it."""
        with _OPEN_LOCK:
            key = _identity(path)
            shared = _OPEN.get(key) if key else None
            if shared is None or shared.pid != os.getpid():
                shared = cls(path, map_size, create)
                _OPEN[_identity(path)] = shared
            shared.users += 1
            return shared

    def release(self) -> None:
        """Drop one user; the last one closes the environment (never in a forked child)."""
        with _OPEN_LOCK:
            self.users -= 1
            if self.users or self.pid != os.getpid():
                return
            for key, shared in list(_OPEN.items()):
                if shared is self:
                    del _OPEN[key]
            self.env.close()

    def check_process(self) -> None:
        if os.getpid() != self.pid:
            raise KvmemError(
                f"the lmdb store at {self.path} was opened in process {self.pid} and this is process "
                f"{os.getpid()} (a fork): an LMDB environment cannot cross fork(). Open the store again "
                f"in this process with kvmem.load({str(self.path)!r}).")

    # ------------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def begin(self, write: bool = False) -> Iterator[lmdb.Transaction]:
        """A transaction with ``buffers=True``; aborted on exit unless the body committed it."""
        self.check_process()
        while True:
            with self._cond:
                while self._resizing:
                    self._cond.wait()
                self._open_txns += 1
            try:
                txn = self.env.begin(write=write, buffers=True)
                break
            except lmdb.MapResizedError:       # another process grew the map past ours: adopt its size
                self._done()
                self.resize(0)
            except BaseException:
                self._done()
                raise
        try:
            yield txn
        finally:
            txn.abort()
            self._done()

    def _done(self) -> None:
        with self._cond:
            self._open_txns -= 1
            self._cond.notify_all()

    def resize(self, size: int) -> None:
        """Set the map size (0: adopt the size on disk) once no transaction of this process is open."""
        with self._cond:
            self._resizing = True
            try:
                while self._open_txns:
                    self._cond.wait()
                self.env.set_mapsize(size)
            finally:
                self._resizing = False
                self._cond.notify_all()

    def grow(self, ceiling: int | None, what: str) -> None:
        """Double the map (up to ``ceiling`` bytes); StoreFullError when it is already there."""
        size = self.env.info()["map_size"]
        if ceiling is not None and size >= ceiling:
            raise StoreFullError(f"{what}: the LMDB map is full at its ceiling max_map_size={ceiling} bytes; "
                                 f"nothing was written")
        self.env.reader_check()            # stale readers pin old pages; free them before growing
        self.resize(2 * size if ceiling is None else min(2 * size, ceiling))

    def reserve(self, size_hint: int, ceiling: int | None) -> None:
        """Grow the map ahead of a write of about ``size_hint`` bytes (saves MapFullError retries of big adds)."""
        info, page = self.env.info(), self.env.stat()["psize"]
        need = (info["last_pgno"] + 1) * page + 2 * size_hint + (1 << 20)
        if need > info["map_size"] and (ceiling is None or info["map_size"] < ceiling):
            target = max(need, 2 * info["map_size"])
            self.resize(target if ceiling is None else min(target, ceiling))

    def map_size(self) -> int:
        return self.env.info()["map_size"]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = (path / "data.mdb").stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino
