"""kvmem ``exact`` against faiss ``IndexFlatIP``, naive torch and the machine's matmul floor, in one run.

    python -m kvmem.benchmarks.exact_flat            # N = 1M, dim 128, k = 32
    python -m kvmem.benchmarks.exact_flat --n 200000 --rounds 3 --data gaussian,clustered

Prints (and writes as JSON with ``--json``):

- whether exact CPU float32 searches select with the compiled kernel
  (``kvmem.kernels.available()``);
- batched search (1024 queries) on each kind of keys in ``--data``:
  ``gaussian``, ``clustered`` (:func:`kvmem.benchmarks.datasets.clustered`) and
  ``duplicates`` (N/4 distinct Gaussian keys, each stored 4 times in shuffled
  order, as a memory with ``positions="first"`` stores repeated tokens): time
  ratio kvmem / faiss for float32, bfloat16 and float16 keys, and id agreement
  with faiss (copies of one key count as the same id);
- the matmul floor (512 queries over 400k keys, ``--floor-queries`` /
  ``--floor-n``): the machine's in-cache matmul peak in float32
  (``np.matmul``, what kvmem's CPU float32 ranking calls) and bfloat16
  (``torch.mm``), and kvmem's search time for float32 and bfloat16 keys,
  Gaussian and clustered, as a multiple of the floor of the dtype it ranks in;
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
import kvmem.kernels
import kvmem.topk

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


DATA_KINDS = ("gaussian", "clustered", "duplicates")
COPIES = 4                      # how often ``duplicates`` stores each distinct key
FLOOR_BLOCK = 4096              # key rows of the in-cache block the matmul floor repeats


def data_kinds(text: str) -> tuple[str, ...]:
    """``--data``: a comma list of :data:`DATA_KINDS`."""
    kinds = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [kind for kind in kinds if kind not in DATA_KINDS]
    if unknown or not kinds:
        what = f"unknown data kind {unknown[0]!r}" if unknown else "no data kind given"
        raise argparse.ArgumentTypeError(f"{what}; choose from {', '.join(DATA_KINDS)}")
    return kinds


def keys_of(kind: str, n: int, dim: int, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """float32 keys ``(n, dim)`` and queries ``(q, dim)`` of one kind, and the distinct key each row copies ``(n,)``.

    ``gaussian``: N(0, I) keys and queries. ``clustered``: the benchmark
    generator's keys and its queries (noisy copies of held-out keys).
    ``duplicates``: ``n / 4`` distinct Gaussian keys, each stored 4 times in
    shuffled order; Gaussian queries.
    """
    if kind == "clustered":
        from .datasets import load_dataset

        data = load_dataset("clustered", n=n, dim=dim, queries=q, seed=seed)
        return torch.from_numpy(data.base), torch.from_numpy(data.queries), np.arange(n)
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        keys, queries = torch.randn(n, dim, generator=gen), torch.randn(q, dim, generator=gen)
        return keys, queries, np.arange(n)
    distinct, queries = torch.randn(-(-n // COPIES), dim, generator=gen), torch.randn(q, dim, generator=gen)
    source = (torch.randperm(n, generator=gen) // COPIES).numpy()                 # row -> its distinct key
    return distinct[torch.from_numpy(source)], queries, source


def batched_on(kind: str, n: int, dim: int, k: int, q: int, rounds: int, seed: int) -> dict[str, Any]:
    """Batched search of ``q`` queries on one kind of keys: kvmem time / faiss time per key dtype, id agreement.

    Agreement compares the key each id names (copies of one key are the same
    id), so tied copies listed in another order still agree.
    """
    import faiss

    keys, queries, source = keys_of(kind, n, dim, q, seed)
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
        out["agreement_with_faiss"][name] = float((source[ids] == source[faiss_ids]).mean())
        store.close()
    return out


def batched(kinds: tuple[str, ...], n: int, dim: int, k: int, q: int, rounds: int,
            seed: int) -> dict[str, dict[str, Any]]:
    """:func:`batched_on` for each kind of keys, ``{kind: figures}``."""
    out = {}
    for kind in kinds:
        out[kind] = batched_on(kind, n, dim, k, q, rounds, seed)
        gc.collect()
    return out


def _matmul_floor(queries: torch.Tensor, keys: torch.Tensor, n: int, dtype: str) -> float:
    """Seconds the FLOPs of ``queries`` against ``n`` keys take at the in-cache matmul peak.

    Repeats ``queries @ block.T`` over one block of :data:`FLOOR_BLOCK` key
    rows (operands stay in cache) until it has done the FLOPs of all ``n``:
    float32 through ``np.matmul``, bfloat16 through ``torch.mm``.
    """
    block = keys[:FLOOR_BLOCK]
    reps = -(-n // len(block))
    if dtype == "float32":
        a, b = queries.numpy(), block.numpy().T
        buf = np.empty((len(a), len(block)), np.float32)

        def step() -> Any:
            return np.matmul(a, b, out=buf)
    else:
        a_t, b_t = queries.bfloat16(), block.bfloat16().T
        buf_t = torch.empty(len(a_t), len(block), dtype=torch.bfloat16)

        def step() -> Any:
            return torch.mm(a_t, b_t, out=buf_t)
    step()                                                                          # warm
    seconds = _seconds(lambda: [step() for _ in range(reps)])
    return seconds * n / (reps * len(block))


def _rank_name(store: Any, queries: torch.Tensor) -> str:
    """The dtype an exact CPU store ranks ``queries`` in ("float32" where rank_dtype_for says None)."""
    rank = kvmem.topk.rank_dtype_for(store.options["ranking"], len(queries), store.dtype, "ip",
                                     torch.device("cpu"))
    return "float32" if rank is None else str(rank).removeprefix("torch.")


def floor(n: int, q: int, dim: int, k: int, rounds: int, seed: int) -> dict[str, Any]:
    """kvmem exact search of ``q`` queries over ``n`` keys against the machine's matmul floor.

    Per round: the float32 and bfloat16 floors (:func:`_matmul_floor`), then
    ``store.search`` for float32 and bfloat16 keys, Gaussian and clustered,
    each divided by the floor of the dtype that store ranks in.
    """
    data = {kind: keys_of(kind, n, dim, q, seed + 3) for kind in ("gaussian", "clustered")}
    stores = {}
    for kind, (keys, queries, _) in data.items():
        for name in ("float32", "bfloat16"):
            store = kvmem.create("exact", dim=dim, value_dim=1, dtype=DTYPES[name])
            store.add(keys, torch.zeros(n, 1))
            store.search(queries, k)                                                # warm
            stores[name, kind] = store
    floor_s: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    secs: dict[tuple[str, str], list[float]] = {key: [] for key in stores}
    ratios: dict[tuple[str, str], list[float]] = {key: [] for key in stores}
    ranks = {key: _rank_name(store, data[key[1]][1]) for key, store in stores.items()}
    for _ in range(rounds):
        now = {name: _matmul_floor(data["gaussian"][1], data["gaussian"][0], n, name) for name in floor_s}
        for name, t in now.items():
            floor_s[name].append(t)
        for key, store in stores.items():
            queries = data[key[1]][1]
            t = _seconds(lambda s=store, x=queries: s.search(x, k))
            secs[key].append(t)
            ratios[key].append(t / now[ranks[key]])
    flops = 2.0 * q * n * dim
    out: dict[str, Any] = {"n": n, "queries": q, "dim": dim, "k": k, "block": min(FLOOR_BLOCK, n), "matmul": {},
                           "search": []}
    for name, via in (("float32", "np.matmul"), ("bfloat16", "torch.mm")):
        t = float(np.median(floor_s[name]))
        out["matmul"][name] = {"via": via, "floor_s": t, "gflops": flops / t / 1e9}
    for (name, kind), store in stores.items():
        out["search"].append({"keys": name, "data": kind, "seconds": float(np.median(secs[name, kind])),
                              "rank_dtype": ranks[name, kind],
                              "ratio_to_floor": float(np.median(ratios[name, kind]))})
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


DATA_TITLES = {"gaussian": "Gaussian", "clustered": "clustered",
               "duplicates": f"duplicates (N/{COPIES} distinct keys x {COPIES}, shuffled)"}


def _batched_of(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{kind: figures}``; JSON kept before ``--data`` holds one Gaussian section."""
    b = result["batched"]
    return {"gaussian": b} if "ratio" in b else b


def _render_floor(f: dict[str, Any]) -> list[str]:
    """The matmul-floor table."""
    m = f["matmul"]
    lines = ["", f"**Against the matmul floor** ({f['queries']} queries over {f['n']:,} keys x {f['dim']}, "
             f"k = {f['k']}). In-cache matmul peak ({f['queries']} x {f['dim']} queries against one "
             f"{f['block']:,}-key block, repeated): float32 (`{m['float32']['via']}`) "
             f"{m['float32']['gflops']:.0f} GFLOP/s, floor {m['float32']['floor_s'] * 1e3:.1f} ms; "
             f"bfloat16 (`{m['bfloat16']['via']}`) {m['bfloat16']['gflops']:.0f} GFLOP/s, floor "
             f"{m['bfloat16']['floor_s'] * 1e3:.1f} ms.", "",
             "| keys | data | ranks in | search | / floor of its ranking dtype |", "|---|---|---|---|---|"]
    for r in f["search"]:
        lines.append(f"| {r['keys']} | {r['data']} | {r['rank_dtype']} | {r['seconds'] * 1e3:.1f} ms "
                     f"| **{r['ratio_to_floor']:.2f}** |")
    return lines


def render(result: dict[str, Any]) -> str:
    """The RESULTS.md section for one run of this script."""
    batches, one = _batched_of(result), result["single_query"]
    b = next(iter(batches.values()))
    fused = result.get("fused_selection")
    selection = "" if fused is None else (" Compiled selection: " + ("in use." if fused else
                                          "not built (torch ops, slower)."))
    lines = [
        f"N = {b['n']:,} keys, dim {b['dim']}, k = {b['k']}; median of {result['rounds']} rounds, "
        f"each ratio taken within a round.{selection}",
        "",
        f"**{b['queries']} queries at once** (against faiss `IndexFlatIP` over the same float32 keys)",
        "",
        "| data | kvmem exact keys | faiss | time / faiss | ids equal to faiss |",
        "|---|---|---|---|---|",
    ]
    for kind, fig in batches.items():
        for name in DTYPES:
            lines.append(f"| {DATA_TITLES.get(kind, kind)} | {name} | {fig['faiss_s']:.3f} s "
                         f"| **{fig['ratio'][name]:.2f}** | {fig['agreement_with_faiss'][name]:.4f} |")
    lines += ["", "bfloat16 and float16 keys are rounded when stored, so their ids differ from faiss's float32 "
              "ranking where rounding reorders near neighbours; they equal brute force over the rounded keys "
              "(tested). Copies of one key count as the same id."]
    if result.get("floor"):
        lines += _render_floor(result["floor"])
    lines += ["", "**One query at a time** (median latency)", "",
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
    parser.add_argument("--data", type=data_kinds, default=DATA_KINDS,
                        help=f"kinds of keys for the batched search, a comma list of {', '.join(DATA_KINDS)}")
    parser.add_argument("--floor-n", type=int, default=400_000, help="keys of the matmul-floor section")
    parser.add_argument("--floor-queries", type=int, default=512, help="queries of the matmul-floor section")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    result = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds,
        "fused_selection": kvmem.kernels.available(),
        "batched": batched(args.data, args.n, args.dim, args.k, args.queries, args.rounds, args.seed),
        "floor": floor(args.floor_n, args.floor_queries, args.dim, args.k, args.rounds, args.seed),
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
