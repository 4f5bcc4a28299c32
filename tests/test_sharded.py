"""The ``sharded`` backend over real gloo process groups of 2 and 4 processes on this machine.

Each world size is one launch (process start-up is the cost): every rank runs
``tests/sharded_ranks.py`` with the checks below in order, the driver asserting,
the others serving; each test here reads one check's outcome.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import kvmem
from kvmem.stores import sharded
from kvmem.stores.sharded import ShardedStore
from kvmem.stores.sharded.launch import launch
from kvmem.stores.sharded.wire import message_device_type

HERE = Path(__file__).parent
FOUR = ["exact_identical", "exact_capacity_and_clear", "bad_input_changes_no_shard", "ivf_recall", "hnsw_recall",
        "save_then_load", "memory_attention", "lost_rank"]                           # lost_rank ends the group
TWO = ["exact_identical_each_metric", "one_partition_two_dimensional", "mismatched_create_is_refused",
       "load_on_another_world_size", "damaged_shard_is_refused_on_every_rank", "stores_interleaved",
       "refused_on_a_serving_rank", "hf_attach",
       "fuzz_store_calls"]

pytestmark = pytest.mark.timeout(300)


def _run(out: Path, world: int, checks: list[str]) -> dict:
    finished = launch([str(HERE / "sharded_ranks.py"), str(out), *checks], world, timeout=240, logs=out / "logs")
    results = {}
    for f in finished:
        file = out / f"rank-{f.rank}.json"
        results[f.rank] = {"returncode": f.returncode, "output": f.output[-4000:],
                           "checks": json.loads(file.read_text()) if file.exists() else {}}
    return results


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "world-4"
    out.mkdir()
    return _run(out, 4, FOUR)


@pytest.fixture(scope="module")
def two(four, tmp_path_factory):
    out = Path(tmp_path_factory.getbasetemp()) / "sharded0" / "world-2"    # beside world-4: loads its save
    out.mkdir(parents=True, exist_ok=True)
    return _run(out, 2, TWO)


def _outcome(results: dict, rank: int, name: str) -> dict:
    got = results[rank]["checks"].get(name)
    assert got is not None, f"rank {rank} never finished {name}:\n{results[rank]['output']}"
    assert got["ok"], f"rank {rank}, {name}:\n{got['error']}"
    return got["data"]


@pytest.mark.parametrize("name", [n for n in FOUR if n != "lost_rank"])
def test_four_ranks(four, name):
    for rank in range(4):
        _outcome(four, rank, name)


@pytest.mark.parametrize("name", TWO)
def test_two_ranks(two, name):
    for rank in range(2):
        _outcome(two, rank, name)


def test_shards_stay_balanced_under_eviction_removal_and_clear(four):
    counts = _outcome(four, 0, "exact_capacity_and_clear")["shard_counts"]
    assert sum(counts) == 50 + 2 + 50 and max(counts) - min(counts) <= 3, counts   # partition 1 cleared, then 2 rows


def test_ann_shards_meet_the_recall_threshold(four):
    assert _outcome(four, 0, "ivf_recall")["recall"] >= 0.9
    assert _outcome(four, 0, "hnsw_recall")["recall"] >= 0.9


def test_a_save_is_one_manifest_and_a_shard_per_rank(four):
    files = _outcome(four, 0, "save_then_load")["files"]
    assert files[0] == "manifest.json" and len(files) == 5, files          # older shards were replaced
    assert sorted(f.split(".")[0] for f in files[1:]) == [f"shard-{r}" for r in range(4)]


def test_a_killed_rank_is_named_within_the_timeout_and_the_living_keep_their_rows(four):
    driver = _outcome(four, 0, "lost_rank")
    assert "serving rank 2 is lost" in driver["error"] and driver["seconds"] < 5.0 + 2.0, driver
    assert "refuses further work" in driver["after"]
    assert "refuses further work" in driver["other"] and driver["other_seconds"] < 1.0, driver   # same group
    assert driver["driver_held"] == driver["held_before"][0]
    for rank in (1, 3):     # their serve() raised: told by the driver, or seeing a connection drop
        served = _outcome(four, rank, "lost_rank")
        assert "rank 2" in served["error"] or "lost its connection" in served["error"], served
        assert served["held"] == driver["held_before"][rank], served
        assert four[rank]["returncode"] == 0
    assert four[2]["returncode"] == -9


def test_a_sharded_fuzz_call_succeeds_or_is_refused_and_changes_nothing(two):
    from kvmem.testing.fuzz import TALLY

    tally = _outcome(two, 0, "fuzz_store_calls")["tally"]
    TALLY["sharded"].update(tally)                      # printed with the other backends' at the end of the run
    assert tally.get("escapes", 0) == 0 and tally["errors"] > 0 and tally["accepted"] > 0, tally


def test_hf_attach_makes_a_sharded_store_per_layer_with_rows_on_every_rank(two):
    counts = _outcome(two, 0, "hf_attach")["shard_counts"]
    assert sorted(counts) == ["0", "1"] and all(min(c) > 0 for c in counts.values()), counts


@pytest.mark.parametrize("backend, device", [("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("nccl", "cuda"),
                                             ("cuda:nccl", "cuda"), ("mpi", "cpu"), ("GLOO", "cpu")])
def test_messages_travel_on_the_device_the_group_moves(backend, device):
    assert message_device_type(backend) == device       # nccl itself runs only where a GPU is (untested here)


def test_a_cpu_only_inner_backend_refuses_a_cuda_device_before_any_communication():
    options = {**ShardedStore.defaults, "inner": "hnsw"}
    ShardedStore.check_options(options, torch.device("cpu"))
    with pytest.raises(kvmem.InvalidInputError, match=r"inner='hnsw' lives on \['cpu'\]; got device cuda:0"):
        ShardedStore.check_options(options, torch.device("cuda", 0))      # no CUDA call: checked by name


def test_without_a_process_group_create_says_what_to_do():
    with pytest.raises(kvmem.InvalidInputError, match="init_process_group"):
        kvmem.create("sharded", dim=8)
    for call in (sharded.serve, sharded.release):
        with pytest.raises(kvmem.InvalidInputError, match="process group"):
            call()


@pytest.mark.parametrize("options, message", [
    ({"inner": "sharded"}, "another backend"),
    ({"inner": "nope"}, "backend must be one of"),
    ({"inner": "lmdb"}, "in-RAM backend"),
    ({"inner_options": {"nprobe": 4}}, "got 'nprobe' in inner_options"),
    ({"inner": "ivf", "inner_options": {"nlist": 0}}, "nlist"),
    ({"driver": -1}, "driver must be a rank"),
    ({"timeout": 0}, "timeout must be a positive"),
])
def test_bad_options_raise_before_any_communication(options, message):
    with pytest.raises(kvmem.InvalidInputError, match=message):
        kvmem.create("sharded", dim=8, **options)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
