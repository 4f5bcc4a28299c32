"""kvmem.adapters.hf on tiny random Llama, Mistral and Qwen2 models (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvmem
from kvmem.errors import CorruptStoreError, InvalidInputError
from kvmem.testing.child import run_child

transformers = pytest.importorskip("transformers")
from kvmem.adapters import hf  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
VOCAB, HKV = 128, 2


def tiny(kind="llama", seed=0, **kw):
    torch.manual_seed(seed)
    config = CONFIGS[kind](
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=HKV,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        initializer_range=0.25,  # sharp attention: positions and memory visibly matter
        **kw,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tokens(B, N, seed=1):
    return torch.randint(0, VOCAB, (B, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_chunked_feed_equals_full_attention(kind):
    model = tiny(kind)
    ids = tokens(2, 48)
    with torch.no_grad():
        full = model(ids).logits  # (2, 48, V)
    adapter = hf.attach(model, backend="exact", layers="all", k=64, positions="absolute", chunk_size=16)
    out = adapter.feed(ids, return_logits="all")
    assert out.logits.shape == full.shape
    assert (out.logits - full).abs().max().item() <= 1e-4
    assert {i: len(s) for i, s in adapter.stores.items()} == {0: 2 * HKV * 48, 1: 2 * HKV * 48}
    last = adapter.feed(tokens(2, 5, seed=2)).logits
    assert last.shape == (2, 1, VOCAB)
    adapter.detach()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunked_feed_equals_full_attention_on_cuda():
    model = tiny("qwen2").cuda()
    ids = tokens(2, 48).cuda()
    with torch.no_grad():
        full = model(ids).logits
    adapter = hf.attach(model, k=64, positions="absolute", chunk_size=16, store_options={"device": "cuda"})
    out = adapter.feed(ids, return_logits="all").logits
    adapter.detach()
    assert out.device.type == "cuda"
    assert (out - full).abs().max().item() <= 1e-4


def test_small_k_differs_from_full_attention():
    """The equality above is not vacuous: with k < memory the logits move."""
    model = tiny()
    ids = tokens(1, 48)
    with torch.no_grad():
        full = model(ids).logits
    adapter = hf.attach(model, k=2, positions="absolute", chunk_size=16)
    out = adapter.feed(ids, return_logits="all").logits
    adapter.detach()
    assert (out[:, :16] - full[:, :16]).abs().max().item() <= 1e-4  # first window: no memory yet
    assert (out[:, 16:] - full[:, 16:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_generate_after_feed_continues_the_stream(impl):
    """positions="absolute", k >= memory: generating after feed == generating on the whole text."""
    model = tiny(attn_implementation=impl)
    doc, prompt = tokens(1, 40), tokens(1, 6, seed=3)
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = model.generate(torch.cat([doc, prompt], 1), **greedy)[:, 46:]
    with torch.no_grad():
        whole = model(torch.cat([doc, prompt], 1)).logits[:, 40:]
    adapter = hf.attach(model, k=64, positions="absolute", chunk_size=16)
    adapter.feed(doc)
    with torch.no_grad():
        continued = model(prompt).logits  # positions 0.. moved by the 40 fed tokens
    assert (continued - whole).abs().max().item() <= 1e-4
    got = model.generate(prompt, **greedy)[:, 6:]
    assert torch.equal(got, want)
    assert len(adapter.stores[0]) == HKV * 40  # generate reads memory, does not write it
    adapter.detach()


def test_generate_first_mode_uses_memory_and_handles_padding():
    model = tiny("qwen2")
    adapter = hf.attach(model, k=8, positions="first", chunk_size=16)
    prompt = tokens(2, 6, seed=4)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding in the second row
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, attention_mask=mask)
    with torch.no_grad():
        empty = model(prompt, attention_mask=mask).logits
    adapter.feed(tokens(2, 40))
    with torch.no_grad():
        remembered = model(prompt, attention_mask=mask).logits
    out = model.generate(prompt, **greedy)
    assert out.shape == (2, 11)
    assert (remembered - empty).abs().max().item() > 1e-3  # memory changes what the prompt sees
    adapter.detach()


@pytest.mark.parametrize("positions", ["first", "none"])
def test_memory_keys_are_stored_before_rope(positions):
    """Memory rows are k_proj outputs (pre-RoPE), recovered by inverting the model's rotation."""
    model = tiny()
    captured = []
    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.append(o))
    adapter = hf.attach(model, k=4, positions=positions, chunk_size=8)
    adapter.feed(tokens(1, 24))
    hook.remove()
    pre = torch.cat(captured, 1).view(1, 24, HKV, -1).transpose(1, 2)  # (1, Hkv, 24, d)
    keys, _ = adapter.stores[0].get(torch.arange(24).expand(HKV, 24))  # (Hkv, 24, d)
    assert (keys - pre[0]).abs().max().item() < 1e-5
    adapter.detach()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    ids = tokens(1, 48)
    logits = {}
    for dt in (torch.float32, dtype):
        adapter = hf.attach(tiny().to(dt), k=8, positions="first", chunk_size=16)
        logits[dt] = adapter.feed(ids, return_logits="all").logits.float()
        assert adapter.stores[0].dtype == dt  # the store follows the model unless told otherwise
        adapter.detach()
    assert torch.isfinite(logits[dtype]).all()
    agree = (logits[dtype].argmax(-1) == logits[torch.float32].argmax(-1)).float().mean().item()
    assert agree >= 0.9


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_detach_restores_bit_identical_outputs(impl):
    model = tiny("mistral", attn_implementation=impl)
    ids = tokens(2, 20)
    with torch.no_grad():
        before = model(ids).logits
    adapter = hf.attach(model, layers=[1], k=4, chunk_size=8)
    adapter.feed(ids)
    with torch.no_grad():
        during = model(ids).logits
    assert not torch.equal(during, before)
    adapter.detach()
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(after, before)
    assert model.config._attn_implementation == impl
    assert not any(hasattr(m, "kvmem_memory") for m in model.modules())
    hf.attach(model).detach()  # attachable again


def test_layers_subset_and_reset():
    model = tiny()
    adapter = hf.attach(model, layers=[1], k=4, chunk_size=8)
    assert adapter.layers == (1,)
    assert not hasattr(model.model.layers[0].self_attn, "kvmem_memory")
    adapter.feed(tokens(2, 16))
    assert list(adapter.stores) == [1] and len(adapter.stores[1]) == 2 * HKV * 16
    with pytest.raises(InvalidInputError, match="batch size"):
        adapter.feed(tokens(1, 8))
    adapter.reset()
    assert adapter.tokens == 0 and len(adapter.stores[1]) == 0
    adapter.feed(tokens(1, 8))  # another batch size after reset
    assert adapter.stores[1].partitions == HKV and len(adapter.stores[1]) == HKV * 8
    adapter.detach()


def test_bad_arguments_are_refused_before_touching_the_model():
    model = tiny()
    for kwargs, words in [
        ({"positions": "relative"}, "positions"),
        ({"layers": [7]}, "layers"),
        ({"layers": "some"}, "layers"),
        ({"k": -1}, "k: expected"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"backend": "faiss-gpu-please"}, "backend"),
    ]:
        with pytest.raises(InvalidInputError, match=words):
            hf.attach(model, **kwargs)
    assert model.config._attn_implementation == "sdpa"
    adapter = hf.attach(model)
    with pytest.raises(InvalidInputError, match="already attached"):
        hf.attach(model)
    with pytest.raises(InvalidInputError, match="input_ids"):
        adapter.feed(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="return_logits"):
        adapter.feed(tokens(1, 4), return_logits="first")
    adapter.detach()


def test_load_refuses_a_damaged_save_or_another_model(tmp_path):
    model = tiny()
    adapter = hf.attach(model, k=4, chunk_size=8)
    adapter.feed(tokens(1, 16))
    adapter.save(tmp_path / "memory")
    adapter.save(tmp_path / "memory")  # a second save replaces the first snapshot
    adapter.detach()
    assert len(list((tmp_path / "memory").glob("snapshot-*"))) == 1
    with pytest.raises(InvalidInputError, match="shaped like"):
        hf.load(tiny("qwen2"), tmp_path / "memory")
    manifest = tmp_path / "memory" / "adapter.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(CorruptStoreError):
        hf.load(model, tmp_path / "memory")
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "kvmem_memory") for m in model.modules())


def test_model_without_attention_interface_gets_a_clear_error():
    from transformers import BloomConfig

    config = BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(InvalidInputError, match="AttentionInterface"):
        hf.attach(model)


SCRIPT = """
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM
from kvmem.adapters import hf
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
adapter = hf.load(model, sys.argv[2])
assert adapter.tokens == int(sys.argv[4]), adapter.tokens
rest = torch.from_numpy(np.load(sys.argv[3]))
np.save(sys.argv[3], adapter.feed(rest, return_logits="all").logits.numpy())
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend,positions", [
    ("exact", "absolute"), ("exact", "first"), ("ivf", "first"), ("hnsw", "first"), ("lmdb", "first"),
])
def test_save_load_in_new_process_continues_like_uninterrupted(tmp_path, backend, positions):
    reason = unavailable(backend)
    if reason is not None:
        pytest.skip(f"kvmem.backends() reports {backend!r} unavailable here: {reason}")
    options = high_recall(backend)
    if backend == "lmdb":
        options["path"] = str(tmp_path / "live")
    model = tiny("qwen2")
    model.save_pretrained(tmp_path / "model")
    head, rest = tokens(2, 352), tokens(2, 24, seed=5)  # 352 rows: IVF (nlist 8) is trained when saved
    adapter = hf.attach(model, backend=backend, k=8, positions=positions, chunk_size=64, store_options=options)
    adapter.feed(head)
    adapter.save(tmp_path / "memory")
    want = adapter.feed(rest, return_logits="all").logits.numpy()
    adapter.detach()

    np.save(tmp_path / "rest.npy", rest.numpy())
    args = [str(tmp_path / "model"), str(tmp_path / "memory"), str(tmp_path / "rest.npy"), "352"]
    run_child(SCRIPT, args=args)                                      # a new process: nothing shared but files
    got = np.load(tmp_path / "rest.npy")
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5


def unavailable(name):
    """None if kvmem.backends() says ``name`` works here, else its reason."""
    info = kvmem.backends().get(name)
    if info is None:
        return "not registered"
    return None if info.available else (info.reason or "unavailable")


def high_recall(backend):
    """store_options at high-recall settings, from what the backend declares.

    ``target_recall=0.999``: the backend calibrates its knob (nprobe, ef) for
    recall@32 0.999 on its own sample. ``nlist=8`` makes IVF train once a
    partition holds 312 rows, so the second half of the text is searched
    through the index. (The top-1 of a random model is fragile: IVF at a
    fixed 7 of 8 lists reached only 0.97-0.99 agreement here.)
    """
    cls = kvmem.registry.resolve(backend)
    options = {"target_recall": 0.999} if "target_recall" in cls.defaults else {}
    if "nlist" in cls.defaults:
        options["nlist"] = 8
    return options


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_approximate_backends_agree_with_exact_on_top1(backend):
    reason = unavailable(backend)
    if reason is not None:
        pytest.skip(f"kvmem.backends() reports {backend!r} unavailable here: {reason}")
    model = tiny()
    ids = tokens(1, 640)
    preds = {}
    for name, opts in [("exact", {}), (backend, high_recall(backend))]:
        adapter = hf.attach(model, backend=name, k=16, positions="first", chunk_size=64, store_options=opts)
        preds[name] = adapter.feed(ids, return_logits="all").logits.argmax(-1)
        adapter.detach()
    agreement = (preds[backend] == preds["exact"]).float().mean().item()
    assert agreement >= 0.99


def test_layers_without_memory_compute_exactly_what_they_did_before():
    """With memory on layer 0 only, layer 1's attention, given the inputs it gets, returns what the
    unattached model's layer 1 returns for them, bit for bit."""
    model, twin = tiny(seed=5), tiny(seed=5)
    seen = {}

    def capture(module, args, kwargs, output):
        seen.update(args=args, kwargs=kwargs, output=output[0])

    hook = model.model.layers[1].self_attn.register_forward_hook(capture, with_kwargs=True)
    adapter = hf.attach(model, layers=[0], k=4, positions="first", chunk_size=8)
    adapter.feed(tokens(1, 24))
    with torch.no_grad():
        model(tokens(1, 8, seed=6), use_cache=False)
        alone = twin.model.layers[1].self_attn(*seen["args"], **seen["kwargs"])[0]
    hook.remove()
    assert torch.equal(seen["output"], alone)
    adapter.detach()


def test_search_options_reach_the_store():
    """ivf with every list probed is exact search; with one list probed it is not, and the logits say so."""
    ids, doc = tokens(1, 8, seed=7), tokens(1, 256, seed=8)
    store_options = {"train_size": 64, "nlist": 8, "query_sample": 0}   # no hub: the probed lists alone
    logits = {}
    for name, backend, search in [("exact", "exact", {}), ("all-lists", "ivf", {"nprobe": 8}),
                                  ("one-list", "ivf", {"nprobe": 1})]:
        model = tiny(seed=9)
        adapter = hf.attach(model, backend=backend, k=4, positions="first", chunk_size=64,
                            store_options=store_options if backend == "ivf" else {}, search_options=search)
        adapter.feed(doc)
        with torch.no_grad():
            logits[name] = model(ids).logits
        adapter.detach()
    assert (logits["all-lists"] - logits["exact"]).abs().max().item() < 1e-4
    assert (logits["one-list"] - logits["exact"]).abs().max().item() > 1e-3


def test_generate_with_left_padding_equals_the_unpadded_run():
    doc = tokens(2, 32, seed=10)
    prompts = tokens(2, 6, seed=11)
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0                                         # row 1's prompt is 4 tokens, left-padded by 2
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    model = tiny("qwen2", seed=12)
    adapter = hf.attach(model, k=8, positions="first", chunk_size=16)
    adapter.feed(doc)
    padded = model.generate(prompts, attention_mask=mask, **greedy)[:, 6:]
    adapter.detach()
    for row, prompt in ((0, prompts[:1]), (1, prompts[1:, 2:])):
        alone_model = tiny("qwen2", seed=12)
        alone = hf.attach(alone_model, k=8, positions="first", chunk_size=16)
        alone.feed(doc[row:row + 1])
        want = alone_model.generate(prompt, **greedy)[:, prompt.shape[1]:]
        alone.detach()
        assert torch.equal(padded[row:row + 1], want), (row, padded[row], want)
