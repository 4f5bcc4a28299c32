"""Every benchmark script runs end to end on tiny sizes and its RESULTS.md section renders.

The figures themselves belong to ``benchmarks/RESULTS.md``; here each path (build,
measure, JSON, plot, Markdown) runs once, and the figures it returns are checked
for what must hold at any size (exact agrees with faiss, ratios are positive).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from kvmem.benchmarks import (
    adapter_forward,
    ann,
    asked,
    exact_flat,
    exact_parts,
    hnsw_beam,
    lmdb_bench,
    lookup,
    make_results,
)
from kvmem.benchmarks.report import BenchResult

PNG = b"\x89PNG\r\n\x1a\n"


def test_exact_flat_small(tmp_path):
    out = exact_flat.main(["--n", "3000", "--dim", "16", "--k", "5", "--queries", "20", "--rounds", "1",
                           "--floor-n", "5000", "--floor-queries", "16", "--json", str(tmp_path / "exact.json")])
    assert set(out["batched"]) == {"gaussian", "clustered", "duplicates"}
    for kind, fig in out["batched"].items():
        assert fig["agreement_with_faiss"]["float32"] >= 0.99, kind          # copies of one key agree too
        assert set(fig["ratio"]) == {"float32", "bfloat16", "float16"} and all(r > 0 for r in fig["ratio"].values())
    assert json.loads((tmp_path / "exact.json").read_text())["batched"]["gaussian"]["n"] == 3000
    assert isinstance(out["fused_selection"], bool)
    floor = out["floor"]
    assert floor["n"] == 5000 and floor["queries"] == 16
    assert all(m["gflops"] > 0 < m["floor_s"] for m in (floor["matmul"]["float32"], floor["matmul"]["bfloat16"]))
    assert {(r["keys"], r["data"]) for r in floor["search"]} == {
        (keys, data) for keys in ("float32", "bfloat16") for data in ("gaussian", "clustered")}
    assert all(r["rank_dtype"] in ("float32", "bfloat16") and r["ratio_to_floor"] > 0 for r in floor["search"])
    text = exact_flat.render(out)
    assert "time / faiss" in text and "One query at a time" in text and "matmul floor" in text
    assert "duplicates" in text and "clustered" in text and "Compiled selection:" in text
    assert "| float32 | clustered |" in text and "GFLOP/s" in text


def test_exact_flat_data_picks_kinds_and_rejects_unknown_ones(capsys):
    out = exact_flat.main(["--n", "800", "--dim", "8", "--k", "4", "--queries", "8", "--rounds", "1",
                           "--floor-n", "1000", "--floor-queries", "8", "--data", "duplicates"])
    assert list(out["batched"]) == ["duplicates"]
    assert out["batched"]["duplicates"]["agreement_with_faiss"]["float32"] == 1
    with pytest.raises(SystemExit):
        exact_flat.main(["--data", "gaussian,sparse"])
    assert "unknown data kind 'sparse'; choose from gaussian, clustered, duplicates" in capsys.readouterr().err


def test_exact_flat_renders_json_kept_before_data_kinds():
    old = {"rounds": 1, "batched": {"n": 10, "dim": 4, "k": 2, "queries": 3, "faiss_s": 0.1,
                                    "ratio": dict.fromkeys(exact_flat.DTYPES, 1.0),
                                    "agreement_with_faiss": dict.fromkeys(exact_flat.DTYPES, 1.0)},
           "single_query": {"latency_s": {"faiss": 0.001}, "ratio_to_faiss": {}, "ratio_to_naive": {}},
           "memory": [{"n": 10, "queries": 3, "dtype": "float32", "peak_extra_mib": 0.0,
                       "naive_score_matrix_mib": 0.0}], "cuda": None}
    text = exact_flat.render(old)
    assert "| Gaussian | float32 |" in text and "matmul floor" not in text


def test_exact_parts_small():
    pytest.importorskip("faiss")
    out = exact_parts.measure(size=3000, dim=16, queries=40, rounds=1, block=1024)
    assert 0 <= out["uncertified"] <= 40 and out["size"] == 3000            # counted per query, once
    assert set(out["seconds"]) == {"matmul", "select", "interleaved", "search", "faiss"}
    assert all(t > 0 for t in out["seconds"].values()) and out["search_vs_faiss"] > 0


@pytest.mark.filterwarnings("ignore:(ivf|hnsw). the index cannot reach")   # tiny Gaussian data: exact, rightly
def test_ann_small_runs_every_contender(tmp_path):
    config = ann.AnnConfig(size=3000, dim=16, queries=30, k=5, datasets=("clustered", "gaussian:l2"),
                           nprobes=(1, 8), efs=(32, 64), targets=(0.95,), repeats=1, runs=1, out=tmp_path)
    rows = ann.run(config, verbose=False)
    names = {r.backend for r in rows}
    assert {"exact", "ivf", "faiss-ivf", "hnsw", "hnswlib"} <= names
    assert all(0.0 <= r.recall <= 1.0 and r.qps > 0 for r in rows)
    assert [r.recall for r in rows if r.backend == "exact"] == [1.0, 1.0]
    swept = [r for r in rows if r.backend in ("ivf", "hnsw") and r.params.keys() & {"nprobe", "ef"}]
    assert len(swept) == 8 and all(r.extra["wrapper_tax"] > 0 < r.extra["tax_vs_search_and_fetch"] for r in swept)
    assert json.loads((tmp_path / "results.json").read_text())["results"]
    assert (tmp_path / "recall_qps_clustered_ip.png").read_bytes()[:8] == PNG
    again = [BenchResult(**dataclasses.asdict(r)) for r in rows]
    assert "metric l2" in ann.render(again) and "metric ip" in ann.render(again)


def test_asked_small_takes_the_asked_held_out_and_sample_it_is_given(tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    monkeypatch.setattr(asked, "SWEEP", {"nprobe": (1, 4), "ef": (32,)})
    config = asked.AskedConfig("ood", size=33_000, dim=16, repeats=1, backends=("ivf",), asked=160, held_out=40,
                               query_sample=128, out=tmp_path)
    rows = asked.run(config, verbose=False)
    kept = json.loads((tmp_path / "asked-ood.json").read_text())
    assert kept["meta"]["asked"] == 160 and kept["meta"]["held_out"] == 40 and kept["meta"]["query_sample"] == 128
    learned = [r for r in rows if r["backend"] == "ivf" and r.get("defaults")]
    assert len(learned) == 1 and learned[0]["asked_queries"] == 128          # the sample is bounded by the option
    assert [r.get("asked_queries") for r in rows if r["backend"] == "ivf-plain" and r.get("defaults")] == [0]
    assert {r["backend"] for r in rows} == {"exact", "ivf", "ivf-plain", "faiss-ivf"}
    assert all(0 < r["scored"] <= 1 for r in rows if "scored" in r) and all(r["qps"] > 0 for r in rows)
    assert "(query_sample 128), 40 held out" in asked.render(rows, kept["meta"])
    assert rows[0]["backend"] == "exact" and rows[0]["qps_vs_exact"] == 1.0       # exact's median, every row
    assert all(r["qps_vs_exact"] == r["qps"] / rows[0]["qps"] for r in rows)
    assert isinstance(learned[0]["index"], bool) and learned[0]["hub_rows"] >= 0


@pytest.mark.parametrize("bad", [{"asked": 0}, {"held_out": -5}, {"asked": 2.5}, {"held_out": True}])
def test_asked_refuses_a_bad_count_of_queries_before_running(tmp_path, bad):
    import kvmem

    with pytest.raises(kvmem.InvalidInputError, match="positive number of queries"):
        asked.run(asked.AskedConfig("ood", size=1000, dim=8, out=tmp_path / "out", **bad), verbose=False)
    assert not (tmp_path / "out").exists()                                       # nothing written


def test_hnsw_beam_small_every_space(capsys):
    rows = hnsw_beam.main(["--size", "2000", "--dim", "16", "--queries", "40", "--k", "5", "--efs", "16,200",
                           "--variants", "ip:8:100,lift:8:100,cosine:8:100,l2:8:100"])
    assert len(rows) == 8 and all(r["qps"] > 0 and r["build_s"] > 0 for r in rows)
    recall = {(r["variant"], r["ef"]): r["recall"] for r in rows}
    assert all(recall[v, 200] >= 0.95 for v in ("ip:8:100", "lift:8:100"))    # 2000 rows: ef 200 is near exact
    assert all(0 <= r <= 1 for r in recall.values()) and "lift:8:100" in capsys.readouterr().out


def test_lookup_small_every_backend(tmp_path):
    results = lookup.run(["exact", "ivf", "hnsw", "lmdb"], [512, 2048], out=tmp_path, verbose=False, queries=64)
    assert len(results) == 8 and all(0.0 <= r.accuracy <= 1.0 for r in results)
    exact = {r.size: r.accuracy for r in results if r.backend == "exact"}
    assert exact[512] >= 0.9                                 # a small dictionary is read back almost always
    assert (tmp_path / "lookup.png").read_bytes()[:8] == PNG and (tmp_path / "lookup.json").exists()
    assert "2,048" in lookup.render(results)


def test_adapter_forward_small():
    pytest.importorskip("transformers")
    result = adapter_forward.main(["--memory", "600", "--backends", "exact,ivf,hnsw,lmdb", "--chunk", "32",
                                   "--hidden", "64", "--heads", "2", "--kv-heads", "1", "--repeats", "1",
                                   "--fill-batch", "256"])
    rows = result["rows"]
    assert [r["backend"].split()[0] for r in rows] == ["exact", "ivf", "hnsw", "lmdb"]
    assert all(r["rows"] >= 600 and r["read_s"] > 0 for r in rows)
    assert "| (no memory) |" in adapter_forward.render(result)


def test_lmdb_bench_small(tmp_path):
    result = lmdb_bench.main(["--n", "2048", "--big", "4096", "--batch", "512", "--rounds", "1",
                              "--dir", str(tmp_path / "stores"), "--json", str(tmp_path / "lmdb.json")])
    assert result["ingest"]["ratio"] > 0 and result["search"]["q1"]["ratio"] > 0
    assert result["big"]["rows"] == 4096 and result["reopen"]["reopen_current_s"] > 0
    assert "rows in one store" in lmdb_bench.render(result)


def test_make_results_renders_the_page_from_kept_json(tmp_path):
    data = exact_flat.main(["--n", "2000", "--dim", "8", "--k", "4", "--queries", "8", "--rounds", "1",
                            "--floor-n", "2000", "--floor-queries", "8"])
    (tmp_path / "exact.json").write_text(json.dumps({"seconds": 60, "data": data, "note": "Measured before X."}))
    page = tmp_path / "RESULTS.md"
    make_results.main(["--out", str(tmp_path), "--render-only", "--page", str(page)])
    text = page.read_text()
    assert text.startswith("# kvmem benchmark results") and make_results.SECTIONS["exact"].title in text
    assert "Machine:" in text and not math.isnan(data["batched"]["gaussian"]["ratio"]["float32"])
    assert "(1 min)\n\n*Measured before X.*\n" in text


@pytest.mark.filterwarnings("ignore:(ivf|hnsw). the index cannot reach")
@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_bench_stores_never_learn_from_the_queries_they_are_measured_on(backend):
    """A store that learns is asked the dataset's held-apart queries, then frozen: measuring adds nothing to
    its sample (else its hub would hold the measured queries' exact neighbours)."""
    from kvmem.benchmarks.contenders import contender
    from kvmem.benchmarks.datasets import clustered, ood

    for data, sampled in ((clustered(3000, 16, queries=50, seed=1), 0), (ood(3000, 16, queries=50, asked=200), 200)):
        built = contender(backend).build(data, {})
        try:
            for _ in range(3):
                built.search(np.ascontiguousarray(data.queries), 10)
            assert built.store.stats()["partitions"][0]["asked_sample"] == sampled
        finally:
            built.close()
