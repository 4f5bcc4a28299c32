"""Odd arguments to MemoryAttention (constructor and forward) and to hf.attach / feed / hf.load.

Every call succeeds or raises InvalidInputError with a message, and a refused forward or feed leaves
the memory as it was. Tallied under ``attention`` and ``hf`` (kvmem.testing.fuzz).
"""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kvmem.adapters import MemoryAttention, RotaryEmbedding

import kvmem
from kvmem.testing import odd
from kvmem.testing.checks import same, snapshot
from kvmem.testing.fuzz import attempt, describe, fuzz_settings, limited, scratch_folder

B, H, HKV, T, D = 1, 4, 2, 3, 8


@st.composite
def tensors4(draw, shape):
    """A (B, H, T, d) tensor, or something odd in its place (rank, sizes, dtype, values, form)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(odd.SCALARS)
    if draw(st.booleans()):
        shape = draw(st.sampled_from([shape[:3], (*shape, 1), (shape[0], shape[1], 0, shape[3]),
                                      (shape[0], shape[1] + 1, *shape[2:]), (*shape[:3], shape[3] + 2),
                                      (shape[0] + 1, *shape[1:])]))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 999))), dtype=torch.float64)
    fill = draw(st.sampled_from(["normal"] * 4 + ["nan", "inf", "1e39"]))
    if fill != "normal" and t.numel():
        t.view(-1)[0] = float(fill)
    dtypes = [torch.float32] * 4 + [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]
    t = t.to(draw(st.sampled_from(dtypes)))
    form = draw(st.sampled_from(["tensor"] * 4 + ["noncontiguous", "numpy", "list"]))
    if form == "noncontiguous" and t.dim() == 4:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if form == "numpy" and t.dtype != torch.bfloat16:
        return t.numpy()
    return t.tolist() if form == "list" else t


def _positions(T):
    return st.one_of(st.none(), st.just(torch.arange(T)), st.just(torch.arange(T)[None]), st.just(torch.arange(T) + 50),
                     st.sampled_from([torch.arange(T + 1), torch.arange(T).float(), -torch.arange(T) - 1,
                                      torch.full((T,), 2**62), torch.zeros(2, 2, T, dtype=torch.long), [0, 1, 2]]),
                     odd.SCALARS)


def _masks(T, Tl):
    return st.one_of(st.none(), st.just(torch.ones(1, 1, T, Tl, dtype=torch.bool)),
                     st.just(torch.tril(torch.ones(T, Tl, dtype=torch.bool))[None, None]),
                     st.sampled_from([torch.ones(1, 1, T, Tl), torch.ones(T, Tl, dtype=torch.bool),
                                      torch.zeros(1, 1, T, Tl, dtype=torch.bool),
                                      torch.ones(2, 1, T, Tl, dtype=torch.bool)]),
                     odd.SCALARS)


def test_fuzz_memory_attention():
    @fuzz_settings(80)
    @given(data=st.data())
    def run(data):
        draw = data.draw
        store = kvmem.create("exact", dim=D, value_dim=D, partitions=B * HKV, dtype=torch.float32)
        store.add(torch.randn(B * HKV, 5, D), torch.randn(B * HKV, 5, D))
        kwargs = {"num_heads": draw(odd.scalars_or(st.just(H))),
                  "k": draw(odd.scalars_or(st.one_of(st.integers(0, 6), odd.names(["all"])))),
                  "positions": draw(odd.names(["absolute", "first", "none"])),
                  "gate": draw(odd.scalars_or(st.booleans())),
                  "scaling": draw(odd.scalars_or(st.one_of(st.none(), st.floats(0.01, 2)))),
                  "rope": draw(st.sampled_from([RotaryEmbedding(D), RotaryEmbedding(D), None, RotaryEmbedding(D + 2),
                                                "rope"]))}
        hnsw = kvmem.create("hnsw", dim=D, value_dim=D, partitions=B * HKV)        # k="all" refuses it (no streaming)
        other = kvmem.create("exact", dim=D, partitions=3)
        given_store = draw(st.sampled_from([store] * 4 + [None, "exact", hnsw, other]))
        ok, attn = attempt("attention", describe("MemoryAttention", (given_store,), kwargs),
                           lambda: MemoryAttention(given_store, **kwargs))
        if not ok:
            return
        Tl = draw(st.sampled_from([T, T + 2]))
        args = (draw(tensors4((B, H, T, D))), draw(tensors4((B, HKV, Tl, D))), draw(tensors4((B, HKV, Tl, D))))
        call = {"position_ids": draw(_positions(T)), "key_position_ids": draw(st.one_of(st.none(), _positions(Tl))),
                "attention_mask": draw(_masks(T, Tl)), "write": draw(odd.scalars_or(st.booleans())),
                "search_params": draw(st.sampled_from([None, {}, {"bogus": 1}, "ef", {"k": 3}]))}
        probe = torch.randn(B * HKV, 2, D)
        before = snapshot(store, probe, k=16)
        ok, _ = attempt("attention", describe("MemoryAttention.forward", args, call), lambda: attn(*args, **call))
        if not ok:
            assert same(before, snapshot(store, probe, k=16)), "a refused forward changed the memory"

    with limited():
        run()


@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _token_ids():
    good = st.integers(1, 12).map(lambda n: torch.randint(0, 64, (1, n)))
    return st.one_of(good, good, good, st.sampled_from([
        torch.zeros(1, 0, dtype=torch.long), torch.full((1, 4), 64), torch.full((1, 4), -1), torch.ones(1, 4),
        torch.ones(1, 2, 3, dtype=torch.long), torch.ones(4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long),
        np.ones((1, 4), np.int64), [[1, 2, 3]], [[1, 2], [3]], torch.ones(1, 4, dtype=torch.bool),
        torch.full((1, 2), 2**40)]), odd.SCALARS)


def test_fuzz_hf_attach_feed_load(llama):
    from kvmem.adapters import hf

    root = scratch_folder(Path(tempfile.mkdtemp(prefix="kvmem-fuzz-hf-")))

    @fuzz_settings(15)
    @given(data=st.data())
    def run(data):
        draw = data.draw
        valid = {"backend": st.sampled_from(["exact", "hnsw"]), "layers": st.sampled_from(["all", [0], [1], [0, 1]]),
                 "k": st.one_of(st.integers(0, 8), st.just("all")),
                 "positions": st.sampled_from(["first", "absolute", "none"]),
                 "store_options": st.sampled_from([None, {}, {"dtype": "float32"}, {"capacity": 5}]),
                 "chunk_size": st.sampled_from([None, 4, 8]), "search_options": st.sampled_from([None, {}])}
        bad = {"backend": odd.names(["exact"]), "layers": odd.scalars_or(st.sampled_from([[0, 0], [5], [], "0"])),
               "k": odd.SCALARS, "positions": odd.names(["first"]), "chunk_size": odd.SCALARS,
               "store_options": st.sampled_from([{"dtype": "int8"}, {"capacity": 0}, {"bogus": 1}, {"dim": 3},
                                                 {"path": "\x00"}, "exact", 3, [("a", 1)]]),
               "search_options": st.sampled_from([{"bogus": 1}, {"ef": 0}, 5, "ef"])}
        kwargs = {name: draw(strategy) for name, strategy in valid.items()}
        for name in draw(st.sets(st.sampled_from(sorted(bad)), max_size=2)):
            kwargs[name] = draw(bad[name])
        ok, adapter = attempt("hf", describe("hf.attach", (), kwargs), lambda: hf.attach(llama, **kwargs))
        if not ok:
            return
        try:
            first = torch.randint(0, 64, (1, 6))
            ok, _ = attempt("hf", "adapter.feed(6 tokens) after attach", lambda: adapter.feed(first, chunk_size=3))
            if not ok:                                        # store_options refused as the stores are made
                return
            counts = {i: len(s) for i, s in adapter.stores.items()}
            feed = {"input_ids": draw(_token_ids()), "chunk_size": draw(odd.scalars_or(st.sampled_from([None, 2, 5]))),
                    "return_logits": draw(odd.names(["last", "all"]))}
            ok, _ = attempt("hf", describe("adapter.feed", (), feed), lambda: adapter.feed(**feed))
            if not ok:
                assert {i: len(s) for i, s in adapter.stores.items()} == counts, "a refused feed changed memory"
            target = draw(st.one_of(st.just(root / "saved"), odd.paths(str(root))))
            if draw(st.booleans()):
                attempt("hf", describe("adapter.save", (target,)), lambda: adapter.save(target))
        finally:
            adapter.detach()
        device = draw(odd.scalars_or(st.sampled_from([None, "cpu"])))
        ok, loaded = attempt("hf", describe("hf.load", (target,), {"device": device}),
                             lambda: hf.load(llama, target, device=device),
                             (kvmem.InvalidInputError, kvmem.CorruptStoreError))
        if ok:
            loaded.detach()

    try:
        with limited():
            run()
    finally:
        shutil.rmtree(root, ignore_errors=True)
