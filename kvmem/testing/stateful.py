"""A Hypothesis state machine driving any store against the NumPy oracle.

Random sequences of add / search / get / remove / clear / save-and-load, with
random metric, dtype, partitions and capacity, each step checked against
:class:`~kvmem.testing.model.BruteForceMemory`. A backend's test file::

    from kvmem.testing import store_machine

    TestExactMachine = store_machine("exact").TestCase
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import kvmem
from kvmem.testing.checks import check_get, check_search
from kvmem.testing.model import BruteForceMemory

__all__ = ["StoreMachine", "store_machine"]

DIM, VALUE_DIM = 6, 3


def _rows(seed: int, partitions: int, n: int, width: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((partitions, n, width)).astype(np.float32))


class StoreMachine(RuleBasedStateMachine):
    """Subclass (or use :func:`store_machine`) and set ``backend``, ``options``, ``exact``."""

    backend = "exact"
    options: dict[str, Any] = {}
    exact = True
    recall_threshold = 1.0
    needs_path = False

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="kvmem-machine-"))
        self.saves = 0
        self.hits = self.wanted = 0

    @initialize(partitions=st.integers(1, 3), metric=st.sampled_from(["ip", "l2", "cos"]),
                dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
                capacity=st.one_of(st.none(), st.integers(1, 40)))
    def open(self, partitions: int, metric: str, dtype: torch.dtype, capacity: int | None) -> None:
        kwargs = dict(self.options)
        if self.needs_path:
            kwargs["path"] = self.tmp / "store"
        self.store = kvmem.create(self.backend, dim=DIM, value_dim=VALUE_DIM, partitions=partitions,
                                  metric=metric, dtype=dtype, capacity=capacity, **kwargs)
        self.model = BruteForceMemory(DIM, VALUE_DIM, partitions, metric, dtype, capacity)

    @rule(n=st.integers(0, 25), seed=st.integers(0, 2**32 - 1))
    def add(self, n: int, seed: int) -> None:
        P = self.model.partitions
        keys, values = _rows(seed, P, n, DIM), _rows(seed + 1, P, n, VALUE_DIM)
        ids = self.store.add(keys, values)
        np.testing.assert_array_equal(ids.numpy(), self.model.add(keys, values))

    @rule(q=st.integers(1, 4), k=st.integers(1, 30), seed=st.integers(0, 2**32 - 1))
    def search(self, q: int, k: int, seed: int) -> None:
        queries = _rows(seed, self.model.partitions, q, DIM)
        hits, wanted = check_search(self.store.search(queries, k), self.model, queries, k, exact=self.exact)
        self.hits += hits
        self.wanted += wanted

    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        ids = self._some_live_ids(data)
        keys, values = self.store.get(ids)
        check_get(keys, values, self.model, ids)

    @precondition(lambda self: self.model.count() > 0)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        ids = self._some_live_ids(data)
        self.store.remove(ids)
        self.model.remove(ids)

    @rule(offset=st.integers(0, 5))
    def unknown_id_is_rejected(self, offset: int) -> None:
        ids = np.full((self.model.partitions, 1), -1)
        ids[0, 0] = self.model.next_id[0] + offset
        with_before = self.model.count()
        try:
            self.store.remove(ids)
        except kvmem.InvalidInputError:
            pass
        else:
            raise AssertionError(f"removing never-issued id {ids[0, 0]} did not raise")
        assert len(self.store) == with_before

    @rule(data=st.data())
    def clear(self, data: st.DataObject) -> None:
        P = self.model.partitions
        parts = data.draw(st.one_of(st.none(), st.lists(st.integers(0, P - 1), max_size=P)))
        self.store.clear(parts)
        self.model.clear(parts)

    @rule()
    def save_and_load(self) -> None:
        target = self.tmp / f"save-{self.saves}"
        self.saves += 1
        self.store.save(target)
        self.store.close()
        self.store = kvmem.load(target)

    @invariant()
    def counts_agree(self) -> None:
        if hasattr(self, "store"):
            assert [self.store.count(p) for p in range(self.model.partitions)] == \
                   [self.model.count(p) for p in range(self.model.partitions)]

    def teardown(self) -> None:
        if hasattr(self, "store"):
            self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if not self.exact and self.wanted >= 200:
            assert self.hits / self.wanted >= self.recall_threshold, (self.hits, self.wanted)

    def _some_live_ids(self, data: st.DataObject) -> np.ndarray:
        """``(P, m)`` live ids (``-1`` padded) drawn from the oracle."""
        rows = []
        for p in range(self.model.partitions):
            live = self.model.live_ids(p).tolist()
            rows.append(data.draw(st.lists(st.sampled_from(live), max_size=6, unique=True)) if live else [])
        width = max(1, max(len(r) for r in rows))
        return np.array([r + [-1] * (width - len(r)) for r in rows], np.int64)


def store_machine(backend: str, *, options: dict[str, Any] | None = None, exact: bool = True,
                  recall_threshold: float = 1.0, needs_path: bool = False,
                  max_examples: int = 40, stateful_step_count: int = 30) -> type[StoreMachine]:
    """A :class:`StoreMachine` subclass for ``backend``; use its ``.TestCase`` in a test module."""
    machine = type(f"{backend.title()}Machine", (StoreMachine,), {
        "backend": backend, "options": dict(options or {}), "exact": exact,
        "recall_threshold": recall_threshold, "needs_path": needs_path})
    machine.TestCase.settings = settings(max_examples=max_examples, stateful_step_count=stateful_step_count,
                                         deadline=None)
    return machine
