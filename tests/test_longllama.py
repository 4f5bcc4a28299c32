"""A LongLLaMA checkpoint through LlamaForCausalLM + hf.attach, against LongLLaMA's published algorithm.

The checkpoint is a tiny random Llama saved with ``save_pretrained`` whose
config carries LongLLaMA's fields; nothing is downloaded. The reference
(tests/longllama_reference.py) is plain torch written from the paper's
description, not from long_llama's code.
"""

from __future__ import annotations

import pytest
import torch

import kvmem
from kvmem.errors import InvalidInputError

transformers = pytest.importorskip("transformers")
from kvmem.adapters import hf  # noqa: E402
from longllama_reference import Reference  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB, WINDOW, LAST, MEM_LAYERS = 128, 16, 8, [1, 2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.15,
        max_position_embeddings=WINDOW, last_context_length=LAST, mem_layers=MEM_LAYERS,
        mem_dtype="float32", mem_positionals=True, mem_attention_grouping=None,
    )
    folder = tmp_path_factory.mktemp("longllama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(folder):
    return LlamaForCausalLM.from_pretrained(folder).eval()


def tokens(B, N, seed=1):
    return torch.randint(0, VOCAB, (B, N), generator=torch.Generator().manual_seed(seed))


def test_attach_takes_its_settings_from_the_longllama_config(checkpoint):
    adapter = hf.attach(load(checkpoint), k="all")
    s = adapter.settings
    assert (s.layers, s.chunk_size, s.last_context_length, s.positions, s.rolling) == (
        tuple(MEM_LAYERS), WINDOW, LAST, "first", True)
    assert s.store_options["dtype"] == torch.float32
    assert s.sources["layers"] == "config.mem_layers"
    assert s.sources["chunk_size"] == "config.max_position_embeddings"
    assert s.sources["dtype"] == "config.mem_dtype"
    adapter.detach()
    explicit = hf.attach(load(checkpoint), layers=[0], chunk_size=8, last_context_length=2,
                         store_options={"dtype": torch.bfloat16})
    s = explicit.settings
    assert (s.layers, s.chunk_size, s.last_context_length, s.store_options["dtype"]) == ((0,), 8, 2, torch.bfloat16)
    assert {s.sources[n] for n in ("layers", "chunk_size", "last_context_length", "dtype")} == {"argument"}


def test_a_transformers_older_than_supported_is_refused_by_version(checkpoint, monkeypatch):
    model = load(checkpoint)
    monkeypatch.setattr("transformers.__version__", "4.55.4")  # sys.modules' transformers, which attach reads
    with pytest.raises(kvmem.errors.BackendUnavailableError, match="4.56.*4.55.4"):
        hf.attach(model)
    assert model.config._attn_implementation != "kvmem"
    monkeypatch.setattr("transformers.__version__", "4.56.0")
    hf.attach(model).detach()


def test_mem_positionals_false_is_refused_by_name(checkpoint):
    model = load(checkpoint)
    model.config.mem_positionals = False
    with pytest.raises(InvalidInputError, match="mem_positionals"):
        hf.attach(model)
    assert model.config._attn_implementation != "kvmem"
    hf.attach(model, positions="first").detach()  # an explicit choice wins


@pytest.mark.parametrize("last", [0, LAST])
def test_feed_equals_longllama(checkpoint, last):
    model = load(checkpoint)
    ids = tokens(2, 4 * WINDOW + 5)
    ref = Reference(model, MEM_LAYERS, WINDOW)
    want = ref.feed(ids, last=last)
    after = tokens(2, 3, seed=2)
    want_after = ref.forward(after)
    adapter = hf.attach(model, k="all")
    got = adapter.feed(ids, last_context_length=last, return_logits="all").logits
    assert (got - want).abs().max().item() <= 1e-5
    assert adapter.context == last
    assert len(adapter.stores[1]) == 2 * 2 * (ids.shape[1] - last)  # B x Hkv x tokens read into memory
    with torch.no_grad():
        got_after = model(after).logits  # continues the local context the feed left
    assert (got_after - want_after).abs().max().item() <= 1e-5


def test_greedy_generate_rolls_into_memory_as_longllama(checkpoint):
    """Four windows of greedy generation: the local context rolls into memory, positions restart."""
    model = load(checkpoint)
    ids, prompt = tokens(1, 2 * WINDOW + 3), tokens(1, 5, seed=3)
    adapter = hf.attach(model, k="all")
    adapter.feed(ids)  # the last LAST tokens stay local
    new = 4 * WINDOW
    out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    generated = out.sequences[:, prompt.shape[1]:]
    scores = torch.stack(out.logits, 1)  # (1, new, V)
    assert adapter.context <= WINDOW  # bounded local cache
    ref = Reference(model, MEM_LAYERS, WINDOW)
    ref.feed(ids, last=LAST)
    want = ref.follow(prompt, generated)
    assert (scores - want).abs().max().item() <= 1e-5
    assert torch.equal(generated, want.argmax(-1))
    # everything that left the local context is in memory; flush() moves the rest
    streamed = ids.shape[1] + prompt.shape[1] + new - 1  # the last generated token was never read
    assert len(adapter.stores[1]) == 2 * (streamed - adapter.context)
    adapter.flush()
    assert adapter.context == 0 and len(adapter.stores[1]) == 2 * streamed


def test_padding_is_neither_written_nor_attended(checkpoint):
    """Right padding: each row reads as it would alone, and memory holds only its real tokens."""
    model = load(checkpoint)
    a, b = tokens(1, 2 * WINDOW + 4, seed=4), tokens(1, WINDOW + 7, seed=5)
    batch = torch.zeros(2, a.shape[1], dtype=torch.long)
    batch[0], batch[1, : b.shape[1]] = a[0], b[0]
    mask = torch.zeros_like(batch)
    mask[0], mask[1, : b.shape[1]] = 1, 1
    adapter = hf.attach(model, k="all", last_context_length=0)
    got = adapter.feed(batch, attention_mask=mask, return_logits="all").logits
    assert adapter.stores[1].count(0) == a.shape[1] and adapter.stores[1].count(2) == b.shape[1]  # p = b*Hkv + h
    adapter.reset()
    alone_b = adapter.feed(b, return_logits="all").logits
    adapter.reset()
    alone_a = adapter.feed(a, return_logits="all").logits
    assert (got[1:, : b.shape[1]] - alone_b).abs().max().item() <= 1e-5
    assert (got[:1] - alone_a).abs().max().item() <= 1e-5


@pytest.mark.parametrize("positions", ["first", "absolute"])
def test_write_only_feed_leaves_what_the_searching_feed_leaves(checkpoint, positions, monkeypatch):
    """A padded batch with a last context: with one memory layer (its inputs do not depend on memory) the
    write-only feed writes the same rows at the same positions, leaves the same local context, and the
    step after it gives the same logits as the searching feed."""
    from kvmem.adapters import _hf_fill

    monkeypatch.setattr(_hf_fill, "ROWS", 2)  # several forwards of several windows, and a partial window
    ids, after = tokens(2, 5 * WINDOW + 3, seed=7), tokens(2, 3, seed=8)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, 20:24] = 0  # a hole inside the second window
    mask[1, -3:] = 0  # right padding, in the last context
    head = ids.shape[1] - LAST

    def read(search):
        model = load(checkpoint)
        adapter = hf.attach(model, layers=[1], k="all", positions=positions)
        logits = adapter.feed(ids, attention_mask=mask, return_logits="all", search=search).logits
        store = adapter.stores[1]
        real = [mask[b, :head].nonzero()[:, 0] for b in range(2)]
        wanted = torch.full((store.partitions, max(len(r) for r in real)), -1)
        for p in range(store.partitions):  # partition p = b * Hkv + h
            wanted[p, : len(real[p // 2])] = real[p // 2]
        rows = store.get(wanted)
        counts = [store.count(p) for p in range(store.partitions)]
        local = [(layer.keys.clone(), layer.values.clone()) for layer in adapter._context.layers]
        state = (adapter.tokens, adapter.context)
        with torch.no_grad():
            step = model(after).logits
        return logits[:, head:], rows, counts, local, state, step

    want, got = read(True), read(False)
    assert got[2] == want[2] == [int(mask[b, :head].sum()) for b in (0, 0, 1, 1)]  # only real tokens stored
    assert got[4] == want[4] == (ids.shape[1], LAST)  # tokens read, local context
    for a, b in zip(got[1], want[1]):
        assert (a - b).abs().max().item() <= 1e-5
    for (ka, va), (kb, vb) in zip(got[3], want[3]):
        assert (ka - kb).abs().max().item() <= 1e-5 and (va - vb).abs().max().item() <= 1e-5
    assert (got[0] - want[0]).abs().max().item() <= 1e-5  # the last context's logits
    assert (got[5] - want[5]).abs().max().item() <= 1e-5  # the step after


def test_bad_inputs_change_nothing(checkpoint):
    model = load(checkpoint)
    with pytest.raises(InvalidInputError, match='"all"'):
        hf.attach(model, k="some")
    assert model.config._attn_implementation != "kvmem"
    adapter = hf.attach(model, k="all")
    ids = tokens(1, 2 * WINDOW + 3)
    adapter.feed(ids)
    before = {i: (len(s), s.get(torch.arange(4)[None].expand(s.partitions, -1))[0].clone())
              for i, s in adapter.stores.items()}
    context, fed = adapter.context, adapter.tokens
    bad = [
        dict(input_ids=tokens(1, 10), attention_mask=torch.ones(1, 9)),
        dict(input_ids=tokens(1, 10), attention_mask=torch.ones(2, 10)),
        dict(input_ids=tokens(1, 10), last_context_length=WINDOW + 1),
        dict(input_ids=tokens(1, 10), attention_mask=torch.full((1, 10), 2)),
        dict(input_ids=tokens(1, 10), attention_mask=torch.ones(1, 9), search=False),
        dict(input_ids=tokens(1, 10), last_context_length=WINDOW + 1, search=False),
    ]
    for kwargs in bad:
        with pytest.raises(InvalidInputError):
            adapter.feed(**kwargs)
        assert (adapter.context, adapter.tokens) == (context, fed)
        for i, s in adapter.stores.items():
            assert len(s) == before[i][0] and torch.equal(s.get(torch.arange(4)[None].expand(s.partitions, -1))[0],
                                                          before[i][1])
    with pytest.raises(InvalidInputError, match="last_context_length"):
        hf.attach(load(checkpoint), chunk_size=4)  # the config's last_context_length 8 > window 4


def test_k_all_is_refused_by_backends_that_cannot_stream(checkpoint):
    adapter = hf.attach(load(checkpoint), k="all", backend="ivf")
    with pytest.raises(InvalidInputError, match="ivf"):
        adapter.feed(tokens(1, 8))
    adapter.detach()
    store = kvmem.create("ivf", dim=4, value_dim=4)
    with pytest.raises(InvalidInputError, match="ivf"):
        store.scan_rows(lambda *a: None)


@pytest.mark.parametrize("backend", ["exact", "lmdb"])
def test_k_all_equals_full_attention_under_absolute_positions(tmp_path, backend):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.25)
    model = LlamaForCausalLM(config).eval()
    ids = tokens(2, 64, seed=6)
    with torch.no_grad():
        want = model(ids).logits
    options = {"dtype": torch.float32, **({"path": tmp_path / "m", "block_rows": 16} if backend == "lmdb" else {})}
    adapter = hf.attach(model, backend=backend, k="all", positions="absolute", chunk_size=16, store_options=options)
    got = adapter.feed(ids, return_logits="all").logits
    assert (got - want).abs().max().item() <= 1e-4
    adapter.detach()


def test_save_and_load_keep_the_longllama_settings(checkpoint, tmp_path):
    model = load(checkpoint)
    adapter = hf.attach(model, k="all")
    adapter.feed(tokens(1, 2 * WINDOW + 3))
    adapter.save(tmp_path / "mem")
    rows = {i: len(s) for i, s in adapter.stores.items()}
    adapter.detach()
    again = hf.load(model, tmp_path / "mem")
    s = again.settings
    assert (s.k, s.layers, s.chunk_size, s.last_context_length, s.rolling) == ("all", tuple(MEM_LAYERS), WINDOW,
                                                                             LAST, True)
    assert {i: len(st) for i, st in again.stores.items()} == rows
    again.detach()
