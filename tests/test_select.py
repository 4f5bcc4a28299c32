"""The compiled selection of the exact CPU search (``kvmem/_select.c``) against a NumPy oracle.

The store-level exactness of both selections (this one and the torch ops fallback) is in
``test_exact.py`` (the ``selection`` fixture); here: the kernel's heaps, its refusals, that it is
built, and that a search really goes through it.
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
from kvmem import topk

native = pytest.mark.skipif(not topk.fused_selection(), reason="kvmem was built without its C extension")


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
        topk._native.push(np.ascontiguousarray(scores[:, first:first + width]), first, None, values, columns)
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
        topk._native.push(np.ascontiguousarray(scores[:, first:first + 64]), first, limits, values, columns)
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
        topk._native.push(args[0], 0, args[3], args[1], args[2])
    assert np.isinf(values).all() and (columns == -1).all()


@native
def test_read_only_heaps_are_refused():
    values, columns = _heaps(1, 2)
    values.setflags(write=False)
    with pytest.raises((BufferError, ValueError, TypeError)):
        topk._native.push(np.zeros((1, 4), np.float32), 0, None, values, columns)
    assert (columns == -1).all()


@native
def test_a_cpu_float32_search_selects_through_the_heaps(monkeypatch):
    calls = []
    push = topk._native.push

    class Spy:
        @staticmethod
        def push(*args):
            calls.append(args[1])
            return push(*args)

    monkeypatch.setattr(topk, "_native", Spy)
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
    assert topk.fused_selection(), "kvmem._select did not build; reinstall and read the build log"


def test_kvmem_native_0_selects_with_torch_ops():
    code = "from kvmem import topk; print(topk.fused_selection())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "KVMEM_NATIVE": "0"})
    assert out.stdout.strip() == "False"
