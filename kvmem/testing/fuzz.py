"""Fuzz every public entry point of a store with odd arguments (Hypothesis).

Subclass :class:`StoreFuzz` once per backend, as :class:`~kvmem.testing.StoreConformance`::

    from kvmem.testing.fuzz import StoreFuzz

    class TestMyStoreFuzz(StoreFuzz):
        backend = "mystore"

Each example builds a small store (partitions, metric, dtype and capacity
drawn too), fills it, and makes a few calls drawn from :data:`STORE_ENTRIES`
with arguments from :mod:`kvmem.testing.odd`. Every call must succeed or
raise :class:`~kvmem.InvalidInputError` (a ``ValueError``) with a message;
after an error the store's rows, ids and counts are as before; a refused
call raises the process's peak memory by at most :data:`REFUSED_BYTES`.
``kvmem.create`` and ``kvmem.load`` are fuzzed the same way. Anything else
escaping fails the test with the call that raised it.

Resource limits: the fuzz runs with ``KVMEM_MAX_CALL_BYTES`` at
:data:`FUZZ_LIMIT`, so that huge ``k`` or batches are refused below a few MB
and an accepted call stays small.

Every call is tallied per label (backend, ``cli``, ...): drawn, errors,
accepted, escapes; :func:`summary` prints the table (the test suite's
``conftest.py`` prints it at the end of a run). The ``slow`` test runs
``KVMEM_FUZZ_EXAMPLES`` examples of store calls, and only when it is set.

A new entry point is one :class:`Entry`: its name and a strategy of its
arguments given the store (and a scratch folder).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import resource
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmem
from kvmem.errors import CorruptStoreError, InvalidInputError
from kvmem.inputs import LIMIT_ENV
from kvmem.registry import registry
from kvmem.testing import odd
from kvmem.testing.checks import same, snapshot

__all__ = ["Entry", "STORE_ENTRIES", "TUNING_ENTRIES", "StoreFuzz", "attempt", "fuzz_settings", "limited",
           "summary", "TALLY", "FUZZ_LIMIT", "REFUSED_BYTES"]

FUZZ_LIMIT = 16 << 20           # bytes: KVMEM_MAX_CALL_BYTES during a fuzz
REFUSED_BYTES = 64 << 20        # bytes: the most a refused call may raise the process's peak memory

TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def summary() -> str:
    """The tally as a table: per label, calls drawn, errors (InvalidInputError), accepted, escapes."""
    if not TALLY:
        return ""
    lines = [f"{'fuzz':<12} {'drawn':>8} {'errors':>8} {'accepted':>9} {'escapes':>8}"]
    for label, c in sorted(TALLY.items()):
        lines.append(f"{label:<12} {c['drawn']:>8} {c['errors']:>8} {c['accepted']:>9} {c['escapes']:>8}")
    total = sum(TALLY.values(), collections.Counter())
    lines.append(f"{'total':<12} {total['drawn']:>8} {total['errors']:>8} {total['accepted']:>9} {total['escapes']:>8}")
    return "\n".join(lines)


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux: KiB


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)} {value.dtype}{'' if value.is_contiguous() else ' non-contiguous'}"
    if isinstance(value, np.ndarray):
        return f"ndarray{list(value.shape)} {value.dtype}"
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def describe(name: str, args: tuple = (), kwargs: dict | None = None) -> str:
    """``name(arg, ..., key=value)`` with tensors shown by shape and dtype."""
    parts = [_shown(a) for a in args] + [f"{k}={_shown(v)}" for k, v in (kwargs or {}).items()]
    return f"{name}({', '.join(parts)})"


def attempt(label: str, what: str, call: Callable[[], Any],
            errors: tuple[type[BaseException], ...] = (InvalidInputError,),
            refused: Callable[[Any], bool] = lambda result: False) -> tuple[bool, Any]:
    """Run ``call``; ``(True, result)``, or ``(False, error)`` for one of ``errors`` with a message.

    ``refused(result)`` says whether a returned result is a refusal (a command's exit code 2).

    Anything else raised, an empty message, or a refused call that raised the peak memory by more
    than :data:`REFUSED_BYTES` is tallied as an escape and fails with ``what`` (the call, described).
    """
    tally = TALLY[label]
    tally["drawn"] += 1
    peak = _peak_bytes()
    try:
        result = call()
    except errors as exc:
        grew = _peak_bytes() - peak
        problem = ("an empty message" if not str(exc).strip() else
                   f"{grew:,} bytes of new peak memory" if grew > REFUSED_BYTES else None)
        if problem:
            tally["escapes"] += 1
            raise AssertionError(f"{label}: {what} was refused with {problem}: {exc!r}") from exc
        tally["errors"] += 1
        return False, exc
    except Exception as exc:
        tally["escapes"] += 1
        raise AssertionError(f"{label}: {what} raised {type(exc).__name__}: {exc}") from exc
    if refused(result):
        tally["errors"] += 1
        return False, result
    tally["accepted"] += 1
    return True, result


@contextlib.contextmanager
def limited(limit: int = FUZZ_LIMIT) -> Iterator[None]:
    """``KVMEM_MAX_CALL_BYTES`` set to ``limit`` inside the block."""
    before = os.environ.get(LIMIT_ENV)
    os.environ[LIMIT_ENV] = str(limit)
    try:
        yield
    finally:
        if before is None:
            del os.environ[LIMIT_ENV]
        else:
            os.environ[LIMIT_ENV] = before


def fuzz_settings(examples: int) -> settings:
    # The same draws every run (CI must not pass or fail by chance); KVMEM_FUZZ_EXAMPLES runs fresh ones.
    fresh = os.environ.get("KVMEM_FUZZ_EXAMPLES") is not None
    return settings(max_examples=examples, deadline=None, derandomize=not fresh, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ---------------------------------------------------------------------------------------------- entries
Args = tuple[tuple[Any, ...], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Entry:
    """A store method to fuzz: ``args(store, scratch)`` draws its ``(args, kwargs)``."""

    name: str
    args: Callable[[kvmem.MemoryStore, Path], st.SearchStrategy[Args]]

    def call(self, store: kvmem.MemoryStore, args: Args) -> Any:
        return getattr(store, self.name)(*args[0], **args[1])


def _issued(store: kvmem.MemoryStore) -> int:
    return int(store._book.next_ids.max(initial=0))


def _search_args(store: kvmem.MemoryStore, scratch: Path) -> st.SearchStrategy[Args]:
    names = sorted(store.search_params) + ["bogus"]
    params = st.one_of(st.just({}), st.dictionaries(st.sampled_from(names), odd.scalars_or(st.integers(1, 64)),
                                                    max_size=2))
    k = odd.scalars_or(st.integers(1, 12))
    return st.tuples(st.tuples(odd.vectors(store.partitions, store.dim), k), params)


def _partitions_arg(store: kvmem.MemoryStore) -> st.SearchStrategy[Any]:
    valid = st.one_of(st.none(), st.integers(0, store.partitions - 1),
                      st.lists(st.integers(-1, store.partitions), max_size=3), st.just(range(2**40)))
    return odd.scalars_or(valid)


STORE_ENTRIES: list[Entry] = [
    Entry("add", lambda s, _: st.integers(0, 5).flatmap(lambda n: st.tuples(
        st.tuples(odd.vectors(s.partitions, s.dim, n), odd.vectors(s.partitions, s.value_dim, n)), st.just({})))),
    Entry("search", _search_args),
    Entry("get", lambda s, _: st.tuples(st.tuples(odd.ids(s.partitions, _issued(s))), st.just({}))),
    Entry("remove", lambda s, _: st.tuples(st.tuples(odd.ids(s.partitions, _issued(s))), st.just({}))),
    Entry("clear", lambda s, _: st.tuples(st.tuples(_partitions_arg(s)), st.just({}))),
    Entry("count", lambda s, _: st.tuples(st.tuples(_partitions_arg(s)), st.just({}))),
    Entry("save", lambda s, root: st.tuples(st.tuples(odd.paths(str(root))), st.just({}))),
    Entry("observe", lambda s, _: st.tuples(st.tuples(odd.vectors(s.partitions, s.dim)), st.just({}))),
]

#: The calls of a store that calibrates its knob on asked queries (``ivf``, ``hnsw``): added to a
#: :class:`StoreFuzz`'s entries when the backend has ``calibrate``.
TUNING_ENTRIES: list[Entry] = [
    Entry("calibrate", lambda s, _: st.tuples(
        st.tuples(st.one_of(st.none(), st.none(), odd.vectors(s.partitions, s.dim)),
                  st.one_of(st.none(), st.none(), st.floats(0.5, 0.99), odd.scalars_or(st.sampled_from([0.0, 1.5])))),
        st.just({}))),
    Entry("freeze", lambda s, _: st.tuples(st.tuples(odd.scalars_or(st.booleans())), st.just({}))),
    Entry("stats", lambda s, _: st.just(((), {}))),
]


def scratch_folder(root: Path) -> Path:
    """A folder holding what :func:`kvmem.testing.odd.paths` names: a file, a non-store folder."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a-file").write_bytes(b"not a store")
    (root / "not-a-store").mkdir(exist_ok=True)
    (root / "not-a-store" / "junk").write_bytes(b"junk")
    return root


# ---------------------------------------------------------------------------------------------- the suite
class StoreFuzz:
    """Fuzz tests for one backend; subclasses set the class attributes."""

    backend: ClassVar[str] = "exact"
    options: ClassVar[dict[str, Any]] = {}     # backend options for every store
    needs_path: ClassVar[bool] = False          # create(path=...) (persistent backends)
    examples: ClassVar[int] = 30                # examples per test in the default run
    entries: ClassVar[list[Entry] | None] = None    # None: STORE_ENTRIES, and TUNING_ENTRIES if it calibrates

    # ------------------------------------------------------------------ building
    def new_store(self, root: Path, partitions: int = 2, metric: str = "ip", dtype: torch.dtype = torch.float32,
                  capacity: int | None = None, n: int = 6) -> kvmem.MemoryStore:
        """A store of dim 8, value_dim 4 holding ``n`` rows per partition, the last removed (n > 2)."""
        kwargs: dict[str, Any] = {**self.options, "partitions": partitions, "metric": metric, "dtype": dtype,
                                  "capacity": capacity}
        if self.needs_path:
            kwargs["path"] = Path(tempfile.mkdtemp(dir=root)) / "store"
        store = kvmem.create(self.backend, dim=8, value_dim=4, **kwargs)
        g = torch.Generator().manual_seed(n)
        store.add(torch.randn(partitions, n, 8, generator=g), torch.randn(partitions, n, 4, generator=g))
        if n > 2:
            store.remove(np.full((partitions, 1), n - 1))
        return store

    def store_entries(self) -> list[Entry]:
        if self.entries is not None:
            return self.entries
        return STORE_ENTRIES + (TUNING_ENTRIES if hasattr(registry[self.backend], "calibrate") else [])

    def observe(self, store: kvmem.MemoryStore, probe: torch.Tensor) -> dict[str, Any]:
        """What a refused call must leave as it was (:func:`~kvmem.testing.checks.snapshot`); a backend
        with state of its own beyond the store's answers adds it."""
        return snapshot(store, probe, k=16)

    def run_calls(self, root: Path, data: st.DataObject, only: Entry | None = None) -> None:
        """One example: a store drawn, then 1-4 calls drawn from its entries (or of ``only``)."""
        draw = data.draw
        entries = [only] if only is not None else self.store_entries()
        store = self.new_store(root, draw(st.sampled_from([1, 2])), draw(st.sampled_from(["ip", "l2", "cos"])),
                               draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
                               draw(st.sampled_from([None, 6])), draw(st.integers(0, 8)))
        probe = torch.randn(store.partitions, 2, store.dim)
        try:
            for _ in range(data.draw(st.integers(1, 4))):
                entry = data.draw(st.sampled_from(entries))
                args = data.draw(entry.args(store, root))
                before = self.observe(store, probe)
                what = describe(f"{self.backend}.{entry.name}", *args)
                ok, _ = attempt(self.backend, what, functools.partial(entry.call, store, args))
                if not ok:
                    after = self.observe(store, probe)
                    assert same(before, after), f"{self.backend}: {what} raised and changed the store"
            self.observe(store, probe)                   # the last call, too, left the store consistent
        finally:
            store.close()

    def _run(self, examples: int, test: Callable[[Path, st.DataObject], None]) -> None:
        root = scratch_folder(Path(tempfile.mkdtemp(prefix="kvmem-fuzz-")))

        @fuzz_settings(examples)
        @given(data=st.data())
        def run(data: st.DataObject) -> None:
            test(root, data)

        try:
            with limited():
                run()
        finally:
            shutil.rmtree(root, ignore_errors=True)

    # ------------------------------------------------------------------ tests
    def test_fuzz_store_calls(self) -> None:
        # Half the examples mix the methods; the other half give each method a share of its own (mixed
        # draws alone may leave a method never drawn, or never accepted, in a small fixed run).
        entries = self.store_entries()
        self._run(self.examples // 2, self.run_calls)
        for entry in entries:
            self._run(max(2, self.examples // (2 * len(entries))), functools.partial(self.run_calls, only=entry))

    @pytest.mark.slow
    @pytest.mark.skipif(not os.environ.get("KVMEM_FUZZ_EXAMPLES"), reason="set KVMEM_FUZZ_EXAMPLES=N to run")
    def test_fuzz_store_calls_more(self) -> None:
        self._run(int(os.environ["KVMEM_FUZZ_EXAMPLES"]), self.run_calls)

    def run_create(self, root: Path, data: st.DataObject) -> None:
        cls = registry[self.backend]
        kwargs: dict[str, Any] = {}
        for name, valid in (("dim", st.integers(1, 16)), ("value_dim", st.integers(1, 16)),
                            ("partitions", st.integers(1, 3)), ("capacity", st.one_of(st.none(), st.integers(1, 9))),
                            ("metric", odd.names(["ip", "l2", "cos"])),
                            ("dtype", st.one_of(odd.names(["float32", "fp16", "bfloat16"]),
                                                st.sampled_from([torch.float16, torch.int8, torch.float64]))),
                            ("device", odd.names(["cpu", "cpu:0", "cuda", "meta"])), *(
                                (option, st.just(default)) for option, default in cls.defaults.items())):
            if data.draw(st.booleans()) or name == "dim":
                kwargs[name] = data.draw(odd.scalars_or(valid))
        if data.draw(st.integers(0, 9)) == 0:
            kwargs["no_such_option"] = 1
        if self.needs_path or data.draw(st.integers(0, 9)) == 0:
            kwargs["path"] = data.draw(st.one_of(st.just(Path(tempfile.mkdtemp(dir=root)) / "s"), odd.paths(str(root))))
        kwargs.update(self.options if data.draw(st.booleans()) else {})
        ok, store = attempt(self.backend, describe(f"create[{self.backend}]", (), kwargs),
                            lambda: kvmem.create(self.backend, **kwargs))
        if ok:
            store.close()

    def test_fuzz_create(self) -> None:
        self._run(self.examples, self.run_create)

    def run_load(self, root: Path, data: st.DataObject) -> None:
        saved = root / f"saved-{self.backend}"
        if not saved.exists():
            with self.new_store(root) as store:
                store.save(saved)
        path = data.draw(st.one_of(st.just(saved), odd.paths(str(root))))
        device = data.draw(odd.scalars_or(st.sampled_from([None, "cpu"])))
        ok, store = attempt(self.backend, describe("kvmem.load", (path,), {"device": device}),
                            lambda: kvmem.load(path, device=device), (InvalidInputError, CorruptStoreError))
        if ok:
            store.close()

    def test_fuzz_load(self) -> None:
        self._run(self.examples, self.run_load)

