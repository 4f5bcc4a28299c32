"""Where an ``exact`` search's time goes, beside faiss ``IndexFlatIP`` on the same data (issue 14).

    python -m kvmem.benchmarks.exact_parts [--size 200000] [--dim 128] [--queries 1000] [--rounds 3]

Times (median of 5 calls, median over rounds), on ``kvmem bench``'s default data:

- ``matmul``: the score blocks alone, as :class:`kvmem.topk._BlockScorer` computes them on the CPU
  (NumPy's BLAS into one preallocated block);
- ``select``: the running top-k alone (:class:`kvmem.topk.RunningTopK`) over precomputed blocks;
- ``interleaved``: the two, block after block, as a search runs them (no rescoring, no certificate);
- ``search``: ``store.search`` on an ``exact`` store;
- ``faiss``: ``IndexFlatIP.search``.

and how many queries failed the rounding certificate (they are searched again one precision finer).
``matmul + select`` against ``interleaved`` is the cost of running two thread pools (NumPy's BLAS and
torch's OpenMP) one after the other; set ``OMP_WAIT_POLICY=PASSIVE`` to see torch's part of it.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import kvmem
from kvmem import topk

from .contenders import timed
from .datasets import load_dataset


def measure(size: int = 200_000, dim: int = 128, queries: int = 1000, k: int = 32, rounds: int = 3,
            block: int = 32768) -> dict[str, object]:
    import faiss

    data = load_dataset("clustered", n=size, dim=dim, queries=queries, seed=0)
    keys, q = np.ascontiguousarray(data.base), np.ascontiguousarray(data.queries, dtype=np.float32)
    store = kvmem.create("exact", dim=dim, value_dim=dim)
    store.add(torch.from_numpy(keys), torch.zeros(size, dim))
    index = faiss.IndexFlatIP(dim)
    index.add(keys)
    keep = k + 8                                                   # the float32 ranking's candidates
    out = torch.empty(queries, block)
    done = [(f, torch.from_numpy(q @ keys[f:f + block].T)) for f in range(0, size, block)]

    def matmul() -> None:
        for f in range(0, size, block):
            part = keys[f:f + block]
            np.matmul(q, part.T, out=out[:, :len(part)].numpy())

    def select() -> None:
        running = topk.RunningTopK(queries, keep, torch.device("cpu"))
        for f, scores in done:
            running.push(scores, f)

    def interleaved() -> None:
        running = topk.RunningTopK(queries, keep, torch.device("cpu"))
        for f in range(0, size, block):
            part = keys[f:f + block]
            scores = out[:, :len(part)]
            np.matmul(q, part.T, out=scores.numpy())
            running.push(scores, f)

    failed = []
    certified = topk._certified

    def counting(*args, **kwargs):
        ok = certified(*args, **kwargs)
        failed.append(int((~ok).sum()))
        return ok

    topk._certified = counting
    try:
        store.search(torch.from_numpy(q), k)
    finally:
        topk._certified = certified
    parts = {"matmul": matmul, "select": select, "interleaved": interleaved,
             "search": lambda: store.search(torch.from_numpy(q), k), "faiss": lambda: index.search(q, k)}
    times = {name: [] for name in parts}
    for _ in range(rounds):
        for name, call in parts.items():
            times[name].append(timed(call, 5)[0])
    seconds = {name: float(f"{np.median(t):.4g}") for name, t in times.items()}
    return {"size": size, "dim": dim, "queries": queries, "k": k, "uncertified": sum(failed),
            "rank_dtype": str(topk.rank_dtype_for("auto", queries, torch.float32, "ip", torch.device("cpu"))),
            "seconds": seconds, "search_vs_faiss": round(seconds["search"] / seconds["faiss"], 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.size, args.dim, args.queries, rounds=args.rounds)))


if __name__ == "__main__":
    main()
