"""The kvmem command: info on a saved store, bench on tiny sizes (real subprocesses)."""

import json
import subprocess
import sys

import torch

import kvmem


def _kvmem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmem.cli", *args], capture_output=True, text=True, timeout=300)


def test_info_describes_a_saved_store(tmp_path):
    store = kvmem.create("exact", dim=8, value_dim=3, partitions=2, dtype=torch.bfloat16, capacity=100)
    store.add(torch.randn(2, 10, 8), torch.randn(2, 10, 3))
    store.save(tmp_path / "s")
    out = _kvmem("info", str(tmp_path / "s"))
    assert out.returncode == 0, out.stderr
    assert "exact" in out.stdout and "8 / 3" in out.stdout and "20 (per partition: 10, 10)" in out.stdout
    info = json.loads(_kvmem("info", "--json", str(tmp_path / "s")).stdout)
    assert info["rows"] == 20 and info["dtype"] == "bfloat16" and info["capacity"] == 100
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in (tmp_path / "s").iterdir())


def test_info_on_something_else_is_a_clear_error(tmp_path):
    out = _kvmem("info", str(tmp_path))
    assert out.returncode == 2 and "CorruptStoreError" in out.stderr and "manifest.json" in out.stderr


def test_bench_measures_every_backend_and_peer_and_writes_json_and_plot(tmp_path):
    out = _kvmem("bench", "--size", "3000", "--queries", "40", "--dim", "16", "--k", "5", "--repeats", "1",
                 "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    rows: dict[str, list[dict]] = {}
    for r in results["results"]:
        rows.setdefault(r["backend"], []).append(r)
    everyone = {"exact", "ivf", "hnsw", "lmdb", "faiss-flat", "faiss-ivf", "hnswlib", "torch-naive"}
    assert set(rows) == everyone and all(name in out.stdout for name in everyone)
    for name in ("exact", "faiss-flat", "torch-naive", "lmdb"):
        assert [r["recall"] for r in rows[name]] == [1.0]
    # kvmem's ANN stores at their defaults (target_recall 0.95), then the sweep; raw peers only the sweep
    assert [r["params"] for r in rows["ivf"]] == [{}] + [{"nprobe": v} for v in (1, 4, 16, 64)]
    assert [r["params"] for r in rows["hnswlib"]] == [{"ef": v} for v in (16, 32, 64, 128, 256)]
    assert rows["hnsw"][0]["recall"] >= 0.9 and rows["ivf"][0]["recall"] >= 0.9
    swept = [r for r in rows["hnsw"] + rows["ivf"] if r["params"]]
    assert all(r["extra"]["vs"] in ("hnswlib", "faiss-ivf") and r["extra"]["time_ratio"] > 0 for r in swept)
    assert max(r["recall"] for r in rows["faiss-ivf"]) >= 0.95
    assert (tmp_path / "recall_qps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "time vs raw peer" in out.stdout and "x faiss-ivf" in out.stdout and "x hnswlib" in out.stdout
    assert "Fastest at recall >= 0.95: " in out.stdout.splitlines()[-1]
