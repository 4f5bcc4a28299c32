"""What a CUDA user's stores do, tested on the CPU: device resolution and restoring, the bfloat16
capability choice, the memory budget, the TF32 guard, and the CUDA-only search branches under
emulation (``kvmem.devices.EMULATE_CUDA``)."""

from __future__ import annotations

import json
import threading
import warnings

import numpy as np
import pytest
import torch
from kvmem.benchmarks.cuda_smoke import truth_scores

import kvmem
from kvmem import devices, topk
from kvmem.errors import CorruptStoreError, InvalidInputError

METRICS = ("ip", "l2", "cos")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def emulated(monkeypatch):
    """CUDA branches on the CPU, with a device so small that searches take several tiles and blocks."""
    monkeypatch.setattr(devices, "EMULATE_CUDA", True)
    monkeypatch.setattr(devices, "EMULATED_FREE", 4 << 20)
    monkeypatch.setattr(devices, "BUDGET_FLOOR", 1 << 20)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # tiny bmm calls: threads only contend (the machine is shared)
    yield
    torch.set_num_threads(threads)


def _assert_exact(result, keys, queries, metric, k):
    truth = truth_scores(keys, queries, metric, k).numpy()
    scale = 1e-4 * (1 + np.abs(truth).max())
    np.testing.assert_allclose(result.scores.double().numpy(), truth, rtol=1e-4, atol=scale)


# ---------------------------------------------------------------------------- devices
def test_device_names_resolve_and_bad_ones_raise():
    assert devices.resolve(None) == torch.device("cpu") == devices.resolve("cpu")
    for bad in ("tpu", "meta", 3.5, "cuda:x"):
        with pytest.raises(InvalidInputError, match="device"):
            devices.resolve(bad)


def test_cuda_is_resolved_to_an_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert devices.resolve("cuda") == torch.device("cuda", 1)
    assert devices.resolve(torch.device("cuda:0")) == torch.device("cuda", 0)
    with pytest.raises(InvalidInputError, match="2 CUDA device"):
        devices.resolve("cuda:2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without CUDA")
def test_cuda_without_cuda_raises():
    with pytest.raises(InvalidInputError, match="is_available"):
        kvmem.create("exact", dim=4, device="cuda")


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_index_backends_refuse_cuda_at_create(backend):
    with pytest.raises(InvalidInputError, match=f"{backend} keeps its index in RAM.*'cuda'"):
        kvmem.create(backend, dim=4, device="cuda")


def _saved(tmp_path, backend="exact", **options):
    store = kvmem.create(backend, dim=8, value_dim=2, partitions=2, dtype=torch.float32, **options)
    keys = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(0))
    store.add(keys, torch.zeros(2, 40, 2))
    store.save(tmp_path / "s")
    return tmp_path / "s", keys


def _set_manifest(path, **fields):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(fields)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_save_records_its_device_and_load_restores_it(tmp_path):
    path, keys = _saved(tmp_path)
    assert json.loads((path / "manifest.json").read_text())["device"] == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = kvmem.load(path)
    assert store.device == torch.device("cpu") and len(store) == 80


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without CUDA")
@pytest.mark.parametrize("backend", ["exact", "lmdb"])
def test_a_cuda_save_comes_back_on_the_cpu_with_a_warning_where_cuda_is_absent(tmp_path, backend):
    path, keys = _saved(tmp_path, backend, **({"path": tmp_path / "live"} if backend == "lmdb" else {}))
    _set_manifest(path, device="cuda:0")
    with pytest.warns(RuntimeWarning, match="saved on cuda:0.*loading it on cpu"):
        store = kvmem.load(path)
    assert store.device == torch.device("cpu")
    queries = torch.randn(2, 3, 8)
    _assert_exact(store.search(queries, 5), keys, queries, "ip", 5)
    store.close()
    with warnings.catch_warnings():                       # a device given wins, silently
        warnings.simplefilter("error")
        assert kvmem.load(path, device="cpu").device == torch.device("cpu")


def test_damaged_device_field_and_unknown_options_are_corrupt(tmp_path):
    path, _ = _saved(tmp_path)
    for bad in ("gpu", 0, None, "cuda:"):
        _set_manifest(path, device=bad)
        with pytest.raises(CorruptStoreError, match="device"):
            kvmem.load(path)
    _set_manifest(path, device="cpu")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["config"]["options"]["block_elums"] = None
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptStoreError, match="block_elums"):
        kvmem.load(path)


def test_version_1_saves_without_a_device_load_on_the_cpu(tmp_path):
    path, _ = _saved(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["device"]
    manifest["format_version"] = 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert kvmem.load(path).device == torch.device("cpu")
    manifest["format_version"] = 2                        # version 2 must say where it lived
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptStoreError, match="device"):
        kvmem.load(path)


# ---------------------------------------------------------------------------- hf adapter
def _tiny_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_attach_refuses_an_index_backend_on_cuda_before_touching_the_model(backend):
    from kvmem.adapters import hf

    model = _tiny_model()
    before = model.config._attn_implementation
    with pytest.raises(InvalidInputError, match=f"{backend} keeps its index in RAM"):
        hf.attach(model, backend=backend, store_options={"device": "cuda"})
    assert model.config._attn_implementation == before
    hf.attach(model, backend=backend).detach()                          # the model is still free to attach


def test_layer_stores_follow_the_models_device_where_the_backend_can():
    from kvmem.adapters._hf_layer import store_device

    cuda = torch.device("cuda", 0)
    assert store_device("exact", cuda) == cuda and store_device("lmdb", cuda) == cuda
    assert store_device("ivf", cuda) == store_device("hnsw", cuda) == torch.device("cpu")
    assert store_device("exact", torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without CUDA")
def test_an_adapter_saved_on_cuda_loads_on_a_machine_without_it(tmp_path):
    from kvmem.adapters import hf

    model = _tiny_model()
    adapter = hf.attach(model, k=8)
    adapter.feed(torch.randint(0, 64, (1, 40)), chunk_size=20)
    adapter.save(tmp_path / "a")
    adapter.detach()
    manifest = json.loads((tmp_path / "a" / "adapter.json").read_text())
    manifest["store_options"]["device"] = "cuda:0"                      # as a GPU machine writes it
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(manifest))
    for layer in (tmp_path / "a" / manifest["snapshot"]).iterdir():
        _set_manifest(layer, device="cuda:0")
    with pytest.warns(RuntimeWarning, match="cuda:0"):
        adapter = hf.load(model, tmp_path / "a")
    assert {str(s.device) for s in adapter.stores.values()} == {"cpu"}
    assert {len(s) for s in adapter.stores.values()} == {80}
    adapter.feed(torch.randint(0, 64, (1, 20)))
    adapter.detach()
    adapter = hf.load(model, tmp_path / "a", device="cpu")              # a device given: no warning needed
    assert adapter.settings.store_options["device"] == "cpu"
    adapter.detach()


# ---------------------------------------------------------------------------- bfloat16 capability
@pytest.mark.parametrize(("capability", "want"), [((6, 0), None), ((7, 5), None), ((8, 0), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_bf16_ranking_needs_capability_8_of_the_stores_device(monkeypatch, capability, want):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: asked.append(d) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)   # counts emulation: ignored
    device = torch.device("cuda", 1)
    assert topk.fast_rank_dtype(device) is want
    assert asked == [device]
    assert topk.rank_dtype_for("auto", 64, torch.float16, "ip", device) is want
    assert topk.rank_dtype_for("fp32", 64, torch.float16, "ip", device) is None


def test_emulated_cuda_takes_the_cuda_choices(emulated):
    cpu = torch.device("cpu")
    assert devices.cuda_like(cpu) and topk.fast_rank_dtype(cpu) is torch.bfloat16
    scorer = topk._BlockScorer(torch.randn(2, 3, 8), "ip", torch.float32, 1024)
    assert not scorer._numpy                                       # the bmm scorer
    assert not topk.RunningTopK(4, 2, cpu)._sparse                 # dense merges, no data-dependent shapes


# ---------------------------------------------------------------------------- memory budget
def test_budget_is_a_quarter_of_free_memory_within_bounds():
    assert devices.search_budget(8 << 30) == 2 << 30
    assert devices.search_budget(80 << 30) == devices.BUDGET_CAP == 4 << 30
    assert devices.search_budget(1 << 20) == devices.BUDGET_FLOOR


@pytest.mark.parametrize("free_gib", [2, 8, 24, 80])
@pytest.mark.parametrize(("P", "q", "keep", "dim"), [(8, 2048, 80, 128), (32, 4096, 80, 128), (1, 1, 33, 64)])
def test_a_tile_and_its_rescoring_fit_the_budget(free_gib, P, q, keep, dim):
    budget = devices.search_budget(free_gib << 30)
    elems, tile = topk.cuda_plan(P, keep, dim, 2, budget)
    tile = min(tile, q)
    rescoring = P * tile * keep * (12 * dim + 384)
    rows = topk._block_rows(P, tile, dim + 1, elems, 1 << 22, True, topk._LIMITS["cuda"].max_rows)
    block = (P * tile * rows + P * rows * (dim + 1)) * 2
    assert rescoring + block <= budget, (rescoring, block, budget)
    assert elems <= 1 << 28 and tile >= 1


def test_the_issues_feed_no_longer_asks_for_gigabytes():
    """A 512-token feed of an 8-kv-head model with 4 query heads per kv head, beside a 7B model on a
    24 GB card (about 6 GB free): the tile's rescoring and score block stay within 1.5 GB."""
    budget = devices.search_budget(6 << 30)
    elems, tile = topk.cuda_plan(8, 32 + topk._MARGIN[torch.bfloat16], 128, 2, budget)
    assert tile < 2048 and 8 * tile * 80 * (12 * 128 + 384) + elems * 2 * 2 <= budget <= 1.5 * (1 << 30)


# ---------------------------------------------------------------------------- emulated CUDA searches
@pytest.mark.parametrize("ranking", ["auto", "bf16", "fp32"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_cuda_search_is_exact_in_several_tiles_and_blocks(emulated, dtype, metric, ranking):
    gen = torch.Generator().manual_seed(4)
    store = kvmem.create("exact", dim=32, value_dim=1, partitions=2, metric=metric, dtype=dtype, ranking=ranking,
                         block_elems=8192)
    n = 5000
    store.add(torch.randn(2, n, 32, generator=gen), torch.zeros(2, n, 1))
    keys = store._table.data["keys"][:, :n]
    queries = torch.randn(2, 60, 32, generator=gen)
    keep = 16 + topk._MARGIN[torch.float32 if ranking == "fp32" else torch.bfloat16]
    _, tile = topk.cuda_plan(2, keep, 32, 2, devices.search_budget(devices.EMULATED_FREE))
    assert tile < 60                                                # several tiles (blocks: block_elems)
    _assert_exact(store.search(queries, 16), keys, queries, metric, 16)


def test_emulated_near_ties_are_searched_again_and_stay_exact(emulated, monkeypatch):
    calls = []
    redo = topk._redo
    monkeypatch.setattr(topk, "_redo", lambda *a, **kw: calls.append(1) or redo(*a, **kw))
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1, 1, 32, generator=gen)
    store = kvmem.create("exact", dim=32, value_dim=1, partitions=2, dtype=torch.float32, ranking="bf16")
    store.add(base + 1e-4 * torch.randn(2, 2000, 32, generator=gen), torch.zeros(2, 2000, 1))
    queries = base.expand(2, 16, 32) + 1e-3 * torch.randn(2, 16, 32, generator=gen)
    _assert_exact(store.search(queries, 10), store._table.data["keys"][:, :2000], queries, "ip", 10)
    assert calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", [None, "ivf"])     # ivf before training: partitions searched exactly, in turns
def test_emulated_cuda_lmdb_stages_in_turns_and_stays_exact(emulated, tmp_path, dtype, index, monkeypatch):
    from kvmem.stores import _lmdb_rows

    monkeypatch.setattr(_lmdb_rows, "_CUDA_STAGE_ELEMS", 2 * 256 * 16)    # several staging steps
    gen = torch.Generator().manual_seed(6)
    store = kvmem.create("lmdb", path=tmp_path / "m", dim=16, value_dim=1, partitions=2, dtype=dtype,
                         block_rows=256, index=index)
    store.add(torch.randn(2, 2500, 16, generator=gen), torch.zeros(2, 2500, 1))
    keys, _ = store.get(torch.arange(2500).expand(2, -1))
    staged = []
    stack = _lmdb_rows.BlockKeys._stack
    monkeypatch.setattr(_lmdb_rows.BlockKeys, "_stack",
                        lambda self, *a: staged.append((self.dtype, id(a[2]) if a[2] else None)) or stack(self, *a))
    queries = torch.randn(2, 8, 16, generator=gen)                       # one query tile
    _assert_exact(store.search(queries, 8), keys, queries, "ip", 8)
    assert len(staged) >= 3 and all(d == dtype for d, _ in staged)       # float16 not widened on the host
    assert len({buffer for _, buffer in staged if buffer}) == 2            # two buffers, used in turn
    store.close()


def test_the_float32_redo_gathers_only_the_failed_partition(monkeypatch):
    from kvmem.stores.exact import TableKeys

    widths = []
    gather = TableKeys.gather
    monkeypatch.setattr(TableKeys, "gather", lambda self, slots: widths.append(slots.shape[0]) or gather(self, slots))
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(1, 32, generator=gen)
    keys = torch.randn(4, 2000, 32, generator=gen)
    keys[2] = base + 1e-4 * torch.randn(2000, 32, generator=gen)       # near-ties in partition 2 only
    store = kvmem.create("exact", dim=32, value_dim=1, partitions=4, dtype=torch.float32, ranking="bf16")
    store.add(keys, torch.zeros(4, 2000, 1))
    queries = torch.randn(4, 16, 32, generator=gen)
    queries[2] = base + 1e-3 * torch.randn(16, 32, generator=gen)
    _assert_exact(store.search(queries, 10), keys, queries, "ip", 10)
    assert widths[0] == 4 and widths[1:] and set(widths[1:]) == {1}    # the ranked pass, then partition 2 alone
    #                                                                     (float32, and float64 for what it leaves)


# ---------------------------------------------------------------------------- TF32 guard
def _precision_state():
    return [devices._get(obj, name) for obj, name, _ in devices._switches()]


def test_exact_matmuls_turns_tf32_off_and_restores_it():
    before = _precision_state()
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    try:
        user = _precision_state()
        with devices.exact_matmuls():
            assert _precision_state() == [value for _, _, value in devices._switches()]
            with devices.exact_matmuls():                         # nested: still off
                pass
            assert _precision_state() == [value for _, _, value in devices._switches()]
        assert _precision_state() == user
        with pytest.raises(RuntimeError, match="boom"), devices.exact_matmuls():
            raise RuntimeError("boom")
        assert _precision_state() == user
    finally:
        for (obj, name, _), value in zip(devices._switches(), before):
            devices._set(obj, name, value)


def test_concurrent_searches_restore_the_users_setting_once_the_last_one_leaves():
    torch.set_float32_matmul_precision("high")
    try:
        user = _precision_state()
        inside, leave = threading.Barrier(2), threading.Event()

        def search():
            with devices.exact_matmuls():
                inside.wait()
                leave.wait()

        first = threading.Thread(target=search)
        first.start()
        with devices.exact_matmuls():
            inside.wait()
        assert _precision_state() != user                         # the other search still runs: still off
        leave.set()
        first.join()
        assert _precision_state() == user
    finally:
        torch.set_float32_matmul_precision("highest")


def test_store_search_runs_inside_the_guard(monkeypatch):
    from kvmem.stores.exact import ExactStore

    seen = []
    search = ExactStore._search
    monkeypatch.setattr(ExactStore, "_search", lambda self, *a: seen.append(_precision_state()) or search(self, *a))
    torch.set_float32_matmul_precision("high")
    try:
        user = _precision_state()
        store = kvmem.create("exact", dim=4, value_dim=1)
        store.add(torch.randn(10, 4), torch.zeros(10, 1))
        store.search(torch.randn(2, 4), 3)
        assert seen == [[value for _, _, value in devices._switches()]] and _precision_state() == user
    finally:
        torch.set_float32_matmul_precision("highest")


# ---------------------------------------------------------------------------- table growth
def test_table_growth_keeps_rows_and_zeroes_only_new_slots():
    from kvmem.table import RowTable

    table = RowTable(2, {"keys": ((3,), torch.float32)}, torch.device("cpu"))
    table.reserve(10)
    table.data["keys"].fill_(7)
    table.reserve(table.allocated + 1)
    assert table.allocated >= 1025
    assert (table.data["keys"][:, :1024] == 7).all() and (table.data["keys"][:, 1024:] == 0).all()


# ---------------------------------------------------------------------------- the smoke command
def test_the_cuda_smoke_command_passes_on_the_cpu():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "kvmem.benchmarks.cuda_smoke", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    lines = done.stdout.splitlines()
    checks = [line for line in lines if line.startswith(("PASS", "FAIL"))]
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(checks) == 27 + 10 and all(line.startswith("PASS") for line in checks), done.stdout
    assert lines[-1] == "all checks passed"
