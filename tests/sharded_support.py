"""What the rank scripts of the sharded tests share: the check registry, the rank, stores served or driven.

Every rank runs the same checks in order (``tests/sharded_ranks.py``) and so
creates and loads the same stores; on the driver (rank 0) a check uses its
stores and asserts, the other ranks serve each store until the driver closes it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

import kvmem
from kvmem.stores import sharded as sharded_backend
from kvmem.testing import BruteForceMemory, check_search

OUT = Path(sys.argv[1])
RANK = int(os.environ["RANK"])
DRIVER = RANK == 0
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def sharded(**kw):
    """A sharded store on the driver; on the other ranks, serve it and return None."""
    store = kvmem.create("sharded", **kw)
    if DRIVER:
        return store
    store.serve()
    return None


def loaded(path):
    store = kvmem.load(path)
    if DRIVER:
        return store
    store.serve()
    return None


def twins(**kw):
    """A sharded exact store, and (on the driver) one local exact store and the oracle with the same config."""
    inner_options = kw.pop("inner_options", None)
    store = sharded(inner="exact", inner_options=inner_options, **kw)
    if store is None:
        return None, None, None
    local = kvmem.create("exact", **kw, **(inner_options or {}))
    model = BruteForceMemory(kw["dim"], kw.get("value_dim", kw["dim"]), kw.get("partitions", 1),
                             kw.get("metric", "ip"), kw.get("dtype", torch.float16), kw.get("capacity"))
    return store, local, model


def same(store, local, model, queries, k):
    """The sharded answer is the local exact store's, bit for bit, and a correct one."""
    a, b = store.search(queries, k), local.search(queries, k)
    for name, x, y in zip(a._fields, a, b):
        assert torch.equal(x, y), f"{name} differs from one exact store's: {x.flatten()[:6]} vs {y.flatten()[:6]}"
    check_search(a, model, queries, k, exact=True)
    assert [store.count(p) for p in range(store.partitions)] == [local.count(p) for p in range(local.partitions)]


def add_all(stores, model, keys, values):
    ids = [s.add(keys, values) for s in stores]
    want = model.add(keys, values)
    for got in ids:
        np.testing.assert_array_equal(got.numpy(), want)
    return ids[0]


def driven(body, data):
    """``body(data)`` on the driver, which opens its stores alone, then releases the serving ranks;
    the other ranks ``serve()`` meanwhile."""
    if not DRIVER:
        sharded_backend.serve()
        return
    try:
        body(data)
    finally:
        sharded_backend.release()


def refused(call, *fragments, kind=kvmem.InvalidInputError):
    """``call()`` raises ``kind`` (on every rank), with every fragment in its message."""
    try:
        call()
    except kind as exc:
        assert all(f in str(exc) for f in fragments), str(exc)
    else:
        raise AssertionError(f"no error; expected one saying {fragments}")
