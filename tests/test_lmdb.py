"""The lmdb backend: conformance, the state machine, and what only a store kept on disk must do."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import lmdb
import numpy as np
import pytest
import torch

import kvmem
from kvmem.stores._lmdb_env import SharedEnv
from kvmem.stores._lmdb_format import block_key
from kvmem.testing import BruteForceMemory, StoreConformance, check_search, randn, snapshot, store_machine
from kvmem.testing.child import corruptions, load_in_child, run_child


class TestLMDB(StoreConformance):
    backend = "lmdb"
    needs_path = True


class TestLMDBSmallBlocks(StoreConformance):
    """Blocks of 16 rows: every add, removal and search crosses block boundaries."""

    backend = "lmdb"
    needs_path = True
    options = {"block_rows": 16}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestLMDBCuda(StoreConformance):
    """Rows on disk, search on the GPU: blocks are copied to the device as they stream."""

    backend = "lmdb"
    needs_path = True
    device = "cuda"


TestLMDBMachine = store_machine("lmdb", needs_path=True).TestCase
TestLMDBSmallBlocksMachine = store_machine("lmdb", needs_path=True, options={"block_rows": 16}).TestCase


def _filled(path, n=100, partitions=2, **options):
    """A store at ``path`` with ``n`` rows per partition (some removed, one partition cleared), and its oracle."""
    kw = {"dim": 8, "value_dim": 4, "partitions": partitions, "metric": "l2", "dtype": torch.bfloat16,
          "capacity": 90, "block_rows": 16, **options}
    store = kvmem.create("lmdb", path=path, **kw)
    model = BruteForceMemory(8, 4, partitions, "l2", kw["dtype"], kw["capacity"])
    for seed in range(0, n, 25):
        keys, values = randn(seed, partitions, 25, 8), randn(seed + 1000, partitions, 25, 4)
        store.add(keys, values)
        model.add(keys, values)
    if n >= 90:
        gone = np.array([[70, 71, 89]] + [[-1, -1, -1]] * (partitions - 1))
        store.remove(gone)
        model.remove(gone)
    return store, model


# ---------------------------------------------------------------------------- kept in place
def test_a_store_reopens_in_place_with_everything_committed(tmp_path):
    store, model = _filled(tmp_path / "mem")
    store.clear([1])
    model.clear([1])
    store.close()
    with kvmem.load(tmp_path / "mem") as again:
        assert (again.metric, again.dtype, again.capacity, again.partitions) == ("l2", torch.bfloat16, 90, 2)
        assert again.options["block_rows"] == 16 and again.persistent
        assert [again.count(p) for p in range(2)] == [model.count(0), model.count(1)]
        check_search(again.search(randn(5, 2, 6, 8), 12), model, randn(5, 2, 6, 8), 12, exact=True)
        ids = again.add(randn(7, 2, 3, 8), randn(8, 2, 3, 4))
        model.add(randn(7, 2, 3, 8), randn(8, 2, 3, 4))
        assert ids.tolist() == [[100, 101, 102]] * 2                       # numbering goes on after reopening
    with kvmem.load(tmp_path / "mem") as third:
        check_search(third.search(randn(9, 2, 6, 8), 40), model, randn(9, 2, 6, 8), 40, exact=True)


def test_rows_come_back_byte_identical(tmp_path):
    store, model = _filled(tmp_path / "mem", dtype=torch.float16)
    live = [model.live_ids(p) for p in range(2)]
    ids = torch.full((2, 90), -1)
    for p, row in enumerate(live):
        ids[p, :len(row)] = torch.from_numpy(row)
    keys, values = store.get(ids)
    store.close()
    with kvmem.load(tmp_path / "mem") as again:
        keys2, values2 = again.get(ids)
    assert keys.view(torch.int16).equal(keys2.view(torch.int16)) and values.view(torch.int16).equal(
        values2.view(torch.int16))


def test_create_needs_a_new_or_empty_directory(tmp_path):
    with pytest.raises(kvmem.InvalidInputError, match="path=DIR"):
        kvmem.create("lmdb", dim=4)
    store, _ = _filled(tmp_path / "mem", n=25)
    store.close()
    with pytest.raises(kvmem.InvalidInputError, match="holds an lmdb store: open it with kvmem.load"):
        kvmem.create("lmdb", dim=4, path=tmp_path / "mem")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(kvmem.InvalidInputError, match="new or empty directory"):
        kvmem.create("lmdb", dim=4, path=tmp_path / "notes")
    assert os.listdir(tmp_path / "notes") == ["keep.txt"]


@pytest.mark.parametrize("option, value, message", [
    ("block_rows", 100, "multiple of 16"), ("index", "flat", "index must be one of"),
    ("map_size", 10, "map_size must be an int >= 1048576"), ("max_map_size", 1 << 20, "max_map_size"),
    ("ranking", "int8", "ranking"),
])
def test_bad_options_are_named(tmp_path, option, value, message):
    with pytest.raises(kvmem.InvalidInputError, match=message):
        kvmem.create("lmdb", dim=4, path=tmp_path / "mem", **{option: value})
    assert not (tmp_path / "mem").exists()


def test_two_stores_on_one_directory_share_it(tmp_path):
    """LMDB forbids opening an environment twice in a process; the stores share one and each sees the other's rows."""
    store, model = _filled(tmp_path / "mem")
    other = kvmem.load(tmp_path / "mem")
    store.add(randn(1, 2, 5, 8), randn(2, 2, 5, 4))
    model.add(randn(1, 2, 5, 8), randn(2, 2, 5, 4))
    assert len(other) == model.count()
    check_search(other.search(randn(3, 2, 4, 8), 10), model, randn(3, 2, 4, 8), 10, exact=True)
    other.close()
    assert len(store) == model.count()                                    # closing one leaves the other open
    store.close()


# ---------------------------------------------------------------------------- map and disk
@pytest.mark.parametrize("ahead", [True, False], ids=["grown-ahead", "grown-on-map-full"])
def test_the_map_grows_by_itself(tmp_path, monkeypatch, ahead):
    if not ahead:                                    # no growth before a write: every growth is a MapFullError retry
        monkeypatch.setattr(SharedEnv, "reserve", lambda self, size_hint, ceiling: None)
    store = kvmem.create("lmdb", dim=64, path=tmp_path / "mem", map_size=1 << 20, block_rows=64)
    store.add(randn(0, 20000, 64), randn(1, 20000, 64))                 # ~5 MB into a 1 MB map
    for seed in range(2, 40):
        store.add(randn(seed, 100, 64), randn(seed, 100, 64))
    assert store._shared.map_size() >= 8 << 20 and len(store) == 23800
    store.close()
    with kvmem.load(tmp_path / "mem") as again:
        assert len(again) == 23800


def test_a_full_map_raises_store_full_and_writes_nothing(tmp_path):
    store = kvmem.create("lmdb", dim=64, path=tmp_path / "mem", map_size=1 << 20, max_map_size=2 << 20,
                         block_rows=64)
    queries = randn(9, 3, 64)
    with pytest.raises(kvmem.StoreFullError, match="max_map_size"):
        for seed in range(1000):
            before = snapshot(store, queries)
            store.add(randn(seed, 300, 64), randn(seed + 1, 300, 64))
    after = snapshot(store, queries)
    for key, value in before.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(after[key]), err_msg=key)
    store.add(randn(5, 2, 64), randn(5, 2, 64))                          # a small add still fits
    count = len(store)
    store.close()
    with kvmem.load(tmp_path / "mem") as again:
        assert len(again) == count == before["len"] + 2


def test_a_full_disk_raises_store_full_and_writes_nothing(tmp_path):
    """The child may write 3 MB of file (RLIMIT_FSIZE: the kernel answers EFBIG, as a full disk does)."""
    out = run_child(f"""
        import json, resource, signal, torch, kvmem
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = kvmem.create("lmdb", dim=64, path={str(tmp_path / "mem")!r}, block_rows=64)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))
        committed, error = 0, None
        for seed in range(1000):
            g = torch.Generator().manual_seed(seed)
            try:
                store.add(torch.randn(200, 64, generator=g), torch.randn(200, 64, generator=g))
                committed += 200
            except kvmem.StoreFullError as exc:
                error = str(exc)
                break
        print(json.dumps({{"committed": committed, "count": len(store), "error": error}}))
    """)
    result = json.loads(out)
    assert result["error"] and "disk full" in result["error"] and result["count"] == result["committed"] > 0
    with kvmem.load(tmp_path / "mem") as again:
        assert len(again) == result["committed"]
        keys, _ = again.get(torch.arange(200))
        g = torch.Generator().manual_seed(0)
        assert torch.equal(keys, torch.randn(200, 64, generator=g).half())


# ---------------------------------------------------------------------------- processes
def _writer(path, batches, pause):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, torch, kvmem
        store = kvmem.load({str(path)!r})
        for b in range({batches}):
            g = torch.Generator().manual_seed(b)
            store.add(torch.randn(2, 50, 8, generator=g), torch.randn(2, 50, 4, generator=g))
            print(b, flush=True)
            time.sleep({pause})
    """)], stdout=subprocess.PIPE, text=True)


def test_a_second_process_reads_while_the_first_writes(tmp_path):
    kvmem.create("lmdb", path=tmp_path / "mem", dim=8, value_dim=4, partitions=2, block_rows=32).close()
    writer = _writer(tmp_path / "mem", batches=40, pause=0.01)
    seen = []
    deadline = time.monotonic() + 120
    with kvmem.load(tmp_path / "mem") as reader:
        while time.monotonic() < deadline and (not seen or seen[-1] < 4000):
            n = len(reader)
            assert n % 100 == 0, f"a reader saw {n} rows: half a batch"
            if n:
                top = int(reader.search(randn(0, 2, 3, 8), 5).ids.max())
                assert top < len(reader) // 2                              # a row it found is a row it holds
                last = n // 100 - 1                                        # the newest batch, row for row
                g = torch.Generator().manual_seed(last)
                keys, _ = reader.get(torch.arange(last * 50, last * 50 + 50).expand(2, -1))
                assert torch.equal(keys, torch.randn(2, 50, 8, generator=g).half())
            seen.append(n)
    assert writer.wait(60) == 0
    assert seen == sorted(seen) and seen[-1] == 4000 and len(set(seen)) > 3, seen


def test_stale_reader_slots_are_cleared_on_open(tmp_path):
    _filled(tmp_path / "mem")[0].close()
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, kvmem
        store = kvmem.load({str(tmp_path / "mem")!r})
        with store._shared.begin():                 # a read transaction holds a reader slot
            print("reading", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "reading"
    child.send_signal(signal.SIGKILL)
    child.wait()
    with kvmem.load(tmp_path / "mem") as store:
        assert str(child.pid) not in store._shared.env.readers()


def test_a_store_used_after_fork_raises(tmp_path):
    store, model = _filled(tmp_path / "mem")
    pid = os.fork()
    if pid == 0:                                     # the child: every call must refuse, clearly
        code = 1
        try:
            store.count()
        except kvmem.KvmemError as exc:
            code = 0 if "fork" in str(exc) and "kvmem.load" in str(exc) else 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(store) == model.count()               # the parent's store is untouched
    store.close()


# ---------------------------------------------------------------------------- damaged files
def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x04
    return bytes(out)


def _in_leaf_page(data: bytes, key: bytes, page: int = 4096) -> int:
    """Where ``key`` sits in a B-tree leaf page of an LMDB file (not in stale bytes elsewhere)."""
    for start in range(0, len(data), page):
        if int.from_bytes(data[start + 10:start + 12], "little") & 0x02:     # mp_flags: P_LEAF
            at = data.find(key, start, start + page)
            if at >= 0:
                return at
    raise AssertionError("key not found in any leaf page")


def test_damaged_files_raise_corrupt_store_error_in_a_child(tmp_path):
    """Every kind of damage to data.mdb gives CorruptStoreError, in a child process that must not die of a signal.

    The store is a compacted copy, so every page is live and the middle of the
    file is data; the flips below land in a block's keys, ids and values, in
    the state record, and in the B-tree of the blocks.
    """
    store, _ = _filled(tmp_path / "src", n=4000, partitions=1, capacity=None, block_rows=64)
    (tmp_path / "good").mkdir()
    store._shared.env.copy(str(tmp_path / "good"), compact=True)
    spans = store._layout.spans(64)
    store.close()
    data = (tmp_path / "good" / "data.mdb").read_bytes()
    block = data.index(b"KVMB")                                       # block (0, 0): the first in a compacted file
    damaged = dict(corruptions(tmp_path / "good" / "data.mdb"))       # its bitflip lands inside a block's columns
    damaged.update({f"flip-{name}": _flip(data, block + start + 5) for name, (start, _) in spans.items()})
    damaged.update({
        "flip-state": _flip(data, data.index(b"next_ids") + 10),
        "flip-block-key": _flip(data, _in_leaf_page(data, block_key(0, 3)) + 11),     # (0, 3) -> (0, 7)
        "truncated-by-80-pages": data[:-4096 * 80], "three-pages-short": data[:-4096 * 3],
        "meta-page-only": data[:4096],
    })
    foreign = lmdb.open(str(tmp_path / "foreign-lmdb"))
    with foreign.begin(write=True) as txn:
        txn.put(b"meta", b"not a kvmem store")
    foreign.close()
    cases = [tmp_path / "foreign-lmdb"]
    for kind, raw in damaged.items():
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "data.mdb").write_bytes(raw)
        cases.append(tmp_path / kind)
    results = load_in_child(cases, [[0.5] * 8], k=3)
    assert len(results) == len(cases)
    for case, result in zip(cases, results):
        assert result.get("error") == "CorruptStoreError", (case.name, result)
    (good,) = load_in_child([tmp_path / "good"])
    assert good["ok"] and good["count"] == 3997


def test_a_killed_writer_loses_nothing_it_committed(tmp_path):
    kvmem.create("lmdb", path=tmp_path / "mem", dim=8, value_dim=4, partitions=2, block_rows=32).close()
    writer = _writer(tmp_path / "mem", batches=10_000, pause=0)
    acked = -1
    deadline = time.monotonic() + 60
    while acked < 30 and time.monotonic() < deadline:
        acked = int(writer.stdout.readline())
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    shutil.copytree(tmp_path / "mem", tmp_path / "copy")              # what the disk held at the kill
    with kvmem.load(tmp_path / "copy") as store:
        assert len(store) % 100 == 0 and len(store) >= (acked + 1) * 100


def test_kvmem_info_describes_a_store_directory(tmp_path):
    store, model = _filled(tmp_path / "mem")
    out = subprocess.run([sys.executable, "-m", "kvmem.cli", "info", "--json", str(tmp_path / "mem")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (info["backend"], info["dim"], info["dtype"], info["metric"], info["capacity"]) == \
           ("lmdb", 8, "bfloat16", "l2", 90)
    assert info["counts"] == [model.count(0), model.count(1)] and info["options"]["block_rows"] == 16
    assert info["bytes_on_disk"] >= (tmp_path / "mem" / "data.mdb").stat().st_size
    store.close()
    (tmp_path / "mem" / "data.mdb").write_bytes(b"\0" * 8192)
    out = subprocess.run([sys.executable, "-m", "kvmem.cli", "info", str(tmp_path / "mem")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "CorruptStoreError" in out.stderr


class TestLMDBWithHNSW(StoreConformance):
    backend = "lmdb"
    needs_path = True
    exact = False
    recall_threshold = 0.9
    options = {"index": "hnsw", "block_rows": 32}
    full_results_up_to = 10**9


class TestLMDBWithIVF(StoreConformance):
    """nlist=4: partitions train at 156 rows, so most tests search through a trained index."""

    backend = "lmdb"
    needs_path = True
    exact = False
    recall_threshold = 0.9
    options = {"index": "ivf", "nlist": 4, "nprobe": 4, "block_rows": 32}
    full_results_up_to = 10**9          # every list probed


TestLMDBHNSWMachine = store_machine("lmdb", needs_path=True, exact=False, recall_threshold=0.9,
                                    options={"index": "hnsw", "block_rows": 16}).TestCase


# ---------------------------------------------------------------------------- the index beside the data
def _indexed(path, kind="hnsw", n=600):
    store = kvmem.create("lmdb", path=path, dim=8, value_dim=4, partitions=2, index=kind, nlist=4, block_rows=64)
    model = BruteForceMemory(8, 4, 2, "ip", torch.float16)
    for seed in range(0, n, 100):
        keys, values = randn(seed, 2, 100, 8), randn(seed + 1, 2, 100, 4)
        store.add(keys, values)
        model.add(keys, values)
    return store, model


def _recall(store, model, k=10):
    queries = randn(77, 2, 20, 8)
    hits, wanted = check_search(store.search(queries, k), model, queries, k, exact=False)
    return hits / wanted


def _no_rebuild(monkeypatch):
    from kvmem.stores._lmdb_index import AnnIndex

    monkeypatch.setattr(AnnIndex, "rebuild", lambda *a: pytest.fail("the index was rebuilt"))


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_the_index_is_kept_beside_the_data_and_loaded_without_a_rebuild(tmp_path, monkeypatch, kind):
    store, model = _indexed(tmp_path / "mem", kind)
    store.close()
    manifest = json.loads((tmp_path / "mem" / "index.json").read_text())
    assert manifest["kind"] == kind and len(manifest["parts"]) == 2
    _no_rebuild(monkeypatch)
    with kvmem.load(tmp_path / "mem") as again:
        assert again._index.changed == 0 and not again.exact and again.search_params == {again._index.param}
        assert _recall(again, model) >= 0.95


def test_a_stale_index_is_caught_up_from_lmdb(tmp_path, monkeypatch):
    """The writer dies (here: its directory is copied) after rows and removals it never wrote
    into the index files: the next open adds and removes just those."""
    store, model = _indexed(tmp_path / "mem")
    store.close()
    store = kvmem.load(tmp_path / "mem")
    keys, values = randn(5, 2, 50, 8), randn(6, 2, 50, 4)
    store.add(keys, values)
    model.add(keys, values)
    gone = np.array([[3, 620], [-1, 7]])
    store.remove(gone)
    model.remove(gone)
    shutil.copytree(tmp_path / "mem", tmp_path / "crashed")               # the disk as a kill would leave it
    store.close()
    _no_rebuild(monkeypatch)
    with kvmem.load(tmp_path / "crashed") as again:
        assert again._index.parts[0].live == model.count(0) and again._index.parts[1].live == model.count(1)
        assert _recall(again, model) >= 0.95


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "other-kind", "manifest"])
def test_a_missing_or_damaged_index_is_rebuilt_from_lmdb(tmp_path, damage):
    store, model = _indexed(tmp_path / "mem")
    store.close()
    directory = tmp_path / "mem"
    graph = next(directory.glob("index.*.p0.hnsw"))
    if damage == "missing":
        for file in directory.glob("index*"):
            file.unlink()
    elif damage == "garbage":
        graph.write_bytes(os.urandom(graph.stat().st_size))
    elif damage == "truncated":
        graph.write_bytes(graph.read_bytes()[:1000])
    elif damage == "other-kind":
        (directory / "index.json").write_text((directory / "index.json").read_text().replace('"hnsw"', '"ivf"'))
    else:
        (directory / "index.json").write_bytes(b"\x00" * 100)
    (result,) = load_in_child([directory], [[0.3] * 8], k=5)                 # a signal would fail here
    assert result["ok"] and result["count"] == model.count()
    with kvmem.load(directory) as again:
        assert _recall(again, model) >= 0.95
    assert json.loads((directory / "index.json").read_text())["kind"] == "hnsw"   # rewritten


def test_a_second_store_follows_the_index_of_the_first(tmp_path):
    """Another store of the same directory (as another process would) catches its index up on its next call."""
    store, model = _indexed(tmp_path / "mem")
    other = kvmem.load(tmp_path / "mem")
    keys, values = randn(9, 2, 40, 8) * 3, randn(10, 2, 40, 4)             # long keys: they win every query
    store.add(keys, values)
    model.add(keys, values)
    res = other.search(keys[:, :5].float(), 1)
    assert (res.ids >= 600).all()                                          # found through the index, caught up
    assert _recall(other, model) >= 0.95
    other.close()
    store.close()


def test_a_reader_adopts_a_map_another_process_grew(tmp_path):
    """This process maps 1 MB; a writer process commits 20 MB: the next call adopts the larger map."""
    store = kvmem.create("lmdb", path=tmp_path / "mem", dim=64, map_size=1 << 20, block_rows=256)
    run_child(f"""
        import torch, kvmem
        store = kvmem.load({str(tmp_path / "mem")!r})
        for seed in range(10):
            g = torch.Generator().manual_seed(seed)
            store.add(torch.randn(4000, 64, generator=g), torch.randn(4000, 64, generator=g))
    """)
    assert store._shared.map_size() == 1 << 20
    assert len(store) == 40000
    assert store._shared.map_size() > 20 << 20
    keys, _ = store.get(torch.arange(39990, 40000))
    g = torch.Generator().manual_seed(9)
    assert torch.equal(keys, torch.randn(4000, 64, generator=g)[-10:].half())
    store.close()
