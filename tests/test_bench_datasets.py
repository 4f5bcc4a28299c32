"""kvmem.benchmarks on tiny sizes: generators, loaders, ground truth, recall, table, JSON, plots."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvmem.benchmarks import datasets as D
from kvmem.benchmarks import plot as PL
from kvmem.benchmarks import recall as R
from kvmem.benchmarks import report as P

from kvmem.errors import BackendUnavailableError, InvalidInputError

h5py = pytest.importorskip("h5py")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- file writers
# Written record by record, independently of the loaders' structured dtypes.

def write_vecs(path, rows, dtype):
    with open(path, "wb") as f:
        for row in rows:
            f.write(np.int32(len(row)).astype("<i4").tobytes())
            f.write(np.asarray(row, dtype=dtype).tobytes())
    return path


def write_bin(path, rows, dtype):
    rows = np.asarray(rows, dtype=dtype)
    with open(path, "wb") as f:
        f.write(np.array(rows.shape, dtype="<i4").tobytes())
        f.write(rows.tobytes())
    return path


def write_hdf5(path, train, test, neighbors=None, distances=None, distance="euclidean", **ds_kw):
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = distance
        f.create_dataset("train", data=train, **ds_kw)
        f.create_dataset("test", data=test, **ds_kw)
        if neighbors is not None:
            f.create_dataset("neighbors", data=neighbors)
        if distances is not None:
            f.create_dataset("distances", data=distances)
    return path


def brute_scores(base, queries, metric):
    b, q = base.astype(np.float64), queries.astype(np.float64)
    if metric == "ip":
        return q @ b.T
    if metric == "l2":
        return -((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    bn = np.linalg.norm(b, axis=1, keepdims=True)
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    return (q / np.where(qn > 0, qn, 1)) @ (b / np.where(bn > 0, bn, 1)).T


# ----------------------------------------------------------------------------- generators

@pytest.mark.parametrize("gen", [D.gaussian, D.clustered])
def test_generators_are_seeded_and_shaped(gen):
    a = gen(300, 16, 20, seed=3)
    b = gen(300, 16, 20, seed=3)
    c = gen(300, 16, 20, seed=4)
    assert a.base.shape == (300, 16) and a.queries.shape == (20, 16)
    assert a.base.dtype == np.float32 and a.queries.dtype == np.float32
    assert a.metric == "ip" and a.size == 300 and a.dim == 16 and a.neighbors is None
    np.testing.assert_array_equal(a.base, b.base)
    np.testing.assert_array_equal(a.queries, b.queries)
    assert not np.array_equal(a.base, c.base)
    assert np.isfinite(a.base).all() and np.isfinite(a.queries).all()


def _top_variance_share(x, top):
    ev = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return ev[:top].sum() / ev.sum()


def test_clustered_is_anisotropic_and_queries_follow_the_data():
    g = D.gaussian(2000, 32, 50, seed=0)
    c = D.clustered(2000, 32, 50, seed=0)
    assert _top_variance_share(c.base, 4) > 1.5 * _top_variance_share(g.base, 4)
    # a query sits nearer its nearest base row than a typical pair of rows does
    d_nn = -brute_scores(c.base, c.queries, "l2").max(axis=1)
    d_pair = ((c.base[:50] - c.base[50:100]) ** 2).sum(1)
    assert np.median(d_nn) < 0.5 * np.median(d_pair)


@pytest.mark.parametrize("bad", [dict(n=0), dict(dim=-1), dict(queries=0), dict(n=2.5)])
def test_generators_reject_bad_sizes(bad):
    kw = dict(n=10, dim=4, queries=2) | bad
    with pytest.raises(InvalidInputError):
        D.gaussian(**kw)


def test_dataset_validates():
    base, q = np.zeros((5, 3), np.float32), np.zeros((2, 3), np.float32)
    with pytest.raises(InvalidInputError, match="metric"):
        D.Dataset("x", base, q, "dot")
    with pytest.raises(InvalidInputError, match="dim"):
        D.Dataset("x", base, np.zeros((2, 4), np.float32), "ip")
    with pytest.raises(InvalidInputError, match="neighbors"):
        D.Dataset("x", base, q, "ip", neighbors=np.zeros((3, 1), np.int64))
    assert "5x3" in repr(D.Dataset("x", base, q, "ip"))


# ----------------------------------------------------------------------------- loaders

@pytest.mark.parametrize("suffix,dtype", [(".fvecs", "<f4"), (".ivecs", "<i4"), (".bvecs", "u1")])
def test_texmex_round_trip(tmp_path, suffix, dtype):
    rows = np.random.default_rng(0).integers(0, 200, size=(7, 5)).astype(dtype)
    path = write_vecs(tmp_path / f"x{suffix}", rows, dtype)
    got = D.read_vecs(path)
    assert isinstance(got, np.memmap) and not got.flags.writeable
    np.testing.assert_array_equal(got, rows)
    np.testing.assert_array_equal(D.read_vectors(path, limit=3), rows[:3])


@pytest.mark.parametrize("suffix,dtype", [(".fbin", "<f4"), (".ibin", "<i4"),
                                          (".u8bin", "u1"), (".i8bin", "i1")])
def test_bigann_round_trip(tmp_path, suffix, dtype):
    rows = np.random.default_rng(1).integers(-100, 100, size=(6, 4)) % 120
    path = write_bin(tmp_path / f"x{suffix}", rows, dtype)
    got = D.read_bin(path)
    assert isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, rows.astype(dtype))
    np.testing.assert_array_equal(D.read_vectors(path, limit=2), rows[:2].astype(dtype))


@pytest.mark.parametrize("distance,metric",
                         [("angular", "cos"), ("euclidean", "l2"), ("dot", "ip")])
def test_hdf5_round_trip(tmp_path, distance, metric):
    rng = np.random.default_rng(2)
    train, test = rng.standard_normal((30, 6), np.float32), rng.standard_normal((4, 6), np.float32)
    nbrs = np.tile(np.arange(5, dtype=np.int32), (4, 1))
    dist = rng.random((4, 5), np.float32)
    path = write_hdf5(tmp_path / "toy-6-x.hdf5", train, test, nbrs, dist, distance)
    ds = D.load_dataset(path)
    assert ds.name == "toy-6-x" and ds.metric == metric
    assert isinstance(ds.base, np.memmap)  # contiguous dataset: mapped, not read
    np.testing.assert_array_equal(ds.base, train)
    np.testing.assert_array_equal(ds.train, train)
    np.testing.assert_array_equal(ds.queries, test)
    np.testing.assert_array_equal(ds.neighbors, nbrs)
    np.testing.assert_array_equal(ds.distances, dist)
    # a cut base or another metric would make the file's ground truth wrong
    assert D.read_hdf5(path, limit=10).neighbors is None
    assert D.read_hdf5(path, metric="ip" if metric != "ip" else "l2").neighbors is None
    assert D.read_hdf5(path, queries=2).queries.shape == (2, 6)


def test_hdf5_compressed_is_read(tmp_path):
    train = np.arange(40, dtype=np.float32).reshape(10, 4)
    path = write_hdf5(tmp_path / "c.h5", train, train[:2], compression="gzip", chunks=True)
    ds = D.read_hdf5(path)
    np.testing.assert_array_equal(ds.base, train)
    assert ds.neighbors is None


def test_hdf5_without_h5py_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(BackendUnavailableError, match=r"kvmem\[bench\]"):
        D.read_hdf5(tmp_path / "x.hdf5")


def test_load_dataset_generators_and_specs(tmp_path):
    ds = D.load_dataset("clustered", n=100, dim=8, queries=5, seed=1, metric="l2")
    assert ds.base.shape == (100, 8) and ds.queries.shape == (5, 8) and ds.metric == "l2"
    assert D.load_dataset("Gaussian", n=10, dim=2).queries.shape == (1000, 2)
    with pytest.raises(InvalidInputError, match="neither a generator"):
        D.load_dataset("sift1m")
    with pytest.raises(InvalidInputError, match="cannot read"):
        D.load_dataset(tmp_path / "missing.fvecs")


def test_load_dataset_texmex_siblings(tmp_path):
    rng = np.random.default_rng(3)
    base, q = rng.standard_normal((20, 4)), rng.standard_normal((3, 4))
    gt = np.argsort(-brute_scores(base.astype(np.float32), q.astype(np.float32), "l2"), 1)[:, :5]
    write_vecs(tmp_path / "toy_base.fvecs", base, "<f4")
    write_vecs(tmp_path / "toy_query.fvecs", q, "<f4")
    write_vecs(tmp_path / "toy_groundtruth.ivecs", gt, "<i4")
    ds = D.load_dataset(tmp_path / "toy_base.fvecs")
    assert ds.metric == "l2" and ds.base.shape == (20, 4) and ds.queries.shape == (3, 4)
    np.testing.assert_array_equal(ds.neighbors, gt)
    assert D.load_dataset(tmp_path / "toy_base.fvecs", limit=10).neighbors is None


def test_load_dataset_holds_out_queries(tmp_path):
    rows = np.arange(200, dtype=np.float32).reshape(50, 4)
    path = write_bin(tmp_path / "x.fbin", rows, "<f4")
    ds = D.load_dataset(path, queries=3, metric="ip")
    np.testing.assert_array_equal(ds.base, rows[:47])
    np.testing.assert_array_equal(ds.queries, rows[47:])
    qpath = write_bin(tmp_path / "q.fbin", rows[:2], "<f4")
    assert D.load_dataset(path, query_path=qpath).base.shape == (50, 4)


def _malformed_files(tmp_path):
    """name -> (path, message fragment) of files every loader must refuse."""
    good = np.ones((4, 3), np.float32)
    cases = {}

    def add(name, data, match):
        p = tmp_path / name
        p.write_bytes(data)
        cases[name] = (p, match)

    fvecs = write_vecs(tmp_path / "good.fvecs", good, "<f4").read_bytes()
    add("empty.fvecs", b"", "shorter than")
    add("truncated.fvecs", fvecs[:-3], "whole number")
    add("zero_dim.fvecs", np.int32(0).tobytes() + fvecs[4:], "dimension 0")
    add("huge_dim.fvecs", np.int32(2**30).tobytes() + fvecs[4:], "dimension")
    mixed = bytearray(fvecs)
    mixed[16:20] = np.int32(5).tobytes()  # record 1 (at byte 16) declares another dim
    add("mixed_dims.fvecs", bytes(mixed), "record 1 declares dimension 5")
    fbin = write_bin(tmp_path / "good.fbin", good, "<f4").read_bytes()
    add("short.fbin", fbin[:6], "shorter than")
    add("truncated.fbin", fbin[:-1], "truncated")
    add("extra.fbin", fbin + b"\0" * 4, "the file has")
    add("zero_rows.fbin", np.array([0, 3], "<i4").tobytes(), "n=0")
    add("wrong_dim.u8bin", np.array([2, -3], "<i4").tobytes() + b"\0" * 6, "d=-3")
    add("garbage.hdf5", b"not an hdf5 file at all" * 10, "not a readable")
    add("unknown.npy", b"\0" * 16, "neither a generator")
    big = np.ones((500, 8), np.float32)
    p = write_hdf5(tmp_path / "cut.hdf5", big, big[:2])
    add("cut.hdf5", p.read_bytes()[: p.stat().st_size // 2], "truncated|not a readable")
    write_hdf5(tmp_path / "nodist.hdf5", good, good, distance="jaccard")
    cases["nodist.hdf5"] = (tmp_path / "nodist.hdf5", "distance attribute")
    write_hdf5(tmp_path / "dims.hdf5", good, np.ones((2, 5), np.float32))
    cases["dims.hdf5"] = (tmp_path / "dims.hdf5", "queries have dim 5")
    write_hdf5(tmp_path / "ids.hdf5", good, good, neighbors=np.full((4, 2), 9))
    cases["ids.hdf5"] = (tmp_path / "ids.hdf5", "outside")
    with h5py.File(tmp_path / "notrain.hdf5", "w") as f:
        f.attrs["distance"] = "euclidean"
        f.create_dataset("test", data=good)
    cases["notrain.hdf5"] = (tmp_path / "notrain.hdf5", "no 'train'")
    return cases


def test_malformed_files_raise_a_clear_error(tmp_path):
    wrong = {}
    for name, (path, match) in _malformed_files(tmp_path).items():
        try:
            D.load_dataset(path)
            wrong[name] = "loaded"
        except InvalidInputError as exc:
            if not re.search(match, str(exc)):
                wrong[name] = str(exc)
    assert not wrong


def test_malformed_files_cannot_crash_the_process(tmp_path):
    """Loaders run in a child; a signal (negative return code) is a failure."""
    cases = _malformed_files(tmp_path)
    script = textwrap.dedent("""
        import sys, numpy as np
        from kvmem.benchmarks.datasets import load_dataset
        from kvmem.errors import InvalidInputError
        for p in sys.argv[1:]:
            try:
                ds = load_dataset(p)
                float(np.asarray(ds.base, np.float64).sum())  # touch every mapped byte
                sys.exit(f"{p} loaded")
            except InvalidInputError:
                pass
    """)
    proc = subprocess.run([sys.executable, "-c", script, *(str(p) for p, _ in cases.values())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)


# ----------------------------------------------------------------------------- ground truth

@pytest.mark.parametrize("metric", ["ip", "l2", "cos"])
def test_ground_truth_matches_brute_force(metric):
    rng = np.random.default_rng(5)
    base = rng.standard_normal((300, 8), np.float32)
    base[7] = 0  # a zero vector: cosine 0, not NaN
    qs = rng.standard_normal((1100, 8), np.float32)  # more than one query block
    gt = R.ground_truth(base, qs, 10, metric, base_block=37)
    s = brute_scores(base, qs, metric)
    ids = np.argsort(-s, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(gt.ids, ids)
    np.testing.assert_allclose(gt.scores, np.take_along_axis(s, ids, 1), rtol=1e-12, atol=1e-12)
    assert gt.k == 10 and gt.metric == metric


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), q=st.integers(1, 6), k=st.integers(1, 12),
       block=st.integers(1, 50), metric=st.sampled_from(["ip", "l2", "cos"]),
       seed=st.integers(0, 2**16))
def test_ground_truth_scores_are_the_best_k_any_blocking(n, q, k, block, metric, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(-3, 4, size=(n, 3)).astype(np.float32)  # small ints: many ties
    qs = rng.integers(-3, 4, size=(q, 3)).astype(np.float32)
    gt = R.ground_truth(base, qs, k, metric, base_block=block)
    want = -np.sort(-brute_scores(base, qs, metric), axis=1)[:, :k]  # (q, min(k, n))
    np.testing.assert_allclose(gt.scores[:, :want.shape[1]], want, atol=1e-9)
    assert (gt.ids[:, n:] == -1).all() and np.isneginf(gt.scores[:, n:]).all()
    assert R.recall_at_k(gt.ids, gt, base, qs) == 1.0


def test_ground_truth_on_byte_vectors_and_validation():
    base = np.random.default_rng(6).integers(0, 255, (50, 4)).astype(np.uint8)
    qs = np.random.default_rng(7).random((3, 4), np.float32) * 255
    gt = R.ground_truth(base, qs, 5, "l2")
    np.testing.assert_array_equal(gt.ids, np.argsort(-brute_scores(base, qs, "l2"), 1)[:, :5])
    with pytest.raises(InvalidInputError, match="k must"):
        R.ground_truth(base, qs, 0)
    with pytest.raises(InvalidInputError, match="metric"):
        R.ground_truth(base, qs, 1, "dot")
    with pytest.raises(InvalidInputError, match="NaN"):
        R.ground_truth(np.full((3, 4), np.nan, np.float32), qs, 1)


def test_dataset_truth_uses_file_neighbors():
    ds = D.gaussian(200, 4, 5, seed=8, metric="l2")
    computed = R.dataset_truth(ds, 5)
    shuffled = computed.ids[:, ::-1].copy()  # a file may order ties differently
    with_file = D.Dataset(ds.name, ds.base, ds.queries, ds.metric, neighbors=shuffled)
    from_file = R.dataset_truth(with_file, 5)
    np.testing.assert_array_equal(from_file.ids, computed.ids)
    assert R.dataset_truth(with_file, 6).k == 6  # the file's k is too small: computed


# ----------------------------------------------------------------------------- recall

def test_recall_counts_ties_at_the_boundary_in_distance_space():
    base = np.array([[0.0], [1.0], [2.0], [2.0005], [2.002], [9.0]], np.float32)
    qs = np.zeros((1, 1), np.float32)
    gt = R.ground_truth(base, qs, 3, "l2")
    np.testing.assert_array_equal(gt.ids, [[0, 1, 2]])
    assert R.recall_at_k([[0, 1, 2]], gt, base, qs) == 1.0
    # 2.0005 is within 1e-3 of the true 3rd distance 2.0 (squared it would not be)
    assert R.recall_at_k([[0, 1, 3]], gt, base, qs) == 1.0
    assert R.recall_at_k([[0, 1, 4]], gt, base, qs) == pytest.approx(2 / 3)
    assert R.recall_at_k([[3, 5, 4]], gt, base, qs) == pytest.approx(1 / 3)
    assert R.recall_at_k([[0, 1, 4]], gt, base, qs, epsilon=0.01) == 1.0


def test_recall_exact_duplicates_are_interchangeable():
    base = np.array([[1, 0], [0.9, 0], [0.8, 0], [0.8, 0], [0.1, 0]], np.float32)
    qs = np.array([[1, 0]], np.float32)
    gt = R.ground_truth(base, qs, 3, "ip")
    np.testing.assert_array_equal(gt.ids, [[0, 1, 2]])  # ties broken by lower id
    assert R.recall_at_k(np.array([[0, 1, 3]]), gt, base, qs) == 1.0


def test_recall_handles_padding_duplicates_and_short_rows():
    base = np.eye(4, dtype=np.float32)
    qs = np.eye(4, dtype=np.float32)[:2] + 0.1 * np.arange(4, dtype=np.float32)
    gt = R.ground_truth(base, qs, 2, "ip")
    best = gt.ids
    assert R.recall_at_k(best, gt, base, qs) == 1.0
    assert R.recall_at_k(np.full((2, 2), -1), gt, base, qs) == 0.0
    assert R.recall_at_k(np.c_[best[:, :1], np.full((2, 1), -1)], gt, base, qs) == 0.5
    assert R.recall_at_k(np.c_[best[:, :1], best[:, :1]], gt, base, qs) == 0.5  # repeat is a miss
    assert R.recall_at_k(best[:, :1], gt, base, qs) == 0.5  # fewer columns than k
    assert R.recall_at_k(np.c_[best, [[-1], [-1]]], gt, base, qs) == 1.0  # extra columns ignored
    hits, wanted = R.knn_hits(best, gt, base, qs, k=1)
    assert hits.tolist() == [1, 1] and wanted.tolist() == [1, 1]


def test_recall_when_the_base_is_smaller_than_k():
    base = np.eye(3, dtype=np.float32)
    qs = np.ones((2, 3), np.float32)
    gt = R.ground_truth(base, qs, 5, "l2")
    assert (gt.ids[:, 3:] == -1).all()
    assert R.recall_at_k([[2, 1, 0, -1, -1]] * 2, gt, base, qs) == 1.0
    assert R.recall_at_k([[2, -1, -1, -1, -1]] * 2, gt, base, qs) == pytest.approx(1 / 3)


def test_recall_rejects_bad_ids():
    base, qs = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)
    gt = R.ground_truth(base, qs, 2)
    with pytest.raises(InvalidInputError, match=r"\[-1, 3\)"):
        R.recall_at_k(np.full((3, 2), 3), gt, base, qs)
    with pytest.raises(InvalidInputError, match="found ids"):
        R.recall_at_k(np.zeros((2, 2), np.int64), gt, base, qs)
    with pytest.raises(InvalidInputError, match="k must"):
        R.recall_at_k(gt.ids, gt, base, qs, k=3)


# ----------------------------------------------------------------------------- report and plots

def _results():
    return [
        P.BenchResult("exact", {}, 0.5, 1024.0, 1500.0, 1.0, {"dataset": "toy"}),
        P.BenchResult("ivf", {"nlist": 64, "nprobe": 1}, 1.25, 1100.0, 90000.0, 0.61),
        P.BenchResult("ivf", {"nlist": 64, "nprobe": 8}, 1.25, 1100.0, 20000.0, np.float64(0.95)),
        P.BenchResult("hnsw", {"ef": 32}, 3.0, 1300.0, 45000.5, math.nan),
    ]


def test_table_is_aligned():
    text = P.format_table(_results())
    lines = text.splitlines()
    assert lines[0].split() == ["backend", "params", "build_s", "bytes_per_row", "qps", "recall"]
    assert len({len(line) for line in lines}) == 1  # right-aligned last column: equal widths
    assert "nlist=64,nprobe=8" in text and "0.9500" in text and "90,000" in text
    assert lines[-1].endswith("-")  # NaN recall
    assert P.format_table([]) == "(no results)"
    assert _results()[1].label == "ivf (nlist=64)"


def test_json_round_trip(tmp_path):
    lookups = [P.LookupResult("hnsw", 16384, 0.98, qps=np.float32(1e4))]
    path = P.write_json(_results() + lookups, tmp_path / "out", meta={"k": np.int64(10)})
    assert path == tmp_path / "out" / "results.json"
    doc = json.loads(path.read_text())
    assert doc["meta"] == {"k": 10} and doc["results"][3]["recall"] is None
    back = P.read_json(path)
    assert back[:3] == _results()[:3] and math.isnan(back[3].recall)
    assert back[4] == P.LookupResult("hnsw", 16384, 0.98, qps=10000.0)
    assert "cpus" in json.loads(P.write_json([], tmp_path / "r.json").read_text())["meta"]


def test_plots_are_png(tmp_path):
    p1 = PL.plot_recall_qps(_results(), tmp_path / "plots" / "recall_qps.png", title="toy", k=10)
    lookups = [P.LookupResult(b, s, a) for b in ("exact", "ivf")
               for s, a in ((16384, 1.0), (65536, 0.9), (262144, 0.8))]
    p2 = PL.plot_lookup(lookups, tmp_path / "lookup.png")
    for p in (p1, p2):
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(BackendUnavailableError, match=r"kvmem\[bench\]"):
        PL.plot_recall_qps(_results(), tmp_path / "x.png")


def test_progress_degrades_to_a_plain_iterator(monkeypatch):
    assert list(P.progress(range(3), "x")) == [0, 1, 2]  # stderr is not a TTY under pytest
    assert list(P.progress(range(3), "x", enabled=True)) == [0, 1, 2]  # with tqdm
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert list(P.progress(iter("ab"), "x", enabled=True)) == ["a", "b"]
