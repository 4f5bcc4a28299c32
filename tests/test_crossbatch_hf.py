"""CrossBatch through a Hugging Face model (the adapter's attention function), write-only feed, fot_lookup."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from kvmem.adapters import hf  # noqa: E402
from kvmem.benchmarks import fot_lookup  # noqa: E402
from kvmem.benchmarks.fot_task import (  # noqa: E402
    MEMORY_LAYERS,
    Task,
    TrainConfig,
    dictionary,
    make_model,
    query_windows,
    train,
    training_batch,
)
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from kvmem.errors import InvalidInputError, KvmemError  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread (two threads on a loaded 2-core machine spin and wait)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=40, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config).eval()


def test_window_zero_is_the_plain_model_and_later_windows_read_memory():
    model, plain = _model(), _model()
    adapter = hf.attach(model, layers=[1], positions="first")
    ids = torch.randint(0, 40, (3, 12))
    with adapter.crossbatch(d=2, window=4) as step:
        logits = step(ids).logits  # (3, 12, 40)
    for b in range(3):
        for j in range(3):
            alone = plain(ids[b : b + 1, 4 * j : 4 * j + 4]).logits[0]  # the window by itself, no memory
            if j == 0:
                torch.testing.assert_close(logits[b, :4], alone, atol=1e-5, rtol=1e-5)
            else:
                assert not torch.allclose(logits[b, 4 * j : 4 * j + 4], alone, atol=1e-3)
    assert adapter.stores == {}  # training neither made nor wrote a store
    adapter.detach()


def test_gradients_reach_the_negatives_and_only_them():
    model = _model()
    adapter = hf.attach(model, layers=[2], positions="none")
    docs, W = 3, 4
    ids = torch.arange(docs * 2 * W).view(docs, 2 * W)  # every token distinct: row b = doc b
    labels = torch.full_like(ids, -100)
    labels[0, W + 1 :] = ids[0, W + 1 :]  # only the second window of document 0 is scored
    with adapter.crossbatch(d=2, window=W) as step:
        step(ids, labels).loss.backward()
    grad = model.get_input_embeddings().weight.grad.abs().sum(-1)  # (V,)
    assert (grad[ids[0, :-1]] > 0).all()  # own document: window 1 and, through memory, window 0
    assert (grad[ids[1, :W]] > 0).all()  # the negative: document 1's window 0
    assert (grad[ids[1, W:]] == 0).all() and (grad[ids[2]] == 0).all()  # not in the softmax
    adapter.detach()


def test_a_50_step_run_lowers_the_loss():
    task = Task(keys=8, values=8, window=20)
    config = TrainConfig(d="2", docs=4, windows=2, steps=50, warmup=5, lr=5e-3, hidden=32, heads=2, head_dim=16)
    record = train(task, config, log=lambda *_: None)
    losses = record["losses"]
    assert len(losses) == 50
    assert sum(losses[-10:]) / 10 < 0.85 * losses[0]


def test_bad_settings_raise_and_leave_the_model_as_it_was():
    model = _model()
    adapter = hf.attach(model, layers=[1])
    ids = torch.randint(0, 40, (2, 12))
    for d, W, match in [(0, 4, "d: expected an int >= 1"), (3, 4, "at most the 2 documents"),
                        (1, 5, "divisor of the sequence length 12")]:
        with pytest.raises(InvalidInputError, match=match):
            with adapter.crossbatch(d=d, window=W) as step:
                step(ids)
    with pytest.raises(InvalidInputError, match="labels: expected shape"):
        with adapter.crossbatch(d=1, window=4) as step:
            step(ids, ids[:, :4])
    with pytest.raises(KvmemError, match="inside its with-block"):
        adapter.crossbatch(d=1, window=4)(ids)
    out = adapter.feed(ids, chunk_size=4)  # the adapter works as before
    assert out.logits.shape == (2, 1, 40) and len(adapter.stores[1]) == 2 * 12 * 2
    adapter.detach()


@pytest.mark.parametrize("positions", ["first", "absolute"])
def test_feed_without_search_writes_what_a_memory_without_search_writes(positions, monkeypatch):
    from kvmem.adapters import _hf_fill

    monkeypatch.setattr(_hf_fill, "ROWS", 2)  # several forwards of several windows, and a partial window
    reference = hf.attach(_model(), layers=[0, 2], k=0, positions=positions)  # reads nothing, writes all
    fast = hf.attach(_model(), layers=[0, 2], k=32, positions=positions)
    ids = torch.randint(0, 40, (2, 22))
    fast.feed(ids[:, :4], chunk_size=4)  # memory already holds a window: the fast path must not read it
    reference.feed(ids[:, :4], chunk_size=4)
    want = reference.feed(ids[:, 4:], chunk_size=4, return_logits="all").logits
    got = fast.feed(ids[:, 4:], chunk_size=4, search=False, return_logits="all").logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    last = fast.feed(ids[:, 4:], chunk_size=4, search=False).logits
    torch.testing.assert_close(last, want[:, -1:], atol=1e-5, rtol=1e-5)
    assert fast.tokens == 40 and reference.tokens == 22
    for i in (0, 2):
        rows = torch.arange(22).expand(4, -1)  # (B * Hkv, 22)
        for a, b in zip(fast.stores[i].get(rows), reference.stores[i].get(rows)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidInputError, match="search: expected a bool"):
        fast.feed(ids, search="no")
    assert fast.tokens == 40 and len(fast.stores[0]) == 2 * 2 * 40
    fast.detach()
    reference.detach()


def test_training_batches_ask_the_entries_of_the_window_before():
    task = Task(keys=8, values=8, window=20)
    ids, labels = training_batch(task, 3, 2, torch.Generator().manual_seed(0))
    for b in range(3):
        entries = {tuple(e[1:4].tolist()): int(e[4]) for e in ids[b, :20].view(4, 5)}
        for q, lab in zip(ids[b, 20:].view(4, 5), labels[b, 20:].view(4, 5)):
            assert int(q[-1]) == entries[tuple(q[1:4].tolist())] == int(lab[-1])
        assert (labels[b, :20] == -100).all()


def test_fot_lookup_runs_end_to_end(tmp_path):
    data = fot_lookup.quick(tmp_path)
    backends = {r["backend"] for r in data["results"]}
    assert backends == {"window only", "exact", "ivf", "hnsw", "lmdb"}
    assert {r["tokens"] for r in data["results"]} == {320, 640}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in data["results"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "crossbatch")  # safetensors checkpoint
    assert (tmp_path / "crossbatch" / "model.safetensors").exists() and reloaded.config.num_hidden_layers == 2
    assert json.loads((tmp_path / "fot_lookup.json").read_text())["training"]["control"]["train"]["d"] == "1"
    assert (tmp_path / "fot_lookup.png").stat().st_size > 0
    assert "memory tokens" in fot_lookup.render(data)
    # a dictionary with no entries left over for the warm-up queries, and ivf given a target recall
    small = fot_lookup.evaluate({"m": tmp_path / "crossbatch"}, [320], ["exact", "ivf"], queries=64,
                                target_recall=0.99, max_rows={}, log=lambda *_: None)
    assert {r["backend"] for r in small} == {"window only", "exact", "ivf"}


def test_query_windows_batched_in_one_forward_score_as_one_window_per_forward():
    task = Task(keys=8, values=8, window=10)
    config = TrainConfig(hidden=32, heads=2, head_dim=16)
    model = make_model(task, config).eval()
    adapter = hf.attach(model, layers=MEMORY_LAYERS, k=4, positions="none", chunk_size=10)
    codes, values = dictionary(task, 40, 0)
    adapter.feed(task.entries(codes, values).view(1, -1), search=False)
    ids, _, _ = query_windows(task, codes, values, 14, 1)  # 7 windows of 2 queries
    alone = torch.cat([fot_lookup.window_logits(model, ids[w : w + 1], batch=1)[0] for w in range(7)])
    batched, _ = fot_lookup.window_logits(model, ids, batch=3)  # forwards of 3, 3 and 1 windows
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    adapter.detach()


def test_the_d_curriculum_moves_on_when_the_loss_is_below_advance():
    task = Task(keys=8, values=8, window=10)
    small = {"docs": 2, "windows": 2, "warmup": 5, "hidden": 16, "heads": 2, "head_dim": 8}
    moves = train(task, TrainConfig(d="1,2", advance=100.0, steps=55, **small), log=lambda *_: None)
    assert moves["phases"] == [(1, 0), (2, 50)] and moves["steps"] == 55  # 50 steps at least per d
    stays = train(task, TrainConfig(d="1,2", advance=0.0, steps=55, **small), log=lambda *_: None)
    assert stays["phases"] == [(1, 0)] and stays["steps"] == 55


def test_hard_negatives_share_all_but_one_key_token_with_the_document_before():
    task = Task(keys=8, values=8, window=10)
    ids, _ = training_batch(task, 6, 2, torch.Generator().manual_seed(0), hard=1.0)
    keys = ids[:, :10].view(6, 2, 5)[:, :, 1:4]  # (docs, slots, 3) the entries' key tokens
    assert ((keys[1:] != keys[:-1]).sum(-1) == 1).all()
    easy, _ = training_batch(task, 6, 2, torch.Generator().manual_seed(0))
    assert ((easy[1:, 1:4] != easy[:-1, 1:4]).sum(-1) > 1).any()


def test_each_key_position_has_its_own_tokens():
    task = Task(keys=8, values=8, window=5)
    tokens = task.entries(torch.arange(512), torch.zeros(512, dtype=torch.long))  # every key once
    for i in range(3):
        assert set(tokens[:, 1 + i].tolist()) == set(range(10 + 8 * i, 18 + 8 * i))
    assert task.vocab == 2 + 8 + 24 and Task(keys=8, values=8, split=False).vocab == 18


def test_an_oracle_answers_every_query():
    class Oracle:  # logits at position t name the token at t + 1
        def __call__(self, input_ids, **_):
            nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], 1)
            return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, task.vocab).float()})

    task = Task(keys=8, values=8, window=10)
    codes, values = dictionary(task, 40, 0)
    ids, where, answers = query_windows(task, codes, values, 14, 1)
    assert fot_lookup._accuracy(Oracle(), ids, where, answers)[0] == 1.0


def test_fot_margins_counts_every_distractor_once(tmp_path):
    from kvmem.benchmarks.fot_margins import margins
    from kvmem.benchmarks.fot_task import Task, TrainConfig, train

    tiny = dict(d="1", docs=2, hidden=32, heads=2, head_dim=16)
    train(Task(keys=8, values=8, window=5), TrainConfig(steps=2, **tiny), tmp_path / "m", log=lambda *_: None)
    out = margins(tmp_path / "m", entries=300, queries=20, k=4)
    assert sum(d["per_query"] for d in out["distractors"]) == pytest.approx(299)  # every other entry, once
    assert all(0 <= d["beats_true"] <= 1 for d in out["distractors"])
    assert margins(tmp_path / "m", entries=300, queries=20, k=1500)["true_in_top_k_of_some_head"] == 1.0
    train(Task(keys=8, values=8, window=20), TrainConfig(steps=1, **tiny), tmp_path / "w", log=lambda *_: None)
    with pytest.raises(ValueError, match="one entry per window"):
        margins(tmp_path / "w", entries=50)
