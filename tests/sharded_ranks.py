"""One rank of the sharded-store tests: ``python tests/sharded_ranks.py OUT_DIR CHECK...`` under torchrun's env.

Every rank runs the same checks in order (these, and those of ``sharded_serving.py``;
see ``sharded_support.py``). Each rank writes ``OUT_DIR/rank-<r>.json``: per
check, ``ok``, the seconds it took, and the error (a traceback) or data.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import traceback

import numpy as np
import sharded_serving  # noqa: F401 - registers its checks
import torch
import torch.distributed as dist
from sharded_support import CHECKS, DRIVER, OUT, RANK, add_all, check, loaded, refused, same, sharded, twins

import kvmem
from kvmem.testing import BruteForceMemory, check_get, check_search, randn, snapshot
from kvmem.testing.bad_inputs import BAD_CALLS

# ---------------------------------------------------------------------- checks
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@check
def exact_identical(data):
    _identical([(metric, dtype) for metric in ("ip", "l2", "cos") for dtype in DTYPES])


@check
def exact_identical_each_metric(data):
    _identical(list(zip(("ip", "l2", "cos"), DTYPES)))   # every metric and dtype once: the grid runs on 4 ranks


def _identical(cases):
    for metric, dtype in cases:
        store, local, model = twins(dim=16, value_dim=4, partitions=2, metric=metric, dtype=dtype)
        if store is None:
            continue
        with store, local:
            add_all((store, local), model, randn(1, 2, 300, 16), randn(2, 2, 300, 4))
            add_all((store, local), model, randn(3, 2, 7, 16), randn(4, 2, 7, 4))
            gone = np.array([[0, 5, 299, -1], [10, 11, 12, 13]])
            store.remove(gone), local.remove(gone), model.remove(gone)
            same(store, local, model, randn(5, 2, 20, 16), 10)
            same(store, local, model, randn(6, 2, 3, 16), 400)          # k past the rows held: padding
            ids = np.array([[3, -1, 306, 1], [7, 7, -1, 300]])
            check_get(*store.get(ids), model, ids)


@check
def exact_capacity_and_clear(data):
    store, local, model = twins(dim=8, value_dim=4, partitions=3, dtype=torch.float32, capacity=50)
    if store is None:
        return
    with store, local:
        for seed, n in ((0, 30), (1, 30), (2, 70), (3, 5)):                       # 70: one add past capacity
            add_all((store, local), model, randn(seed, 3, n, 8), randn(seed + 9, 3, n, 4))
            same(store, local, model, randn(seed + 20, 3, 6, 8), 12)
        gone = np.array([[130, 131, -1], [120, 133, 134], [-1, -1, -1]])
        store.remove(gone), local.remove(gone), model.remove(gone)
        add_all((store, local), model, randn(4, 3, 4, 8), randn(5, 3, 4, 4))
        same(store, local, model, randn(30, 3, 6, 8), 50)
        store.clear([1]), local.clear([1]), model.clear([1])
        ids = add_all((store, local), model, randn(6, 3, 2, 8), randn(7, 3, 2, 4))
        assert ids[1].tolist() == [139, 140]
        same(store, local, model, randn(31, 3, 6, 8), 5)
        data["shard_counts"] = store.shard_counts()


@check
def one_partition_two_dimensional(data):
    store, local, model = twins(dim=8, value_dim=4, dtype=torch.bfloat16)
    if store is None:
        return
    with store, local:
        ids = store.add(randn(0, 10, 8), randn(1, 10, 4))
        local.add(randn(0, 10, 8), randn(1, 10, 4))
        assert ids.shape == (10,) and ids.tolist() == list(range(10))
        a, b = store.search(randn(2, 3, 8), 4), local.search(randn(2, 3, 8), 4)
        assert a.scores.shape == (3, 4) and all(torch.equal(x, y) for x, y in zip(a, b))
        keys, values = store.get(ids[:3])
        assert torch.equal(keys, local.get(ids[:3])[0]) and torch.equal(values, local.get(ids[:3])[1])


@check
def bad_input_changes_no_shard(data):
    store = sharded(dim=8, value_dim=4, partitions=2, dtype=torch.float16, capacity=30)
    if store is None:
        return
    with store:
        store.add(randn(0, 2, 40, 8), randn(1, 2, 40, 4))
        store.remove(np.array([[12], [-1]]))
        queries = randn(2, 2, 6, 8)
        before, shards = snapshot(store, queries), store.shard_counts()    # what every refused call must keep
        for name, call, message in BAD_CALLS:
            try:
                call(store)
            except kvmem.InvalidInputError as exc:
                assert re.search(message, str(exc)), f"{name}: {exc!r} does not match {message!r}"
            else:
                raise AssertionError(f"{name} did not raise")
            after = snapshot(store, queries)
            for key in before:
                same_value = torch.equal(before[key], after[key]) if isinstance(before[key], torch.Tensor) \
                    else np.array_equal(before[key], after[key])
                assert same_value, f"{name} changed {key}"
            assert store.shard_counts() == shards, f"{name} changed a shard"
        data["bad_calls"] = len(BAD_CALLS)


def _recall(inner, inner_options, threshold, data):
    store = sharded(dim=16, value_dim=4, partitions=2, dtype=torch.float32, inner=inner, inner_options=inner_options)
    if store is None:
        return
    with store:
        model = BruteForceMemory(16, 4, 2, "ip", torch.float32)
        for seed in range(2):
            keys, values = randn(seed, 2, 1000, 16), randn(seed + 50, 2, 1000, 4)
            store.add(keys, values)
            model.add(keys, values)
        queries = randn(99, 2, 40, 16)
        hits, wanted = check_search(store.search(queries, 10), model, queries, 10, exact=False)
        data["recall"] = hits / wanted
        assert not store.exact and hits / wanted >= threshold, f"recall {hits / wanted:.3f} < {threshold}"


@check
def ivf_recall(data):
    _recall("ivf", {"train_size": 256, "target_recall": 0.95}, 0.9, data)


@check
def hnsw_recall(data):
    _recall("hnsw", {"target_recall": 0.95}, 0.9, data)


@check
def save_then_load(data):
    path = OUT / "saved"
    queries = randn(9, 2, 8, 8)
    store, local, model = twins(dim=8, value_dim=4, partitions=2, dtype=torch.bfloat16, capacity=50, metric="l2")
    if store is not None:
        with store:
            add_all((store, local), model, randn(0, 2, 40, 8), randn(1, 2, 40, 4))
            gone = np.array([[1, 2], [30, -1]])
            store.remove(gone), local.remove(gone), model.remove(gone)
            add_all((store, local), model, randn(3, 2, 20, 8), randn(4, 2, 20, 4))
            store.save(path)
            store.save(path)                                              # a second save replaces the first
            before = store.search(queries, 12)
    store = loaded(path)
    if store is not None:
        with store, local:
            after = store.search(queries, 12)
            assert all(torch.equal(x, y) for x, y in zip(before, after)), "loaded store answers differently"
            add_all((store, local), model, randn(5, 2, 3, 8), randn(6, 2, 3, 4))
            same(store, local, model, randn(10, 2, 8, 8), 12)
            data["files"] = sorted(p.name for p in path.iterdir())


@check
def memory_attention(data):
    from kvmem.adapters import MemoryAttention, RotaryEmbedding

    store, local, _ = twins(dim=16, value_dim=16, partitions=2, dtype=torch.float32)
    if store is None:
        return
    with store, local:
        torch.manual_seed(0)
        rope = RotaryEmbedding(16)
        attn = [MemoryAttention(s, num_heads=4, k=8, positions="first", rope=rope) for s in (store, local)]
        for chunk in range(3):
            q, kk, v = randn(chunk, 1, 4, 32, 16), randn(chunk + 10, 1, 2, 32, 16), randn(chunk + 20, 1, 2, 32, 16)
            out = [a(q, kk, v) for a in attn]
            assert torch.equal(out[0], out[1]), f"chunk {chunk}: {(out[0] - out[1]).abs().max()}"
        assert len(store) == len(local) == 2 * 96


@check
def mismatched_create_is_refused(data):
    refused(lambda: kvmem.create("sharded", dim=8 if DRIVER else 9), "same arguments", "rank 1")


@check
def load_on_another_world_size(data):
    refused(lambda: kvmem.load(OUT.parent / "world-4" / "saved"), "holds 4 shards", "load it on 4 ranks")


@check
def damaged_shard_is_refused_on_every_rank(data):
    path = OUT / "damaged"
    store = sharded(dim=8, value_dim=4, partitions=2, dtype=torch.float32)
    if store is not None:
        with store:
            store.add(randn(0, 2, 50, 8), randn(1, 2, 50, 4))
            store.save(path)
            rows = next(next(path.glob("shard-1.*")).glob("rows.*"))   # damaged before the ranks load
            rows.write_bytes(rows.read_bytes()[:-64] + bytes(64))
    refused(lambda: kvmem.load(path), "rank 1", "SHA-256", kind=kvmem.CorruptStoreError)


@check
def lost_rank(data):
    pids = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    store = kvmem.create("sharded", dim=8, value_dim=4, partitions=2, dtype=torch.float32, timeout=5.0)
    other = kvmem.create("sharded", dim=4, dtype=torch.float32, timeout=5.0)     # a second store on the group
    if not DRIVER:
        held = None
        try:
            store.serve()                                                         # answers other's calls too
        except kvmem.KvmemError as exc:
            data["error"] = str(exc)
            held = len(store._shard.inner)
        data["held"] = held
        return
    store.add(randn(0, 2, 400, 8), randn(1, 2, 400, 4))
    other.add(randn(5, 40, 4), randn(6, 40, 4))
    data["held_before"] = store.shard_counts()
    os.kill(pids[2], signal.SIGKILL)
    time.sleep(0.2)
    start = time.monotonic()
    try:
        store.search(randn(2, 2, 4, 8), 5)
    except kvmem.KvmemError as exc:
        data["seconds"] = time.monotonic() - start
        data["error"] = str(exc)
    else:
        raise AssertionError("a search with rank 2 killed did not raise")
    data["driver_held"] = len(store._shard.inner)
    try:
        store.add(randn(3, 2, 4, 8), randn(4, 2, 4, 4))
    except kvmem.KvmemError as exc:
        data["after"] = str(exc)
    start = time.monotonic()
    try:
        other.search(randn(7, 2, 4), 3)               # the group is broken: refused at once, not after a timeout
    except kvmem.KvmemError as exc:
        data["other"], data["other_seconds"] = str(exc), time.monotonic() - start
    store.close(), other.close()


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {}
    for name in sys.argv[2:]:
        data, start = {}, time.monotonic()
        try:
            CHECKS[name](data)
            results[name] = {"ok": True, "data": data}
        except BaseException:  # noqa: BLE001 - reported to the test
            results[name] = {"ok": False, "error": traceback.format_exc(), "data": data}
        results[name]["seconds"] = time.monotonic() - start
        (OUT / f"rank-{RANK}.json").write_text(json.dumps(results))
    if "lost_rank" not in sys.argv[2:]:       # a group with a dead rank is left to the process exit
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
