"""kvmem ``ivf`` / ``hnsw`` against raw faiss / hnswlib: recall@k vs QPS, wrapper tax, build, memory.

Run (on a shared machine, one heavy job at a time)::

    python -m kvmem.benchmarks.ann --size 1000000 --out bench-ann

For each dataset (clustered and gaussian with metric ip by default; ``--datasets
clustered:l2`` adds one where HNSW searches a true metric), in one process:

- ground truth: exact top-k, rescored in float64 (:mod:`kvmem.benchmarks.recall`);
- kvmem ``exact`` at its defaults: the QPS every other row is divided by;
- kvmem ``ivf`` / ``hnsw`` built at their defaults (adds of 65536 rows; ``target_recall``
  0.95 calibrated during the adds): build time, bytes per row, recall and QPS at the
  defaults, then a sweep of ``nprobe`` / ``ef``;
- the raw library on kvmem's own index at the same ``nprobe`` / ``ef``
  (``faiss-ivf/same-index``, ``hnswlib/same-graph``): the wrapper tax, kvmem
  seconds / library seconds, both returning the top-k of the same candidates;
  and the same search followed by what a caller of the raw library does to get
  what kvmem returns (gather the found rows' keys and values from its own
  arrays and score them: the memorizing-transformers way): the tax over that;
- the raw library built the way its documentation suggests (``faiss-ivf``: IndexIVFFlat
  with the dataset's metric, kvmem's nlist, trained on 64 rows per list; ``hnswlib``:
  one ``add_items`` of every row, same M and ef_construction): its own sweep;
- ``target_recall`` 0.9 / 0.95 / 0.99 calibrated on kvmem's index at the final size
  (what a store created with that target does at its next calibration).

Timings are medians over ``runs`` runs of the median of ``repeats`` calls after a
warm-up; within a run a kvmem call and its peers' alternate, so all see the same
machine, and each ratio is the median of the per-run ratios. Every timed call
starts after 20 ms idle: faiss's and torch's OpenMP workers spin about 6 ms after
a parallel call and would take a core from whichever call came next (kvmem
right after a 2-thread faiss search ran 1.45x slower than after a pause). Functions are importable:
:func:`run` for everything, ``bench_*`` per backend, ``build_*`` for the
contenders, :func:`render` for RESULTS.md; :mod:`kvmem.benchmarks.contenders`
has ``ivf``, ``faiss-ivf``, ``hnsw`` and ``hnswlib`` as ``kvmem bench`` contenders.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kvmem

from .contenders import add_rows, batches, learn, prepared
from .datasets import Dataset, load_dataset
from .recall import GroundTruth, dataset_truth, recall_at_k
from .report import BenchResult, format_table, machine_info, markdown_table, write_json

__all__ = ["AnnConfig", "run", "build_kvmem", "build_faiss_ivf", "build_hnswlib", "interleaved",
           "bench_exact", "bench_ivf", "bench_hnsw", "render", "main"]


COOL_DOWN_S = 0.02          # idle before each timed call (see the module docstring)


@dataclasses.dataclass(frozen=True)
class AnnConfig:
    size: int = 1_000_000
    dim: int = 128
    queries: int = 1000
    k: int = 32
    datasets: tuple[str, ...] = ("clustered", "gaussian")   # name or name:metric, e.g. "clustered:l2"
    metric: str = "ip"
    nprobes: tuple[int, ...] = (1, 4, 16, 64)
    efs: tuple[int, ...] = (32, 128, 512, 2048)
    targets: tuple[float, ...] = (0.9, 0.95, 0.99)
    repeats: int = 5                    # timed calls per run (medians)
    runs: int = 2                       # runs per setting; figures are medians over runs, ratios per run
    seed: int = 0
    out: Path = Path("bench-ann")


# ---------------------------------------------------------------------------------------------- building
def build_kvmem(backend: str, data: Dataset, **options: Any) -> tuple[kvmem.MemoryStore, float]:
    """A one-partition store (float32 unless ``dtype`` is given) of ``data.base`` added in batches, and its
    seconds; then asked ``data.asked`` (if any) and frozen (:func:`~kvmem.benchmarks.contenders.learn`)."""
    start = time.perf_counter()
    dtype = options.pop("dtype", torch.float32)
    store = kvmem.create(backend, dim=data.dim, value_dim=1, metric=data.metric, dtype=dtype, **options)
    add_rows(store, data.base)
    seconds = time.perf_counter() - start
    learn(store, data)                                  # never from the queries it is measured on
    return store, seconds


def build_faiss_ivf(data: Dataset, nlist: int, seed: int = 0) -> tuple[Any, float]:
    """IndexIVFFlat as faiss's docs build it: the dataset's metric, k-means on 64 rows per list."""
    import faiss

    start = time.perf_counter()
    metric = faiss.METRIC_L2 if data.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    index = faiss.index_factory(data.dim, f"IVF{nlist},Flat", metric)
    sample = np.sort(np.random.default_rng(seed).choice(len(data.base), min(len(data.base), 64 * nlist), False))
    train = np.asarray(data.base[sample], np.float32)
    index.train(prepared(train, data.metric))
    for rows in batches(data.base):
        index.add(prepared(rows, data.metric))
    return index, time.perf_counter() - start


def build_hnswlib(data: Dataset, M: int, ef_construction: int) -> tuple[Any, float]:
    """An hnswlib graph of every row in one ``add_items`` call (all threads)."""
    import hnswlib

    start = time.perf_counter()
    index = hnswlib.Index(space={"l2": "l2", "ip": "ip", "cos": "cosine"}[data.metric], dim=data.dim)
    index.init_index(max_elements=len(data.base), M=M, ef_construction=ef_construction, random_seed=100)
    index.add_items(np.asarray(data.base, np.float32), np.arange(len(data.base)))
    return index, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- timing
def interleaved(calls: dict[str, Callable[[], Any]], repeats: int,
                budget_s: float = 60.0) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds per call name over ``repeats`` rounds (after a warm-up), the calls taking turns,
    each after :data:`COOL_DOWN_S` idle.

    Slow settings stop after two rounds once ``budget_s`` seconds are spent.
    """
    began = time.perf_counter()
    out = {name: fn() for name, fn in calls.items()}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats):
        if round_ >= 2 and time.perf_counter() - began > budget_s:
            break
        for name, fn in calls.items():
            time.sleep(COOL_DOWN_S)
            start = time.perf_counter()
            out[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: float(np.median(s)) for name, s in seconds.items()}, out


def repeated(calls: dict[str, Callable[[], Any]], config: AnnConfig) -> tuple[dict[str, float], dict[str, Any],
                                                                              list[dict[str, float]]]:
    """:func:`interleaved` ``config.runs`` times: median seconds over runs, the last results, each run's seconds."""
    per_run = []
    for _ in range(config.runs):
        secs, out = interleaved(calls, config.repeats)
        per_run.append(secs)
    return {name: float(np.median([s[name] for s in per_run])) for name in calls}, out, per_run


# ---------------------------------------------------------------------------------------------- one backend
def _sweep(store: kvmem.MemoryStore, data: Dataset, truth: GroundTruth, config: AnnConfig, exact_qps: float,
           raw_same: Callable[[np.ndarray, int, int], np.ndarray], peer: Any, peer_search: Callable,
           peer_name: str, values: Sequence[int], build: dict[str, float]) -> list[BenchResult]:
    """Defaults, the sweep (kvmem, raw on kvmem's index, raw built apart) and the targets, as records."""
    knob, backend = store.param, store.backend
    queries = np.ascontiguousarray(data.queries, np.float32)
    qt = torch.from_numpy(queries)
    common = {"dataset": data.name, "metric": data.metric, "n": data.size, "k": config.k, "queries": len(queries)}
    nbytes = store.nbytes() / data.size

    def record(name: str, params: dict, secs: float, ids: np.ndarray, extra: dict, per_row: float = math.nan,
               build_s: float = math.nan) -> BenchResult:
        qps = len(queries) / secs
        return BenchResult(name, params, build_s, per_row, qps, recall_at_k(ids, truth, data.base, queries, config.k),
                           {**common, "qps_vs_exact": qps / exact_qps, **extra})

    base, column = torch.from_numpy(np.ascontiguousarray(data.base, np.float32)), torch.zeros(data.size, 1)

    def fetch(ids: np.ndarray) -> np.ndarray:
        """Keys, values and scores of the found rows, as a raw-library caller gets them (kvmem ids = rows here)."""
        rows = torch.from_numpy(ids.astype(np.int64, copy=False)).clamp(min=0).reshape(-1)   # hnswlib: uint64
        keys = base.index_select(0, rows).view(*ids.shape, -1)                         # (q, k, dim)
        column.index_select(0, rows)                                                    # the values
        torch.einsum("qd,qkd->qk", qt, keys)
        return ids

    cal = store.calibration()[0]
    secs, out, _ = repeated({"kvmem": lambda: store.search(qt, config.k).ids.numpy()}, config)
    rows = [record(backend, {}, secs["kvmem"], out["kvmem"], {
        "defaults": True, knob: store._value(0, {}), "calibrated_at_rows": cal.rows if cal else None,
        "calibrated_recall": cal.recall if cal else None, "searched_exactly": bool(cal and cal.exact)},
        nbytes, build["kvmem"])]
    for value in values:
        secs, out, per_run = repeated({
            "kvmem": lambda v=value: store.search(qt, config.k, **{knob: v}).ids.numpy(),
            "same": lambda v=value: raw_same(queries, config.k, v),
            "fetch": lambda v=value: fetch(raw_same(queries, config.k, v)),
            "peer": lambda v=value: peer_search(peer, queries, config.k, v)}, config)
        taxes = [s["kvmem"] / s["same"] for s in per_run]                     # each run against its own peer
        fetched = float(np.median([s["kvmem"] / s["fetch"] for s in per_run]))
        rows += [record(backend, {knob: value}, secs["kvmem"], out["kvmem"],
                        {"wrapper_tax": float(np.median(taxes)), "wrapper_tax_runs": taxes,
                         "tax_vs_search_and_fetch": fetched}, nbytes, build["kvmem"]),
                 record(f"{peer_name}/same-index", {knob: value}, secs["same"], out["same"], {}),
                 record(peer_name, {knob: value}, secs["peer"], out["peer"],
                        {"kvmem_time_ratio": float(np.median([s["kvmem"] / s["peer"] for s in per_run]))},
                        build["peer_bytes"] / data.size, build["peer"])]
    from kvmem.stores._calibrate import calibrate

    for target in config.targets:                   # searched as a store created with that target searches
        with store._lock.write():
            got, _ = calibrate(store, 0, target, *store._value_range(0))
            kept, store._calibrations[0] = store._calibrations[0], got
        try:
            secs, out, _ = repeated({"kvmem": lambda: store.search(qt, config.k).ids.numpy()}, config)
        finally:
            store._calibrations[0] = kept
        rows.append(record(f"{backend}-target", {"target_recall": target}, secs["kvmem"], out["kvmem"],
                           {knob: got.value, "calibrated_recall": got.recall, "searched_exactly": got.exact}))
    return rows


def bench_ivf(data: Dataset, truth: GroundTruth, config: AnnConfig, exact_qps: float) -> list[BenchResult]:
    import faiss

    from kvmem.stores.ivf import index_nbytes

    small = {"train_size": max(2, data.size // 2)} if data.size < 1 << 15 else {}   # defaults train at 32768
    store, build_s = build_kvmem("ivf", data, **small)
    part = store._parts[0]
    nlist = part.index.nlist
    peer, peer_s = build_faiss_ivf(data, nlist, config.seed)

    q_kvmem = part.prepare_queries(np.ascontiguousarray(data.queries, np.float32))    # as kvmem hands them to faiss

    def same(queries: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        return part.index.search(q_kvmem, k, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]

    def peer_search(index: Any, queries: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        q = prepared(queries, data.metric)
        return index.search(q, k, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]

    try:
        rows = _sweep(store, data, truth, config, exact_qps, same, peer, peer_search, "faiss-ivf", config.nprobes,
                      {"kvmem": build_s, "peer": peer_s, "peer_bytes": index_nbytes(peer)})
    finally:
        store.close()
    return [dataclasses.replace(r, params={**r.params, "nlist": nlist}) if r.backend != "ivf-target" else r
            for r in rows]


def bench_hnsw(data: Dataset, truth: GroundTruth, config: AnnConfig, exact_qps: float) -> list[BenchResult]:
    from kvmem.stores.hnsw import graph_nbytes

    store, build_s = build_kvmem("hnsw", data)
    part = store._parts[0]
    peer, peer_s = build_hnswlib(data, store.options["M"], store.ef_construction)

    def same(queries: np.ndarray, k: int, ef: int) -> np.ndarray:
        with part.gate.use(ef):                     # sets hnswlib's ef the way a raw caller would, then searches
            return part.index.knn_query(queries, k)[0]

    def peer_search(index: Any, queries: np.ndarray, k: int, ef: int) -> np.ndarray:
        index.set_ef(ef)
        return index.knn_query(queries, k)[0]

    try:
        return _sweep(store, data, truth, config, exact_qps, same, peer, peer_search, "hnswlib", config.efs,
                      {"kvmem": build_s, "peer": peer_s, "peer_bytes": graph_nbytes(peer)})
    finally:
        store.close()


def bench_exact(data: Dataset, truth: GroundTruth, config: AnnConfig) -> BenchResult:
    store, build_s = build_kvmem("exact", data)
    queries = np.ascontiguousarray(data.queries, np.float32)
    try:
        secs, out = interleaved({"exact": lambda: store.search(torch.from_numpy(queries), config.k).ids.numpy()},
                                max(1, config.repeats // 2))
        return BenchResult("exact", {}, build_s, store.nbytes() / data.size, len(queries) / secs["exact"],
                           recall_at_k(out["exact"], truth, data.base, queries, config.k),
                           {"dataset": data.name, "metric": data.metric, "n": data.size, "k": config.k,
                            "queries": len(queries)})
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------- all
def run(config: AnnConfig, *, verbose: bool = True) -> list[BenchResult]:
    """Every dataset of ``config``; prints tables, writes ``results.json`` and one plot per dataset."""
    results: list[BenchResult] = []
    config.out.mkdir(parents=True, exist_ok=True)
    for spec in config.datasets:
        name, _, metric = spec.partition(":")
        data = load_dataset(name, n=config.size, dim=config.dim, queries=config.queries, seed=config.seed,
                            metric=metric or config.metric)
        truth = dataset_truth(data, config.k, progress=verbose)
        rows = [bench_exact(data, truth, config)]
        for bench in (bench_ivf, bench_hnsw):
            part = bench(data, truth, config, rows[0].qps)
            rows += part
            if verbose:
                print(f"\n{data.name}, k={config.k}\n" + format_table(part, ["backend", "params", "build_s",
                                                                             "bytes_per_row", "qps", "recall"]))
                print(ratios(part), flush=True)
            write_json(results + rows, config.out / "results.json",
                       meta={"config": dataclasses.asdict(config), **machine_info()})
        results += rows
        if verbose:
            print(format_table(rows[:1], ["backend", "build_s", "bytes_per_row", "qps", "recall"]), flush=True)
        _plot(rows, config.out / f"recall_qps_{name}_{data.metric}.png", f"{data.name}, {data.metric}, k={config.k}",
              config.k)
    return results


def render(results: Sequence[BenchResult]) -> str:
    """The RESULTS.md section of one :func:`run`: per dataset, the defaults, the sweeps and the targets."""
    out = []
    for name, metric in dict.fromkeys((r.extra["dataset"], r.extra.get("metric", "ip")) for r in results):
        rows = [r for r in results if (r.extra["dataset"], r.extra.get("metric", "ip")) == (name, metric)]
        e = rows[0].extra
        out += [f"**{name}, metric {metric}**: {e['n']:,} rows, {e['queries']} queries, k = {e['k']}; "
                "QPS from the median of the timed batches, ratios within the same run.", ""]
        head = ["backend", "knob", "recall", "QPS", "QPS / exact", "build s per 1M rows", "bytes per row"]
        table = []
        for r in rows:
            peer = r.backend in ("faiss-ivf", "hnswlib") and r is _last(rows, r.backend)
            if r.backend == "exact" or r.extra.get("defaults"):
                knob = {k: v for k, v in {**r.params, **r.extra}.items() if k in ("nprobe", "ef", "nlist")}
                if _searched_exactly(r):
                    knob = ",".join(f"{k}={v}" for k, v in knob.items()) + ": 0.95 out of reach, searched exactly"
                table.append([r.backend + ("" if r.backend == "exact" else " (defaults)"), knob or "-", r.recall,
                              r.qps, f"{r.extra.get('qps_vs_exact', 1.0):.1f}", r.build_s * 1e6 / r.extra["n"],
                              r.bytes_per_row])
            elif peer:
                table.append([f"{r.backend} (its own build)", "-", "-", "-", "-", r.build_s * 1e6 / r.extra["n"],
                              r.bytes_per_row])
        out += [markdown_table(head, table), ""]
        head = ["knob", "kvmem recall", "kvmem QPS", "library on kvmem's index: QPS", "wrapper tax",
                "tax over search + fetch", "library's own build: recall", "its QPS"]
        for backend, peer in (("ivf", "faiss-ivf"), ("hnsw", "hnswlib")):
            swept = [r for r in rows if r.backend == backend and not r.extra.get("defaults")]
            same = {repr(r.params): r for r in rows if r.backend == f"{peer}/same-index"}
            own = {repr(r.params): r for r in rows if r.backend == peer}
            table = [[r.params, r.recall, r.qps, same[repr(r.params)].qps, f"{r.extra['wrapper_tax']:.2f}",
                      _fetch_tax(r), own[repr(r.params)].recall, own[repr(r.params)].qps] for r in swept]
            out += [f"`{backend}` against {peer} at equal settings:", "", markdown_table(head, table), ""]
        head = ["backend", "target_recall", "knob reached", "recall there on the sample", "search",
                "recall on the queries", "QPS"]
        table, exact_row, dagger = [], next(r for r in rows if r.backend == "exact"), False
        for r in (r for r in rows if r.backend.endswith("-target")):
            exact, recall, qps, mark = r.extra.get("searched_exactly"), r.recall, r.qps, ""
            if exact is None:                       # runs before the flag: the index was timed at the knob
                exact = r.extra["calibrated_recall"] < r.params["target_recall"]
                if exact:
                    recall, qps, mark, dagger = 1.0, exact_row.qps, " †", True
            table.append([r.backend.removesuffix("-target"), r.params["target_recall"],
                          {k: r.extra[k] for k in ("nprobe", "ef") if k in r.extra}, r.extra["calibrated_recall"],
                          f"exact (out of reach){mark}" if exact else "index", recall, qps])
        out += ["`target_recall` calibrated at the final size (a target the index cannot reach within its knob "
                "range is searched exactly):", "", markdown_table(head, table), ""]
        if dagger:
            out += ["† This run timed the index at the knob reached; a store searches exactly there, so recall "
                    "and QPS are those of the `exact` row of the same run.", ""]
    return "\n".join(out)


def _searched_exactly(r: BenchResult) -> bool:
    """Whether a store at its defaults searched exactly (runs before the flag: its calibration fell short)."""
    if "searched_exactly" in r.extra:
        return bool(r.extra["searched_exactly"])
    return r.extra.get("calibrated_recall") is not None and r.extra["calibrated_recall"] < 0.95


def _fetch_tax(r: BenchResult) -> str:
    tax = r.extra.get("tax_vs_search_and_fetch")                  # absent from runs before it was measured
    return "-" if tax is None else f"{tax:.2f}"


def _last(rows: Sequence[BenchResult], backend: str) -> BenchResult:
    return [r for r in rows if r.backend == backend][-1]


def ratios(rows: Sequence[BenchResult]) -> str:
    """The derived figures: wrapper tax per setting, QPS ratio to exact, build seconds per million rows."""
    lines = []
    for r in rows:
        extra = r.extra
        names = ("wrapper_tax", "tax_vs_search_and_fetch", "kvmem_time_ratio", "qps_vs_exact")
        bits = [f"{k}={extra[k]:.3f}" for k in names if k in extra]
        if math.isfinite(r.build_s):
            bits.append(f"build_s_per_1M={r.build_s * 1e6 / extra['n']:.1f}")
        lines.append(f"  {r.label:40s} {r.params}  " + " ".join(bits))
    return "\n".join(lines)


def _plot(rows: Sequence[BenchResult], path: Path, title: str, k: int) -> None:
    try:
        from .plot import plot_recall_qps
    except ImportError:
        return
    swept = [r for r in rows if r.params and not r.backend.endswith("-target")]
    try:
        plot_recall_qps(swept, path, title=title, k=k)
    except kvmem.BackendUnavailableError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmem.benchmarks.ann", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=AnnConfig.size)
    parser.add_argument("--dim", type=int, default=AnnConfig.dim)
    parser.add_argument("--queries", type=int, default=AnnConfig.queries)
    parser.add_argument("--k", type=int, default=AnnConfig.k)
    parser.add_argument("--datasets", default=",".join(AnnConfig.datasets))
    parser.add_argument("--repeats", type=int, default=AnnConfig.repeats)
    parser.add_argument("--runs", type=int, default=AnnConfig.runs)
    parser.add_argument("--out", default=str(AnnConfig.out))
    args = parser.parse_args(argv)
    run(AnnConfig(size=args.size, dim=args.dim, queries=args.queries, k=args.k, repeats=args.repeats, runs=args.runs,
                  datasets=tuple(args.datasets.split(",")), out=Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
