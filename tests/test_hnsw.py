"""The hnsw backend: conformance, recall, calibration, per-call ef, growth, deletions, files."""

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from ann_support import assert_foreign_indexes_refused, index_bytes_of, recall, resave
from kvmem.benchmarks.datasets import clustered
from kvmem.benchmarks.recall import ground_truth, recall_at_k

import kvmem
from kvmem.stores.hnsw import _EfGate
from kvmem.testing import StoreConformance, check_search, randn, store_machine
from kvmem.testing.child import load_in_child
from kvmem.testing.model import BruteForceMemory


class TestHNSW(StoreConformance):
    backend = "hnsw"
    exact = False
    recall_threshold = 0.95
    full_results_up_to = 10**9          # hnswlib always returns k rows when it holds k


class TestHNSWSparseGraph(StoreConformance):
    """A weak graph (M=4): deletions and k near the rows held reach the exact fallback."""

    backend = "hnsw"
    exact = False
    recall_threshold = 0.9
    options = {"M": 4, "ef_construction": 16}
    full_results_up_to = 10**9


TestHNSWMachine = store_machine("hnsw", exact=False, recall_threshold=0.95).TestCase


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def data():
    return clustered(24_576, 32, queries=300, seed=4)


@pytest.fixture(scope="module")
def truth(data):
    return ground_truth(data.base, data.queries, 32, data.metric)


def build(base: np.ndarray, metric: str = "ip", **options) -> kvmem.MemoryStore:
    store = kvmem.create("hnsw", dim=base.shape[-1], value_dim=1, metric=metric, dtype=torch.float32, **options)
    for start in range(0, len(base), 8192):
        chunk = torch.from_numpy(np.ascontiguousarray(base[start:start + 8192], np.float32))
        store.add(chunk, torch.zeros(len(chunk), 1))
    store.freeze()          # these tests search the same queries again: asked-query learning is test_asked's
    return store


@pytest.fixture(scope="module")
def store(data):
    return build(data.base)


# ---------------------------------------------------------------------------------------------- recall
def test_defaults_reach_095_recall_on_clustered_keys(store, data, truth):
    assert recall(store, data, truth) >= 0.95
    cal = store.calibration()[0]
    assert cal.rows == 24_576 and cal.k == 32 and cal.recall >= 0.95          # the last add grew it by 50%
    assert recall(store, data, truth, ef=32) < recall(store, data, truth)


def test_target_recall_moves_ef_both_ways(data, truth):
    # 8192 rows: ef 32 (the floor) gives over 0.8 and the range ends at 256 (~0.97): 0.955 lies in between
    low, high = build(data.base[:8192], target_recall=0.8), build(data.base[:8192], target_recall=0.955)
    sub = ground_truth(data.base[:8192], data.queries, 32)
    assert low.calibration()[0].value == 32 < high.calibration()[0].value                 # 32: the floor
    assert not low.calibration()[0].exact and not high.calibration()[0].exact
    got = [recall_at_k(s.search(torch.from_numpy(data.queries), 32).ids.numpy(), sub, data.base[:8192],
                       data.queries) for s in (low, high)]
    assert 0.8 <= got[0] < got[1] and got[1] >= 0.95


def test_a_target_out_of_the_graphs_reach_searches_exactly_and_says_so(data):
    # an ip graph of these keys tops out near 0.98 at any ef (and the range stops at 256 here)
    with pytest.warns(RuntimeWarning, match=r"hnsw: the index cannot reach recall@32 0.995 .* partition \(best "
                                            r"recall\) 0 \(0\.9\d\d at ef \d+\) is searched exactly"):
        store = build(data.base[:8192], target_recall=0.995)
    cal = store.calibration()[0]
    assert cal.exact and cal.recall < 0.995 and 32 < cal.value <= 256
    exact = build_exact(data.base[:8192])
    queries = torch.from_numpy(data.queries)
    assert torch.equal(store.search(queries, 32).ids, exact.search(queries, 32).ids)
    graph = store.search(queries, 32, ef=64).ids                                       # a knob per call: the graph
    assert not torch.equal(graph, exact.search(queries, 32).ids)


def build_exact(base: np.ndarray) -> kvmem.MemoryStore:
    store = kvmem.create("exact", dim=base.shape[-1], value_dim=1, metric="ip", dtype=torch.float32)
    store.add(torch.from_numpy(np.ascontiguousarray(base, np.float32)), torch.zeros(len(base), 1))
    return store


def test_fixed_ef_skips_calibration_and_calibrate_recalibrates_now(data):
    fixed = build(data.base[:4000], ef=40)
    assert fixed.calibration() == [None] and fixed._value(0, {}) == 40
    with pytest.raises(kvmem.InvalidInputError, match="fixed ef=40; create it with target_recall"):
        fixed.calibrate()
    grown = build(data.base[:4000])
    grown.add(torch.from_numpy(data.base[4000:4900]), torch.zeros(900, 1))      # +22%: no calibration yet
    assert grown.calibration()[0].rows == 4000
    assert grown.calibrate()[0].rows == 4900 and grown._value(0, {}) == grown.calibration()[0].value


# ---------------------------------------------------------------------------------------------- per call
def test_threads_with_different_ef_get_their_serial_results(store, data):
    store.freeze()                                  # no recalibration on these queries between the runs
    queries = torch.from_numpy(data.queries[:64])
    serial = {ef: store.search(queries, 16, ef=ef).ids for ef in (16, 40, 300)}
    assert not torch.equal(serial[16], serial[300])
    errors = []

    def worker(ef: int) -> None:
        try:
            for _ in range(12):
                assert torch.equal(store.search(queries, 16, ef=ef).ids, serial[ef])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(ef,)) for ef in (16, 40, 300, 16, 300, 40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_the_ef_gate_shares_equal_ef_and_separates_others():
    class Index:
        def __init__(self) -> None:
            self.ef = 0

        def set_ef(self, ef: int) -> None:
            self.ef = ef

    index = Index()
    gate = _EfGate(index, 10)
    inside, seen, lock = [], [], threading.Lock()
    both_in = threading.Barrier(2, timeout=5)

    def search(ef: int, wait: bool) -> None:
        with gate.use(ef):
            with lock:
                inside.append(ef)
                seen.append((ef, index.ef, sorted(set(inside))))
            if wait:
                both_in.wait()                       # two searches at ef=10 are inside together
            with lock:
                inside.remove(ef)

    pair = [threading.Thread(target=search, args=(10, True)) for _ in range(2)]
    for t in pair:
        t.start()
    for t in pair:
        t.join()
    others = [threading.Thread(target=search, args=(ef, False)) for ef in (10, 20, 30, 20, 10) * 20]
    for t in others:
        t.start()
    for t in others:
        t.join()
    bad = [s for s in seen if not (s[0] == s[1] and s[2] == [s[0]])]
    assert not bad, bad[:5]


@pytest.mark.parametrize("value", [0, -3, 1.5, False, "64"])
def test_bad_ef_is_rejected(value):
    with pytest.raises(kvmem.InvalidInputError, match=f"ef must be a positive int; got {value!r}"):
        build(randn(0, 20, 8).numpy()).search(randn(1, 2, 8), 3, ef=value)


@pytest.mark.parametrize("options, message", [
    ({"M": 1}, "M must be an int >= 2"),
    ({"M": 5000}, r"M must be an int in \[2, 2048\]"),
    ({"ef_construction": 0}, "ef_construction must be an int >= 1"),
    ({"ef": 10, "target_recall": 0.9}, "not both"),
    ({"target_recall": 0}, "target_recall must be"),
])
def test_bad_options_are_rejected(options, message):
    with pytest.raises(kvmem.InvalidInputError, match=message):
        kvmem.create("hnsw", dim=8, **options)


def test_the_build_beam_defaults_by_metric_and_reaches_the_graph():
    # ip is not a metric: its graph needs the wider beam to stay navigable (module docstring)
    beams = {m: kvmem.create("hnsw", dim=8, metric=m).ef_construction for m in ("ip", "l2", "cos")}
    assert beams == {"ip": 500, "l2": 200, "cos": 200}
    store = build(randn(0, 100, 8).numpy(), ef_construction=40)
    assert store.ef_construction == 40 and store._parts[0].index.ef_construction == 40
    assert build(randn(0, 100, 8).numpy())._parts[0].index.ef_construction == 500


def test_calibration_records_round_trip_and_malformed_ones_are_refused():
    from kvmem.stores._calibrate import Calibration

    edges = (Calibration(64, 1.0, 5000, 32, key_recall=0.0), Calibration(256, 0, 10, 8, queries=300, key_recall=1))
    for cal in (Calibration(96, 0.97, 5000, 32), Calibration(256, 0.9, 5000, 32, exact=True), *edges,
                Calibration(64, 0.96, 5000, 32, queries=1000, key_recall=0.3, index=False)):
        assert Calibration.from_dict(cal.to_dict(), (64, 256)) == cal        # both ends of each range are valid
    good = Calibration(96, 0.97, 5000, 32).to_dict()
    older = {k: v for k, v in good.items() if k != "exact"}                 # a store saved before the flag
    assert Calibration.from_dict(older, (64, 256)) == Calibration(96, 0.97, 5000, 32, exact=False)
    before_index = {k: v for k, v in good.items() if k != "index"}          # saved before the hub could answer alone
    assert Calibration.from_dict(before_index, (64, 256)).index is True
    for bad in ({**good, "exact": 1}, {k: v for k, v in good.items() if k != "rows"}, {**good, "value": 512},
                {**good, "value": 63}, {**good, "recall": 1.5}, {**good, "recall": -0.1}, {**good, "recall": True},
                {**good, "recall": "0.9"}, {**good, "key_recall": 2.0}, {**good, "queries": -1},
                {**good, "index": 0}, {**good, "index": "no"}, {**good, "index": None}):
        with pytest.raises(kvmem.CorruptStoreError, match="calibration is malformed"):
            Calibration.from_dict(bad, (64, 256))


# ---------------------------------------------------------------------------------------------- growth, deletion
def test_the_graph_grows_by_itself_and_a_fifo_memory_reuses_deleted_elements():
    store = build(randn(1, 3000, 8).numpy())
    assert store._parts[0].index.max_elements >= 3000
    fifo = kvmem.create("hnsw", dim=8, value_dim=1, dtype=torch.float32, capacity=1500)
    for start in range(0, 6000, 700):
        fifo.add(randn(start, 700, 8), torch.zeros(700, 1))
    index = fifo._parts[0].index
    assert len(fifo) == 1500 and index.element_count == 1500 and index.max_elements == 1500


def test_after_deleting_almost_everything_search_still_finds_every_live_row():
    keys = randn(2, 1, 3000, 8)
    store = kvmem.create("hnsw", dim=8, value_dim=1, dtype=torch.float32, M=4, ef_construction=8, ef=10)
    store.add(keys, torch.zeros(1, 3000, 1))
    keep = np.arange(0, 3000, 300)
    store.remove(np.setdiff1d(np.arange(3000), keep)[None])
    model = BruteForceMemory(8, 1, 1, "ip", torch.float32)
    model.add(keys, torch.zeros(1, 3000, 1))
    model.remove(np.setdiff1d(np.arange(3000), keep)[None])
    queries = randn(3, 1, 20, 8)
    res = store.search(queries, 12)                                  # 10 live rows: 2 of -1 padding
    check_search(res, model, queries, 12, exact=True)


# ---------------------------------------------------------------------------------------------- files
def test_save_and_load_keep_the_graph_and_its_calibration(store, data, tmp_path):
    store.save(tmp_path / "s")
    with kvmem.load(tmp_path / "s") as loaded:
        assert loaded.calibration() == store.calibration()
        queries = torch.from_numpy(data.queries[:50])
        assert torch.equal(loaded.search(queries, 10).ids, store.search(queries, 10).ids)


def test_foreign_graphs_with_recomputed_manifests_are_rejected_in_a_child(tmp_path):
    def saved(name: str, dim: int = 8, seed: int = 6, drop: int = 0, **options) -> Path:
        store = build(randn(seed, 300, dim).numpy(), **options)
        if drop:
            store.remove(np.arange(drop, 2 * drop))
        store.save(tmp_path / name)
        return tmp_path / name

    good = saved("good", drop=10)
    full = index_bytes_of(good)
    foreign = {
        "wider": index_bytes_of(saved("wider", dim=16, drop=10)),
        "other-degree": index_bytes_of(saved("degree", M=8, drop=10)),
        "other-keys": index_bytes_of(saved("keys", seed=7, drop=10)),
        "other-ids": index_bytes_of(saved("ids", drop=20)),
        "truncated": full[:len(full) - 68],
        "grown": full + bytes(68),
    }
    assert_foreign_indexes_refused(good, foreign, tmp_path, count=290)


def test_random_bytes_with_recomputed_manifests_never_crash_the_loader(tmp_path):
    build(randn(8, 400, 8).numpy()).save(tmp_path / "good")
    blob = index_bytes_of(tmp_path / "good")
    rng = np.random.default_rng(0)
    cases = []
    for i, at in enumerate(rng.integers(0, len(blob), 40)):
        case = tmp_path / f"flip-{i}"
        shutil.copytree(tmp_path / "good", case)
        damaged = bytearray(blob)
        damaged[at] ^= 1 << int(rng.integers(8))
        resave(case, "index.p0", bytes(damaged))
        cases.append(case)
    results = load_in_child(cases, randn(9, 4, 8).tolist())     # a crash fails inside load_in_child
    assert all(r["ok"] or r["error"] == "CorruptStoreError" for r in results)


def test_calibration_reports_the_recall_its_knob_delivers_on_its_own_sample():
    """A partition of at most QUERIES rows calibrates on all its keys, each leaving itself out: the
    recall it reports is what a search at its ef gives those keys (own row dropped), recomputed here
    against float64 brute force."""
    from kvmem.testing.model import scores

    keys = torch.randn(1, 500, 48, generator=torch.Generator().manual_seed(0))
    store = kvmem.create("hnsw", dim=48, value_dim=1, dtype=torch.float32, M=4, ef_construction=8,
                         target_recall=0.97)
    store.add(keys, torch.zeros(1, 500, 1))
    (cal,) = store.calibrate()
    assert not cal.exact and cal.k == 32 and 0.9 < cal.recall < 1     # a sparse graph: recall is measurable
    res = store.search(keys[0], cal.k + 1, ef=cal.value)
    found = res.scores.masked_fill(res.ids == torch.arange(500)[:, None], float("-inf")).topk(cal.k, -1).values
    truth = scores(keys[0].double().numpy(), keys[0].double().numpy(), "ip")
    np.fill_diagonal(truth, -np.inf)
    kth = -np.sort(-truth, 1)[:, cal.k - 1:cal.k]
    delivered = (found.double().numpy() >= kth - 1e-5 * (1 + np.abs(kth))).mean()
    assert delivered == pytest.approx(cal.recall, abs=1e-9)
