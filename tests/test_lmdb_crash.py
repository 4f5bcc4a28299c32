"""Crash test: a process adding batches is killed with SIGKILL at random moments, again and again.

After every kill the store must hold every batch the writer acknowledged,
row for row and byte for byte, and no batch may be there in part. The writer
is a child process forked from a forkserver that has torch and kvmem loaded,
so a round costs milliseconds, not an interpreter start.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kvmem
from kvmem.testing import BruteForceMemory, check_search
from kvmem.testing.child import forkserver

pytestmark = pytest.mark.slow

P, DIM, VALUE_DIM, CAPACITY = 2, 16, 8, 3000
KILLS = 24


def _size(batch: int) -> int:
    return 1 + (batch * 37) % 150


def _batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    n = _size(batch)
    return torch.randn(P, n, DIM, generator=g), torch.randn(P, n, VALUE_DIM, generator=g)


_ENDS = np.cumsum([_size(b) for b in range(100_000)])     # next id after batch b


def _batches_in(next_id: int) -> int:
    """How many whole batches ``next_id`` ids make; AssertionError if it falls inside a batch."""
    done = int(np.searchsorted(_ENDS, next_id, side="right"))
    assert next_id == (_ENDS[done - 1] if done else 0), f"next id {next_id} is inside batch {done}: half a batch"
    return done


def _write_batches(path: str, conn) -> None:
    """The child: open the store and add batches from where it stands, acknowledging each one.

    Its index files (if any) are rewritten after every batch, so kills land in those writes too."""
    from kvmem.stores._lmdb_index import AnnIndex

    AnnIndex.due = lambda self, rows: self.changed > 0
    store = kvmem.load(path)
    start = _batches_in(int(store._book.next_ids[0]))
    for b in itertools.count(start):
        store.add(*_batch(b))
        conn.send(b)


def _check(path: Path, acked: int) -> int:
    """Open the store; assert whole batches, every acknowledged one, rows byte-identical. Return batches held."""
    with kvmem.load(path) as store:
        nexts = store._book.next_ids.tolist()
        assert len(set(nexts)) == 1, f"partitions disagree: next ids {nexts}"
        done = _batches_in(nexts[0])
        assert done >= acked + 1, f"batch {acked} was acknowledged but the store holds {done} batches"
        first = max(0, nexts[0] - CAPACITY)                       # FIFO: the last CAPACITY ids are held
        assert [store.count(p) for p in range(P)] == [nexts[0] - first] * P
        want_k, want_v = _rows_between(first, nexts[0])
        keys, values = store.get(torch.arange(first, nexts[0]).expand(P, -1))
        assert keys.view(torch.int16).equal(want_k.view(torch.int16))
        assert values.view(torch.int16).equal(want_v.view(torch.int16))
        return done


def _rows_between(first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16 rows with ids ``[first, end)``, rebuilt from the batch seeds."""
    b0 = int(np.searchsorted(_ENDS, first, side="right"))
    keys, values = zip(*(_batch(b) for b in range(b0, _batches_in(end))))
    offset = first - (_ENDS[b0 - 1] if b0 else 0)
    return (torch.cat(keys, 1)[:, offset:].half(), torch.cat(values, 1)[:, offset:].half())


@pytest.mark.parametrize("options", [{}, {"index": "hnsw"}], ids=["exact", "hnsw"])
def test_killed_writers_lose_no_acknowledged_batch(tmp_path, options):
    path = tmp_path / "mem"
    kvmem.create("lmdb", path=path, dim=DIM, value_dim=VALUE_DIM, partitions=P, capacity=CAPACITY,
                 block_rows=64, **options).close()
    ctx = forkserver()
    rng = random.Random(0)
    acked = -1
    for _ in range(KILLS):
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_write_batches, args=(str(path), send))
        child.start()
        send.close()
        wait_for = acked + 1 + rng.randrange(4)                   # a few more acknowledgements, then a random moment
        deadline = time.monotonic() + 60
        while acked < wait_for and time.monotonic() < deadline and child.is_alive():
            if receive.poll(0.1):
                acked = receive.recv()
        time.sleep(rng.uniform(0, 0.01))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        with contextlib.suppress(EOFError):                        # acknowledgements sent before the kill
            while receive.poll():
                acked = receive.recv()
        receive.close()
        assert child.exitcode == -signal.SIGKILL, "the writer died before it was killed"
        _check(path, acked)
    assert acked >= KILLS
    with kvmem.load(path) as store:                                 # search works on what survived
        model = BruteForceMemory(DIM, VALUE_DIM, P, "ip", torch.float16, CAPACITY)
        for b in range(_batches_in(int(store._book.next_ids[0]))):
            model.add(*_batch(b))
        queries = torch.randn(P, 8, DIM, generator=torch.Generator().manual_seed(7))
        hits, wanted = check_search(store.search(queries, 20), model, queries, 20, exact=store.exact)
        assert hits / wanted >= 0.95
