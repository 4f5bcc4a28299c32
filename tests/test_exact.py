"""The exact backend: conformance, the state machine, and exactness on hard data on every ranking path.

Hard data is where a ranking in reduced precision goes wrong: near-ties (keys closer together than
bfloat16 can tell apart), duplicate keys (what ``positions="first"`` stores for a repeated token), and
keys sharing a large offset (attention keys do; under ``l2`` even a float32 ranking, which scores
``2 q.k - |k|^2``, cannot order them). Answers are checked against a float64 brute force built from
the rows the test added (not from the store's own ``get``), to float32 resolution (see
:func:`kvmem.testing.checks.score_error`); each data set asserts that it is hard and still resolvable.
"""

import threading

import numpy as np
import pytest
import torch

import kvmem
from kvmem import kernels, topk
from kvmem.stores.exact import TableKeys
from kvmem.testing import BruteForceMemory, StoreConformance, check_search, store_machine
from kvmem.testing.checks import score_error


class TestExact(StoreConformance):
    backend = "exact"


class TestExactFp32Ranking(StoreConformance):
    """The float32 ranking path (used for few queries, and where bf16 is slow)."""

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


METRICS = ("ip", "l2", "cos")
K = 10


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def near_ties(metric, seed=0, partitions=2, n=2000, dim=32):
    """Keys spread 1e-2 around one point (0.1 for cos, whose scores crowd near 1), queries 10x (3x)
    wider: bfloat16 cannot rank them, float32 resolves most boundaries."""
    gen = _gen(seed)
    spread, wider = (0.1, 0.3) if metric == "cos" else (1e-2, 1e-1)
    base = torch.randn(1, 1, dim, generator=gen)
    keys = base + spread * torch.randn(partitions, n, dim, generator=gen)
    queries = base + wider * torch.randn(partitions, 16, dim, generator=gen)
    return keys, queries


def duplicates(metric, seed=0, partitions=2, n=2000, dim=32):
    """200 distinct keys, each stored 10 times: the top-k holds exact ties."""
    gen = _gen(seed)
    keys = torch.randn(partitions, n // 10, dim, generator=gen).repeat_interleave(10, 1)
    return keys, torch.randn(partitions, 16, dim, generator=gen)


def shared_offset(metric, seed=0, partitions=2, n=2000, dim=32):
    """Clustered keys around an offset of norm ~30 (clusters of size 0.05; 1.5 for cos, whose scores
    would otherwise all round to 1), queries from the same clusters."""
    gen = _gen(seed)
    scale = 1.5 if metric == "cos" else 0.05
    offset = 5 * torch.randn(1, 1, dim, generator=gen)
    centres = torch.randn(partitions, 8, dim, generator=gen)
    keys = offset + scale * (centres[:, torch.randint(8, (n,), generator=gen)] + 0.3 * torch.randn(
        partitions, n, dim, generator=gen))
    queries = offset + scale * (centres.repeat(1, 2, 1) + 0.3 * torch.randn(partitions, 16, dim, generator=gen))
    return keys, queries


DATA = {"near-ties": near_ties, "duplicates": duplicates, "shared-offset": shared_offset}


def _filled(keys, metric, ranking, dtype=torch.float32, **options):
    """A store and the oracle, both given the same rows (the oracle never reads the store)."""
    P, n, dim = keys.shape
    values = torch.arange(float(n)).expand(P, n)[..., None]
    store = kvmem.create("exact", dim=dim, value_dim=1, partitions=P, metric=metric, dtype=dtype,
                         ranking=ranking, **options)
    model = BruteForceMemory(dim, 1, P, metric, dtype)
    store.add(keys, values)
    model.add(keys, values)
    return store, model


def _resolvable(model, queries, k=K):
    """Fraction of queries whose k-th and (k+1)-th true scores are farther apart than float32 resolution."""
    best, _ = model.search(queries, k + 1)
    tol = score_error(queries, model, np.abs(best[..., :1]))[..., 0]
    return float(((best[..., k - 1] - best[..., k]) > 2 * tol).mean())


@pytest.fixture(params=["fused", "torch"])
def selection(request, monkeypatch):
    """Both CPU float32 selections: the compiled heaps (``kvmem/_kernels.c``) and the torch ops fallback."""
    if request.param == "fused" and not kernels.available():
        pytest.skip("kvmem was built without its C extension")
    if request.param == "torch":
        monkeypatch.setattr(kernels, "native", None)
    return request.param


@pytest.fixture
def finer_searches(monkeypatch):
    """Counts the queries each working dtype searched again: ``{torch.float32: n, torch.float64: n}``."""
    seen = {}
    redo = topk._redo

    def counting(source, queries, k, metric, budget, max_rows, failed, best, best_slots, work):
        seen[work] = seen.get(work, 0) + int(failed.sum())
        return redo(source, queries, k, metric, budget, max_rows, failed, best, best_slots, work)

    monkeypatch.setattr(topk, "_redo", counting)
    return seen


@pytest.mark.parametrize("ranking", ["fp32", "bf16"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", list(DATA))
def test_hard_data_gets_the_exact_top_k(kind, metric, ranking, finer_searches, selection):
    keys, queries = DATA[kind](metric)
    store, model = _filled(keys, metric, ranking)
    if kind != "duplicates":
        assert _resolvable(model, queries) >= 0.5, "the data must be resolvable in float32 for the test to bite"
    check_search(store.search(queries, K), model, queries, K, exact=True)
    if kind == "near-ties" and ranking == "bf16":
        assert finer_searches.get(torch.float32), "near-ties must fail the bfloat16 certificate"
    if kind == "shared-offset" and metric == "l2":
        assert finer_searches.get(torch.float64), "l2 under a shared offset must fail the float32 certificate"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("metric", METRICS)
def test_rounded_storage_is_exact_over_the_rounded_keys(metric, dtype):
    keys, queries = near_ties(metric, seed=4)
    keys = keys * 4                                  # apart enough that rounding to 16 bits keeps some order
    store, model = _filled(keys, metric, "auto", dtype=dtype)
    check_search(store.search(queries * 4, K), model, queries * 4, K, exact=True)


@pytest.mark.parametrize("ranking", ["fp32", "bf16"])
@pytest.mark.parametrize("metric", METRICS)
def test_every_query_sent_to_the_fallback_comes_back_exact(monkeypatch, metric, ranking, finer_searches,
                                                           selection):
    """The fallback alone: no query certified, so every answer is the finer search's."""
    keys, queries = shared_offset(metric, seed=5)
    store, model = _filled(keys, metric, ranking, block_elems=4096)
    monkeypatch.setattr(topk, "_certified", lambda queries, *a, **kw: torch.zeros(queries.shape[:2], dtype=bool))
    check_search(store.search(queries, K), model, queries, K, exact=True)
    finer = torch.float32 if ranking == "bf16" else torch.float64
    assert finer_searches[finer] == queries.shape[0] * queries.shape[1]


@pytest.mark.parametrize("ranking", ["fp32", "bf16"])
@pytest.mark.parametrize("metric", METRICS)
def test_many_blocks_and_uneven_partitions(ranking, metric, selection):
    gen = _gen(0)
    keys = torch.randn(3, 3000, 16, generator=gen)
    store, model = _filled(keys, metric, ranking, block_elems=4096)
    store.clear(1)
    model.clear([1])
    gone = torch.stack([torch.full((1500,), -1), torch.full((1500,), -1), torch.arange(1500)])
    store.remove(gone)
    model.remove(gone.numpy())
    assert [store.count(p) for p in range(3)] == [3000, 0, 1500]
    queries = torch.randn(3, 40, 16, generator=gen)
    check_search(store.search(queries, 20), model, queries, 20, exact=True)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", list(DATA))
def test_a_search_split_in_spans_returns_what_one_span_returns(kind, metric, monkeypatch, selection):
    """Spans over the queries (each on its own thread, BLAS on one) give the one-span answer, second
    passes included (certificate failures forced on half the queries), and leave BLAS as it was."""
    from threadpoolctl import threadpool_info

    keys, _ = DATA[kind](metric)
    store, model = _filled(keys, metric, "fp32", block_elems=4096)
    queries = keys[:, 7:407] + 1e-3 * torch.randn(keys.shape[0], 400, keys.shape[2], generator=_gen(3))
    source = TableKeys(store)
    certified = topk._certified
    monkeypatch.setattr(topk, "_certified", lambda q, *a, **kw: certified(q, *a, **kw) & (
        torch.arange(q.shape[1]) % 2 == 0))
    tile, threads = topk._search_tile, set()

    def on_thread(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return tile(*args, **kwargs)

    monkeypatch.setattr(topk, "_search_tile", on_thread)
    before = [pool["num_threads"] for pool in threadpool_info()]
    one = topk.blocked_search(source, queries, K, metric, block_elems=4096, spans=1)
    assert len(threads) == 1
    split = topk.blocked_search(source, queries, K, metric, block_elems=4096, spans=2)
    assert len(threads) == 2                                                    # the second span ran on the pool
    assert [pool["num_threads"] for pool in threadpool_info()] == before
    assert torch.equal(one[0], split[0])
    if kind != "duplicates":                    # exact ties may come back in either order, both exact
        assert torch.equal(one[1], split[1])
    check_search(store.search(queries, K), model, queries, K, exact=True)        # the store splits here


def test_well_separated_keys_are_certified_without_a_second_pass(monkeypatch):
    monkeypatch.setattr(topk, "_redo", lambda *a, **kw: pytest.fail("fallback ran"))
    gen = _gen(2)
    store, model = _filled(torch.randn(1, 20000, 64, generator=gen), "ip", "bf16")
    queries = torch.randn(1, 64, 64, generator=gen)
    check_search(store.search(queries, 8), model, queries, 8, exact=True)


def test_auto_ranking_is_exact_for_one_query_and_for_many():
    gen = _gen(3)
    store, model = _filled(torch.randn(1, 5000, 32, generator=gen), "ip", "auto", dtype=torch.bfloat16)
    for q in (1, 64):
        queries = torch.randn(1, q, 32, generator=gen)
        check_search(store.search(queries, 16), model, queries, 16, exact=True)


@pytest.mark.parametrize("metric", METRICS)
def test_the_check_catches_a_wrong_answer(metric):
    """The oracle check itself bites on near-tie data: swapping in the (k+1)-th row is caught."""
    keys, queries = near_ties(metric, seed=6)
    store, model = _filled(keys, metric, "fp32")
    res = store.search(queries, K + 1)
    right = kvmem.SearchResult(*(t[:, :, :K] for t in res))
    check_search(right, model, queries, K, exact=True)
    wrong = [t[:, :, :K].clone() for t in res]
    for t, full in zip(wrong, res):
        t[:, :, K - 1] = full[:, :, K]
    wrong[0][:, :, K - 1] = torch.minimum(wrong[0][:, :, K - 1], wrong[0][:, :, K - 2])
    with pytest.raises(AssertionError):
        check_search(kvmem.SearchResult(*wrong), model, queries, K, exact=True)


def test_a_score_does_not_depend_on_where_its_key_sits_among_the_candidates():
    from kvmem.topk import exact_scores

    gen = torch.Generator().manual_seed(0)
    for dim, c in ((8, 50), (64, 33), (128, 80), (17, 5)):
        queries, keys = torch.randn(2, 5, dim, generator=gen), torch.randn(2, 5, c, dim, generator=gen)
        perm = torch.randperm(c, generator=gen)
        for metric in ("ip", "l2", "cos"):
            assert torch.equal(exact_scores(queries, keys, metric)[..., perm],
                               exact_scores(queries, keys[:, :, perm], metric)), (dim, c, metric)


class _Norms:
    """What the certificate reads of a key source: rows held and the largest |k|^2."""

    def __init__(self, sqnorm: float, count: int) -> None:
        self.sqnorm, self.count = sqnorm, count

    def max_sqnorm(self) -> torch.Tensor:
        return torch.tensor([self.sqnorm])

    def counts(self) -> np.ndarray:
        return np.array([self.count])


@pytest.mark.parametrize("metric", METRICS)
def test_the_certificate_bounds_the_rows_the_matmul_multiplied(metric):
    """A left-out key closer to the k-th than u * d' * |query row| * |key row| (the rounding of one float32
    dot product of the rows of the module docstring's table, l2's key row [k, |k|^2]) is never certified;
    one a hundred times further is."""
    d, sqnorm = 8, 100.0
    queries = torch.ones(1, 1, d)
    qrows = topk._rank_rows(queries, metric)
    krow = {"ip": sqnorm ** 0.5, "l2": (sqnorm + sqnorm ** 2) ** 0.5, "cos": 1.0}[metric]
    simple = 2.0 ** -24 * qrows.shape[-1] * float(qrows.norm()) * krow
    kth = -float(queries.pow(2).sum()) if metric == "l2" else 0.0              # the k-th score: r = 0
    best = torch.full((1, 1, 4), kth)
    for gap, certified in ((simple / 2, False), (simple * 100, True)):
        approx = torch.full((1, 1, 12), 0.0)
        approx[..., -1] = -gap                                                # the best key left out
        got = topk._certified(queries, qrows, approx, best, _Norms(sqnorm, 100), metric, 2.0 ** -24, False)
        assert bool(got) is certified, (gap, simple)


def test_auto_ranking_takes_bfloat16_where_the_cpu_has_either_fast_path(monkeypatch):
    cpu = torch.device("cpu")
    for bf16, amx in ((True, False), (False, True), (True, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        want = torch.bfloat16 if bf16 or amx else None
        assert topk.fast_rank_dtype(cpu) is want
        assert topk.rank_dtype_for("auto", 64, torch.float32, "ip", cpu) is want
        assert topk.rank_dtype_for("auto", 1, torch.bfloat16, "ip", cpu) is want      # bf16 keys enter as they are
        assert topk.rank_dtype_for("auto", 1, torch.float32, "ip", cpu) is None       # a matvec: float32
        assert topk.rank_dtype_for("fp32", 64, torch.float32, "ip", cpu) is None
        assert topk.rank_dtype_for("bf16", 1, torch.float32, "l2", cpu) is torch.bfloat16


def test_overlapping_one_thread_limits_put_blas_back_when_the_last_leaves():
    """Two searches holding BLAS at one thread, leaving in the order they came: the first to leave must
    not restore the count under the second, and the last must put back what BLAS had."""
    pytest.importorskip("threadpoolctl")
    with topk.blas_threads(1):                                 # the controller: the BLAS it limits
        pass

    def blas():
        return [pool["num_threads"] for pool in topk._CONTROLLER.info() if pool["user_api"] == "blas"]

    before = blas()
    if not before or max(before) == 1:
        pytest.skip("BLAS already runs on one thread here: nothing to restore")
    first, second = topk.blas_threads(1), topk.blas_threads(1)
    first.__enter__()
    second.__enter__()
    assert set(blas()) == {1}
    first.__exit__(None, None, None)
    assert set(blas()) == {1}                                   # the second is still inside
    second.__exit__(None, None, None)
    assert blas() == before and topk._HOLDERS == 0


def test_the_first_few_query_search_creates_the_blas_thread_controller(monkeypatch):
    """A search of fewer than 8 queries runs NumPy's BLAS on one thread; in a fresh process (no controller
    yet) the first one creates the controller, and the result is exact."""
    pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(topk, "_CONTROLLER", None)
    gen = _gen(9)
    store, model = _filled(torch.randn(1, 3000, 16, generator=gen), "ip", "fp32")
    queries = torch.randn(1, 2, 16, generator=gen)
    check_search(store.search(queries, 8), model, queries, 8, exact=True)
    assert topk._CONTROLLER is not None
