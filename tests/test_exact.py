"""The exact backend: conformance, the state machine, and its two ranking paths."""

import pytest
import torch

import kvmem
from kvmem.testing import StoreConformance, store_machine


class TestExact(StoreConformance):
    backend = "exact"


class TestExactFp32Ranking(StoreConformance):
    """The direct float32 path (used for few queries, and where bf16 is slow)."""

    backend = "exact"
    options = {"ranking": "fp32"}


class TestExactBf16Ranking(StoreConformance):
    """The certified bfloat16 ranking path, forced on even for one query."""

    backend = "exact"
    options = {"ranking": "bf16", "block_elems": 4096}


TestExactMachine = store_machine("exact").TestCase
TestExactBf16Machine = store_machine("exact", options={"ranking": "bf16", "block_elems": 4096}).TestCase


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestExactCuda(StoreConformance):
    backend = "exact"
    device = "cuda"


def _oracle_check(store, queries, k):
    """The store's top-k equals float64 brute force over its own stored keys."""
    from kvmem.testing import check_search
    from kvmem.testing.model import BruteForceMemory

    model = BruteForceMemory(store.dim, store.value_dim, store.partitions, store.metric, store.dtype)
    for p in range(store.partitions):
        ids = torch.from_numpy(store._book.ids_in_slots(p))
        if len(ids):
            keys, values = store.get(torch.stack([ids if q == p else torch.full_like(ids, -1)
                                                  for q in range(store.partitions)]))
            for i, key, value in zip(ids.tolist(), keys[p], values[p]):
                model.rows[p][i] = (key.double().numpy(), value.double().numpy())
    check_search(store.search(queries, k), model, queries, k, exact=True)


@pytest.mark.parametrize("ranking", ["fp32", "bf16"])
@pytest.mark.parametrize("metric", ["ip", "l2", "cos"])
def test_many_blocks_and_uneven_partitions(ranking, metric):
    store = kvmem.create("exact", dim=16, value_dim=2, partitions=3, metric=metric, dtype=torch.float32,
                         ranking=ranking, block_elems=4096)
    gen = torch.Generator().manual_seed(0)
    store.add(torch.randn(3, 3000, 16, generator=gen), torch.randn(3, 3000, 2, generator=gen))
    store.clear(1)
    store.remove(torch.stack([torch.full((1500,), -1), torch.full((1500,), -1), torch.arange(1500)]))
    assert [store.count(p) for p in range(3)] == [3000, 0, 1500]
    _oracle_check(store, torch.randn(3, 40, 16, generator=gen), k=20)


@pytest.mark.parametrize("metric", ["ip", "l2", "cos"])
def test_near_ties_fail_the_certificate_and_are_searched_again(monkeypatch, metric):
    """Keys closer together than bfloat16 can tell apart: the fast ranking cannot certify
    them, the float32 fallback runs, and the answer is still the exact one."""
    from kvmem import topk

    calls = []
    redo = topk._redo_directly
    monkeypatch.setattr(topk, "_redo_directly", lambda *a, **kw: calls.append(1) or redo(*a, **kw))
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1, 1, 32, generator=gen)
    keys = base + 1e-4 * torch.randn(2, 2000, 32, generator=gen)       # 2000 near-duplicates per partition
    store = kvmem.create("exact", dim=32, value_dim=1, partitions=2, metric=metric, dtype=torch.float32,
                         ranking="bf16")
    store.add(keys, torch.zeros(2, 2000, 1))
    queries = base.expand(2, 16, 32) + 1e-3 * torch.randn(2, 16, 32, generator=gen)
    _oracle_check(store, queries, k=10)
    assert calls, "near-ties should have failed the bfloat16 certificate"


def test_well_separated_keys_are_certified_without_a_second_pass(monkeypatch):
    from kvmem import topk

    monkeypatch.setattr(topk, "_redo_directly", lambda *a, **kw: pytest.fail("fallback ran"))
    gen = torch.Generator().manual_seed(2)
    store = kvmem.create("exact", dim=64, value_dim=1, dtype=torch.float32, ranking="bf16")
    store.add(torch.randn(20000, 64, generator=gen), torch.zeros(20000, 1))
    _oracle_check(store, torch.randn(1, 64, 64, generator=gen), k=8)


def test_auto_ranking_is_exact_for_one_query_and_for_many():
    gen = torch.Generator().manual_seed(3)
    store = kvmem.create("exact", dim=32, value_dim=1, dtype=torch.bfloat16)
    store.add(torch.randn(5000, 32, generator=gen), torch.zeros(5000, 1))
    for q in (1, 64):
        _oracle_check(store, torch.randn(1, q, 32, generator=gen), k=16)


def test_a_score_does_not_depend_on_where_its_key_sits_among_the_candidates():
    from kvmem.topk import exact_scores

    gen = torch.Generator().manual_seed(0)
    for dim, c in ((8, 50), (64, 33), (128, 80), (17, 5)):
        queries, keys = torch.randn(2, 5, dim, generator=gen), torch.randn(2, 5, c, dim, generator=gen)
        perm = torch.randperm(c, generator=gen)
        for metric in ("ip", "l2", "cos"):
            assert torch.equal(exact_scores(queries, keys, metric)[..., perm],
                               exact_scores(queries, keys[:, :, perm], metric)), (dim, c, metric)
