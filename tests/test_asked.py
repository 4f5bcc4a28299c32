"""Calibration on the queries a store is asked (ivf, hnsw): the sample, the hub, calibrate(), files."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from ann_support import recall, resave
from kvmem.benchmarks.datasets import ood
from kvmem.benchmarks.recall import ground_truth

import kvmem
from kvmem.stores import _calibrate
from kvmem.stores._ann import _Found
from kvmem.stores._asked import AskedQueries
from kvmem.stores._calibrate import smallest_value
from kvmem.stores._hub import Hub
from kvmem.testing.child import load_in_child

OPTIONS = {"ivf": {"train_size": 3000}, "hnsw": {"ef_construction": 120}}      # small and quick to build


@pytest.fixture(scope="module", autouse=True)
def keep_hub():
    """These tests are about the hub: keep it whatever the timing (the choice is tested on its own)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_calibrate, "_MARGIN", math.inf)
        yield


@pytest.fixture(scope="module")
def data():
    return ood(6000, 32, queries=300, asked=600, seed=5)


@pytest.fixture(scope="module")
def truth(data):
    return ground_truth(data.base, data.queries, 32, data.metric)


def build(data, backend: str, **options) -> kvmem.MemoryStore:
    store = kvmem.create(backend, dim=data.dim, value_dim=1, dtype=torch.float32, **{**OPTIONS[backend], **options})
    store.add(torch.from_numpy(data.base), torch.zeros(data.size, 1))
    return store


def ask(store: kvmem.MemoryStore, queries: np.ndarray, batch: int = 100) -> None:
    for lo in range(0, len(queries), batch):
        store.search(torch.from_numpy(queries[lo:lo + batch]), 32)
    store._settle()


@pytest.fixture(scope="module", params=["ivf", "hnsw"])
def asked_store(request, data):
    store = build(data, request.param)
    before = store.calibration()[0]
    ask(store, data.asked)
    store.freeze()              # the tests' held-out queries must not join the sample, in whatever order they run
    return store, before


# ---------------------------------------------------------------------------------------------- calibration
def test_calibration_rests_on_asked_queries_and_reports_what_they_get(asked_store, data, truth):
    store, before = asked_store
    assert before.queries == 0 and before.key_recall == before.recall         # keys as queries, and says so
    cal = store.calibration()[0]
    assert cal.queries == 500 and not cal.exact and 0 <= cal.key_recall <= 1   # recalibrated at 100, 200, 300, 500
    stats = store.stats()["partitions"][0]
    assert stats["asked_sample"] == len(data.asked) and stats["calibration"] == cal.to_dict()
    hub = store._hubs[0]
    assert store.nbytes() == store._table.nbytes() + store._parts[0].nbytes() + hub.nbytes()   # the hub is counted
    assert hub.nbytes() >= sum(keys.numel() * 4 for _, keys, _ in hub.lists) > 0
    delivered = recall(store, data, truth)                                     # held-out queries, defaults
    assert delivered >= 0.93, (delivered, cal)
    assert abs(cal.recall - delivered) <= 0.03, (cal.recall, delivered)


def test_the_hub_beats_the_plain_index_at_equal_knob_on_unlike_queries(asked_store, data, truth):
    store, _ = asked_store
    plain = build(data, store.backend, query_sample=0)
    knob = {store.param: 2 if store.backend == "ivf" else 64}
    with_hub, without = recall(store, data, truth, **knob), recall(plain, data, truth, **knob)
    assert plain.calibration()[0].queries == 0 and plain._hubs == [None]
    assert with_hub >= without + 0.05, (with_hub, without)


def choosing(monkeypatch, hub: bool, index: bool) -> None:
    """Make calibration pick the option with this ``hub`` / ``index`` where it reaches the target (the timing
    that picks in use is tested on its own below)."""
    def pick(store, p, asked, k, options, target):
        wanted = [o for o in options if (o[0] is not None) == hub and o[1] == index
                  and _calibrate.reaches(o[3], target)]
        return wanted[0] if wanted else options[0]
    monkeypatch.setattr(_calibrate, "_fastest", pick)


def test_the_plain_index_serves_where_calibration_finds_it_faster(data, truth, monkeypatch):
    choosing(monkeypatch, hub=False, index=True)
    store = build(data, "ivf", target_recall=0.9)
    ask(store, data.asked)
    store.freeze()
    cal = store.calibration()[0]
    assert store._hubs == [None] and cal.queries == 500 and cal.index and not cal.exact   # on asked queries
    assert store.nbytes() == store._table.nbytes() + store._parts[0].nbytes()
    assert store.stats()["partitions"][0]["hub_rows"] == 0
    delivered = recall(store, data, truth)
    assert delivered >= 0.88 and abs(cal.recall - delivered) <= 0.03, (cal, delivered)


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_the_hub_answers_alone_where_calibration_finds_it_faster(backend, data, truth, monkeypatch, tmp_path):
    choosing(monkeypatch, hub=True, index=False)
    store = build(data, backend, target_recall=0.9)
    ask(store, data.asked)
    store.freeze()
    cal = store.calibration()[0]
    assert store._hubs[0] is not None and not cal.index and not cal.exact and cal.queries == 500
    part, calls = store._parts[0], []
    searched = part.search
    monkeypatch.setattr(part, "search", lambda *args: calls.append(1) or searched(*args))
    delivered = recall(store, data, truth)                          # defaults: the lists alone
    assert calls == [] and delivered >= 0.88 and abs(cal.recall - delivered) <= 0.03, (cal, delivered)
    store.search(torch.from_numpy(data.queries[:5]), 32, **{store.param: 8})
    assert len(calls) == 1                                          # a knob per call searches the index
    store.save(tmp_path / "s")
    loaded = kvmem.load(tmp_path / "s")
    loaded.freeze()
    assert loaded.calibration() == store.calibration()
    got, want = (s.search(torch.from_numpy(data.queries), 32).ids for s in (loaded, store))
    assert torch.equal(got, want)


def test_of_the_options_that_reach_the_target_the_fastest_serves_reduced_ones_by_a_margin(data, monkeypatch):
    monkeypatch.setattr(_calibrate, "_MARGIN", 1.25)                # the module's fixture keeps both otherwise
    store = build(data, "ivf")
    hub = object()                                                  # never searched: the timings are given
    both, alone, short, plain = (hub, True, 2, (0.97, 0.005)), (hub, False, 4, (0.962, 0.004)), \
        (hub, True, 1, (0.93, 0.01)), (None, True, 12, (0.955, 0.001))
    options = [both, alone, short, plain]

    def chosen(*seconds: float):
        given = iter(seconds)
        monkeypatch.setattr(_calibrate, "_seconds", lambda fn: next(given))
        return _calibrate._fastest(store, 0, torch.from_numpy(data.asked[:10]), 32, options, 0.95)

    assert chosen(1.0, 0.9, 0.9) is both                       # reduced: 0.9 x 1.25 is slower than both
    assert chosen(1.0, 0.7, 0.9) is alone                      # faster by more than the margin
    assert chosen(1.0, 0.9, 0.7) is plain
    assert chosen(1.0, 0.8, 0.8) is both                       # a tie (0.8 x 1.25 = 1.0): the first
    assert _calibrate._fastest(store, 0, None, 32, [short], 0.95) is short        # none reaches: the nearest
    nearer = (None, True, 64, (0.94, 0.001))
    assert _calibrate._fastest(store, 0, None, 32, [short, nearer], 0.95) is nearer


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_calibrate_takes_queries_and_a_target(backend, data):
    store = build(data, backend)
    cal = store.calibrate(data.asked[:200], target_recall=0.9)[0]
    assert cal.queries == 200 and store.target_recall == 0.9
    assert torch.equal(store._asked.sample(0), torch.from_numpy(data.asked[:200]))
    higher = store.calibrate(target_recall=0.99)[0]
    assert higher.queries == 200 and higher.value >= cal.value


BAD = [
    {"queries": np.zeros((5, 31), np.float32)},                     # wrong dim
    {"queries": np.full((5, 32), np.nan, np.float32)},              # not finite
    {"queries": np.zeros((0, 32), np.float32)},                     # none
    {"queries": np.zeros((2, 5, 32), np.float32)},                  # two partitions in a one-partition store
    {"queries": np.zeros((5, 32), np.int64)},                       # not floating point
    {"target_recall": 1.5}, {"target_recall": 0}, {"target_recall": "high"}, {"target_recall": True},
]


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_bad_calibrate_arguments_raise_and_change_nothing(backend, data):
    store = build(data, backend)
    store.calibrate(data.asked[:100])
    cal, sample, target = store.calibration(), store._asked.sample(0), store.target_recall
    for args in BAD:
        with pytest.raises(kvmem.InvalidInputError):
            store.calibrate(**{"queries": data.asked[100:200], **args})
        assert store.calibration() == cal and torch.equal(store._asked.sample(0), sample), args
        assert store.target_recall == target


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_calibrate_refuses_a_fixed_knob_and_a_bad_query_sample_option(backend, data):
    fixed = build(data, backend, **{"nprobe" if backend == "ivf" else "ef": 8})
    with pytest.raises(kvmem.InvalidInputError, match="fixed"):
        fixed.calibrate(data.asked[:10])
    assert len(fixed._asked.sample(0)) == 0
    for bad in (-1, 1.5, "many", True):
        with pytest.raises(kvmem.InvalidInputError, match="query_sample"):
            kvmem.create(backend, dim=8, query_sample=bad)


# ---------------------------------------------------------------------------------------------- the sample
def test_the_reservoir_keeps_a_uniform_bounded_sample():
    sample = AskedQueries(partitions=2, dim=1, size=100, seed=1)
    for lo in range(0, 10_000, 250):
        sample.record(torch.arange(lo, lo + 250, dtype=torch.float32).view(1, -1, 1).expand(2, -1, -1))
    assert sample.seen.tolist() == [10_000, 10_000]
    for p in range(2):
        kept = sample.sample(p).view(-1).numpy()
        assert len(kept) == 100 == len(np.unique(kept))
        assert 3500 < kept.mean() < 6500 and (kept < 100).sum() < 8                 # uniform over all, not the first
    assert not np.array_equal(sample.sample(0), sample.sample(1))                      # one draw per partition


def test_a_plateau_that_is_not_one_is_checked_at_the_top_of_the_range():
    sinks = lambda v: ((0.776 if v < 8 else min(0.99, 0.776 + 0.0175 * (v - 7))), 0.004)   # noqa: E731
    value, (got, _) = smallest_value(sinks, 1, 512, 0.95)
    assert got - 0.008 >= 0.95 and value < 40                                      # not nprobe 2 at 0.776
    flat = lambda v: (min(0.9, 0.5 + 0.05 * np.log2(v)), 0.002)                    # noqa: E731
    assert smallest_value(flat, 64, 1 << 20, 0.99)[0] < 1 << 16                     # a true plateau still stops


# ---------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_save_and_load_keep_the_sample_the_hub_and_the_calibration(backend, data, tmp_path):
    store = build(data, backend)
    ask(store, data.asked[:300])
    grown = torch.from_numpy(data.asked[:20].copy()) * 2                 # added since: extend the lists
    store.add(grown, torch.zeros(20, 1))
    store.remove(store._hubs[0].lists[0][0][:3])                         # removed since: pruned from them
    store.save(tmp_path / "s")
    with kvmem.load(tmp_path / "s") as loaded:
        assert loaded.calibration() == store.calibration() and loaded.calibration()[0].queries == 300
        assert torch.equal(loaded._asked.sample(0), store._asked.sample(0))
        assert loaded._asked.seen.tolist() == store._asked.seen.tolist()
        assert torch.equal(loaded._hubs[0].ids, store._hubs[0].ids)
        assert torch.equal(loaded._hubs[0].centroids, store._hubs[0].centroids)
        assert sum(len(lid) for lid, _, _ in store._hubs[0].lists) > sum(len(lid) for lid, _, _ in Hub(
            store, 0, store._hubs[0].queries, store._hubs[0].ids, store._hubs[0].centroids).lists)  # extended
        for (lid, keys, _), (lid2, keys2, _), sole, sole2 in zip(loaded._hubs[0].lists, store._hubs[0].lists,
                                                                  loaded._hubs[0].sole, store._hubs[0].sole):
            assert torch.equal(lid, lid2) and torch.equal(keys, keys2) and torch.equal(sole, sole2)
        queries = torch.from_numpy(data.queries[:50])
        assert torch.equal(loaded.search(queries, 10, **{store.param: 4}).ids,
                           store.search(queries, 10, **{store.param: 4}).ids)


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_save_and_load_keep_every_partitions_sample_and_hub(backend, tmp_path):
    small = ood(2000, 16, queries=40, asked=200, seed=8)
    options = {"ivf": {"train_size": 1000, "nlist": 16}, "hnsw": {"ef_construction": 40}}[backend]
    store = kvmem.create(backend, dim=small.dim, value_dim=1, partitions=2, dtype=torch.float32, **options)
    halves = torch.from_numpy(small.base).view(2, -1, small.dim)
    store.add(halves, torch.zeros(2, halves.shape[1], 1))
    asked = torch.from_numpy(small.asked).view(2, -1, small.dim)
    for lo in range(0, asked.shape[1], 25):
        store.search(asked[:, lo:lo + 25], 32)
    store._settle()
    assert all(hub is not None for hub in store._hubs)                       # both partitions learned
    store.save(tmp_path / "s")
    with kvmem.load(tmp_path / "s") as loaded:
        for p in range(2):
            assert torch.equal(loaded._hubs[p].ids, store._hubs[p].ids), p
            assert torch.equal(loaded._asked.sample(p), store._asked.sample(p)), p
        queries = torch.from_numpy(small.queries).view(2, -1, small.dim)
        loaded.freeze(), store.freeze()
        assert torch.equal(loaded.search(queries, 10).ids, store.search(queries, 10).ids)


def test_a_calibration_search_of_one_partition_reads_that_partitions_rows():
    small = ood(2000, 16, queries=40, asked=40, seed=9)
    store = kvmem.create("ivf", dim=small.dim, value_dim=1, partitions=2, dtype=torch.float32, train_size=1000,
                         nlist=16, query_sample=0)
    halves = torch.from_numpy(small.base).view(2, -1, small.dim)
    store.add(halves, torch.arange(2000, dtype=torch.float32).view(2, -1, 1))
    queries = torch.from_numpy(small.queries)
    found = _Found(store, queries[None], 10, first=1)                  # partition 1's queries alone
    found.fill(0, len(queries), store.exact_slots(queries[None], [1], 10)[0])
    want = store.search(torch.stack([queries, queries]), 10, nprobe=16)  # every list: exact here
    assert torch.equal(found.ids, want.ids[1]) and torch.equal(found.values, want.values[1])
    assert store._search_as(1, queries, 10, None, True, 4) and store._search_as(0, queries, 10, None, True, 1)


def test_corrupt_samples_are_refused_in_a_child(data, tmp_path):
    from safetensors.torch import save_file

    small = ood(1000, 32, queries=10, asked=100, seed=6)
    store = build(small, "hnsw")
    ask(store, small.asked)
    store.save(tmp_path / "good")
    blobs = {"garbage": b"\x00not safetensors" * 10}
    hub = {"seen": torch.tensor([100]), "fresh": torch.tensor([0]), "queries.p0": torch.zeros(3, 32),
           "hub.queries.p0": torch.randn(3, 32), "hub.ids.p0": torch.tensor([[0, 1], [2, 3], [4, -1]])}
    for name, tensors in {
        "nan": {"seen": torch.tensor([100]), "fresh": torch.tensor([0]), "queries.p0": torch.full((3, 32), np.nan)},
        "wide": {"seen": torch.tensor([100]), "fresh": torch.tensor([0]), "queries.p0": torch.zeros(3, 33)},
        "seen": {"seen": torch.tensor([1]), "fresh": torch.tensor([0]), "queries.p0": torch.zeros(3, 32)},
        "extra": {"seen": torch.tensor([100]), "fresh": torch.tensor([0]), "queries.p0": torch.zeros(3, 32),
                  "queries.p9": torch.zeros(1, 32)},
        **{f"centroids-{name}": {**hub, "hub.centroids.p0": centroids} for name, centroids in {
            "none": torch.zeros(0, 32), "more-than-queries": torch.zeros(4, 32), "wide": torch.zeros(2, 31),
            "nan": torch.full((2, 32), np.nan), "int": torch.zeros(2, 32, dtype=torch.int64)}.items()},
        **{f"lists-{name}": {**hub, "hub.centroids.p0": torch.randn(2, 32), **lists} for name, lists in {
            "sizes-sum": {"hub.list_ids.p0": torch.tensor([0, 1, 2]), "hub.list_sizes.p0": torch.tensor([1, 1]),
                          "hub.sole.p0": torch.tensor([-1, 0, 1])},
            "sizes-negative": {"hub.list_ids.p0": torch.tensor([0, 1]), "hub.list_sizes.p0": torch.tensor([3, -1]),
                               "hub.sole.p0": torch.tensor([-1, 0])},
            "sole-range": {"hub.list_ids.p0": torch.tensor([0, 1]), "hub.list_sizes.p0": torch.tensor([1, 1]),
                           "hub.sole.p0": torch.tensor([-1, 3])},
            "absent-row": {"hub.list_ids.p0": torch.tensor([0, 10**9]), "hub.list_sizes.p0": torch.tensor([1, 1]),
                           "hub.sole.p0": torch.tensor([-1, -1])},
            "no-centroids": {"hub.centroids.p0": None, "hub.list_ids.p0": torch.tensor([0]),
                             "hub.list_sizes.p0": torch.tensor([1]), "hub.sole.p0": torch.tensor([-1])},
        }.items()},
    }.items():
        tensors = {key: t for key, t in tensors.items() if t is not None}
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        blobs[name] = (tmp_path / f"{name}.safetensors").read_bytes()
    cases = []
    for name, blob in blobs.items():
        shutil.copytree(tmp_path / "good", tmp_path / name)
        resave(tmp_path / name, "asked", blob)
        cases.append(tmp_path / name)
    results = load_in_child([tmp_path / "good", *cases])
    assert results[0]["ok"] and results[0]["count"] == small.size
    for case, result in zip(cases, results[1:]):
        assert result["ok"] is False and result["error"] == "CorruptStoreError", (case.name, result)


def test_a_save_from_before_the_hub_lists_loads_and_learns_them_again(data, tmp_path):
    """Saves written before the hub kept centroids hold only its queries and ids: the lists are learned again."""
    from safetensors.torch import load_file, save_file

    store = build(data, "ivf")
    ask(store, data.asked[:300])
    store.save(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    tensors = load_file(str(tmp_path / "s" / manifest["files"]["asked"]["name"]))
    for name in ("centroids", "list_ids", "list_sizes", "sole"):
        del tensors[f"hub.{name}.p0"]
    save_file(tensors, str(tmp_path / "old.safetensors"))
    resave(tmp_path / "s", "asked", (tmp_path / "old.safetensors").read_bytes())
    with kvmem.load(tmp_path / "s") as loaded:
        hub = loaded._hubs[0]
        assert torch.equal(hub.ids, store._hubs[0].ids) and len(hub.centroids) == len(store._hubs[0].centroids)
        queries = torch.from_numpy(data.queries[:50])
        assert hub.candidates(loaded, 0, queries, 32).shape == (50, 32 * len(hub.probes(queries[:1])[0]))
        assert loaded.search(queries, 10).ids.shape == (50, 10)


def test_a_frozen_store_takes_no_queries_and_freeze_checks_its_argument(data):
    store = build(data, "ivf")
    store.freeze()
    ask(store, data.asked[:200])
    assert len(store._asked.sample(0)) == 0 and store.calibration()[0].queries == 0
    with pytest.raises(kvmem.InvalidInputError, match="bool"):
        store.freeze(1)
    assert store._asked.frozen is True
    store.freeze(False)
    ask(store, data.asked[:200])
    assert store.calibration()[0].queries == 200


def test_the_adapter_hands_its_first_chunk_queries_to_the_store():
    from kvmem.adapters import MemoryAttention

    store = kvmem.create("hnsw", dim=16, value_dim=16, partitions=2, dtype=torch.float32)
    attn = MemoryAttention(store, num_heads=4, k=8, positions="none")
    q, kv = torch.randn(1, 4, 32, 16), torch.randn(2, 1, 2, 32, 16)
    attn(q, kv[0], kv[1])                                          # memory empty: observed, not searched
    assert torch.equal(store._asked.sample(0), q[0, :2].reshape(64, 16))       # group 0: heads 0 and 1
    assert torch.equal(store._asked.sample(1), q[0, 2:].reshape(64, 16))
    attn(q, kv[0], kv[1])                                          # memory holds the first chunk: searched
    assert store._asked.seen.tolist() == [128, 128]
    with pytest.raises(kvmem.InvalidInputError):
        store.observe(torch.randn(3, 5, 16))
    assert store._asked.seen.tolist() == [128, 128]


# ---------------------------------------------------------------------------------------------- monitor
def test_the_monitor_estimate_holds_the_true_recall_in_its_interval(data, truth):
    store = build(data, "ivf", nprobe=1, monitor=1.0)                # a fixed low knob: recall well below 1
    delivered = recall(store, data, truth)
    store._monitor.wait()
    est = store.stats()["monitor"]
    assert est["checked"] == len(data.queries) and est["low"] <= delivered <= est["high"], (delivered, est)
    assert est["high"] - est["low"] < 0.05 and delivered < 0.9
    off = build(data, "ivf", nprobe=1)
    recall(off, data, truth)
    assert off.stats()["monitor"]["checked"] == 0


def test_a_monitor_below_target_recalibrates(data):
    import dataclasses

    store = build(data, "ivf", query_sample=0, monitor=1.0)
    good = store.calibration()[0]
    store._calibrations[0] = dataclasses.replace(good, value=1)      # a stale knob: delivers far below 0.95
    for lo in range(0, 300, 100):
        store.search(torch.from_numpy(data.queries[lo:lo + 100]), 32)
        store._monitor.wait()
    store._settle()
    assert store.calibration()[0].value > 1 and store.stats()["monitor"]["checked"] < 300


@pytest.mark.parametrize("bad", [-0.1, 1.5, "often", True, None])
def test_bad_monitor_rates_are_rejected(bad):
    with pytest.raises(kvmem.InvalidInputError, match="monitor"):
        kvmem.create("ivf", dim=8, monitor=bad)


def test_kvmem_info_shows_the_saved_calibration(data, tmp_path):
    from kvmem.cli import describe

    store = build(data, "ivf")
    store.calibrate(data.asked[:100])
    store.save(tmp_path / "s")
    assert describe(tmp_path / "s")["calibration"] == [store.calibration()[0].to_dict()]
