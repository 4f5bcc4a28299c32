"""The ``kvmem`` command: ``kvmem info PATH`` and ``kvmem bench``.

The one place in the core that may import ``kvmem.benchmarks``: it stands above everything.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvmem.errors import InvalidInputError, KvmemError, path_error

__all__ = ["main", "describe"]


def describe(path: str | Path) -> dict[str, Any]:
    """What ``kvmem info`` prints: backend, dims, partitions, counts and bytes on disk of a store."""
    from kvmem import inputs, persist
    from kvmem.api import in_place

    path = inputs.path(path, "path")
    kept_in_place = in_place(path)
    if kept_in_place is not None:
        return kept_in_place._describe_directory(path)
    manifest, config = persist.read_manifest(path)
    info = {"path": str(path), "backend": manifest["backend"], **config.to_dict(),
            "rows": sum(manifest["counts"]), "counts": manifest["counts"], "next_ids": manifest["next_ids"],
            "format_version": manifest["format_version"], "kvmem_version": manifest.get("kvmem_version"),
            "bytes_on_disk": sum(f.stat().st_size for f in path.iterdir() if f.is_file())}
    if "ann" in manifest["files"]:                      # ivf / hnsw: each partition's last calibration
        from kvmem.stores._ann import read_meta

        states = read_meta(path / manifest["files"]["ann"]["name"], manifest["backend"], config.partitions)
        info["calibration"] = [state.get("calibration") for state in states]
    return info


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _info(args: argparse.Namespace) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    counts = info["counts"]
    shown = ", ".join(map(str, counts[:8])) + (", ..." if len(counts) > 8 else "")
    rows = [("path", info["path"]), ("backend", info["backend"]),
            ("dim / value_dim", f"{info['dim']} / {info['value_dim']}"),
            ("metric / dtype", f"{info['metric']} / {info['dtype']}"), ("partitions", info["partitions"]),
            ("capacity", info["capacity"]), ("rows", f"{info['rows']} (per partition: {shown})"),
            ("options", json.dumps(info["options"])),
            ("bytes on disk", f"{_human(info['bytes_on_disk'])} ({info['bytes_on_disk']:,})")]
    for p, cal in enumerate(info.get("calibration", [])[:8]):
        if cal is not None:
            rests = f"{cal.get('queries', 0)} asked queries" if cal.get("queries") else "stored keys as queries"
            rows.append((f"calibration p{p}", f"knob {cal['value']}, recall {cal['recall']:.3f} on {rests}, "
                                              f"keys as queries {cal.get('key_recall', cal['recall']):.3f}"
                                              + ("" if cal.get("index", True) else ", the hub's lists alone")))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _count(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``low`` (a bad one is a usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}; got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def _sweep(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated positive ints (an ``--nprobe`` / ``--ef`` sweep)."""
    parse = _count(1)
    return tuple(parse(v.strip()) for v in text.split(","))


def _bench(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from kvmem import inputs
    from kvmem.benchmarks import runner

    if (args.dataset or "").lower() in ("attention", "ood"):       # queries unlike the keys: asked, then held out
        from kvmem.benchmarks import asked

        asked_config = asked.AskedConfig(args.dataset.lower(), args.size or (50_000 if args.quick else 200_000),
                                         args.dim or 64, repeats=args.repeats or 3, out=Path(args.out or "kvmem-bench"))
        asked.run(asked_config)
        return 0
    base = runner.QUICK if args.quick else runner.DEFAULT
    changes: dict[str, Any] = {name: value for name, value in (
        ("size", args.size), ("dim", args.dim), ("k", args.k), ("queries", args.queries),
        ("dataset", args.dataset), ("metric", args.metric), ("dtype", args.dtype), ("repeats", args.repeats),
        ("seed", args.seed)) if value is not None}
    if args.backends is not None:
        changes["backends"] = tuple(runner.C.names(args.backends))
        if not changes["backends"]:
            raise InvalidInputError(f"--backends must name at least one backend; got {args.backends!r}")
    if args.out is not None:
        changes["out"] = inputs.path(args.out, "--out")
    sweeps = {k: v for k, v in (("nprobe", args.nprobe), ("ef", args.ef)) if v}
    if sweeps:
        changes["sweeps"] = sweeps
    config = dataclasses.replace(base, **changes)
    data_bytes = (config.size + config.queries) * config.dim * 4          # the generated float32 vectors
    limit = inputs.byte_limit(torch.device("cpu"))
    if data_bytes > limit:
        raise InvalidInputError(f"--size {config.size:,} and --queries {config.queries:,} of --dim {config.dim:,} take "
                                f"{data_bytes:,} bytes as float32, over the limit of {limit:,} ({inputs.LIMIT_ENV})")
    try:                                            # before an hour of benchmarking, not after
        config.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise path_error(exc, f"--out {str(config.out)!r} cannot be a results folder") from exc
    from kvmem import kernels

    compiled = "compiled kernels" if kernels.available() else "torch ops (no kvmem._kernels, or KVMEM_NATIVE=0)"
    print(f"kvmem bench: {config.dataset}, {config.size:,} rows x {config.dim}, {config.queries} queries, "
          f"k={config.k}; CPU selection: {compiled}; results in {config.out}/", file=sys.stderr)
    runner.run(config)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmem", description="External key-value memory for attention layers.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a saved or on-disk store")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)
    bench = sub.add_parser("bench", help="measure every backend and the raw libraries on the same data")
    bench.add_argument("--quick", action="store_true",
                       help="a smaller run: 50,000 rows, 500 queries (about 25 s on 2 cores)")
    bench.add_argument("--size", type=_count(1), help="base rows")
    bench.add_argument("--dim", type=_count(1))
    bench.add_argument("--k", type=_count(1))
    bench.add_argument("--queries", type=_count(1))
    bench.add_argument("--dataset", help="gaussian, clustered, ood, attention, or a path to .hdf5/.fvecs/.fbin")
    bench.add_argument("--metric", choices=["ip", "l2", "cos"])
    bench.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="kvmem storage dtype")
    bench.add_argument("--backends", help="comma-separated, e.g. exact,faiss-flat")
    bench.add_argument("--nprobe", type=_sweep, help="comma-separated nprobe sweep for ivf")
    bench.add_argument("--ef", type=_sweep, help="comma-separated ef sweep for hnsw")
    bench.add_argument("--repeats", type=_count(1), help="timed batches per setting (median reported)")
    bench.add_argument("--seed", type=_count(0))
    bench.add_argument("--out", help="output folder for results.json and recall_qps.png")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except KvmemError as exc:
        print(f"kvmem {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
