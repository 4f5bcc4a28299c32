"""A sharded memory against one process holding every row, in the same run.

``ranks`` processes on this machine form a gloo group; the driver fills a
``sharded`` store (inner ``exact``) with ``rows_per_rank`` rows per rank, then
times searches of ``q`` queries (median of ``repeats``), the time the slowest
shard searched and the rest (communication: sending the queries, merging,
receiving the top-k). Then the driver builds one ``exact`` store with the same
rows and times the same searches, and checks both give the same ids.

    python -m kvmem.benchmarks.sharded                                 # 4 ranks x 1M rows, dim 128, bf16
    python -m kvmem.benchmarks.sharded --ranks 2 --rows-per-rank 100000  # a quick look

Every rank uses ``cores // ranks`` torch threads (at least one); the single
process uses every core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import kvmem

__all__ = ["main", "render"]

CHUNK = 1 << 17


def _rows(i: int, n: int, dim: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(1000 + i))


def _fill(store: kvmem.MemoryStore, total: int, dim: int) -> float:
    start = time.perf_counter()
    for i, first in enumerate(range(0, total, CHUNK)):
        keys = _rows(i, min(CHUNK, total - first), dim)
        store.add(keys, keys)                  # values: the keys again (their bytes are what is measured)
    return time.perf_counter() - start


def _time(store: kvmem.MemoryStore, queries: torch.Tensor, k: int, repeats: int) -> dict[str, Any]:
    store.search(queries, k)                                                   # warm
    walls, shards, comms = [], [], []
    for _ in range(repeats):
        comm = getattr(store, "comm_seconds", 0.0)
        start = time.perf_counter()
        res = store.search(queries, k)
        walls.append(time.perf_counter() - start)
        if hasattr(store, "comm_seconds"):
            comms.append(store.comm_seconds - comm)
            shards.append(max(store._link.last_busy.values()))
    out = {"latency_s": statistics.median(walls), "ids": res.ids.tolist()}
    if comms:
        out.update(comm_s=statistics.median(comms), shard_s=statistics.median(shards))
    return out


def _drive(store: kvmem.MemoryStore, args: argparse.Namespace) -> dict[str, Any]:
    total = args.ranks * args.rows_per_rank
    result: dict[str, Any] = {"ranks": args.ranks, "rows_per_rank": args.rows_per_rank, "dim": args.dim,
                              "dtype": args.dtype, "k": args.k, "cores": os.cpu_count(),
                              "threads_per_rank": torch.get_num_threads()}
    result["sharded_fill_s"] = _fill(store, total, args.dim)
    result["sharded_bytes_per_row"] = store.nbytes() / total
    result["shard_rows"] = store.shard_counts()
    queries = {q: torch.randn(q, args.dim, generator=torch.Generator().manual_seed(q)) for q in args.queries}
    sharded = {q: _time(store, queries[q], args.k, args.repeats) for q in args.queries}
    store.close()
    torch.set_num_threads(os.cpu_count() or 1)
    single = kvmem.create("exact", dim=args.dim, dtype=args.dtype)
    result["single_fill_s"] = _fill(single, total, args.dim)
    result["single_bytes_per_row"] = single.nbytes() / total
    plain = {q: _time(single, queries[q], args.k, args.repeats) for q in args.queries}
    result["searches"] = []
    for q in args.queries:
        a, b = sharded[q], plain[q]
        result["searches"].append({
            "queries": q, "sharded_s": a["latency_s"], "shard_s": a["shard_s"], "comm_s": a["comm_s"],
            "single_s": b["latency_s"], "same_ids": a["ids"] == b["ids"]})
    return result


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks))
    store = kvmem.create("sharded", dim=args.dim, dtype=args.dtype, timeout=600.0)
    if dist.get_rank() == 0:
        Path(args.worker).write_text(json.dumps(_drive(store, args)))
    else:
        store.serve()
    dist.destroy_process_group()


def render(data: dict[str, Any]) -> str:
    rows = data["ranks"] * data["rows_per_rank"]
    lines = [
        f"{data['ranks']} ranks x {data['rows_per_rank']:,} rows ({rows:,} in all), dim {data['dim']}, "
        f"{data['dtype']} keys and values, k = {data['k']}, exact search; {data['cores']} cores, "
        f"{data['threads_per_rank']} torch thread(s) per rank, the single process {data['cores']}.",
        "",
        "| queries per call | sharded latency | slowest shard | communication | single process | "
        "sharded QPS | single QPS | single / sharded time | same ids |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in data["searches"]:
        q = s["queries"]
        lines.append(f"| {q} | {s['sharded_s'] * 1e3:.1f} ms | {s['shard_s'] * 1e3:.1f} ms | "
                     f"{s['comm_s'] * 1e3:.1f} ms | {s['single_s'] * 1e3:.1f} ms | {q / s['sharded_s']:.1f} | "
                     f"{q / s['single_s']:.1f} | {s['single_s'] / s['sharded_s']:.2f}x | {s['same_ids']} |")
    lines += ["", *_projection(data), "",
              f"Filling: sharded {data['sharded_fill_s']:.1f} s, single {data['single_fill_s']:.1f} s. "
                  f"RAM: {data['sharded_bytes_per_row']:.0f} bytes per row in the shards (plus the driver's id "
                  f"book, 16 bytes per row), {data['single_bytes_per_row']:.0f} in the single store. "
                  f"Rows per shard: {data['shard_rows']}."]
    return "\n".join(lines)


def _projection(data: dict[str, Any]) -> list[str]:
    """Ranks, RAM and latency for larger memories, from this run's figures (one query per call)."""
    per_rank = data["rows_per_rank"]
    one = next(s for s in data["searches"] if s["queries"] == min(x["queries"] for x in data["searches"]))
    comm_per_rank = one["comm_s"] / max(1, data["ranks"] - 1)          # the driver talks to each rank in turn
    answer = data["k"] * (4 + 8 + 2 * data["dim"] * (4 if data["dtype"] == "float32" else 2))   # bytes per query
    lines = [f"On paper, at {per_rank:,} rows per rank as measured (a search of {one['queries']} "
             f"query: slowest shard {one['shard_s'] * 1e3:.1f} ms, communication {one['comm_s'] * 1e3:.1f} ms "
             f"over {data['ranks'] - 1} serving ranks, so {comm_per_rank * 1e3:.2f} ms per rank; each rank "
             f"answers {answer / 1024:.1f} KiB per query):", "",
             "| tokens of memory | ranks | RAM in all (shards + driver's id book) | search latency |",
             "|---|---|---|---|"]
    for tokens in (16_000_000, 100_000_000, 1_000_000_000):
        ranks = -(-tokens // per_rank)
        ram = tokens * (data["sharded_bytes_per_row"] + 16 + 16)          # + inner id book, + driver's book
        latency = one["shard_s"] + comm_per_rank * (ranks - 1)
        lines.append(f"| {tokens / 1e6:,.0f}M | {ranks:,} | {ram / 2**30:,.1f} GiB "
                     f"({tokens * 16 / 2**30:,.1f} GiB on the driver) | {latency * 1e3:,.0f} ms |")
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--rows-per-rank", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--queries", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64],
                        help="queries per search call, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return None
    from kvmem.stores.sharded.launch import launch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "driver.json"
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
        finished = launch(["-m", "kvmem.benchmarks.sharded", *forwarded, "--worker", str(out)], args.ranks,
                          timeout=3600, logs=Path(tmp) / "logs")
        if not out.exists():
            raise SystemExit("the driver wrote no results:\n" + "\n".join(f.output[-2000:] for f in finished))
        data = json.loads(out.read_text())
    print(render(data))
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    return data


if __name__ == "__main__":
    main()
