"""The compiled kernels of the CPU search path (``kvmem/_kernels.c``, :mod:`kvmem.kernels`) against NumPy and torch.

The store-level exactness of both selections (the heaps and the torch ops fallback) is in
``test_exact.py`` (the ``selection`` fixture); here: the heaps against a NumPy oracle, the gather against a
float64 reference, the refusals of both, that the extension is built, that searches really go through it,
and that ``ivf`` / ``hnsw`` return the same with it and without.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch

import kvmem
from kvmem import kernels, topk

native = pytest.mark.skipif(not kernels.available(), reason="kvmem was built without its C extension")


def _heaps(rows, keep):
    return np.full((rows, keep), -np.inf, dtype=np.float32), np.full((rows, keep), -1, dtype=np.int64)


def _oracle(scores, keep, limits=None):
    """Each row's best ``keep`` (value, column), columns beyond the row's limit left out; ties: first seen."""
    out = []
    for r, row in enumerate(scores):
        n = len(row) if limits is None else int(np.clip(limits[r], 0, len(row)))
        order = sorted(range(n), key=lambda j: (-row[j], j))[:keep]
        out.append([(float(row[j]), j) for j in order if row[j] > -np.inf])
    return out


def _pushed(values, columns):
    got = []
    for v, c in zip(values, columns):
        pairs = sorted(((float(a), int(b)) for a, b in zip(v, c) if b >= 0), key=lambda p: (-p[0], p[1]))
        got.append(pairs)
    return got


@native
@pytest.mark.parametrize("width", [1, 31, 32, 33, 100, 257])
def test_heaps_hold_each_rows_best_over_blocks_of_any_width(width):
    rng = np.random.default_rng(width)
    scores = rng.standard_normal((7, 1000)).astype(np.float32)
    values, columns = _heaps(7, 12)
    for first in range(0, 1000, width):
        kernels.native.push(np.ascontiguousarray(scores[:, first:first + width]), first, None, values, columns)
    assert _pushed(values, columns) == _oracle(scores, 12)


@native
def test_ties_keep_tied_columns_and_limits_cut_rows():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(6, 300)).astype(np.float32)        # many exact ties
    scores[2] = -np.inf                                                   # a row with nothing to keep
    scores[3, 5] = np.nan                                                 # never enters a heap
    limits = np.array([300, 0, 300, 17, 150, 1], dtype=np.int64)
    values, columns = _heaps(6, 9)
    for first in range(0, 300, 64):
        kernels.native.push(np.ascontiguousarray(scores[:, first:first + 64]), first, limits, values, columns)
    for r, (want, got) in enumerate(zip(_oracle(scores, 9, limits), _pushed(values, columns))):
        assert [v for v, _ in got] == [v for v, _ in want]                # the best values, ties of any column
        assert len({c for _, c in got}) == len(got)                       # each column once
        assert all(c < limits[r] and scores[r, c] == v for v, c in got)   # inside the limit, its own score
    assert (columns[1] == -1).all() and (columns[2] == -1).all()           # limit 0; all -inf


@native
def test_fewer_scores_than_keep_leave_the_rest_empty():
    heaps = topk.HeapTopK(2, 10)
    heaps.push(torch.arange(8.0).view(2, 4), 100)
    s, c = heaps.result()
    assert c[0, :4].tolist() == [103, 102, 101, 100] and (c[:, 4:] == -1).all()
    assert s[1, :4].tolist() == [7, 6, 5, 4] and torch.isinf(s[:, 4:]).all()


@native
@pytest.mark.parametrize("bad, error", [
    (lambda s, v, c, lim: (s.astype(np.float64), v, c, lim), TypeError),
    (lambda s, v, c, lim: (s, v, c.astype(np.int32), lim), TypeError),
    (lambda s, v, c, lim: (s, v, c, lim.astype(np.float32)), TypeError),
    (lambda s, v, c, lim: (s[0], v, c, lim), ValueError),
    (lambda s, v, c, lim: (s, v[:2], c, lim), ValueError),
    (lambda s, v, c, lim: (s, v, c[:, :3], lim), ValueError),
    (lambda s, v, c, lim: (s, v, c, lim[:2]), ValueError),
    (lambda s, v, c, lim: (s[:, ::2], v, c, lim), ValueError),           # not contiguous
    (lambda s, v, c, lim: (s, v[:, :0], c[:, :0], lim), ValueError),      # keep 0
])
def test_bad_arguments_are_refused_and_change_nothing(bad, error):
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((3, 64)).astype(np.float32)
    values, columns = _heaps(3, 4)
    limits = np.full(3, 64, dtype=np.int64)
    args = bad(scores, values, columns, limits)
    with pytest.raises(error):
        kernels.native.push(args[0], 0, args[3], args[1], args[2])
    assert np.isinf(values).all() and (columns == -1).all()


@native
def test_read_only_heaps_are_refused():
    values, columns = _heaps(1, 2)
    values.setflags(write=False)
    with pytest.raises((BufferError, ValueError, TypeError)):
        kernels.native.push(np.zeros((1, 4), np.float32), 0, None, values, columns)
    assert (columns == -1).all()


@native
def test_a_cpu_float32_search_selects_through_the_heaps(monkeypatch):
    calls = []
    push = kernels.native.push

    class Spy:
        gather = staticmethod(kernels.native.gather)

        @staticmethod
        def push(*args):
            calls.append(args[1])
            return push(*args)

    monkeypatch.setattr(kernels, "native", Spy)
    store = kvmem.create("exact", dim=8, value_dim=1, dtype=torch.float32, ranking="fp32")
    keys = torch.randn(5000, 8, generator=torch.Generator().manual_seed(0))
    store.add(keys, torch.zeros(5000, 1))
    queries = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    got = store.search(queries, 5)
    firsts = sorted(set(calls))
    step = firsts[1]
    assert step >= 256 and firsts == list(range(0, 5000, step))
    assert len(calls) == 2 * len(firsts)                                       # once per step in each span
    assert torch.equal(got.ids, (queries @ keys.T).topk(5).indices)


def test_the_extension_is_built_where_a_c_compiler_exists():
    """An install that silently fell back to the slower selection would pass every other test."""
    compiler = sysconfig.get_config_var("CC") or "cc"
    if shutil.which(compiler.split()[0]) is None:
        pytest.skip(f"no C compiler ({compiler}) here: kvmem uses its torch selection")
    assert kernels.available(), "kvmem._kernels did not build; reinstall and read the build log"


def test_kvmem_native_0_selects_with_torch_ops():
    code = "from kvmem import kernels; print(kernels.available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "KVMEM_NATIVE": "0"})
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- gather: candidates' keys and exact scores

def _reference(table, rows, slots, queries, metric):
    keys = table.float()[rows.clamp(min=0)]                                      # (n, c, d)
    q = queries.double()[:, None, :]
    k = keys.double()
    if metric == "ip":
        s = (q * k).sum(-1)
    elif metric == "l2":
        s = -((q - k) ** 2).sum(-1)
    else:
        s = (q * k).sum(-1) / (q.norm(dim=-1) * k.norm(dim=-1))
        s = torch.nan_to_num(s, nan=0.0)
    return s.float().masked_fill(slots < 0, float("-inf")), keys


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("metric", ["ip", "l2", "cos"])
@pytest.mark.parametrize("dim", [1, 7, 8, 96, 129])
def test_gather_copies_each_key_and_scores_it_within_float32_rounding(dtype, metric, dim):
    gen = torch.Generator().manual_seed(dim)
    table = torch.randn(500, dim, generator=gen).to(dtype)
    table[3] = 0                                                                 # a zero key (cos: score 0)
    rows = torch.randint(0, 500, (9, 6), generator=gen)
    rows[0, 0] = 3
    slots = rows.clone()
    slots[2, 1:] = -1                                                            # padded candidates
    queries = torch.randn(9, dim, generator=gen)
    keys = torch.full((9, 6, dim), 7.0).to(dtype)
    got = kernels.gather(table, rows, slots, queries, metric, keys)
    want, want_keys = _reference(table, rows, slots, queries, metric)
    bound = 2 * dim * 2.0 ** -24 * (queries.norm(dim=-1, keepdim=True) * want_keys.norm(dim=-1) +
                                    (queries.norm(dim=-1, keepdim=True) + want_keys.norm(dim=-1)) ** 2) + 1e-30
    finite = slots >= 0
    assert torch.isinf(got[~finite]).all() and (got[~finite] < 0).all()
    assert ((got - want).abs()[finite] <= bound[finite]).all()
    assert torch.equal(keys[finite], table[rows][finite]) and (keys[~finite] == 0).all()
    assert torch.equal(kernels.gather(table, rows, slots, queries, metric, None), got)     # scores alone: the same


@native
def test_a_score_does_not_depend_on_the_other_candidates():
    gen = torch.Generator().manual_seed(5)
    table, queries = torch.randn(300, 64, generator=gen), torch.randn(4, 64, generator=gen)
    rows = torch.randint(0, 300, (4, 10), generator=gen)
    full = kernels.gather(table, rows, rows, queries, "ip", None)
    alone = torch.stack([kernels.gather(table, rows[:, j:j + 1], rows[:, j:j + 1], queries, "ip", None)[:, 0]
                         for j in range(10)], 1)
    assert torch.equal(full, alone)


@native
@pytest.mark.parametrize("bad, error", [
    (dict(rows=torch.full((2, 3), 10)), IndexError),                              # past the table
    (dict(rows=torch.full((2, 3), -2)), IndexError),
    (dict(rows=torch.zeros(2, 4, dtype=torch.long)), ValueError),                 # shapes disagree
    (dict(queries=torch.zeros(2, 5)), ValueError),
    (dict(keys=torch.full((2, 3, 4), 9.0, dtype=torch.float16)), TypeError),      # not the table's kind
    (dict(kind=3), ValueError),
    (dict(metric=5), ValueError),
])
def test_gather_refuses_bad_arguments_and_writes_nothing(bad, error):
    args = dict(table=np.ones((10, 4), np.float32), kind=0, rows=torch.zeros(2, 3, dtype=torch.long),
                slots=torch.zeros(2, 3, dtype=torch.long), queries=torch.ones(2, 4), metric=0,
                keys=torch.full((2, 3, 4), 9.0), scores=torch.full((2, 3), 9.0))
    args.update(bad)
    keys, scores = args["keys"], args["scores"]
    with pytest.raises(error):
        kernels.native.gather(args["table"], args["kind"], args["rows"].numpy(), args["slots"].numpy(),
                              args["queries"].numpy(), args["metric"], keys.numpy(), scores.numpy())
    assert (keys == 9).all() and (scores == 9).all()


@pytest.mark.parametrize("built", [True, False], ids=["kernels", "torch"])
def test_best_gives_each_rows_best_columns_best_first(built, monkeypatch):
    if built and not kernels.available():
        pytest.skip("kvmem was built without its C extension")
    if not built:
        monkeypatch.setattr(kernels, "native", None)
    scores = np.random.default_rng(0).standard_normal((50, 300)).astype(np.float32)
    values, columns = kernels.best(scores, 7)
    order = np.argsort(-scores, axis=1)[:, :7]
    assert np.array_equal(columns, order) and np.array_equal(values, np.take_along_axis(scores, order, 1))


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_approximate_results_are_the_same_with_or_without_the_kernels(backend, monkeypatch):
    """The fill's one-pass gather and the ivf coarse step against the torch ops they replace."""
    if not kernels.available():
        pytest.skip("kvmem was built without its C extension")
    gen = torch.Generator().manual_seed(11)
    keys = torch.randn(3000, 24, generator=gen)
    options = {"train_size": 2000, "nlist": 32} if backend == "ivf" else {}        # ivf: indexed at 3,000 rows
    store = kvmem.create(backend, dim=24, value_dim=2, dtype=torch.float16, **options)
    store.add(keys, torch.randn(3000, 2, generator=gen))
    store.freeze()
    queries = torch.randn(300, 24, generator=gen)
    knob = {"nprobe": 1} if backend == "ivf" else {"ef": 40}
    assert store._parts[0].indexed
    k = 200 if backend == "ivf" else 50                                         # ivf: more than one list holds
    fast = store.search(queries, k, **knob)
    monkeypatch.setattr(kernels, "native", None)
    slow = store.search(queries, k, **knob)
    assert torch.equal(fast.ids, slow.ids) and torch.equal(fast.keys, slow.keys)
    assert torch.equal(fast.values, slow.values)
    assert torch.allclose(fast.scores, slow.scores, rtol=1e-5, atol=1e-4)
    assert (fast.ids == -1).any() or backend == "hnsw"                         # some padded rows at nprobe 1
