"""Recall on queries unlike the keys: kvmem ``ivf`` / ``hnsw`` after being asked, beside plain indexes.

Run (``attention`` needs :mod:`kvmem.benchmarks.capture_attention` first)::

    kvmem bench --dataset attention          # or --dataset ood, and --size for the keys kept
    python -m kvmem.benchmarks.asked --dataset ood --size 200000 --dim 64

In one process, on one dataset with :attr:`~kvmem.benchmarks.datasets.Dataset.asked`
queries (``ood``, ``attention``):

- kvmem ``exact``: ground truth for the held-out queries and the QPS every row is divided by (the
  median of its timings before the first backend and after each: a shared machine drifts);
- kvmem ``ivf`` / ``hnsw`` at their defaults, asked the ``asked`` queries (batches of 100;
  calibration on them runs as it would in use), then frozen (:meth:`AnnStore.freeze`) and
  measured on the held-out queries: recall@k, the recall the store reports
  (``calibration()``), the recall it measured on keys used as queries, QPS;
- the same stores with ``query_sample=0`` (the plain index, calibrated on keys as before);
- the curve: recall@k against the fraction of the keys scored (ivf: the rows of the
  lists probed plus the hub's lists probed; hnsw: QPS instead, hnswlib counts no
  distances), with the hub and without it, and raw faiss IVF / hnswlib on the same
  queries, over a sweep of the knob.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kvmem

from .ann import build_faiss_ivf, build_hnswlib
from .contenders import add_rows, learn, prepared
from .datasets import Dataset, load_dataset
from .recall import ground_truth, recall_at_k

__all__ = ["AskedConfig", "run", "render", "main"]

SWEEP = {"nprobe": (1, 2, 4, 8, 16, 32, 64), "ef": (32, 64, 128, 256, 512, 1024)}


@dataclasses.dataclass(frozen=True)
class AskedConfig:
    dataset: str = "attention"      # "ood", "attention", or another dataset with asked queries
    size: int = 1_000_000           # keys kept (attention: its first ones)
    dim: int = 64                   # generated data only
    k: int = 32
    repeats: int = 3                # timed calls per setting (median)
    backends: tuple[str, ...] = ("ivf", "hnsw")
    asked: int | None = None        # asked queries used (None: all the dataset holds)
    held_out: int | None = None     # held-out queries measured (None: all)
    query_sample: int | None = None  # the stores' option (None: their default, 1,024)
    out: Path = Path("kvmem-bench")


def _timed(fn, repeats: int) -> tuple[float, Any]:
    out, times = fn(), []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def _ivf_scored(store: kvmem.MemoryStore, queries: torch.Tensor, nprobe: int) -> float:
    """Mean fraction of partition 0's keys scored at ``nprobe``: the probed lists' rows and the hub's."""
    import faiss

    part = store._parts[0]
    if part.index is None:
        return 1.0
    x = torch.from_numpy(part.prepare_queries(queries.numpy()))
    near = torch.addmm(part.centroid_norms, x, part.centroids.T, alpha=-2)
    lists = near.topk(min(nprobe, part.index.nlist), -1, largest=False).indices                 # (q, nprobe)
    invlists = faiss.extract_index_ivf(part.index).invlists
    sizes = torch.tensor([invlists.list_size(i) for i in range(part.index.nlist)], dtype=torch.float64)
    scored = sizes[lists].sum(-1)
    hub = store._hubs[0]
    if hub is not None:
        scored += hub.scored(queries).double()                                           # its lists and centroids
    return float(scored.mean()) / len(store)


def _kvmem_rows(backend: str, data: Dataset, truth, queries: torch.Tensor, config: AskedConfig,
                exact_qps: float, **options: Any) -> list[dict[str, Any]]:
    name = backend if options.get("query_sample", 1) else f"{backend}-plain"
    start = time.perf_counter()
    store = kvmem.create(backend, dim=data.dim, value_dim=1, dtype=torch.float32, **options)
    add_rows(store, data.base)
    build_s = time.perf_counter() - start
    learn(store, data, config.k)
    knob = store.param

    def row(params: dict, secs: float, ids: np.ndarray, **extra: Any) -> dict[str, Any]:
        qps = len(queries) / secs
        return {"backend": name, "params": params, "recall": recall_at_k(ids, truth, data.base, data.queries, config.k),
                "qps": qps, "qps_vs_exact": qps / exact_qps, **extra}

    cal, hub = store.calibration()[0], store._hubs[0]
    size = {} if name.endswith("-plain") else {"hub_rows": store.stats()["partitions"][0]["hub_rows"],
                                               "hub_mb": 0 if hub is None else hub.nbytes() / 2**20}
    secs, res = _timed(lambda: store.search(queries, config.k).ids.numpy(), config.repeats)
    rows = [row({}, secs, res, defaults=True, build_s=build_s, **{knob: cal.value if cal else None},
                reported=cal.recall if cal else None, key_recall=cal.key_recall if cal else None,
                index=cal.index if cal else None,
                asked_queries=cal.queries if cal else 0, searched_exactly=bool(cal and cal.exact), **size)]
    for value in SWEEP[knob]:
        secs, res = _timed(lambda v=value: store.search(queries, config.k, **{knob: v}).ids.numpy(), config.repeats)
        extra = {"scored": _ivf_scored(store, queries, value)} if backend == "ivf" else {}
        rows.append(row({knob: value}, secs, res, **extra))
    store.close()
    return rows


def _raw_rows(backend: str, data: Dataset, truth, queries: torch.Tensor, config: AskedConfig,
              exact_qps: float, nlist: int) -> list[dict[str, Any]]:
    q = prepared(np.ascontiguousarray(data.queries, np.float32), data.metric)
    rows = []
    if backend == "ivf":
        index, _ = build_faiss_ivf(data, nlist)
        sizes = np.array([index.invlists.list_size(i) for i in range(index.nlist)], np.float64)
        for value in SWEEP["nprobe"]:
            index.nprobe = value
            secs, ids = _timed(lambda: index.search(q, config.k)[1], config.repeats)
            lists = index.quantizer.search(q, value)[1]
            rows.append({"backend": "faiss-ivf", "params": {"nprobe": value}, "qps": len(q) / secs,
                         "recall": recall_at_k(ids, truth, data.base, data.queries, config.k),
                         "qps_vs_exact": len(q) / secs / exact_qps,
                         "scored": float(sizes[lists].sum(1).mean()) / data.size})
    else:
        index, _ = build_hnswlib(data, 16, 500 if data.metric == "ip" else 200)
        for value in SWEEP["ef"]:
            index.set_ef(value)
            secs, ids = _timed(lambda: index.knn_query(q, k=config.k)[0].astype(np.int64), config.repeats)
            rows.append({"backend": "hnswlib", "params": {"ef": value}, "qps": len(q) / secs,
                         "recall": recall_at_k(ids, truth, data.base, data.queries, config.k),
                         "qps_vs_exact": len(q) / secs / exact_qps})
    return rows


def run(config: AskedConfig, *, verbose: bool = True) -> list[dict[str, Any]]:
    for name in ("asked", "held_out"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise kvmem.InvalidInputError(f"{name} must be a positive number of queries or None; got {value!r}")
    data = load_dataset(config.dataset, n=config.size, dim=config.dim)
    if data.asked is None:
        raise kvmem.InvalidInputError(f"dataset {config.dataset!r} has no asked queries (use ood or attention)")
    data = dataclasses.replace(data, asked=data.asked[:config.asked], queries=data.queries[:config.held_out])
    sample = {} if config.query_sample is None else {"query_sample": config.query_sample}
    queries = torch.from_numpy(np.ascontiguousarray(data.queries, np.float32))
    truth = ground_truth(data.base, data.queries, config.k, data.metric)
    exact = kvmem.create("exact", dim=data.dim, value_dim=1, dtype=torch.float32)
    add_rows(exact, data.base)
    exact_secs = [_timed(lambda: exact.search(queries, config.k), config.repeats)[0]]
    exact_qps = len(queries) / exact_secs[0]
    rows: list[dict[str, Any]] = [{"backend": "exact", "params": {}, "qps": exact_qps, "recall": 1.0,
                                   "qps_vs_exact": 1.0}]
    for backend in config.backends:
        for options in (sample, {"query_sample": 0}):
            rows += _kvmem_rows(backend, data, truth, queries, config, exact_qps, **options)
            if verbose:
                print(render(rows[-len(SWEEP['nprobe' if backend == 'ivf' else 'ef']) - 1:]), flush=True)
        nlist = max(1, min(round(4 * data.size ** 0.5), data.size // 39))
        rows += _raw_rows(backend, data, truth, queries, config, exact_qps, nlist)
        exact_secs.append(_timed(lambda: exact.search(queries, config.k), config.repeats)[0])
    exact.close()
    exact_qps = len(queries) / float(np.median(exact_secs))      # exact timed before and after each backend
    rows[0]["qps"] = exact_qps
    for r in rows:
        r["qps_vs_exact"] = r["qps"] / exact_qps
    meta = {"dataset": data.name, "n": data.size, "dim": data.dim, "k": config.k, "held_out": len(queries),
            "asked": len(data.asked), "query_sample": config.query_sample}
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / f"asked-{config.dataset}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if verbose:
        print(render(rows, meta))
    return rows


def render(rows: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    sample = "" if meta is None or meta.get("query_sample") is None else f" (query_sample {meta['query_sample']})"
    head = "" if meta is None else (f"{meta['dataset']}: {meta['n']:,} keys x {meta['dim']}, {meta['asked']} asked "
                                    f"queries{sample}, {meta['held_out']} held out, k = {meta['k']}\n\n")
    lines = ["| backend | params | recall (held out) | reported | keys as queries | keys scored | QPS x exact |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        params = r["params"] or ", ".join(["defaults"] + [f"{k} {r[k]}" for k in ("nprobe", "ef") if k in r])
        if r.get("hub_rows"):
            alone = ", its lists alone" if r.get("index") is False else ""
            params += f" (hub: {r['hub_rows']:,} rows, {r['hub_mb']:.0f} MB{alone})"
        elif "hub_rows" in r:
            params += " (no hub: the plain index reached the target faster)"
        fmt = lambda x: "–" if x is None else f"{x:.3f}"                                          # noqa: E731
        scored = "–" if "scored" not in r else f"{100 * r['scored']:.2f} %"
        lines.append(f"| {r['backend']} | {params} | {r['recall']:.3f} | {fmt(r.get('reported'))} | "
                     f"{fmt(r.get('key_recall'))} | {scored} | {r['qps_vs_exact']:.1f} |")
    return head + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="attention")
    ap.add_argument("--size", type=int, default=AskedConfig.size)
    ap.add_argument("--dim", type=int, default=AskedConfig.dim)
    ap.add_argument("--backends", default="ivf,hnsw")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--asked", type=int, default=None, help="asked queries to use (default: all the data has)")
    ap.add_argument("--held-out", type=int, default=None, help="held-out queries to measure (default: all)")
    ap.add_argument("--query-sample", type=int, default=None, help="the stores' query_sample (default: theirs)")
    ap.add_argument("--out", type=Path, default=AskedConfig.out)
    args = ap.parse_args(argv)
    run(AskedConfig(args.dataset, args.size, args.dim, repeats=args.repeats, backends=tuple(args.backends.split(",")),
                    asked=args.asked, held_out=args.held_out, query_sample=args.query_sample, out=args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
