"""The memory lookup task (the Focused Transformer's dictionary lookup, without training).

A dictionary of ``size`` entries is written into a memory: each key is a
random unit vector, each value the embedding of a random label. A query is a
noisy copy of one key (noise of norm ``noise`` relative to the key), and
:func:`kvmem.adapters.attention.memory_attention` reads a value out of memory
for it; the read value is decoded to the nearest label embedding. Accuracy is
the fraction of queries whose label comes back.

As the memory grows, more keys crowd each query, so accuracy falls even for
an exact memory; an approximate backend falls further where its recall drops.
That is the shape of the FoT paper's accuracy-vs-memory-size figure,
reproducible here without a trained model:

    python -m kvmem.benchmarks.lookup --sizes 16384,262144,4194304 --backends exact,ivf,hnsw,lmdb
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import kvmem

from .report import LookupResult, markdown_table, print_table, progress, write_json

__all__ = ["lookup", "run", "render", "SIZES"]

SIZES = tuple(1 << s for s in range(14, 25, 2))   # 16k, 64k, 256k, 1M, 4M, 16M
# Fixed knobs for the approximate backends. Random unit keys are unstructured, so target_recall
# (recall@32 among the stored keys) drives nprobe / ef to their ceilings here; a lookup needs
# only the one key its query was copied from.
KNOBS: dict[str, dict[str, Any]] = {"ivf": {"nprobe": 64}, "hnsw": {"ef": 256}}
CHUNK = 1 << 18


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def lookup(backend: str, size: int, *, dim: int = 64, labels: int = 1024, label_dim: int = 32,
           queries: int = 1000, noise: float = 1.2, k: int = 32, scaling: float = 30.0, seed: int = 0,
           options: Mapping[str, Any] | None = None, search_params: Mapping[str, Any] | None = None,
           workdir: Path | None = None) -> LookupResult:
    """Accuracy of reading ``queries`` labels back out of a ``size``-entry memory."""
    from kvmem.adapters.attention import memory_attention

    gen = torch.Generator().manual_seed(seed)
    table = _unit(torch.randn(labels, label_dim, generator=gen))                 # (L, dv) label embeddings
    picks = torch.randint(0, size, (queries,), generator=gen)                    # which entries are asked
    opts = dict(options or {})
    if backend == "lmdb":
        opts.setdefault("path", Path(workdir or tempfile.mkdtemp()) / f"lookup-{size}")
    store = kvmem.create(backend, dim=dim, value_dim=label_dim, dtype=torch.bfloat16, **opts)
    asked_keys = torch.empty(queries, dim)
    asked_labels = torch.empty(queries, dtype=torch.long)
    start = time.perf_counter()
    try:
        for first in range(0, size, CHUNK):
            n = min(CHUNK, size - first)
            keys = _unit(torch.randn(n, dim, generator=gen))                     # (n, d)
            label = torch.randint(0, labels, (n,), generator=gen)                # (n,)
            store.add(keys, table[label])
            inside = (picks >= first) & (picks < first + n)
            asked_keys[inside] = keys[picks[inside] - first].to(torch.bfloat16).float()
            asked_labels[inside] = label[picks[inside] - first]
        build_s = time.perf_counter() - start
        q = asked_keys + noise * _unit(torch.randn(queries, dim, generator=gen))  # (q, d)
        q = q[None, None]                                                        # (B=1, H=1, q, d)
        zeros_k, zeros_v = torch.zeros(1, 1, queries, dim), torch.zeros(1, 1, queries, label_dim)
        start = time.perf_counter()
        out = memory_attention(q, zeros_k, zeros_v, store, k, scaling=scaling, write=False,
                               search_params=search_params)                      # (1, 1, q, dv)
        search_s = time.perf_counter() - start
    finally:
        store.close()
    decoded = (out[0, 0].float() @ table.T).argmax(-1)
    accuracy = float((decoded == asked_labels).float().mean())
    return LookupResult(backend, size, accuracy, queries / search_s, dict(search_params or {}),
                        {"build_s": build_s, "dim": dim, "noise": noise, "k": k, "queries": queries,
                         "options": {n: v for n, v in (options or {}).items() if n != "path"}})


def run(backends: Sequence[str], sizes: Sequence[int], *, out: Path | None = None, verbose: bool = True,
        knobs: Mapping[str, Mapping[str, Any]] = KNOBS, **kwargs: Any) -> list[LookupResult]:
    """:func:`lookup` for every backend and size; ``knobs``: store options per backend."""
    results = []
    with tempfile.TemporaryDirectory(prefix="kvmem-lookup-") as work:
        for backend in backends:
            for size in progress(sizes, f"lookup {backend}", enabled=verbose):
                results.append(lookup(backend, size, workdir=Path(work), options=knobs.get(backend), **kwargs))
    if verbose:
        print_table(results)
    if out is not None:
        write_json(results, Path(out) / "lookup.json")
        from .plot import plot_lookup

        plot_lookup(results, Path(out) / "lookup.png", title="memory lookup: accuracy vs memory size")
    return results


def render(results: Sequence[LookupResult]) -> str:
    """Accuracy (and queries per second) by memory size and backend, as a Markdown table."""
    backends = list(dict.fromkeys(r.backend for r in results))
    sizes = sorted({r.size for r in results})
    cell = {(r.backend, r.size): f"{r.accuracy:.3f} ({r.qps:,.0f} q/s)" for r in results}
    knob = {r.backend: ", ".join(f"{k}={v}" for k, v in r.extra.get("options", {}).items()) for r in results}
    names = [f"{b} ({knob[b]})" if knob[b] else b for b in backends]
    rows = [[f"{size:,}", *(cell.get((b, size), "–") for b in backends)] for size in sizes]
    e = results[0].extra if results else {}
    head = (f"dim {e.get('dim')}, noise {e.get('noise')}, k = {e.get('k')}, {e.get('queries')} queries per size; "
            "cells: accuracy (queries per second of the read-out).\n\n")
    return head + markdown_table(["entries", *names], rows) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="exact,ivf,hnsw,lmdb")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES[:5])))
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=1.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="kvmem-bench")
    args = parser.parse_args(argv)
    run(args.backends.split(","), [int(s) for s in args.sizes.split(",")], out=Path(args.out),
        queries=args.queries, noise=args.noise, seed=args.seed)


if __name__ == "__main__":
    main()
