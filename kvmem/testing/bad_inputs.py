"""Bad input: every call below must raise InvalidInputError and change nothing."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import kvmem
from kvmem.testing.checks import same, snapshot
from kvmem.testing.fuzz import limited

__all__ = ["BAD_CALLS", "ODD_CALLS", "BAD_CREATE", "BadInputConformance"]


def _r(*shape: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32))


def _with(value: float, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    t = _r(*shape).to(dtype)
    t.view(-1)[len(t.view(-1)) // 2] = value
    return t


def _limited(call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)`` under a 1 MiB call limit: an over-the-limit get without allocating gigabytes."""
    with limited(1 << 20):
        return call(*args)


Call = Callable[[kvmem.MemoryStore], Any]

# (name, call, a fragment the message must contain). The store: 2 partitions, dim 8,
# value_dim 4, float16, capacity 30, 40 rows added per partition (ids 0-9 evicted), id 12 removed.
BAD_CALLS: list[tuple[str, Call, str]] = [
    ("add-key-dim", lambda s: s.add(_r(2, 3, 7), _r(2, 3, 4)), r"dim=8.*got \[2, 3, 7\]"),
    ("add-partitions", lambda s: s.add(_r(3, 3, 8), _r(3, 3, 4)), r"partitions=2.*got \[3, 3, 8\]"),
    ("add-2d-into-2-partitions", lambda s: s.add(_r(3, 8), _r(3, 4)), r"partitions=2.*got \[3, 8\]"),
    ("add-count-mismatch", lambda s: s.add(_r(2, 3, 8), _r(2, 2, 4)), r"values.*\[partitions=2, 3, .*got \[2, 2, 4\]"),
    ("add-value-dim", lambda s: s.add(_r(2, 3, 8), _r(2, 3, 5)), r"value_dim=4.*got \[2, 3, 5\]"),
    ("add-nan-key", lambda s: s.add(_with(float("nan"), 2, 3, 8), _r(2, 3, 4)), "keys must be finite; got nan"),
    ("add-inf-value", lambda s: s.add(_r(2, 3, 8), _with(float("inf"), 2, 3, 4)), "values must be finite; got inf"),
    ("add-fp16-overflow", lambda s: s.add(_with(1e6, 2, 3, 8), _r(2, 3, 4)), "rounded to float16 must be finite"),
    ("add-int-keys", lambda s: s.add(torch.ones(2, 3, 8, dtype=torch.int64), _r(2, 3, 4)), "floating point.*int64"),
    ("add-strings", lambda s: s.add(np.array([["a"] * 8] * 3), _r(2, 3, 4)), "numeric.*<U1"),
    ("add-none", lambda s: s.add(None, _r(2, 3, 4)), "numeric"),
    ("add-ragged", lambda s: s.add([[1.0, 2.0], [3.0]], _r(2, 3, 4)), "numeric"),
    ("search-dim", lambda s: s.search(_r(2, 3, 9), 3), r"dim=8.*got \[2, 3, 9\]"),
    ("search-nan", lambda s: s.search(_with(float("nan"), 2, 3, 8), 3), "queries must be finite; got nan"),
    ("search-inf", lambda s: s.search(_with(float("-inf"), 2, 3, 8), 3), "queries must be finite; got -inf"),
    ("search-k-0", lambda s: s.search(_r(2, 3, 8), 0), "k must be a positive int; got 0"),
    ("search-k-negative", lambda s: s.search(_r(2, 3, 8), -2), "got -2"),
    ("search-k-float", lambda s: s.search(_r(2, 3, 8), 2.5), "got 2.5"),
    ("search-k-bool", lambda s: s.search(_r(2, 3, 8), True), "got True"),
    ("search-k-string", lambda s: s.search(_r(2, 3, 8), "3"), "got '3'"),
    ("search-unknown-param", lambda s: s.search(_r(2, 3, 8), 3, bogus=1), "got 'bogus'"),
    ("get-never-added", lambda s: s.get(np.array([[999], [10]])), "id 999 of partition 0.*never added"),
    ("get-removed", lambda s: s.get(np.array([[12], [10]])), "id 12 of partition 0.*removed"),
    ("get-evicted", lambda s: s.get(np.array([[10], [3]])), "id 3 of partition 1.*evicted"),
    ("get-float-ids", lambda s: s.get(np.array([[10.0], [11.0]])), "integers; got torch.float64"),
    ("get-below-minus-one", lambda s: s.get(np.array([[-2], [10]])), "got -2"),
    ("get-shape", lambda s: s.get(np.zeros((2, 1, 1), np.int64)), r"\[partitions=2, m\]; got \[2, 1, 1\]"),
    ("remove-some-unknown", lambda s: s.remove(np.array([[13, 999], [13, -1]])), "id 999"),
    ("remove-evicted", lambda s: s.remove(np.array([[20], [0]])), "id 0 of partition 1"),
    ("remove-bool-ids", lambda s: s.remove(np.array([[True], [False]])), "integers; got torch.bool"),
    ("clear-out-of-range", lambda s: s.clear([0, 5]), r"\[0, 2\); got 5"),
    ("clear-negative", lambda s: s.clear(-1), "got -1"),
    ("clear-bool", lambda s: s.clear(True), "got True"),
    ("count-out-of-range", lambda s: s.count(2), "got 2"),
]

# Calls the fuzz suite found escaping (issue 17), run one after another on one victim (cheaper).
ODD_CALLS: list[tuple[str, Call, str]] = [
    ("search-k-huge", lambda s: s.search(_r(2, 3, 8), 2**40), r"k=1,099,511,627,776 .*over the limit.*largest k"),
    ("search-k-huge-no-queries", lambda s: s.search(_r(2, 0, 8), 2**62), "over the limit.*largest k"),
    ("search-float64-overflows-float32", lambda s: s.search(_with(1e39, 2, 3, 8, dtype=torch.float64), 3),
     "queries rounded to float32 must be finite; got inf"),
    ("get-m-huge", lambda s: _limited(s.get, np.full((2, 2**16), -1)), r"get with m=65,536 .*over the limit"),
    ("clear-float", lambda s: s.clear(partitions=2.0), r"iterable of ints in \[0, 2\); got 2.0 \(float\)"),
    ("clear-string", lambda s: s.clear("01"), "got '01'"),
    ("clear-0d-array", lambda s: s.clear(np.array(1.5)), r"got array\(1.5\) \(ndarray\)"),
    ("clear-huge-range", lambda s: s.clear(range(2**40)), r"\[0, 2\); got 2"),
    ("clear-endless", lambda s: s.clear(itertools.repeat(0)), "at most 1040 partitions"),
    ("count-float", lambda s: s.count(2.0), r"\[0, 2\); got 2.0"),
    ("count-list", lambda s: s.count([0, 1]), r"\[0, 2\); got \[0, 1\]"),
    ("save-nul-byte", lambda s: s.save("a\x00b"), "without NUL bytes"),
    ("save-none", lambda s: s.save(None), "save path must be a non-empty str.*got None"),
    ("save-name-too-long", lambda s: s.save("x" * 300), "cannot save to .*File name too long"),
]

BAD_CREATE: list[tuple[str, dict[str, Any], str]] = [
    ("dim-zero", {"dim": 0}, "dim must be a positive int; got 0"),
    ("dim-float", {"dim": 1.5}, "got 1.5"),
    ("value-dim-negative", {"value_dim": -4}, "value_dim.*got -4"),
    ("partitions-zero", {"partitions": 0}, "partitions.*got 0"),
    ("metric", {"metric": "dot"}, "metric must be one of.*got 'dot'"),
    ("dtype", {"dtype": "int8"}, "dtype must be.*got 'int8'"),
    ("capacity-zero", {"capacity": 0}, "capacity.*got 0"),
    ("unknown-option", {"no_such_option": 1}, "got 'no_such_option'"),
    ("device", {"device": "tpu"}, "device.*got 'tpu'"),
    ("device-huge-int", {"device": 2**64}, "device.*got 18446744073709551616"),
    ("partitions-huge", {"partitions": 2**40}, r"partitions=1,099,511,627,776 .*over the limit.*largest partitions"),
    ("dim-huge", {"dim": 2**40}, r"a row of dim=1,099,511,627,776 .*over the limit"),
    ("path-nul-byte", {"path": "a\x00b"}, "path must be .* without NUL bytes"),
]


class BadInputConformance:
    backend: str
    options: dict[str, Any]
    needs_path: bool

    @pytest.fixture
    def victim(self, make):
        store, model = make(partitions=2, dtype=torch.float16, capacity=30)
        store.add(_r(2, 40, 8), _r(2, 40, 4))
        store.remove(np.array([[12], [-1]]))
        return store

    @pytest.mark.parametrize("name, call, message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
    def test_bad_input_raises_and_changes_nothing(self, victim, name, call, message):
        queries = _r(2, 6, 8)
        before = snapshot(victim, queries)
        with pytest.raises(kvmem.InvalidInputError, match=message):
            call(victim)
        assert same(before, snapshot(victim, queries))

    def test_odd_input_raises_and_changes_nothing(self, victim):
        queries = _r(2, 6, 8)
        before = snapshot(victim, queries)
        for name, call, message in ODD_CALLS:
            with pytest.raises(kvmem.InvalidInputError, match=message):
                call(victim)
            assert same(before, snapshot(victim, queries)), name

    @pytest.mark.parametrize("name, kwargs, message", BAD_CREATE, ids=[c[0] for c in BAD_CREATE])
    def test_bad_create_arguments_raise(self, tmp_path, name, kwargs, message):
        args: dict[str, Any] = {"dim": 8, **self.options, **kwargs}
        if self.needs_path:
            args.setdefault("path", tmp_path / "store")
        with pytest.raises(kvmem.InvalidInputError, match=message):
            kvmem.create(self.backend, **args)

    def test_unknown_backend_is_named(self):
        with pytest.raises(kvmem.InvalidInputError, match="backend must be one of.*got 'nope'"):
            kvmem.create("nope", dim=8)
