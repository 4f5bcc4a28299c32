"""Dictionary lookup with a trained memory model (Focused Transformer, arXiv 2307.03170, section 5).

Trains a 2-layer decoder with a memory on its last layer with CrossBatch
(:mod:`kvmem.adapters.crossbatch`), and a control trained the same way with
``d = 1``, on the task of :mod:`kvmem.benchmarks.fot_task`; then fills a kvmem
memory with a dictionary of up to 16M tokens (``feed(search=False)``) and asks
it queries whose entries lie somewhere in it, for each backend, beside the same
model without memory (its window only; chance is ``1 / values``).

    python -m kvmem.benchmarks.fot_lookup train --out fot-run/crossbatch       # d = 1, 2, 4, ..., 128
    python -m kvmem.benchmarks.fot_lookup train --d 1 --out fot-run/control
    python -m kvmem.benchmarks.fot_lookup eval --models fot-run/crossbatch,fot-run/control --out fot-run
    python -m kvmem.benchmarks.fot_lookup all --out fot-run           # the three commands above
    python -m kvmem.benchmarks.fot_lookup quick --out /tmp/fot        # all of it at tiny sizes

Checkpoints are ``save_pretrained`` folders (safetensors) with a ``training.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .fot_task import MEMORY_LAYERS, SLOT, Task, TrainConfig, dictionary, query_windows, train
from .report import markdown_table

__all__ = ["evaluate", "window_logits", "render", "main", "SIZES", "MAX_ROWS"]

SIZES = tuple(1 << s for s in range(14, 25, 2))  # 16k, 64k, 256k, 1M, 4M, 16M tokens
BACKENDS = ("exact", "ivf", "hnsw", "lmdb")
# largest memory a backend is built at, for build time on a 2-core CPU: hnsw inserted about 2,800 rows/s on one
# thread there (over 1.5 h for 16M), and past 4M rows ivf would retrain k-means with 16k lists and reassign every row
MAX_ROWS: dict[str, int] = {"hnsw": 1 << 18, "ivf": 1 << 22}
FEED_TOKENS = 1 << 16  # tokens per feed call while filling
QUERY_WINDOWS = 128  # query windows per forward
WARMUP = 128  # query windows about other entries, asked before the measured ones (not timed)


def evaluate(models: Mapping[str, Path], sizes: Sequence[int], backends: Sequence[str] = BACKENDS, *,
             queries: int = 512, k: int = 4, seed: int = 0, max_rows: Mapping[str, int] = MAX_ROWS,
             target_recall: float | None = None, workdir: Path | None = None,
             log: Any = print) -> list[dict[str, Any]]:
    """Accuracy, fill and query time and memory size per model, backend and memory size (tokens).

    ``target_recall`` is given to ivf and hnsw (None: their default)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="kvmem-fot-", dir=workdir) as work:
        for name, path in models.items():
            results += _evaluate_model(name, Path(path), sizes, backends, queries, k, seed, max_rows,
                                       target_recall, Path(work), log)
    return results


def _evaluate_model(name, path, sizes, backends, queries, k, seed, max_rows, target_recall, work, log):
    """The model reads the dictionary once, into an ``exact`` store (bfloat16) grown size by size; at each
    size every other backend gets a fresh store holding a copy of its rows, measured, then closed, so
    one large store besides the exact one is alive at a time.

    Before the measured queries each store is asked :data:`WARMUP` query
    windows about other entries, as a deployed model would have asked: ivf
    and hnsw calibrate their knob on the queries they are asked (keys
    until then), and the model's queries are not like its keys.
    """
    from transformers import AutoModelForCausalLM

    record = json.loads((path / "training.json").read_text())
    task = Task(**record["task"])
    positions = record["train"]["positions"]
    W = task.window
    sizes = sorted(s // W * W for s in sizes)
    codes, values = dictionary(task, sizes[-1] // SLOT, seed)
    bare = AutoModelForCausalLM.from_pretrained(path).eval()
    reader = _attach(path, "exact", positions, k, W, {})
    source = reader.stores[MEMORY_LAYERS[0]]
    fed, fill_s = 0, 0.0
    results = []
    for size in sizes:
        start = time.perf_counter()
        while fed < size:  # the model reads the dictionary into the exact store, many windows per forward
            n = min(FEED_TOKENS, size - fed)
            first, last = fed // SLOT, (fed + n) // SLOT
            reader.feed(task.entries(codes[first:last], values[first:last]).view(1, -1), search=False)
            fed += n
        fill_s += time.perf_counter() - start
        held = codes[: size // SLOT], values[: size // SLOT]
        ids, where, answers = query_windows(task, *held, queries, seed + 1)
        warmup = query_windows(task, *held, WARMUP, seed + 1, skip=queries)[0]  # other entries
        window_only, bare_s = _accuracy(bare, ids, where, answers)
        results.append({"model": name, "backend": "window only", "tokens": size, "accuracy": window_only,
                        "query_ms": 1e3 * bare_s / answers.numel()})
        log(f"{name} {size:,} tokens: window only {window_only:.3f}")
        for backend in backends:
            if size > max_rows.get(backend, size):
                continue
            lmdb = work / f"{name}-lmdb-{size}"
            options = {"path": str(lmdb)} if backend == "lmdb" else {}
            if backend in ("ivf", "hnsw") and target_recall is not None:
                options["target_recall"] = target_recall
            adapter = reader if backend == "exact" else _attach(path, backend, positions, k, W, options)
            store = adapter.stores[MEMORY_LAYERS[0]]
            add_s = 0.0 if adapter is reader else _copy_rows(source, store, base=W)
            if len(warmup):  # an approximate store calibrates on the queries it is asked
                window_logits(adapter.model, warmup)
            if hasattr(store, "freeze"):
                store.freeze()  # the measured queries neither join the sample nor move the knob
            acc, query_s = _accuracy(adapter.model, ids, where, answers)
            results.append({"model": name, "backend": backend, "tokens": size, "accuracy": acc,
                            "fill_s": fill_s + add_s, "add_s": add_s, "query_ms": 1e3 * query_s / answers.numel(),
                            "rows": len(store), "disk_mb": _disk_mb(lmdb), "ram_mb": _ram_mb(store),
                            **_calibrated(store)})
            log(f"{name} {size:,} tokens: {backend} {acc:.3f} (fill {fill_s + add_s:.0f} s, add {add_s:.0f} s, "
                f"{results[-1]['query_ms']:.2f} ms/query{_knob(results[-1])})")
            if adapter is not reader:
                adapter.detach()
                shutil.rmtree(lmdb, ignore_errors=True)
    reader.detach()
    return results


def _attach(path: Path, backend: str, positions: str, k: int, W: int, options: dict[str, Any]):
    """A fresh copy of the model at ``path`` with an empty ``backend`` memory (bfloat16) whose ids start at W."""
    from kvmem.adapters import hf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    adapter = hf.attach(model, backend=backend, layers=MEMORY_LAYERS, k=k, positions=positions,
                        store_options={"dtype": torch.bfloat16, **options}, chunk_size=W)
    adapter.feed(torch.full((1, W), 0), search=False)  # makes the store (ids 0 .. W-1)
    adapter.reset()  # ids go on from W: they are never reused
    return adapter


def _copy_rows(source: Any, store: Any, base: int) -> float:
    """Add the rows of ``source`` (ids from ``base``) that ``store`` lacks; returns the seconds of the adds."""
    seconds, block = 0.0, 1 << 22  # ivf trains once on a copy up to 4M rows
    for first in range(len(store), len(source), block):
        ids = base + torch.arange(first, min(first + block, len(source)))
        keys, values = source.get(ids)
        start = time.perf_counter()
        store.add(keys, values)
        seconds += time.perf_counter() - start
    return seconds


def _accuracy(model, ids, where, answers) -> tuple[float, float]:
    """Fraction of answer tokens predicted (argmax over the vocabulary) at the queries' k3 positions; seconds."""
    logits, seconds = window_logits(model, ids)  # (n, W, V)
    guess = logits.gather(1, where.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).argmax(-1)  # (n, U)
    return float((guess == answers).float().mean()), seconds


def window_logits(model, ids: torch.Tensor, batch: int = QUERY_WINDOWS) -> tuple[torch.Tensor, float]:
    """Logits ``(n, W, V)`` of ``n`` windows ``ids (n, W)``, each run alone; seconds of the forwards.

    ``batch`` windows run as one row with a block-diagonal causal mask and
    positions ``0 .. W - 1`` in each block: each window attends to itself and
    searches memory alone, as one window per forward would.
    """
    n, W = ids.shape
    block = torch.ones(W, W, dtype=torch.bool).tril()
    out, seconds = [], 0.0
    with torch.no_grad():
        for first in range(0, n, batch):
            rows = ids[first : first + batch]
            m = rows.shape[0]
            mask = torch.block_diag(*[block] * m)[None, None]  # (1, 1, m*W, m*W)
            pos = torch.arange(W).repeat(m).unsqueeze(0)  # (1, m*W)
            start = time.perf_counter()
            logits = model(input_ids=rows.reshape(1, -1), attention_mask=mask, position_ids=pos, use_cache=False).logits
            seconds += time.perf_counter() - start
            out.append(logits[0].view(m, W, -1))
    return torch.cat(out), seconds


def _calibrated(store: Any) -> dict[str, Any]:
    """The knob an approximate store searched at, and the recall it measured there (on asked queries)."""
    if not hasattr(store, "calibration"):
        return {}
    done = [c for c in store.calibration() if c is not None]
    if not done:
        return {"knob": None}
    c = done[0]
    return {"knob": "exact" if c.exact else c.value, "calibrated_recall": c.recall, "calibrated_k": c.k,
            "calibrated_on_asked": c.queries, "target_recall": store.target_recall}


def _knob(r: Mapping[str, Any]) -> str:
    if r.get("knob") is None:
        return ""
    return (f", knob {r['knob']}: recall@{r['calibrated_k']} {r['calibrated_recall']:.3f} on "
            f"{r['calibrated_on_asked']} asked queries")


def _ram_mb(store: Any) -> float:
    """Bytes of keys and values held, as stored (index overheads not counted)."""
    item = torch.empty(0, dtype=store.dtype).element_size()
    return len(store) * (store.dim + store.value_dim) * item / 2**20


def _disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def render(data: Mapping[str, Any]) -> str:
    """Training summary, then accuracy by memory size, model and backend, then times and sizes."""
    lines = []
    for name, t in data["training"].items():
        reached = ", ".join(f"d = {d} from step {i}" for d, i in t.get("phases", [(t["train"]["d"], 0)]))
        lines.append(f"- **{name}** ({reached}): {t['steps']} steps in {t['seconds'] / 60:.1f} min, "
                     f"final loss {t['final_loss']:.3f} (mean of the last 50 steps; chance "
                     f"ln {t['task']['values']} = {math.log(t['task']['values']):.2f})")
    results = data["results"]
    cols = list(dict.fromkeys((r["model"], r["backend"]) for r in results))
    sizes = sorted({r["tokens"] for r in results})
    acc = {(r["model"], r["backend"], r["tokens"]): r["accuracy"] for r in results}
    rows = [[f"{s:,}", *(f"{acc[(m, b, s)]:.3f}" if (m, b, s) in acc else "–" for m, b in cols)] for s in sizes]
    table = markdown_table(["memory tokens", *(f"{m} {b}" for m, b in cols)], rows)
    timed = [r for r in results if r["backend"] != "window only"]
    first = timed[0]["model"] if timed else None
    def num(r, key, fmt):
        value = r.get(key)
        return "–" if value is None or not math.isfinite(value) else format(value, fmt)

    trows = [[f"{r['tokens']:,}", r["backend"], *(num(r, key, fmt) for key, fmt in (
        ("fill_s", ".0f"), ("add_s", ".0f"), ("query_ms", ".2f"), ("ram_mb", ".0f"), ("disk_mb", ".0f"))),
        _knob(r).removeprefix(", ") or "–"] for r in timed if r["model"] == first]
    times = markdown_table(["memory tokens", "backend", "fill s", "of it add s", "ms per query", "keys+values MB",
                            "disk MB", "knob searched at"], trows)
    return "\n".join(lines) + "\n\nAccuracy:\n\n" + table + f"\n\nFill, query and size ({first}):\n\n" + times + "\n"


def _plot(results: Sequence[Mapping[str, Any]], path: Path) -> None:
    from .plot import _entries, _figure, _save

    fig, ax = _figure()
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        lines.setdefault(f"{r['model']} {r['backend']}", []).append((r["tokens"], r["accuracy"]))
    for label, points in lines.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label, linestyle="--" if "window" in label else "-")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(_entries)
    ax.set_xlabel("tokens in memory")
    ax.set_ylabel("lookup accuracy")
    ax.set_ylim(0, 1.02)
    _save(fig, ax, path, "dictionary lookup with a CrossBatch-trained memory")


def run_eval(models: Mapping[str, Path], sizes, backends, out: Path, **kwargs: Any) -> dict[str, Any]:
    results = evaluate(models, sizes, backends, **kwargs)
    training = {name: json.loads((Path(p) / "training.json").read_text()) for name, p in models.items()}
    for t in training.values():
        t.pop("losses", None)
    data = {"training": training, "results": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "fot_lookup.json").write_text(json.dumps(data, indent=1))
    _plot(results, out / "fot_lookup.png")
    print(render(data))
    return data


def reproduce(out: Path, sizes: Sequence[int] = SIZES, threads: int = 1, **kwargs: Any) -> dict[str, Any]:
    """Train the CrossBatch model and the d = 1 control under ``out``, then :func:`run_eval` both."""
    torch.set_num_threads(threads)
    models = {}
    for name, d in (("crossbatch", TrainConfig().d), ("control", "1")):
        train(Task(), TrainConfig(d=d), out / name, log=lambda m: print(m, flush=True))
        models[name] = out / name
    return run_eval(models, sizes, BACKENDS, out, log=lambda m: print(m, flush=True), **kwargs)


def quick(out: Path) -> dict[str, Any]:
    """Everything at tiny sizes: two 20-step trainings, memories of 320 and 640 tokens, every backend."""
    task = Task(keys=8, values=8, window=20)
    models = {}
    for name, d in (("crossbatch", "1,2"), ("control", "1")):
        config = TrainConfig(d=d, docs=2, windows=3, steps=20, minutes=5.0, hidden=32, heads=2, head_dim=16)
        train(task, config, out / name, log=lambda *_: None)
        models[name] = out / name
    return run_eval(models, [320, 640], BACKENDS, out, queries=8, max_rows={}, log=lambda *_: None)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one model with CrossBatch")
    for field, value in asdict(TrainConfig()).items():
        t.add_argument(f"--{field}", type=type(value), default=value)
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    t.add_argument("--out", required=True)
    e = sub.add_parser("eval", help="fill memories and measure lookup accuracy")
    e.add_argument("--models", required=True, help="comma-separated checkpoint folders")
    e.add_argument("--sizes", default=",".join(map(str, SIZES)))
    e.add_argument("--backends", default=",".join(BACKENDS))
    e.add_argument("--queries", type=int, default=512)
    e.add_argument("--k", type=int, default=4, help="memory rows each query attends to")
    e.add_argument("--max-rows", default=",".join(f"{b}={n}" for b, n in MAX_ROWS.items()),
                   help="backend=rows,... largest memory per backend")
    e.add_argument("--target-recall", type=float, default=None, help="ivf and hnsw (default: theirs)")
    e.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    e.add_argument("--out", required=True)
    r = sub.add_parser("report", help="merge eval folders (models evaluated in separate processes)")
    r.add_argument("--runs", required=True, help="comma-separated eval --out folders")
    r.add_argument("--out", required=True)
    a = sub.add_parser("all", help="train both models, then evaluate them")
    a.add_argument("--sizes", default=",".join(map(str, SIZES)))
    a.add_argument("--out", required=True)
    q = sub.add_parser("quick", help="train and evaluate at tiny sizes")
    q.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if args.command == "train":
        config = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
        record = train(Task(), config, Path(args.out), log=lambda m: print(m, flush=True))
        print(f"{record['steps']} steps, {record['seconds']:.0f} s, final loss {record['final_loss']:.4f}")
    elif args.command == "eval":
        models = {Path(p).name: Path(p) for p in args.models.split(",")}
        limits = {b: int(n) for b, n in (kv.split("=") for kv in args.max_rows.split(",") if kv)}
        run_eval(models, [int(s) for s in args.sizes.split(",")], args.backends.split(","), Path(args.out),
                 queries=args.queries, k=args.k, max_rows=limits, target_recall=args.target_recall,
                 log=lambda m: print(m, flush=True))
    elif args.command == "report":
        merged: dict[str, Any] = {"training": {}, "results": []}
        for run in args.runs.split(","):
            data = json.loads((Path(run) / "fot_lookup.json").read_text())
            merged["training"].update(data["training"])
            merged["results"] += data["results"]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fot_lookup.json").write_text(json.dumps(merged, indent=1))
        _plot(merged["results"], Path(args.out) / "fot_lookup.png")
        print(render(merged))
    elif args.command == "all":
        reproduce(Path(args.out), [int(x) for x in args.sizes.split(",")])
    else:
        out = Path(args.out or tempfile.mkdtemp(prefix="kvmem-fot-quick-"))
        quick(out)
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
