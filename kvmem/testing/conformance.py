"""The conformance suite: what every backend must do, as pytest tests.

A backend's test file is a short subclass::

    from kvmem.testing import StoreConformance

    class TestHNSW(StoreConformance):
        backend = "hnsw"
        exact = False               # check recall instead of exact top-k
        recall_threshold = 0.95
        options = {"ef": 64}

Every test compares the store with :class:`~kvmem.testing.model.BruteForceMemory`.
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import kvmem
from kvmem import persist
from kvmem.testing.bad_inputs import BadInputConformance
from kvmem.testing.checks import check_get, check_search
from kvmem.testing.child import corruptions, load_in_child
from kvmem.testing.model import BruteForceMemory

__all__ = ["StoreConformance", "randn"]

METRICS = ("ip", "l2", "cos")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def native_loaders() -> list[tuple[Any, str, int]]:
    """``(owner, function, index of the path argument)`` through which backends hand saved files to native
    code (or copy them)."""
    import faiss
    import hnswlib
    import lmdb
    import safetensors.torch

    return [(safetensors.torch, "load_file", 0), (faiss, "read_index", 0), (lmdb, "open", 0),
            (shutil, "copyfile", 0), (hnswlib.Index, "load_index", 1)]


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


class StoreConformance(BadInputConformance):
    """Generic tests; subclasses set the class attributes below."""

    backend: ClassVar[str] = "exact"
    exact: ClassVar[bool] = True              # True: exact top-k; False: recall >= recall_threshold
    recall_threshold: ClassVar[float] = 1.0
    full_results_up_to: ClassVar[int] = 0     # approximate backends: partitions of at most this many rows return
    #                                           min(k, rows held) ids (searched exactly, or an index that fills k)
    options: ClassVar[dict[str, Any]] = {}    # backend options for every store of the suite
    needs_path: ClassVar[bool] = False        # create(path=...) (persistent backends)
    device: ClassVar[str | None] = None

    @pytest.fixture
    def make(self, tmp_path: Path):
        """``make(**create_kwargs) -> (store, oracle)``; stores are closed after the test."""
        made: list[kvmem.MemoryStore] = []
        counter = itertools.count()

        def make(dim: int = 8, value_dim: int = 4, partitions: int = 1, metric: str = "ip",
                 dtype: torch.dtype = torch.float32, capacity: int | None = None, **options: Any):
            kwargs: dict[str, Any] = {**self.options, **options}
            if self.needs_path:
                kwargs["path"] = tmp_path / f"store-{next(counter)}"
            store = kvmem.create(self.backend, dim=dim, value_dim=value_dim, partitions=partitions, metric=metric,
                                 dtype=dtype, capacity=capacity, device=self.device, **kwargs)
            made.append(store)
            return store, BruteForceMemory(dim, value_dim, partitions, metric, dtype, capacity)

        yield make
        for store in made:
            store.close()

    def fill(self, store: kvmem.MemoryStore, model: BruteForceMemory, n: int, seed: int = 0) -> torch.Tensor:
        keys = randn(seed, store.partitions, n, store.dim)
        values = randn(seed + 1, store.partitions, n, store.value_dim)
        ids = store.add(keys, values)
        np.testing.assert_array_equal(ids.numpy(), model.add(keys, values))
        return ids

    def check(self, store: kvmem.MemoryStore, model: BruteForceMemory, queries: torch.Tensor, k: int) -> None:
        result = store.search(queries, k)
        hits, wanted = check_search(result, model, queries, k, exact=self.exact)
        if self.exact:
            return
        held = torch.tensor([model.count(p) for p in range(store.partitions)])
        small = held <= self.full_results_up_to                                       # (P,)
        real = (result.ids >= 0).sum(-1)                                              # (P, q)
        assert (real[small] == held.clamp(max=k)[small, None]).all(), (
            f"partitions of at most {self.full_results_up_to} rows return min(k, rows held) ids; "
            f"got {real[small].tolist()} for {held.tolist()} rows held")
        assert hits >= self.recall_threshold * wanted, (
            f"recall {hits}/{wanted} = {hits / max(1, wanted):.3f} < {self.recall_threshold}")

    # ------------------------------------------------------------------ add / search
    def test_ids_are_issued_per_partition_in_insertion_order(self, make):
        store, model = make(partitions=3)
        first = self.fill(store, model, 5)
        second = self.fill(store, model, 3, seed=7)
        assert first.shape == (3, 5) and first.dtype == torch.int64
        assert (first == torch.arange(5)).all() and (second == torch.arange(5, 8)).all()
        assert len(store) == 24 and store.count(1) == 8

    @pytest.mark.parametrize("metric", METRICS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    def test_search_matches_the_oracle(self, make, metric, dtype):
        store, model = make(dim=16, partitions=2, metric=metric, dtype=dtype)
        self.fill(store, model, 300)
        self.check(store, model, randn(99, 2, 20, 16), k=10)

    def test_partitions_only_see_their_own_rows(self, make):
        store, model = make(partitions=3)
        keys = randn(1, 1, 20, 8).expand(3, -1, -1)                 # the same keys everywhere,
        values = torch.arange(3.0)[:, None, None].expand(3, 20, 4)   # values say the partition
        store.add(keys, values)
        res = store.search(keys[:, :5], k=4)
        assert (res.values == torch.arange(3.0)[:, None, None, None]).all()

    def test_k_beyond_the_rows_held_pads(self, make):
        store, model = make(partitions=2)
        self.fill(store, model, 3)
        res = store.search(randn(5, 2, 4, 8), k=6)
        assert (res.ids[..., 3:] == -1).all() and torch.isneginf(res.scores[..., 3:]).all()
        assert (res.keys[..., 3:, :] == 0).all() and (res.values[..., 3:, :] == 0).all()
        self.check(store, model, randn(5, 2, 4, 8), k=6)

    def test_empty_store_returns_only_padding(self, make):
        store, _ = make(partitions=2)
        res = store.search(randn(0, 2, 3, 8), k=4)
        assert (res.ids == -1).all() and torch.isneginf(res.scores).all()

    def test_empty_batches_give_empty_results(self, make):
        store, model = make(partitions=2, dtype=torch.float16)
        self.fill(store, model, 4)
        res = store.search(torch.zeros(2, 0, 8), k=3)
        assert [tuple(t.shape) for t in res] == [(2, 0, 3), (2, 0, 3), (2, 0, 3, 8), (2, 0, 3, 4)]
        assert [t.dtype for t in res] == [torch.float32, torch.int64, torch.float16, torch.float16]
        keys, values = store.get(np.zeros((2, 0), np.int64))
        assert keys.shape == (2, 0, 8) and values.shape == (2, 0, 4) and keys.dtype == torch.float16
        assert store.add(torch.zeros(2, 0, 8), torch.zeros(2, 0, 4)).shape == (2, 0)
        store.remove(np.zeros((2, 0), np.int64))
        assert len(store) == 8

    def test_two_dimensional_input_with_one_partition(self, make):
        store, model = make()
        ids = store.add(randn(0, 10, 8), randn(1, 10, 4))
        model.add(randn(0, 10, 8)[None], randn(1, 10, 4)[None])
        assert ids.shape == (10,)
        res = store.search(randn(2, 3, 8), k=4)
        assert res.scores.shape == (3, 4) and res.keys.shape == (3, 4, 8) and res.values.shape == (3, 4, 4)
        keys, values = store.get(ids[:3])
        assert keys.shape == (3, 8)
        check_get(keys[None], values[None], model, ids[:3].numpy()[None])
        store.remove(ids[:2])
        assert len(store) == 8

    def test_numpy_input_gives_torch_output(self, make):
        store, model = make(partitions=2)
        keys, values = randn(0, 2, 30, 8).numpy().astype(np.float64), randn(1, 2, 30, 4).numpy()
        ids = store.add(keys, values)
        model.add(keys, values)
        assert isinstance(ids, torch.Tensor)
        queries = randn(2, 2, 5, 8).numpy()
        res = store.search(queries, 3)
        assert isinstance(res.scores, torch.Tensor) and res.scores.device.type == "cpu"
        check_search(res, model, torch.from_numpy(queries), 3, exact=self.exact)

    def test_k_of_one_and_half_precision_numpy_input(self, make):
        store, model = make(partitions=2, dtype=torch.float16)
        keys, values = randn(0, 2, 30, 8).numpy().astype(np.float16), randn(1, 2, 30, 4).numpy().astype(np.float16)
        store.add(keys, values)
        model.add(keys, values)
        self.check(store, model, randn(2, 2, 5, 8), k=1)

    # ------------------------------------------------------------------ get / remove / clear
    def test_get_returns_the_stored_rows(self, make):
        store, model = make(partitions=2, dtype=torch.float16)
        self.fill(store, model, 20)
        ids = np.array([[3, -1, 19, 0], [7, 7, -1, 1]])
        keys, values = store.get(ids)
        check_get(keys, values, model, ids)

    def test_removed_rows_are_gone_and_ids_are_never_reused(self, make):
        store, model = make(partitions=2)
        self.fill(store, model, 40)
        gone = np.array([[0, 5, 39, -1, 5], [10, 11, 12, 13, 14]])
        store.remove(gone)
        model.remove(gone)
        assert store.count(0) == 37 and store.count(1) == 35
        self.check(store, model, randn(3, 2, 10, 8), k=40)
        with pytest.raises(kvmem.InvalidInputError, match="removed"):
            store.get(np.array([[5], [0]]))
        assert (self.fill(store, model, 2, seed=5) == torch.tensor([40, 41])).all()
        self.check(store, model, randn(4, 2, 10, 8), k=8)

    def test_clear_some_or_all_partitions(self, make):
        store, model = make(partitions=3)
        self.fill(store, model, 10)
        store.clear([1])
        model.clear([1])
        assert [store.count(p) for p in range(3)] == [10, 0, 10]
        self.check(store, model, randn(3, 3, 4, 8), k=5)
        store.clear(2)                                                  # one partition, named by a bare int
        model.clear([2])
        assert [store.count(p) for p in range(3)] == [10, 0, 0]
        self.check(store, model, randn(3, 3, 4, 8), k=5)
        store.clear()
        model.clear()
        assert len(store) == 0
        assert (self.fill(store, model, 2, seed=9) == torch.tensor([10, 11])).all()
        self.check(store, model, randn(4, 3, 4, 8), k=5)

    # ------------------------------------------------------------------ capacity
    def test_capacity_evicts_the_oldest_rows_first(self, make):
        store, model = make(partitions=2, capacity=10)
        self.fill(store, model, 7)
        self.fill(store, model, 7, seed=3)
        assert store.count(0) == 10 and model.live_ids(0).tolist() == list(range(4, 14))
        with pytest.raises(kvmem.InvalidInputError, match="evicted"):
            store.get(np.array([[3], [3]]))
        self.check(store, model, randn(5, 2, 6, 8), k=10)

    def test_one_add_larger_than_capacity_keeps_its_last_rows(self, make):
        store, model = make(capacity=5)
        ids = self.fill(store, model, 12)
        assert ids.tolist() == [list(range(12))] and len(store) == 5
        check_get(*store.get(np.arange(7, 12)[None]), model, np.arange(7, 12)[None])
        self.check(store, model, randn(5, 1, 3, 8), k=5)

    def test_capacity_counts_rows_held_after_removals(self, make):
        store, model = make(capacity=5)
        self.fill(store, model, 5)
        store.remove(np.array([[1, 3]]))
        model.remove(np.array([[1, 3]]))
        self.fill(store, model, 2, seed=4)      # fits: nothing evicted
        assert model.live_ids(0).tolist() == [0, 2, 4, 5, 6] and len(store) == 5
        self.fill(store, model, 1, seed=6)      # evicts id 0, the oldest held
        assert model.live_ids(0).tolist() == [2, 4, 5, 6, 7]
        self.check(store, model, randn(8, 1, 4, 8), k=5)

    # ------------------------------------------------------------------ persistence
    def _filled_for_save(self, make, **kw):
        store, model = make(partitions=2, dtype=torch.bfloat16, capacity=50, metric="l2", **kw)
        self.fill(store, model, 40)
        gone = np.array([[1, 2], [30, -1]])
        store.remove(gone)
        model.remove(gone)
        self.fill(store, model, 20, seed=3)
        return store, model

    def test_save_then_load_gives_the_same_store(self, make, tmp_path):
        store, model = self._filled_for_save(make)
        store.save(tmp_path / "saved")
        with kvmem.load(tmp_path / "saved") as loaded:
            assert (loaded.backend, loaded.dim, loaded.partitions, loaded.metric, loaded.dtype, loaded.capacity) == \
                   (store.backend, store.dim, store.partitions, store.metric, store.dtype, store.capacity)
            assert [loaded.count(p) for p in range(2)] == [model.count(p) for p in range(2)]
            self.check(loaded, model, randn(7, 2, 8, 8), k=12)
            ids = self.fill(loaded, model, 3, seed=11)
            assert (ids == torch.tensor([60, 61, 62])).all()
            self.check(loaded, model, randn(8, 2, 8, 8), k=12)

    def test_save_then_load_in_a_new_process(self, make, tmp_path):
        store, model = self._filled_for_save(make)
        store.save(tmp_path / "saved")
        queries = randn(5, 4, 8)
        (child,) = load_in_child([tmp_path / "saved"], queries.tolist(), k=6)
        assert child["ok"], child
        here = store.search(queries.expand(2, -1, -1), 6)
        assert child["counts"] == [store.count(p) for p in range(2)]
        if self.exact:
            assert child["ids"] == here.ids.tolist()
        np.testing.assert_allclose(np.array(child["scores"]), here.scores.numpy(), rtol=1e-5, atol=1e-5)

    def test_saving_again_replaces_the_previous_save(self, make, tmp_path):
        store, model = make()
        self.fill(store, model, 10)
        store.save(tmp_path / "saved")
        first = sorted(p.name for p in (tmp_path / "saved").iterdir())
        self.fill(store, model, 5, seed=3)
        store.save(tmp_path / "saved")
        second = sorted(p.name for p in (tmp_path / "saved").iterdir())
        assert len(first) == len(second) and first != second   # new files, old ones gone
        with kvmem.load(tmp_path / "saved") as loaded:
            assert len(loaded) == 15

    def test_save_refuses_a_directory_that_is_not_a_save(self, make, tmp_path):
        store, model = make()
        self.fill(store, model, 3)
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep me")
        with pytest.raises(kvmem.InvalidInputError, match="not empty"):
            store.save(tmp_path / "mine")
        assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"

    def test_checksums_are_verified_before_a_native_loader_sees_a_file(self, make, tmp_path, monkeypatch):
        """Every file of a save that a native loader (safetensors, faiss, hnswlib, LMDB) or a copy reads has
        passed its size and SHA-256 check first."""
        store, _ = self._filled_for_save(make)
        store.save(tmp_path / "saved")
        saved = (tmp_path / "saved").resolve()
        verified: set[Path] = set()
        seen: list[Path] = []
        late: list[str] = []
        check = persist.verify_files

        def verify(path: Path, manifest: dict[str, Any]) -> None:
            check(path, manifest)
            verified.update((Path(path) / e["name"]).resolve() for e in manifest["files"].values())

        def guarded(name: str, real: Any, arg: int = 0) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                file = Path(str(args[arg])).resolve()
                if file.parent == saved:
                    seen.append(file)
                    if file not in verified:
                        late.append(f"{name}({file.name}) before its checksum was verified")
                return real(*args, **kwargs)
            return call

        monkeypatch.setattr(persist, "verify_files", verify)
        for owner, name, arg in native_loaders():
            monkeypatch.setattr(owner, name, guarded(f"{owner.__name__}.{name}", getattr(owner, name), arg))
        with kvmem.load(tmp_path / "saved") as loaded:
            assert len(loaded) == len(store)
        assert seen, "no native loader read the save: the spies are not where the backend loads"
        assert not late, late

    def test_damaged_saves_raise_corrupt_store_error_in_a_child(self, make, tmp_path):
        store, model = make(partitions=2)
        self.fill(store, model, 64)
        store.save(tmp_path / "good")
        manifest = json.loads((tmp_path / "good" / "manifest.json").read_text())
        targets = ["manifest.json"] + [entry["name"] for entry in manifest["files"].values()]
        cases = []
        for name in targets:
            for kind, data in corruptions(tmp_path / "good" / name).items():
                case = tmp_path / f"{kind}-{name}"
                shutil.copytree(tmp_path / "good", case)
                (case / name).write_bytes(data)
                cases.append(case)
        missing = tmp_path / "missing-file"
        shutil.copytree(tmp_path / "good", missing)
        (missing / targets[-1]).unlink()
        results = load_in_child([*cases, missing, tmp_path / "nowhere"])
        assert len(results) == len(cases) + 2
        for case, result in zip([*cases, missing, tmp_path / "nowhere"], results):
            assert result == {**result, "ok": False, "error": "CorruptStoreError"}, (case.name, result)

    # ------------------------------------------------------------------ contract details
    def test_results_go_to_the_queries_device(self, make):
        store, model = make()
        self.fill(store, model, 10)
        res = store.search(randn(1, 2, 8), 3)
        assert all(t.device.type == "cpu" for t in res)
        if torch.cuda.is_available():
            res = store.search(randn(1, 2, 8).cuda(), 3)
            assert all(t.device.type == "cuda" for t in res)

    def test_unknown_search_parameter_is_rejected(self, make):
        store, model = make()
        self.fill(store, model, 10)
        with pytest.raises(kvmem.InvalidInputError, match="no_such_knob"):
            store.search(randn(1, 2, 8), 3, no_such_knob=1)

    def test_a_closed_store_refuses_work(self, make):
        store, model = make()
        with store:
            self.fill(store, model, 3)
        with pytest.raises(kvmem.KvmemError, match="closed"):
            store.search(randn(1, 2, 8), 3)
        store.close()

    def test_concurrent_searches_while_adding_and_removing(self, make):
        store, model = make(partitions=2, dim=16)
        self.fill(store, model, 200)
        errors: list[BaseException] = []
        stop = threading.Event()

        def search(seed: int) -> None:
            try:
                while not stop.is_set():
                    queries = randn(seed, 2, 4, 16)
                    res = store.search(queries, 5)
                    real = res.ids >= 0
                    dots = torch.einsum("pqd,pqkd->pqk", queries, res.keys.float())
                    assert real.sum(-1).min() >= 5
                    torch.testing.assert_close(dots[real], res.scores[real], rtol=1e-4, atol=1e-4)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        readers = [threading.Thread(target=search, args=(s,)) for s in range(3)]
        for t in readers:
            t.start()
        for i in range(20):
            ids = store.add(randn(100 + i, 2, 10, 16), randn(200 + i, 2, 10, 4))
            store.remove(ids[:, :5])
        stop.set()
        for t in readers:
            t.join()
        assert not errors, errors[0]
        assert store.count(0) == 300
