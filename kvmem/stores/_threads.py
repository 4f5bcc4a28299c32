"""Threads of the approximate backends: one process-wide pool, and how work is spread over it.

- :func:`parallel` runs one task per partition (writes: add, remove), telling
  each how many threads of its own the index library may use, so P
  partitions never start P x cores threads.
- :func:`spread` splits the query rows of a search into contiguous spans, one
  per core, each searched, rescored and fetched on one thread: the first on
  the calling thread, the rest on the pool. faiss and hnswlib release the GIL,
  and so do the torch ops of a span. One thread per span, not the libraries'
  own threads: faiss's OpenMP workers spin for milliseconds after a parallel
  search and take a core from whatever runs next (1000 queries at nprobe 1
  over 1M keys took 17 ms right after a 2-thread faiss search, 12 ms once
  6 ms had passed), and hnswlib starts new threads on every call.
- Inside a span, torch ops run on one thread (:func:`torch_threads`): torch's
  OpenMP workers spin the same way.
- A pool thread woken for a span on the CPU its caller runs on moves off that
  CPU for the span (:func:`_off`). After tens of milliseconds idle, Linux
  tends to wake the sleeping worker on the waker's CPU and to leave both
  spans sharing it while the other core idles: a search of 1000 queries at
  nprobe 1 over 1M keys, called every 20 ms, ran on one core most of the
  time and took 18.5 ms instead of 12 (12.8 ms with the move). Linux only
  (``sched_getcpu`` from the C library, ``os.sched_setaffinity``); elsewhere
  spans go where the scheduler puts them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

__all__ = ["cpus", "workers", "parallel", "spread", "thread_count", "torch_threads"]

T = TypeVar("T")
_POOL_NAME = "kvmem-ann"   # the shared pool's threads' names begin so
SPAN_MIN = 32               # query rows per span, at least: a span costs ~0.1 ms of dispatch and small ops

_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


def _find_getcpu() -> Callable[[], int] | None:
    """The C library's ``sched_getcpu`` (the CPU this thread runs on), where it and affinity exist."""
    try:
        getcpu = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    getcpu.restype, getcpu.argtypes = ctypes.c_int, []
    return getcpu if hasattr(os, "sched_setaffinity") and getcpu() >= 0 else None


_getcpu = _find_getcpu()


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def workers(threads: int) -> int:
    """Threads a search may use: the caller's torch thread count, at most one per core."""
    return max(1, min(cpus(), threads))


def _shared_pool() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():   # a forked child gets a pool of its own
            _pool = ThreadPoolExecutor(max_workers=cpus(), thread_name_prefix=_POOL_NAME)
            _pool_pid = os.getpid()
        return _pool


def parallel(fn: Callable[[int, int], T], items: list[int]) -> list[T]:
    """``[fn(item, threads) for item in items]``, run in the shared pool when there are several.

    ``threads`` is how many threads ``fn`` may use itself: 0 (the library's
    default, every core) for a single item, else ``cores // len(items)``.
    """
    if len(items) <= 1:
        return [fn(item, 0) for item in items]
    threads = max(1, cpus() // len(items))
    return list(_shared_pool().map(lambda item: fn(item, threads), items))


def spread(fn: Callable[[int, int], T], rows: int, threads: int, minimum: int = SPAN_MIN) -> list[T]:
    """``[fn(lo, hi) for each span]`` of ``rows`` cut into up to ``threads`` contiguous spans of at
    least ``minimum`` rows (one span when fewer), each run with torch on one thread: the first on
    this thread, the others on the shared pool. Waits for every span before raising."""
    pieces = max(1, min(threads, rows // minimum))
    if threading.current_thread().name.startswith(_POOL_NAME):
        pieces = 1                              # a span of the pool never waits on the pool: no deadlock
    bounds = [rows * i // pieces for i in range(pieces + 1)]
    home = _getcpu() if _getcpu is not None and pieces > 1 else None

    def span(i: int) -> T:
        with torch_threads(1), _off(home if i else None):
            return fn(bounds[i], bounds[i + 1])

    others = [_shared_pool().submit(span, i) for i in range(1, pieces)]
    try:
        first = span(0)
    finally:
        wait(others)
    return [first, *(f.result() for f in others)]


@contextlib.contextmanager
def _off(cpu: int | None) -> Iterator[None]:
    """Keep this thread off ``cpu`` inside, when it runs there now (see the module docstring)."""
    allowed = os.sched_getaffinity(0) if cpu is not None and _getcpu is not None and _getcpu() == cpu else set()
    if len(allowed - {cpu}) == 0:
        yield
        return
    os.sched_setaffinity(0, allowed - {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


@contextlib.contextmanager
def thread_count(get: Callable[[], int], set_: Callable[[int], None], n: int) -> Iterator[None]:
    """A per-thread thread count (read by ``get``, written by ``set_``) at ``n`` inside, restored after."""
    before = get()
    if n == before:
        yield
        return
    set_(n)
    try:
        yield
    finally:
        set_(before)


def torch_threads(n: int) -> contextlib.AbstractContextManager[None]:
    """Run this thread's torch CPU ops on ``n`` threads inside.

    The count is per thread (OpenMP's ``nthreads-var``), so other threads are not affected. faiss
    carries its own OpenMP runtime: :func:`kvmem.stores.ivf.omp_threads` sets that one.
    """
    return thread_count(torch.get_num_threads, torch.set_num_threads, n)
