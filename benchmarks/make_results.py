"""Regenerate ``benchmarks/RESULTS.md``: run every benchmark, keep its JSON, render one page.

    python -m kvmem.benchmarks.make_results --out results-run/        # everything (hours on 2 cores)
    python -m kvmem.benchmarks.make_results --out results-run/ --only exact,lookup
    python -m kvmem.benchmarks.make_results --out results-run/ --render-only   # page from the JSON kept

Each section is one benchmark module: its measurements go to ``<out>/<section>.json``
(a section whose JSON exists is not measured again unless ``--force``), and the
module's ``render`` turns them into Markdown. A ``"note"`` added to a kept JSON file
is printed under the section's command (say, a default that changed since that run). Every figure is a median of
several runs, each ratio taken against the peer measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SECTIONS", "machine", "main"]

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclasses.dataclass(frozen=True)
class Section:
    title: str
    command: str                               # how to reproduce this section alone
    measure: Callable[[Path], Any]             # writes and returns JSON-able results
    render: Callable[[Any], str]


def _exact(out: Path) -> Any:
    from . import exact_flat

    return exact_flat.main(["--json", str(out / "exact.json")])


def _exact_render(data: Any) -> str:
    from . import exact_flat

    return exact_flat.render(data)


def _bench(out: Path) -> Any:
    from . import runner

    config = dataclasses.replace(runner.DEFAULT, out=out / "bench", repeats=5)
    results = runner.run(config, verbose=False)
    return [dataclasses.asdict(r) for r in results]


def _bench_render(data: Any) -> str:
    from . import runner
    from .report import BenchResult

    return runner.render([BenchResult(**r) for r in data])


def _lookup(out: Path) -> Any:
    from . import lookup

    sizes = [1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22]
    results = lookup.run(["exact", "ivf", "hnsw", "lmdb"], sizes, out=out / "lookup", verbose=False)
    return [dataclasses.asdict(r) for r in results]


def _lookup_render(data: Any) -> str:
    from . import lookup
    from .report import LookupResult

    return lookup.render([LookupResult(**r) for r in data])


def _ann(out: Path) -> Any:
    from . import ann

    results = ann.run(ann.AnnConfig(out=out / "ann"), verbose=False)
    return [dataclasses.asdict(r) for r in results]


def _ann_render(data: Any) -> str:
    from . import ann
    from .report import BenchResult

    return ann.render([BenchResult(**r) for r in data])


def _adapter(out: Path) -> Any:
    from . import adapter_forward

    return adapter_forward.main([])


def _adapter_render(data: Any) -> str:
    from . import adapter_forward

    return adapter_forward.render(data)


def _lmdb(out: Path) -> Any:
    from . import lmdb_bench

    return lmdb_bench.main(["--threads", "1", "--json", str(out / "lmdb-raw.json")])


def _lmdb_render(data: Any) -> str:
    from . import lmdb_bench

    return lmdb_bench.render(data)


def _sharded(out: Path) -> Any:
    from . import sharded

    return sharded.main(["--json", str(out / "sharded-raw.json")])


def _sharded_render(data: Any) -> str:
    from . import sharded

    return sharded.render(data)


def _fot(out: Path) -> Any:
    from . import fot_lookup

    return fot_lookup.reproduce(out / "fot")


def _fot_render(data: Any) -> str:
    from . import fot_lookup

    return fot_lookup.render(data)


def _generate(out: Path) -> Any:
    from . import generate

    return generate.main([])


def _generate_render(data: Any) -> str:
    from . import generate

    return generate.render(data)


def _dense(out: Path) -> Any:
    from . import dense_memory

    return dense_memory.main([])


def _dense_render(data: Any) -> str:
    from . import dense_memory

    return dense_memory.render(data)


SECTIONS: dict[str, Section] = {
    "exact": Section("`exact` against faiss `IndexFlatIP`, naive torch and the matmul floor",
                     "python -m kvmem.benchmarks.exact_flat", _exact, _exact_render),
    "bench": Section("`kvmem bench` (defaults)", "kvmem bench --repeats 5", _bench, _bench_render),
    "lookup": Section("Memory lookup task: accuracy vs memory size",
                      "python -m kvmem.benchmarks.lookup --sizes 16384,65536,262144,1048576,4194304",
                      _lookup, _lookup_render),
    "ann": Section("Approximate backends `ivf` and `hnsw` against faiss and hnswlib (issue 3)",
                   "python -m kvmem.benchmarks.ann --size 1000000", _ann, _ann_render),
    "adapter": Section("Adapter forward with 1M tokens of memory per key-value head",
                       "python -m kvmem.benchmarks.adapter_forward", _adapter, _adapter_render),
    "lmdb": Section("`lmdb`: ingest, exact streaming search, reopen, 16M rows",
                    "python -m kvmem.benchmarks.lmdb_bench --threads 1",
                    _lmdb, _lmdb_render),
    "sharded": Section("`sharded`: 4 ranks x 1M rows against one process holding all 4M (issue 19)",
                       "python -m kvmem.benchmarks.sharded", _sharded, _sharded_render),
    "fot": Section("Dictionary lookup with a CrossBatch-trained memory model (issue 18)",
                   "python -m kvmem.benchmarks.fot_lookup all --out fot-run", _fot, _fot_render),
    "generate": Section("Generate with 64k and 1M memory tokens per kv head, rolling local context (issue 15)",
                        "python -m kvmem.benchmarks.generate --memory 65536,1048576", _generate, _generate_render),
    "dense": Section('Dense memory attention (`k="all"`): peak memory of a window over a 32k memory (issue 15)',
                     "python -m kvmem.benchmarks.dense_memory", _dense, _dense_render),
}


def machine() -> str:
    """One paragraph describing the machine and the library versions."""
    import faiss
    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                "faiss": faiss.__version__}
    for name in ("hnswlib", "lmdb", "transformers"):
        try:
            versions[name] = getattr(__import__(name), "__version__", "?")
        except ImportError:
            pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, GPU: {gpu}; "
            + ", ".join(f"{k} {v}" for k, v in versions.items()))


def _plots(folder: Path, plots: Path, section: str) -> list[str]:
    """Copy a section's PNG plots beside the page (``plots/<section>-<name>.png``); Markdown links to them."""
    lines = []
    for png in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        plots.mkdir(parents=True, exist_ok=True)
        target = plots / f"{section}-{png.name}"
        target.write_bytes(png.read_bytes())
        lines += [f"![{section}: {png.stem}](plots/{target.name})", ""]
    return lines or [""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results-run", help="folder for each section's JSON")
    parser.add_argument("--only", help=f"comma-separated sections of {list(SECTIONS)}")
    parser.add_argument("--force", action="store_true", help="measure again even where JSON exists")
    parser.add_argument("--render-only", action="store_true", help="write the page from the JSON already kept")
    parser.add_argument("--page", default=str(RESULTS), help="where to write the Markdown page")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = args.only.split(",") if args.only else list(SECTIONS)
    for name in chosen:
        file = out / f"{name}.json"
        if args.render_only or (file.exists() and not args.force):
            continue
        start = time.time()
        data = SECTIONS[name].measure(out)
        file.write_text(json.dumps({"seconds": time.time() - start, "data": data}, indent=1, default=str))
    parts = ["# kvmem benchmark results", "",
             "Regenerated by `python -m kvmem.benchmarks.make_results --out results-run/`; a section alone "
             "by the command under its title. These machines are shared and noisy: every figure is a median "
             "of several runs, and each ratio compares two contenders measured back to back in the same run.",
             "", f"Machine: {machine()}.", ""]
    for name, section in SECTIONS.items():
        file = out / f"{name}.json"
        if not file.exists():
            continue
        kept = json.loads(file.read_text())
        note = [f"*{kept['note']}*", ""] if kept.get("note") else []            # e.g. what changed since the run
        parts += [f"## {section.title}", "", f"`{section.command}` ({kept['seconds'] / 60:.0f} min)", "", *note,
                  section.render(kept["data"]), *_plots(out / name, Path(args.page).parent / "plots", name)]
    Path(args.page).write_text("\n".join(parts))
    print(f"wrote {args.page}")


if __name__ == "__main__":
    main()
