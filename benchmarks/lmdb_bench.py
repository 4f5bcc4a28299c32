"""The ``lmdb`` backend against its peers, measured in one run: raw py-lmdb, and the in-RAM ``exact`` store.

    python -m kvmem.benchmarks.lmdb_bench                          # every figure of RESULTS.md (an hour, 10 GB)
    python -m kvmem.benchmarks.lmdb_bench --only ingest,search --n 200000 --rounds 3      # a quick look

dim 128, float16 keys and values, one partition, k = 32. Every figure is a
median over ``--rounds``; within a round the contenders run back to back, so
a ratio compares like with like on a noisy machine.

- **ingest**: rows/s of ``store.add`` in batches of ``--batch`` rows (each one
  committed transaction), and of raw py-lmdb ``putmulti`` writing the same
  bytes (the store's own encoded blocks) in as many transactions.
- **search**: exact streaming search over a warm page cache, and the in-RAM
  ``exact`` store holding the same rows; 1 and 64 queries.
- **reopen**: ``kvmem.load`` of an ``--n``-row store with ``index="hnsw"``: the
  index file current (loaded, nothing to catch up), and the index file deleted
  (rebuilt from LMDB).
- **big**: ``--big`` rows in one store: ingest time, file size, search latency,
  reopen time.

Every ``measure_*`` function is importable and returns a dict of figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

import kvmem

DIM = 128
K = 32


def rows(seed: int, n: int, dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` keys and values ``(n, dim)`` float16, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g).half(), torch.randn(n, dim, generator=g).half()


def batches(n: int, batch: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i, start in enumerate(range(0, n, batch)):
        yield rows(seed * 1_000_003 + i, min(batch, n - start))


def _median(fn: Callable[[], Any], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fresh(base: Path, name: str) -> Path:
    path = base / name
    shutil.rmtree(path, ignore_errors=True)
    return path


def build(path: Path, n: int, batch: int = 65536, **options: Any) -> kvmem.MemoryStore:
    """An lmdb store of ``n`` rows at ``path`` (rows from :func:`batches`)."""
    store = kvmem.create("lmdb", path=path, dim=DIM, dtype=torch.float16, **options)
    for keys, values in batches(n, batch):
        store.add(keys, values)
    return store


# ---------------------------------------------------------------------------- ingest
def _raw_payload(n: int, batch: int, block_rows: int) -> list[list[tuple[bytes, bytes]]]:
    """Per transaction, the (key, value) records holding the same bytes the store writes: its encoded blocks."""
    from kvmem.stores._lmdb_format import BlockLayout, block_key
    from kvmem.stores._lmdb_rows import row_columns

    layout = BlockLayout(DIM, DIM, torch.float16, block_rows)
    out, number = [], 0
    for start, (keys, values) in zip(range(0, n, batch), batches(n, batch)):
        cols = row_columns(keys, values, np.arange(start, start + len(keys)))
        txn = []
        for lo in range(0, len(keys), block_rows):
            part = {name: col[lo:lo + block_rows] for name, col in cols.items()}
            txn.append((block_key(0, number), layout.encode(part).tobytes()))
            number += 1
        out.append(txn)
    return out


def measure_ingest(base: Path, n: int = 1_000_000, batch: int = 4096, rounds: int = 3,
                   block_rows: int = 4096) -> dict[str, Any]:
    """kvmem ``add`` rows/s against raw ``putmulti`` of the same bytes, one transaction per batch each.

    The two alternate batch by batch, so both meet the same disk (fsync times
    on a shared machine swing several-fold from one second to the next).
    """
    data = list(batches(n, batch))
    payload = _raw_payload(n, batch, min(batch, block_rows))
    kv, raw = [], []
    for _ in range(rounds):
        store = kvmem.create("lmdb", path=_fresh(base, "ingest-kvmem"), dim=DIM, dtype=torch.float16,
                             block_rows=block_rows)
        env = lmdb.open(str(_fresh(base, "ingest-raw")), map_size=1 << 40, max_dbs=2)
        db = env.open_db(b"blocks")
        spent = [0.0, 0.0]
        for (keys, values), records in zip(data, payload):
            start = time.perf_counter()
            store.add(keys, values)
            middle = time.perf_counter()
            with env.begin(write=True, db=db) as txn:
                txn.cursor().putmulti(records)
            spent[0] += middle - start
            spent[1] += time.perf_counter() - middle
        kv.append(n / spent[0])
        raw.append(n / spent[1])
        store.close()
        env.close()
    shutil.rmtree(base / "ingest-kvmem", ignore_errors=True)
    shutil.rmtree(base / "ingest-raw", ignore_errors=True)
    kvs, raws = statistics.median(kv), statistics.median(raw)
    return {"rows": n, "batch": batch, "block_rows": block_rows, "kvmem_rows_per_s": kvs,
            "raw_putmulti_rows_per_s": raws, "ratio": kvs / raws}


# ---------------------------------------------------------------------------- search
def measure_search(base: Path, n: int = 1_000_000, rounds: int = 7, queries: tuple[int, ...] = (1, 64),
                   **options: Any) -> dict[str, Any]:
    """Exact streaming search (warm page cache) against the in-RAM ``exact`` store with the same rows."""
    path = _fresh(base, "search")
    store = build(path, n, **options)
    peer = kvmem.create("exact", dim=DIM, dtype=torch.float16)
    for keys, values in batches(n, 65536):
        peer.add(keys, values)
    out: dict[str, Any] = {"rows": n, "k": K}
    for q in queries:
        query = torch.randn(q, DIM, generator=torch.Generator().manual_seed(q))
        store.search(query, K)                      # warm the page cache
        peer.search(query, K)
        times = {"lmdb": [], "exact": []}
        for _ in range(rounds):
            times["lmdb"].append(_median(lambda query=query: store.search(query, K), 1))
            times["exact"].append(_median(lambda query=query: peer.search(query, K), 1))
        ours, theirs = statistics.median(times["lmdb"]), statistics.median(times["exact"])
        out[f"q{q}"] = {"lmdb_ms": ours * 1e3, "exact_ms": theirs * 1e3, "ratio": ours / theirs}
    store.close()
    shutil.rmtree(path, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------- reopen
def measure_reopen(base: Path, n: int = 1_000_000, rounds: int = 3, index: str = "hnsw",
                   rebuild_rounds: int = 1) -> dict[str, Any]:
    """``kvmem.load`` of an ``n``-row store with an index: current on disk, and deleted (rebuilt from LMDB;
    minutes at a million rows, so once by default)."""
    path = _fresh(base, "reopen")
    start = time.perf_counter()
    build(path, n, index=index).close()
    built = time.perf_counter() - start

    def reopen() -> None:
        kvmem.load(path).close()

    current = _median(reopen, rounds)
    rebuilt = []
    for _ in range(rebuild_rounds):
        for file in path.glob("index*"):
            file.unlink()
        rebuilt.append(_median(reopen, 1))
    shutil.rmtree(path, ignore_errors=True)
    return {"rows": n, "index": index, "build_s": built, "reopen_current_s": current,
            "reopen_rebuild_s": statistics.median(rebuilt)}


# ---------------------------------------------------------------------------- big
def measure_big(base: Path, n: int = 16_000_000, rounds: int = 5, batch: int = 65536) -> dict[str, Any]:
    """``n`` rows in one store: ingest time, file size, search latency (warm), reopen time (warm)."""
    path = _fresh(base, "big")
    start = time.perf_counter()
    store = build(path, n, batch=batch)
    ingest = time.perf_counter() - start
    out: dict[str, Any] = {"rows": n, "ingest_s": ingest, "rows_per_s": n / ingest,
                           "data_mdb_bytes": (path / "data.mdb").stat().st_size}
    for q in (1, 64):
        query = torch.randn(q, DIM, generator=torch.Generator().manual_seed(q))
        store.search(query, K)
        out[f"search_q{q}_ms"] = _median(lambda query=query: store.search(query, K), rounds) * 1e3
    store.close()
    out["reopen_s"] = _median(lambda: kvmem.load(path).close(), 3)
    shutil.rmtree(path, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------- RESULTS.md
def render(result: dict[str, Any]) -> str:
    """The RESULTS.md section for one run of :func:`main`."""
    lines = [f"dim {DIM}, float16 keys and values, one partition, k = {K}, Gaussian rows; "
             f"torch threads: {result['torch_threads']}; medians, each ratio taken within a round.", ""]
    if "ingest" in result:
        i = result["ingest"]
        lines += ["**Ingest** (one committed transaction per add; raw: py-lmdb `putmulti` of the same "
                  "encoded blocks, one transaction per batch, alternating batch by batch)", "",
                  "| rows | rows per add | kvmem lmdb | raw putmulti | ratio |", "|---|---|---|---|---|",
                  f"| {i['rows']:,} | {i['batch']:,} | {i['kvmem_rows_per_s']:,.0f} rows/s "
                  f"| {i['raw_putmulti_rows_per_s']:,.0f} rows/s | **{i['ratio']:.2f}** |", "",
                  "Both sides wait for an fsync per transaction, and on a shared disk its latency swings from "
                  "run to run, so this ratio moves more than the others between runs. kvmem's own work per add "
                  "is validation, |k|^2, encoding the block with its CRC-32, and the state record.", ""]
    if "search" in result:
        s = result["search"]
        lines += [f"**Exact search** over {s['rows']:,} rows, warm page cache, against the in-RAM `exact` "
                  "store holding the same rows", "", "| queries | lmdb | exact (RAM) | lmdb / exact |",
                  "|---|---|---|---|"]
        for q in ("q1", "q64"):
            if q in s:
                lines.append(f"| {q[1:]} | {s[q]['lmdb_ms']:.1f} ms | {s[q]['exact_ms']:.1f} ms "
                             f"| **{s[q]['ratio']:.2f}** |")
        lines.append("")
    if "reopen" in result:
        r = result["reopen"]
        lines += [f"**Reopen** of a {r['rows']:,}-row store with `index=\"{r['index']}\"` (`kvmem.load`, which "
                  "also checks the CRC-32 of every block)", "", "| index file | reopen |", "|---|---|",
                  f"| current (loaded, nothing to catch up) | {r['reopen_current_s']:.2f} s |",
                  f"| deleted (rebuilt from LMDB, then written) | {r['reopen_rebuild_s']:.0f} s |", "",
                  f"Building that store (adds of 65,536 rows, the graph growing with them): {r['build_s']:.0f} s.", ""]
    if "big" in result:
        b = result["big"]
        lines += [f"**{b['rows']:,} rows in one store** on this machine", "", "| | |", "|---|---|",
                  f"| ingest (adds of 65,536 rows) | {b['ingest_s']:.0f} s ({b['rows_per_s']:,.0f} rows/s) |",
                  f"| data.mdb | {b['data_mdb_bytes'] / 2**30:.2f} GiB ({b['data_mdb_bytes'] / b['rows']:.0f} "
                  "bytes per row) |",
                  f"| exact search, 1 query | {b['search_q1_ms']:.0f} ms |",
                  f"| exact search, 64 queries | {b['search_q64_ms']:.0f} ms |",
                  f"| reopen (`kvmem.load`, every block's CRC-32 checked) | {b['reopen_s']:.1f} s |", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line
MEASURES = ("ingest", "search", "reopen", "big")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(MEASURES), help=f"comma-separated subset of {MEASURES}")
    parser.add_argument("--n", type=int, default=1_000_000, help="rows for ingest, search and reopen")
    parser.add_argument("--big", type=int, default=16_000_000, help="rows for the big store")
    parser.add_argument("--batch", type=int, default=4096, help="rows per add in the ingest figure")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = Path(args.dir or tempfile.mkdtemp(prefix="kvmem-lmdb-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"command": "python -m kvmem.benchmarks.lmdb_bench " + " ".join(argv or sys.argv[1:]),
                               "torch_threads": torch.get_num_threads()}
    runs = {"ingest": lambda: measure_ingest(base, args.n, args.batch, args.rounds),
            "search": lambda: measure_search(base, args.n, args.rounds),
            "reopen": lambda: measure_reopen(base, args.n, min(args.rounds, 3)),
            "big": lambda: measure_big(base, args.big, args.rounds)}
    try:
        for name in args.only.split(","):
            results[name] = runs[name]()
            print(json.dumps({name: results[name]}), flush=True)
    finally:
        torch.set_num_threads(threads)
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
