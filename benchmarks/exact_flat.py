"""kvmem ``exact`` against faiss ``IndexFlatIP`` and naive torch, measured in one run.

    python -m kvmem.benchmarks.exact_flat            # N = 1M, dim 128, k = 32
    python -m kvmem.benchmarks.exact_flat --n 200000 --rounds 3

Prints (and writes as JSON with ``--json``):

- batched search (1024 queries): time ratio kvmem / faiss for float32,
  bfloat16 and float16 keys, and id agreement with faiss;
- one query at a time: latency ratio to faiss and to ``torch.topk(q @ K.T)``;
- peak extra memory of a search, for two memory sizes, beside the
  ``q x N`` float32 score matrix a naive search allocates;
- the same on CUDA where a GPU exists.

Every figure is a median over ``--rounds``; within a round the contenders run
back to back, so each ratio compares like with like on a noisy machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import kvmem

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak resident memory ``fn`` adds on top of what the process held before (Linux)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                              # reset the peak (VmHWM) to the current RSS
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) * 1024


def batched(n: int, dim: int, k: int, q: int, rounds: int, seed: int) -> dict[str, Any]:
    import faiss

    gen = torch.Generator().manual_seed(seed)
    keys, queries = torch.randn(n, dim, generator=gen), torch.randn(q, dim, generator=gen)
    flat = faiss.IndexFlatIP(dim)
    flat.add(keys.numpy())
    stores = {}
    for name, dtype in DTYPES.items():
        stores[name] = kvmem.create("exact", dim=dim, value_dim=1, dtype=dtype)
        stores[name].add(keys, torch.zeros(n, 1))
    _, faiss_ids = flat.search(queries.numpy(), k)
    rows: dict[str, list[float]] = {name: [] for name in DTYPES}
    faiss_times = []
    for _ in range(rounds):
        t_faiss = _seconds(lambda: flat.search(queries.numpy(), k))
        faiss_times.append(t_faiss)
        for name, store in stores.items():
            rows[name].append(_seconds(lambda s=store: s.search(queries, k)) / t_faiss)
    out = {"n": n, "dim": dim, "k": k, "queries": q, "faiss_s": float(np.median(faiss_times)), "ratio": {},
           "agreement_with_faiss": {}}
    for name, store in stores.items():
        ids = store.search(queries, k).ids.numpy()
        out["ratio"][name] = float(np.median(rows[name]))
        out["agreement_with_faiss"][name] = float((ids == faiss_ids).mean())
        store.close()
    return out


def single_query(n: int, dim: int, k: int, queries: int, rounds: int, seed: int) -> dict[str, Any]:
    import faiss

    gen = torch.Generator().manual_seed(seed + 1)
    keys, q = torch.randn(n, dim, generator=gen), torch.randn(queries, 1, dim, generator=gen)
    flat = faiss.IndexFlatIP(dim)
    flat.add(keys.numpy())
    contenders: dict[str, Callable[[torch.Tensor], Any]] = {
        "faiss": lambda x: flat.search(x.numpy(), k),
        "torch-naive": lambda x: (x @ keys.T).topk(k, 1),
    }
    for name in ("float32", "bfloat16"):
        store = kvmem.create("exact", dim=dim, value_dim=1, dtype=DTYPES[name])
        store.add(keys, torch.zeros(n, 1))
        contenders[f"kvmem-{name}"] = lambda x, s=store: s.search(x, k)
    lat: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            lat[name].append(float(np.median([_seconds(lambda x=x, f=fn: f(x)) for x in q])))
    med = {name: float(np.median(v)) for name, v in lat.items()}
    return {"n": n, "latency_s": med,
            "ratio_to_faiss": {n_: med[n_] / med["faiss"] for n_ in med if n_.startswith("kvmem")},
            "ratio_to_naive": {n_: med[n_] / med["torch-naive"] for n_ in med if n_.startswith("kvmem")}}


def memory(sizes: tuple[int, ...], dim: int, k: int, q: int, seed: int) -> list[dict[str, Any]]:
    out = []
    gen = torch.Generator().manual_seed(seed + 2)
    queries = torch.randn(q, dim, generator=gen)
    for n in sizes:
        for name in ("float32", "bfloat16"):
            store = kvmem.create("exact", dim=dim, value_dim=1, dtype=DTYPES[name])
            store.add(torch.randn(n, dim, generator=gen), torch.zeros(n, 1))
            store.search(queries, k)                               # warm allocator caches
            extra = peak_extra_bytes(lambda s=store: s.search(queries, k))
            out.append({"n": n, "queries": q, "dtype": name, "peak_extra_mib": extra / 2**20,
                        "naive_score_matrix_mib": q * n * 4 / 2**20})
            store.close()
    return out


def cuda(n: int, dim: int, k: int, q: int, rounds: int, seed: int) -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    gen = torch.Generator(device="cuda").manual_seed(seed)
    keys = torch.randn(n, dim, device="cuda", generator=gen)
    queries = torch.randn(q, dim, device="cuda", generator=gen)
    floor = keys.bfloat16()
    out: dict[str, Any] = {"n": n, "queries": q, "device": torch.cuda.get_device_name()}
    out["bf16_matmul_floor_s"] = float(np.median([_seconds(lambda: queries.bfloat16() @ floor.T)
                                                  for _ in range(rounds + 1)][1:]))
    for name, dtype in DTYPES.items():
        store = kvmem.create("exact", dim=dim, value_dim=1, dtype=dtype, device="cuda")
        store.add(keys, torch.zeros(n, 1, device="cuda"))
        store.search(queries, k)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        secs = float(np.median([_seconds(lambda s=store: s.search(queries, k)) for _ in range(rounds)]))
        out[name] = {"seconds": secs, "ratio_to_bf16_floor": secs / out["bf16_matmul_floor_s"],
                     "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
        store.close()
    return out


def render(result: dict[str, Any]) -> str:
    """The RESULTS.md section for one run of this script."""
    b, one = result["batched"], result["single_query"]
    lines = [
        f"N = {b['n']:,} keys, dim {b['dim']}, k = {b['k']}, Gaussian data; median of {result['rounds']} rounds, "
        "each ratio taken within a round.",
        "",
        f"**{b['queries']} queries at once** (faiss `IndexFlatIP`: {b['faiss_s']:.3f} s)",
        "",
        "| kvmem exact keys | time / faiss | ids equal to faiss |",
        "|---|---|---|",
    ]
    for name in DTYPES:
        lines.append(f"| {name} | **{b['ratio'][name]:.2f}** | {b['agreement_with_faiss'][name]:.4f} |")
    lines += ["", "bfloat16 and float16 keys are rounded when stored, so their ids differ from faiss's float32 "
              "ranking where rounding reorders near neighbours; they equal brute force over the rounded keys "
              "(tested).", "", "**One query at a time** (median latency)", "",
              "| | latency | / faiss | / torch-naive |", "|---|---|---|---|"]
    lat = one["latency_s"]
    for name in lat:
        ratio_f = one["ratio_to_faiss"].get(name)
        ratio_n = one["ratio_to_naive"].get(name)
        cells = [f"{lat[name] * 1e3:.1f} ms", f"{ratio_f:.2f}" if ratio_f else "–",
                 f"{ratio_n:.2f}" if ratio_n else "–"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"**Peak extra memory of one search** ({result['memory'][0]['queries']} queries)", "",
              "| N | keys | peak extra | a naive q x N float32 score matrix |", "|---|---|---|---|"]
    for m in result["memory"]:
        lines.append(f"| {m['n']:,} | {m['dtype']} | {m['peak_extra_mib']:.0f} MiB "
                     f"| {m['naive_score_matrix_mib']:.0f} MiB |")
    if result.get("cuda"):
        c = result["cuda"]
        lines += ["", f"**CUDA** ({c['device']}, {c['n']:,} keys, {c['queries']} queries; bf16 matmul floor "
                  f"{c['bf16_matmul_floor_s'] * 1e3:.2f} ms)", "", "| keys | time | / bf16 floor | peak extra |",
                  "|---|---|---|---|"]
        for name in DTYPES:
            lines.append(f"| {name} | {c[name]['seconds'] * 1e3:.2f} ms | {c[name]['ratio_to_bf16_floor']:.2f} | "
                         f"{c[name]['peak_extra_mib']:.0f} MiB |")
    else:
        lines += ["", "CUDA: no GPU was available for this run; the CUDA path is covered by the test suite where "
                  "one exists (`TestExactCuda`)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    result = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds,
        "batched": batched(args.n, args.dim, args.k, args.queries, args.rounds, args.seed),
        "single_query": single_query(args.n, args.dim, args.k, 20, args.rounds, args.seed),
        "memory": memory((args.n // 4, args.n), args.dim, args.k, args.queries, args.seed),
        "cuda": cuda(args.n, args.dim, args.k, 4096, args.rounds, args.seed),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
