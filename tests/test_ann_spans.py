"""How ivf and hnsw spread one search over threads: spans that cut partitions give what one span gives."""

import os
import threading
import time

import pytest
import torch
from kvmem.benchmarks.datasets import clustered

import kvmem
from kvmem.stores import _threads
from kvmem.stores._threads import spread
from kvmem.testing import BruteForceMemory, check_search

P, Q, K = 4, 50, 16          # 200 query rows: three spans cut partitions 1 and 2 in the middle


def test_spread_cuts_contiguous_spans_and_runs_each_once_in_order():
    assert spread(lambda lo, hi: (lo, hi), 100, 3, minimum=10) == [(0, 33), (33, 66), (66, 100)]
    assert spread(lambda lo, hi: (lo, hi), 15, 4, minimum=10) == [(0, 15)]        # too few rows to split
    assert spread(lambda lo, hi: (lo, hi), 0, 4) == [(0, 0)]
    where = spread(lambda lo, hi: threading.current_thread().name, 90, 3, minimum=10)
    assert where[0] == threading.current_thread().name                        # the first span runs here
    assert all(name.startswith("kvmem-ann") for name in where[1:])
    assert spread(lambda lo, hi: torch.get_num_threads(), 90, 3, minimum=10) == [1, 1, 1]


def test_a_span_on_the_pool_runs_a_nested_spread_in_one_piece():
    """A search run on a pool thread (a span) that spreads again must not wait on the pool it occupies."""
    nested = spread(lambda lo, hi: spread(lambda a, b: (a, b, threading.current_thread().name), 200, 4,
                                          minimum=10), 60, 2, minimum=10)
    assert len(nested[0]) == 4                                                 # the caller's span may split
    assert [(a, b) for a, b, _ in nested[1]] == [(0, 200)] and nested[1][0][2].startswith("kvmem-ann")


def test_spread_raises_only_after_every_span_finished():
    finished = []

    def span(lo: int, hi: int) -> None:
        if lo == 0:
            raise ValueError("first span failed")
        time.sleep(0.05)
        finished.append(lo)

    with pytest.raises(ValueError, match="first span failed"):
        spread(span, 90, 3, minimum=10)
    assert sorted(finished) == [30, 60]


def _filled(backend: str, options: dict, value_dim: int, dtype: torch.dtype):
    """A store and its oracle with partitions of every kind: two indexed, one searched exactly (ivf: below
    its training size), one empty."""
    data = clustered(3 * 1500, 16, queries=P * Q, seed=5)
    store = kvmem.create(backend, dim=16, value_dim=value_dim, partitions=P, dtype=dtype, **options)
    model = BruteForceMemory(16, value_dim, P, "ip", dtype)
    keys = torch.from_numpy(data.base).view(P - 1, 1500, 16)
    keys = torch.cat([keys, keys[:1]]).to(dtype)                                # (P, 1500, 16)
    values = torch.randn(P, 1500, value_dim).to(dtype)
    for op in (("add", keys, values), ("clear", [2]), ("add", keys[:, :60], values[:, :60]), ("clear", [3])):
        for target in (store, model):
            getattr(target, op[0])(*op[1:])
    return store, model, torch.from_numpy(data.queries).view(P, Q, 16)


@pytest.mark.parametrize("backend, options, value_dim, dtype", [
    ("ivf", {"train_size": 1000}, 1, torch.float32),
    ("ivf", {"train_size": 1000, "index": "SQ8"}, 3, torch.float16),             # 4 candidates per result
    ("hnsw", {}, 3, torch.float32),
    ("hnsw", {"ef": 16}, 1, torch.float16),
])
def test_spans_across_partitions_return_what_one_span_returns(monkeypatch, backend, options, value_dim, dtype):
    store, model, queries = _filled(backend, options, value_dim, dtype)
    if backend == "ivf":
        assert [store._parts[p].indexed for p in range(P)] == [True, True, False, False]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = store.search(queries, K)
        monkeypatch.setattr(_threads, "cpus", lambda: 3)
        torch.set_num_threads(3)
        cut = []
        monkeypatch.setattr(store, "_candidates", lambda *a, f=store._candidates: cut.append(a[-2:]) or f(*a))
        three = store.search(queries, K)
    finally:
        torch.set_num_threads(before)
    assert sorted(cut) == [(0, 66), (66, 133), (133, 200)]              # partitions 1 and 2 cut mid-way
    for name in ("ids", "keys", "values"):
        assert torch.equal(getattr(one, name), getattr(three, name)), name
    torch.testing.assert_close(three.scores, one.scores, rtol=1e-6, atol=1e-6)     # einsum rounds per batch shape
    assert (three.ids[3] == -1).all() and torch.isneginf(three.scores[3]).all()   # the empty partition
    hits, wanted = check_search(three, model, queries, K, exact=False)
    assert hits >= 0.9 * wanted


@pytest.mark.skipif(_threads._getcpu is None or len(os.sched_getaffinity(0)) < 2, reason="needs Linux, 2 CPUs")
def test_a_span_woken_on_its_callers_cpu_moves_off_it_and_back():
    here, allowed = _threads._getcpu(), os.sched_getaffinity(0)
    with _threads._off(here):
        assert os.sched_getaffinity(0) == allowed - {here} and _threads._getcpu() != here
    assert os.sched_getaffinity(0) == allowed
    for elsewhere in (None, max(allowed) + 1):                      # not on that CPU: nothing changes
        with _threads._off(elsewhere):
            assert os.sched_getaffinity(0) == allowed


def test_exact_slots_of_an_ann_store_spread_over_threads_as_exact_does(monkeypatch):
    """Calibration's and the unindexed partitions' exact search (``exact_slots``) cuts its queries into
    spans like the ``exact`` backend, and returns what one span returns."""
    from kvmem import topk
    from kvmem.stores.exact import TableKeys

    data = clustered(3000, 16, queries=300, seed=4)
    store = kvmem.create("ivf", dim=16, value_dim=1, dtype=torch.float32, query_sample=0)
    store.add(torch.from_numpy(data.base), torch.zeros(3000, 1))
    queries = torch.from_numpy(data.queries)[None]
    tile, threads = topk._search_tile, set()

    def on_thread(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return tile(*args, **kwargs)

    monkeypatch.setattr(topk, "_search_tile", on_thread)
    with _threads.torch_threads(2):
        split = store.exact_slots(queries, [0], K)
    assert len(threads) == 2
    _, one = topk.blocked_search(TableKeys(store, [0]), queries, K, store.metric)        # one span
    assert torch.equal(split, one)
    store.close()
