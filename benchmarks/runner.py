"""``kvmem bench``: every contender on the same data, one table, JSON and a plot.

For each contender: build time, bytes per row, queries per second (median of
``repeats`` timed batches after a warm-up) and recall@k against exact ground
truth computed independently in float64 (:mod:`kvmem.benchmarks.recall`).
kvmem rows also carry their time ratio to the raw library they wrap,
measured in the same run.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import contenders as C
from .datasets import Dataset, load_dataset
from .recall import dataset_truth, recall_at_k
from .report import BenchResult, machine_info, markdown_table, progress, text_table, write_json

__all__ = ["BenchConfig", "run", "render", "QUICK", "DEFAULT"]


SWEEPS: dict[str, tuple[int, ...]] = {"nprobe": (1, 4, 16, 64), "ef": (16, 32, 64, 128, 256)}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    size: int = 200_000                 # base rows
    dim: int = 128
    queries: int = 1000
    k: int = 32
    dataset: str = "clustered"          # "gaussian", "clustered", or a path (.hdf5/.fvecs/.fbin/...)
    metric: str | None = None           # None: the dataset's own ("ip" for generated data)
    backends: tuple[str, ...] = ("exact", "faiss-flat", "torch-naive", "ivf", "faiss-ivf", "hnsw", "hnswlib", "lmdb")
    dtype: str = "float32"              # storage dtype of kvmem stores
    sweeps: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=lambda: dict(SWEEPS))  # knob -> values
    repeats: int = 3
    seed: int = 0
    out: Path = Path("kvmem-bench")


QUICK = BenchConfig(size=50_000, queries=500)
DEFAULT = BenchConfig()


def _settings(contender: C.Contender, config: BenchConfig) -> list[dict[str, Any]]:
    """kvmem at its defaults (``target_recall``) and then the sweep; a raw library only at the sweep's values."""
    knob = contender.sweep_param
    sweep = [{knob: v} for v in config.sweeps.get(knob, ())] if knob else []
    return ([{}] if contender.kvmem or not sweep else []) + sweep


def run(config: BenchConfig, *, verbose: bool = True) -> list[BenchResult]:
    """Measure every contender of ``config``; print the table and write results.json + recall_qps.png."""
    data: Dataset = load_dataset(config.dataset, n=config.size, dim=config.dim, queries=config.queries,
                                 seed=config.seed, metric=config.metric)
    truth = dataset_truth(data, config.k, progress=verbose)
    queries = np.ascontiguousarray(data.queries, dtype=np.float32)
    results: list[BenchResult] = []
    seconds: dict[tuple[str, str], float] = {}
    for name in progress(config.backends, "contenders", enabled=verbose):
        contender = C.contender(name)
        start = time.perf_counter()
        built = contender.build(data, {"dtype": config.dtype} if contender.kvmem else {})
        build_s = time.perf_counter() - start
        try:
            for params in _settings(contender, config):
                secs, ids = C.timed(lambda b=built, p=params: b.search(queries, config.k, **p), config.repeats)
                seconds[(name, repr(sorted(params.items())))] = secs
                extra = {"dataset": data.name, "n": data.size, "dim": data.dim, "k": config.k,
                         "queries": len(queries), "metric": data.metric, "seconds": secs}
                results.append(BenchResult(name, params, build_s, built.nbytes / data.size, len(queries) / secs,
                                           recall_at_k(ids, truth, data.base, queries, config.k), extra))
        finally:
            built.close()
    results = [_with_ratio(r, seconds) for r in results]
    if verbose:
        print(text_table(*_table(results)))
        print(fastest(results))
    config.out.mkdir(parents=True, exist_ok=True)
    write_json(results, config.out / "results.json", meta={"config": dataclasses.asdict(config), **machine_info()})
    if results and _can_plot():
        from .plot import plot_recall_qps

        plot_recall_qps(results, config.out / "recall_qps.png", title=f"{data.name}, k={config.k}", k=config.k)
    return results


HEADER = ("backend", "params", "build_s", "bytes_per_row", "qps", "recall", "time vs raw peer (same params, same run)")


def _table(results: list[BenchResult]) -> tuple[tuple[str, ...], list[list[Any]]]:
    """The columns of the table, printed by ``kvmem bench`` and written to RESULTS.md alike."""
    rows = []
    for r in results:
        ratio = r.extra.get("time_ratio")
        vs = f"{ratio:.2f} x {r.extra['vs']}" if ratio is not None else "–"
        rows.append([r.backend, r.params or "–", r.build_s, r.bytes_per_row, r.qps, r.recall, vs])
    return HEADER, rows


def fastest(results: list[BenchResult], recall: float = 0.95) -> str:
    """One line: the contender with the most queries per second at ``recall`` or more."""
    good = [r for r in results if r.recall >= recall]
    if not good:
        return f"No contender reached recall {recall}."
    best = max(good, key=lambda r: r.qps)
    params = ",".join(f"{k}={v}" for k, v in best.params.items())
    return (f"Fastest at recall >= {recall}: {best.backend}{f' ({params})' if params else ''}, "
            f"{best.qps:,.0f} QPS at recall {best.recall:.4f}.")


def render(results: list[BenchResult]) -> str:
    """The RESULTS.md table of one ``kvmem bench`` run."""
    if not results:
        return "(no results)\n"
    e = results[0].extra
    head = (f"{e['dataset']} data, {e['n']:,} rows x {e['dim']}, {e['queries']} queries, k = {e['k']}, "
            f"metric {e['metric']}; QPS from the median of the timed batches.\n\n")
    return head + markdown_table(*_table(results)) + "\n\n" + fastest(results) + "\n"


def _with_ratio(result: BenchResult, seconds: dict[tuple[str, str], float]) -> BenchResult:
    """Add the time ratio to this contender's raw peer at equal params, from the same run."""
    contender = C.contender(result.backend)
    peer, key = contender.peer, repr(sorted(result.params.items()))
    if peer is None or (peer, key) not in seconds or (contender.sweep_param and not result.params):
        return result
    ratio = seconds[(result.backend, key)] / seconds[(peer, key)]
    return dataclasses.replace(result, extra={**result.extra, "vs": peer, "time_ratio": ratio})


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
