"""Regression tests for what the fuzz suite found escaping (issue 17), outside the per-backend tables
of kvmem.testing.bad_inputs: the resource limits at their boundary, the command, the adapters."""

import contextlib
import io
import resource

import numpy as np
import pytest
import torch
from kvmem.adapters import MemoryAttention, RotaryEmbedding

import kvmem
from kvmem import inputs
from kvmem.cli import main
from kvmem.testing.fuzz import limited


def _store(**kwargs):
    store = kvmem.create("exact", dim=8, value_dim=4, partitions=2, dtype=torch.float32, **kwargs)
    store.add(torch.randn(2, 5, 8), torch.randn(2, 5, 4))
    return store


def test_the_largest_k_named_is_accepted_and_one_more_refused():
    store, queries = _store(), torch.randn(2, 3, 8)
    with limited(1 << 20):
        with pytest.raises(kvmem.InvalidInputError, match="largest k that fits is ") as info:
            store.search(queries, 10**6)
        largest = int(str(info.value).rsplit(" ", 1)[1].replace(",", ""))
        assert largest == (1 << 20) // (2 * 3 * inputs.row_bytes(8, 4, torch.float32))
        assert store.search(queries, largest).ids.shape == (2, 3, largest)
        with pytest.raises(kvmem.InvalidInputError, match="over the limit"):
            store.search(queries, largest + 1)
        with pytest.raises(kvmem.InvalidInputError, match="add with n=20,000 .*largest n"):
            store.add(torch.randn(2, 20_000, 8), torch.randn(2, 20_000, 4))
    assert len(store) == 10


def test_a_refused_huge_k_allocates_nothing():
    store, queries = _store(), torch.randn(2, 3, 8)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for k in (2**40, inputs.byte_limit(torch.device("cpu")) // (2 * 3 * 36) + 1):   # just over the real limit
        with pytest.raises(kvmem.InvalidInputError, match="over the limit of"):
            store.search(queries, k)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024 < 64 << 20


def test_hnsw_partitions_are_bounded_by_what_their_graphs_take():
    message = r"partitions=8 .*largest partitions that fits is 5"
    with limited(16 << 20), pytest.raises(kvmem.InvalidInputError, match=message):
        kvmem.create("hnsw", dim=8, partitions=8)


def _exit_code(*argv):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


@pytest.mark.parametrize("argv, message", [
    (("--backends", ",,"), "at least one backend"), (("--size", "-1"), "expected an int >= 1; got -1"),
    (("--nprobe", "a,b"), "got 'a'"), (("--out", "{file}"), "cannot be a results folder"),
    (("--out", "{file}/inside"), "cannot be a results folder")])
def test_bench_refuses_bad_arguments_before_running(tmp_path, argv, message):
    (tmp_path / "file").write_text("x")
    argv = [a.format(file=tmp_path / "file") for a in argv]
    code, err = _exit_code("bench", "--size", "64", "--backends", "exact", "--out", str(tmp_path / "out"), *argv)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out" / "results.json").exists()


def test_info_of_odd_paths_is_exit_2(tmp_path):
    for path in ("a\x00b", "x" * 300, str(tmp_path / "missing")):
        assert _exit_code("info", path)[0] == 2


def test_memory_attention_refuses_odd_arguments_and_keeps_memory():
    store = kvmem.create("exact", dim=8, value_dim=8, partitions=2, dtype=torch.float32)
    store.add(torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    for kwargs, message in (({"num_heads": 2**40}, "num_heads=1,099,511,627,776 .*over the limit"),
                            ({"gate": 2**31}, "gate: expected a bool"), ({"scaling": float("nan")}, "scaling"),
                            ({"scaling": "a"}, "scaling")):
        with pytest.raises(kvmem.InvalidInputError, match=message):
            MemoryAttention(store, **{"num_heads": 4, **kwargs})
    attn = MemoryAttention(store, num_heads=4, k=2, rope=RotaryEmbedding(8))
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    for args, kwargs, message in (((None, None, None), {}, "query: expected a 4-D floating tensor, got NoneType"),
                                  ((q, [[1.0]], kv), {}, "key: expected a 4-D floating tensor, got list"),
                                  ((q, kv, kv), {"position_ids": torch.arange(3.0)}, "position_ids: expected integer"),
                                  ((q, kv, kv), {"key_position_ids": 3}, "key_position_ids: expected integer"),
                                  ((q, kv, kv), {"write": np.uint8(1)}, "write: expected a bool"),
                                  ((q, kv, kv), {"search_params": "ef"}, "search_params: expected a mapping")):
        with pytest.raises(kvmem.InvalidInputError, match=message):
            attn(*args, **kwargs)
    assert len(store) == 8


def test_hf_refuses_odd_arguments_and_keeps_memory(tmp_path):
    transformers = pytest.importorskip("transformers")
    from kvmem.adapters import hf

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for kwargs, message in (({"layers": 5}, "layers: expected"), ({"layers": [[0]]}, "layers: expected distinct"),
                            ({"store_options": {"dim": 3}}, "'dim' is set by the model"),
                            ({"search_options": 5}, "search_options: expected a mapping"),
                            ({"store_options": "exact", "k": "all"}, "store_options: expected a mapping")):
        with pytest.raises(kvmem.InvalidInputError, match=message):
            hf.attach(model, **kwargs)
    adapter = hf.attach(model, k=4)
    adapter.feed(torch.randint(0, 64, (1, 8)), chunk_size=4)
    for ids, message in ((torch.full((1, 4), 64), r"in \[0, 64\), got 64"), (torch.full((1, 4), -1), "got -1"),
                         ([[1, 2], [3]], "integer token ids")):
        with pytest.raises(kvmem.InvalidInputError, match=message):
            adapter.feed(ids)
    assert adapter.tokens == 8 and all(len(s) == 16 for s in adapter.stores.values())
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", "a\x00b"):
        with pytest.raises(kvmem.InvalidInputError, match="cannot save to|without NUL"):
            adapter.save(path)
    adapter.detach()
    with pytest.raises(kvmem.InvalidInputError, match="without NUL"):
        hf.load(model, "a\x00b")
