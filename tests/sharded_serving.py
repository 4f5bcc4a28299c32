"""Checks of several sharded stores on one process group (run by ``sharded_ranks.py``).

- ``stores_interleaved``: every rank creates two stores; the driver uses them
  in turn; ``store.serve()`` on a serving rank answers both.
- ``refused_on_a_serving_rank``: a store only the driver could open is
  refused on every rank, and the serving loop goes on.
- ``hf_attach``: the serving ranks only ``serve()``; the driver's
  ``hf.attach(backend="sharded")`` opens a store per layer, saves and loads
  them, and answers as the same model with local ``exact`` stores.
- ``fuzz_store_calls``: :mod:`kvmem.testing.fuzz`'s odd store calls on the
  driver; a refused call leaves the driver's book and every shard as it was.
"""

from __future__ import annotations

import os

import torch
from sharded_support import DRIVER, OUT, add_all, check, driven, refused, same

import kvmem
from kvmem.inputs import LIMIT_ENV
from kvmem.testing import BruteForceMemory, randn, snapshot


@check
def stores_interleaved(data):
    kw_a = dict(dim=8, value_dim=4, partitions=2, dtype=torch.float32)
    kw_b = dict(dim=6, value_dim=3, partitions=1, dtype=torch.float32, capacity=40)
    a, b = kvmem.create("sharded", inner="exact", **kw_a), kvmem.create("sharded", inner="exact", **kw_b)
    if not DRIVER:
        a.serve()                     # answers b's operations too, until the driver closes a
        b.serve()
        return
    la, lb = kvmem.create("exact", **kw_a), kvmem.create("exact", **kw_b)
    ma, mb = BruteForceMemory(8, 4, 2, "ip", torch.float32), BruteForceMemory(6, 3, 1, "ip", torch.float32, 40)
    with b, lb:
        with a, la:
            for seed in range(3):
                add_all((a, la), ma, randn(seed, 2, 30, 8), randn(seed + 1, 2, 30, 4))
                add_all((b, lb), mb, randn(seed + 2, 1, 25, 6), randn(seed + 3, 1, 25, 3))
                same(a, la, ma, randn(seed + 4, 2, 5, 8), 7)
                same(b, lb, mb, randn(seed + 5, 1, 5, 6), 9)
        add_all((b, lb), mb, randn(9, 1, 5, 6), randn(10, 1, 5, 3))   # a is closed: the serving ranks wait
        same(b, lb, mb, randn(11, 1, 5, 6), 50)                       # in b.serve() now
        data["b_shards"] = b.shard_counts()


@check
def refused_on_a_serving_rank(data):
    """A store the driver may open but a serving rank may not: every rank raises, the loop serves on."""
    if not DRIVER:
        os.environ[LIMIT_ENV] = str(1 << 20)       # this rank allows 16 partitions of dim 8
        try:
            driven(None, data)
        finally:
            del os.environ[LIMIT_ENV]
        return

    def body(data):
        refused(lambda: kvmem.create("sharded", dim=8, partitions=64), "rank 1", "over the limit")
        with kvmem.create("sharded", dim=8, partitions=2, dtype=torch.float32) as store:
            store.add(randn(0, 2, 10, 8), randn(1, 2, 10, 8))
            assert store.shard_counts() == [10, 10] and store.search(randn(2, 2, 3, 8), 4).ids.min() >= 0

    driven(body, data)


def _tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=256, initializer_range=0.25)
    return AutoModelForCausalLM.from_config(config).eval()   # a LlamaForCausalLM


def _tokens(B, N, seed):
    return torch.randint(0, 64, (B, N), generator=torch.Generator().manual_seed(seed))


@check
def hf_attach(data):
    driven(_hf_attach, data)


def _hf_attach(data):
    from kvmem.adapters import hf

    path, prompt = OUT / "hf-saved", _tokens(2, 5, 2)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    models = [_tiny_llama(), _tiny_llama()]
    settings = dict(k=6, positions="first", chunk_size=16)
    adapters = [hf.attach(models[0], backend="sharded", store_options={"inner": "exact", "dtype": torch.float32,
                                                                       "timeout": 30.0}, **settings),
                hf.attach(models[1], backend="exact", store_options={"dtype": torch.float32}, **settings)]
    fed = [a.feed(_tokens(2, 40, 1), return_logits="all").logits for a in adapters]
    assert torch.equal(fed[0], fed[1]), f"feed logits differ by {(fed[0] - fed[1]).abs().max()}"
    stores = adapters[0].stores
    assert len(stores) == 2 and all(s.backend == "sharded" and min(s.shard_counts()) > 0 for s in stores.values())
    data["shard_counts"] = {i: s.shard_counts() for i, s in stores.items()}
    adapters[0].save(path)
    out = [m.generate(prompt, **greedy) for m in models]
    assert torch.equal(out[0], out[1]), f"generated {out[0].tolist()} with sharded stores, {out[1].tolist()} without"
    adapters[0].detach()
    adapters[0] = hf.load(models[0], path)                  # every rank loads its shards of every layer
    again = models[0].generate(prompt, **greedy)
    assert torch.equal(again, out[0]), f"after load: {again.tolist()}, before: {out[0].tolist()}"
    for a in adapters:                                       # another batch size: every layer's store anew
        a.reset()
    fed = [a.feed(_tokens(1, 24, 3), return_logits="all").logits for a in adapters]
    assert torch.equal(fed[0], fed[1]), f"batch of 1: feed logits differ by {(fed[0] - fed[1]).abs().max()}"
    for a in adapters:
        a.detach()


def _fuzz():
    """The fuzz suite over a sharded exact store (imported on the driver alone: hypothesis is slow to import)."""
    from kvmem.testing.fuzz import StoreFuzz

    class ShardedFuzz(StoreFuzz):
        backend = "sharded"
        options = {"inner": "exact", "timeout": 30.0}
        examples = int(os.environ.get("KVMEM_FUZZ_EXAMPLES", 6))   # per store method

        def observe(self, store, probe):
            shards = store.shard_counts()
            assert sum(shards) == len(store), f"the shards hold {shards} rows; the driver counts {len(store)}"
            return {**snapshot(store, probe, k=16), "shards": shards}

    return ShardedFuzz()


@check
def fuzz_store_calls(data):
    def body(data):
        from kvmem.testing.fuzz import STORE_ENTRIES, TALLY

        fuzz = _fuzz()
        for entry in STORE_ENTRIES:         # each method its share of the draws, few as they are
            fuzz.entries = [entry]
            fuzz._run(fuzz.examples, fuzz.run_calls)
        data["tally"] = dict(TALLY["sharded"])

    driven(body, data)
