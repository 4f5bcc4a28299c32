"""The ivf backend: conformance before and after training, recall, calibration, growth, files."""

import shutil
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from ann_support import assert_foreign_indexes_refused, index_bytes_of, recall, resave
from kvmem.benchmarks.datasets import clustered
from kvmem.benchmarks.recall import ground_truth, recall_at_k

import kvmem
from kvmem.stores._ivffile import list_ids
from kvmem.testing import StoreConformance, check_search, randn, store_machine
from kvmem.testing.child import load_in_child
from kvmem.testing.model import BruteForceMemory


class TestIVF(StoreConformance):
    """Defaults: small partitions are searched exactly until they reach train_size."""

    backend = "ivf"
    exact = False
    recall_threshold = 0.99
    full_results_up_to = 32767          # below train_size (32768) a partition is searched exactly


class TestIVFTrained(StoreConformance):
    """Trains at 20 rows, so every test below runs through faiss."""

    backend = "ivf"
    exact = False
    recall_threshold = 0.9
    options = {"train_size": 20}
    full_results_up_to = 19


TestIVFMachine = store_machine("ivf", exact=False, recall_threshold=0.99).TestCase
TestIVFTrainedMachine = store_machine("ivf", options={"train_size": 8}, exact=False, recall_threshold=0.85,
                                      max_examples=25).TestCase


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def data():
    return clustered(40_000, 32, queries=300, seed=3)


@pytest.fixture(scope="module")
def truth(data):
    return ground_truth(data.base, data.queries, 32, data.metric)


def build(base: np.ndarray, metric: str = "ip", partitions: int = 1, **options) -> kvmem.MemoryStore:
    store = kvmem.create("ivf", dim=base.shape[-1], value_dim=1, partitions=partitions, metric=metric,
                         dtype=torch.float32, **options)
    keys = torch.from_numpy(np.ascontiguousarray(base, np.float32))
    keys = keys if keys.dim() == 3 else keys[None]
    for start in range(0, keys.shape[1], 16384):
        chunk = keys[:, start:start + 16384]
        store.add(chunk, torch.zeros(*chunk.shape[:2], 1))
    return store


# ---------------------------------------------------------------------------------------------- recall
def test_defaults_train_and_reach_095_recall_on_clustered_keys(data, truth):
    store = build(data.base, query_sample=0)             # keys as queries: asked ones are test_asked.py's
    assert store._parts[0].indexed and store._parts[0].index.nlist == 724  # 4 sqrt(32768): trained at 2 x 16384
    assert recall(store, data, truth) >= 0.95
    cal = store.calibration()[0]
    assert cal.rows == 32_768 and cal.k == 32 and cal.recall >= 0.95
    assert recall(store, data, truth, nprobe=1) < 0.8                              # per call, lower


def test_target_recall_moves_nprobe_both_ways(data, truth):
    low, high = build(data.base, target_recall=0.8), build(data.base, target_recall=0.99)
    assert low.calibration()[0].value < high.calibration()[0].value
    assert 0.75 <= recall(low, data, truth) < recall(high, data, truth)
    assert recall(high, data, truth) >= 0.97


def test_exact_until_trained():
    store = build(randn(0, 2, 3000, 16).numpy(), partitions=2, metric="l2")
    assert not any(part.indexed for part in store._parts)
    model = BruteForceMemory(16, 1, 2, "l2", torch.float32)
    model.add(randn(0, 2, 3000, 16), torch.zeros(2, 3000, 1))
    queries = randn(1, 2, 20, 16)
    check_search(store.search(queries, 10), model, queries, 10, exact=True)


@pytest.mark.filterwarnings("ignore:ivf. the index cannot reach")     # calibration's business, not this test's
@pytest.mark.parametrize("index, floor", [("SQ8", 0.9), ("PQ8x6", 0.7), ("IVF{nlist},PQ4x4", 0.5)])
def test_compressed_codes_rank_and_scores_stay_exact(data, index, floor):
    base, queries = data.base[:4000], data.queries[:100]
    store = build(base, index=index, train_size=3000)
    assert store._parts[0].indexed
    res = store.search(torch.from_numpy(queries), 32, nprobe=store._parts[0].index.nlist)   # the codes rank alone
    exact = torch.einsum("qd,qkd->qk", torch.from_numpy(queries), res.keys.float())
    torch.testing.assert_close(res.scores, exact, rtol=1e-5, atol=1e-4)
    assert recall_at_k(res.ids.numpy(), ground_truth(base, queries, 32), base, queries) >= floor


@pytest.mark.parametrize("metric", ["l2", "cos"])
def test_trained_recall_for_l2_and_cos(data, metric):
    sub = clustered(6000, 32, queries=100, seed=5, metric=metric)
    store = build(sub.base, metric=metric, train_size=2000)
    assert store._parts[0].indexed
    assert recall(store, sub, ground_truth(sub.base, sub.queries, 32, metric)) >= 0.93


# ---------------------------------------------------------------------------------------------- growth
def test_a_target_out_of_the_index_reach_searches_exactly_and_says_so():
    # Gaussian keys in 128 dimensions have no lists to speak of: 0.95 needs most of them probed
    base = np.random.default_rng(5).standard_normal((32_768, 128), dtype=np.float32)
    with pytest.warns(RuntimeWarning, match=r"ivf: the index cannot reach recall@32 0.95 within the nprobe range "
                                            r"where it beats exact search; partition \(best recall\) 0"):
        store = build(base)
    store.freeze()                      # these queries asked again would find their own hub entries
    cal = store.calibration()[0]
    assert store._parts[0].indexed and cal.exact and cal.recall < 0.95 and cal.value <= 724 // 8
    exact = kvmem.create("exact", dim=128, value_dim=1, metric="ip", dtype=torch.float32)
    exact.add(torch.from_numpy(base), torch.zeros(len(base), 1))
    queries = torch.from_numpy(np.random.default_rng(6).standard_normal((64, 128), dtype=np.float32))
    assert torch.equal(store.search(queries, 32).ids, exact.search(queries, 32).ids)
    assert not torch.equal(store.search(queries, 32, nprobe=4).ids, exact.search(queries, 32).ids)   # the index


@pytest.mark.filterwarnings("ignore:ivf. the index cannot reach")
def test_growth_retrains_at_the_factor_and_not_without_it():
    keys = randn(2, 1, 8000, 16).numpy()
    store = build(keys[:, :1000], train_size=1000)
    assert store._parts[0].trained_rows == 1000 and store._parts[0].index.nlist == 25       # 1000 // 39
    fixed = build(keys[:, :1000], train_size=1000, retrain_factor=None)
    for start in (1000, 2000, 3000):
        for s in (store, fixed):
            s.add(torch.from_numpy(keys[:, start:start + 1000]), torch.zeros(1, 1000, 1))
    part = store._parts[0]
    assert part.trained_rows == 4000 and part.index.nlist == 102 and store.calibration()[0].rows == 4000
    assert fixed._parts[0].trained_rows == 1000 and fixed._parts[0].index.nlist == 25
    assert fixed.calibration()[0].rows == 4000                       # recalibrated at each doubling


@pytest.mark.filterwarnings("ignore:ivf. the index cannot reach")
def test_fifo_turnover_retrains_and_evicted_rows_leave_the_lists():
    keys = randn(3, 1, 5000, 16)
    store = kvmem.create("ivf", dim=16, value_dim=1, dtype=torch.float32, capacity=1000, train_size=500)
    for start in range(0, 5000, 500):
        store.add(keys[:, start:start + 500], torch.zeros(1, 500, 1))
    part = store._parts[0]
    assert part.trained_rows == 1000 and part.added < 3000           # retrained after 3 turnovers
    assert np.array_equal(np.sort(list_ids(part.index)), np.arange(4000, 5000))
    store.remove(np.arange(4000, 4100)[None])
    assert np.array_equal(np.sort(list_ids(part.index)), np.arange(4100, 5000))
    assert not set(store.search(keys[:, 4000:4100], 5).ids.flatten().tolist()) & set(range(4100))
    store.clear()
    assert not part.indexed or not store._parts[0].indexed


# ---------------------------------------------------------------------------------------------- per call
@pytest.mark.filterwarnings("ignore:ivf. the index cannot reach")
@pytest.mark.parametrize("metric, index", [("ip", "Flat"), ("l2", "SQ8"), ("cos", "PQ8")])
def test_the_coarse_step_probes_the_lists_faiss_would(data, metric, index):
    """kvmem assigns queries to lists itself (a torch GEMM) and hands them to faiss's search_preassigned:
    the candidates must be the ones faiss's own search finds at the same nprobe."""
    store = build(data.base[:8000], metric=metric, train_size=4000, index=index)
    part = store._parts[0]
    queries = np.ascontiguousarray(data.queries[:200])
    for nprobe in (1, 3, 17, 10_000):                                   # 10_000: past nlist, faiss clamps
        ours = part.search(queries, 16, nprobe)
        theirs = part.index.search(part.prepare_queries(queries), ours.shape[1],
                                   params=faiss.SearchParametersIVF(nprobe=nprobe))[1]
        same = (np.sort(ours, 1) == np.sort(theirs, 1)).all(1).mean()
        assert same >= 0.98, (nprobe, same)                             # a centroid tie may round the other way


def test_threads_with_different_nprobe_get_their_serial_results(data):
    store = build(np.stack([data.base[:6000], data.base[6000:12_000]]), partitions=2, train_size=5000)
    store.freeze()                                  # no recalibration on these queries between the runs
    queries = torch.from_numpy(np.stack([data.queries[:50], data.queries[50:100]]))
    serial = {n: store.search(queries, 16, nprobe=n).ids for n in (1, 3, 40)}
    assert not torch.equal(serial[1], serial[40])
    errors = []

    def worker(nprobe: int) -> None:
        try:
            for _ in range(15):
                assert torch.equal(store.search(queries, 16, nprobe=nprobe).ids, serial[nprobe])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (1, 3, 40, 1, 40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "4"])
def test_bad_nprobe_is_rejected(value):
    store = build(randn(4, 1, 50, 8).numpy())
    with pytest.raises(kvmem.InvalidInputError, match=f"nprobe must be a positive int; got {value!r}"):
        store.search(randn(5, 2, 8), 3, nprobe=value)


@pytest.mark.parametrize("options, message", [
    ({"index": "HNSW32"}, "index must be"),
    ({"index": "IVF64,Flat", "nlist": 32}, "fixes nlist=64 but option nlist=32"),
    ({"index": "PQ16"}, r"PQ16x8: need 1 <= m <= 9"),
    ({"nprobe": 4, "target_recall": 0.9}, "not both"),
    ({"target_recall": 1.5}, r"target_recall must be a number in \(0, 1\]"),
    ({"retrain_factor": 1}, "retrain_factor must be a number > 1"),
    ({"refine": 0}, "refine must be an int >= 1"),
    ({"train_size": 1}, "train_size must be an int >= 2"),
])
def test_bad_options_are_rejected(options, message):
    with pytest.raises(kvmem.InvalidInputError, match=message):
        kvmem.create("ivf", dim=8, **options)


# ---------------------------------------------------------------------------------------------- files
def test_foreign_index_files_with_recomputed_manifests_are_rejected_in_a_child(tmp_path):
    def saved(name: str, dim: int = 8, n: int = 300, drop: int = 0, **options) -> Path:
        store = build(randn(6, 1, n, dim).numpy(), train_size=20, **options)
        if drop:
            store.remove(np.arange(drop, 2 * drop)[None])
        store.save(tmp_path / name)
        return tmp_path / name

    good = saved("good", n=310, drop=10)
    flat = faiss.IndexFlatL2(8)
    flat.add(randn(7, 300, 8).numpy())
    foreign = {
        "wider": index_bytes_of(saved("wider", dim=16, n=310, drop=10)),
        "fewer-rows": index_bytes_of(saved("fewer", n=250)),
        "other-ids": index_bytes_of(saved("other", n=310, drop=20)),
        "sq8-codes": index_bytes_of(saved("sq8", n=310, drop=10, index="SQ8")),
        "flat-index": bytes(faiss.serialize_index(flat)),
    }
    ivf = faiss.deserialize_index(np.frombuffer(index_bytes_of(good), np.uint8))   # same lists, a graph quantizer
    graph = faiss.IndexHNSWFlat(ivf.d, 8)
    graph.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    other = faiss.IndexIVFFlat(graph, ivf.d, ivf.nlist, faiss.METRIC_L2)
    other.replace_invlists(ivf.invlists, False)
    other.ntotal, other.is_trained = ivf.ntotal, True
    foreign["graph-quantizer"] = bytes(faiss.serialize_index(other))
    assert_foreign_indexes_refused(good, foreign, tmp_path, count=300)


def test_random_bytes_with_recomputed_manifests_never_crash_the_loader(tmp_path):
    store = build(randn(8, 1, 400, 8).numpy(), train_size=20)
    store.save(tmp_path / "good")
    blob = bytearray(index_bytes_of(tmp_path / "good"))
    rng = np.random.default_rng(0)
    cases = []
    for i, at in enumerate(rng.integers(0, len(blob), 24)):
        case = tmp_path / f"flip-{i}"
        shutil.copytree(tmp_path / "good", case)
        damaged = bytearray(blob)
        damaged[at] ^= 1 << int(rng.integers(8))
        resave(case, "index.p0", bytes(damaged))
        cases.append(case)
    results = load_in_child(cases, randn(9, 4, 8).tolist())     # a crash fails inside load_in_child
    assert all(r["ok"] or r["error"] == "CorruptStoreError" for r in results)


def test_save_and_load_keep_the_index_and_its_calibration(data, tmp_path):
    store = build(data.base[:8000], train_size=4000)
    store.save(tmp_path / "s")
    with kvmem.load(tmp_path / "s") as loaded:
        assert loaded.calibration() == store.calibration()
        assert loaded._parts[0].index.nlist == store._parts[0].index.nlist
        queries = torch.from_numpy(data.queries[:50])
        assert torch.equal(loaded.search(queries, 10).ids, store.search(queries, 10).ids)


def test_calibration_search_bisects_and_stops_at_a_plateau():
    from kvmem.stores._calibrate import smallest_value

    calls = []

    def ivf_like(value: int) -> tuple[float, float]:               # misses halve every 4 lists
        calls.append(value)
        return 1 - 0.5 ** (value / 4), 0.001

    value, (recall, _) = smallest_value(ivf_like, 1, 2048, 0.95)
    assert recall - 0.002 >= 0.95 and 1 - 0.5 ** ((value - 2) / 4) - 0.002 < 0.95   # smallest, to within 1/16
    assert len(calls) < 12
    saturating = lambda value: (min(0.97, 0.5 + 0.05 * np.log2(value)), 0.002)    # noqa: E731
    assert smallest_value(saturating, 64, 1 << 20, 0.99)[0] < 1 << 16                # not the whole range
    unstructured = lambda value: (min(1.0, value / 2048), 0.001)                      # noqa: E731
    value, (recall, _) = smallest_value(unstructured, 1, 2048, 0.95)                  # recall ~ lists probed
    assert recall >= 0.95 and value >= 0.95 * 2048                                    # not stuck at nprobe 1


def test_calibration_on_keys_is_reproducible():
    """The stored keys a calibration samples as queries are drawn from a seed of the partition and its size:
    the same store built twice (or reloaded elsewhere) picks the same knob from the same recall."""
    base = clustered(4000, 16, queries=1, seed=3).base
    first, second = (build(base, target_recall=0.9, train_size=2000, nlist=32) for _ in range(2))
    assert first.calibration() == second.calibration()
    assert first.calibration()[0].queries == 0                                   # on keys: nothing was asked
