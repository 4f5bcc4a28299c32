"""Benchmark records, the plain-text table, ``results.json`` and progress bars.

Records are frozen dataclasses; :func:`format_table` prints any sequence of
them as aligned columns, :func:`write_json` / :func:`read_json` round-trip
them (non-finite floats are written as ``null``, the file is replaced
atomically). :func:`progress` shows a tqdm bar on a terminal and is a plain
iterator anywhere else (pipes, CI logs, tqdm not installed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

__all__ = ["markdown_table", "text_table", "BenchResult", "LookupResult", "format_table", "print_table", "write_json",
           "read_json", "machine_info", "progress"]

T = TypeVar("T")


@dataclass(frozen=True)
class BenchResult:
    """One backend at one setting of its search parameters, on one dataset."""

    backend: str  # "exact", "ivf", ..., or a raw peer such as "faiss-flat"
    params: Mapping[str, Any] = field(default_factory=dict)  # settings: nlist, nprobe, ef, ...
    build_s: float = math.nan  # seconds to add every base row (and train)
    bytes_per_row: float = math.nan  # resident bytes / rows, keys + values + index
    qps: float = math.nan  # queries per second, best of the timed runs
    recall: float = math.nan  # recall@k against exact ground truth (ann-benchmarks knn)
    extra: Mapping[str, Any] = field(default_factory=dict)  # dataset, k, peer ratios, ...

    @property
    def label(self) -> str:
        """``backend`` plus the params that are not swept, e.g. ``ivf (nlist=1024)``."""
        fixed = {k: v for k, v in self.params.items() if k not in SWEEP_PARAMS}
        return self.backend + (f" ({_params_text(fixed)})" if fixed else "")


@dataclass(frozen=True)
class LookupResult:
    """The memory lookup task for one backend at one memory size."""

    backend: str
    size: int  # dictionary entries written into memory
    accuracy: float  # fraction of queries whose value was read out correctly
    qps: float = math.nan
    params: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.backend + (f" ({_params_text(self.params)})" if self.params else "")


SWEEP_PARAMS = ("nprobe", "ef", "ef_search")  # a plot line runs across these
_RECORDS = {cls.__name__: cls for cls in (BenchResult, LookupResult)}


# ----------------------------------------------------------------------------- table

def _params_text(params: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def _cell(name: str, value: Any) -> str:
    if isinstance(value, Mapping):
        return _params_text(value) or "-"
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if name in ("recall", "accuracy"):
            return f"{value:.4f}"
        if name == "build_s":
            return f"{value:.2f}"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(records: Sequence[Any], columns: Sequence[str] | None = None) -> str:
    """Aligned plain-text table of dataclass records (``extra`` left out by default).

    Text columns are left-aligned, numbers right-aligned; NaN prints as ``-``.
    """
    if not records:
        return "(no results)"
    if columns is None:
        columns = [f.name for f in dataclasses.fields(records[0]) if f.name != "extra"]
    return text_table(columns, [[getattr(r, c, None) for c in columns] for r in records])


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The plain-text twin of :func:`markdown_table`: aligned columns, numbers to the right."""
    cells = [[v if isinstance(v, str) else _cell(h, v) for h, v in zip(header, row, strict=True)] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) for row in rows)
               for i in range(len(header))]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]

    def line(parts: Sequence[str]) -> str:
        return "  ".join(s.rjust(w) if num else s.ljust(w)
                         for s, w, num in zip(parts, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; cells that are not strings are formatted as in :func:`format_table`."""
    def cell(name: str, value: Any) -> str:
        return value if isinstance(value, str) else _cell(name, value)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(h, v) for h, v in zip(header, row, strict=True)) + " |" for row in rows]
    return "\n".join(out)


def print_table(records: Sequence[Any], columns: Sequence[str] | None = None,
                file: TextIO | None = None) -> None:
    print(format_table(records, columns), file=file or sys.stdout)


# ----------------------------------------------------------------------------- JSON

def _jsonable(value: Any) -> Any:
    """Plain JSON types; numpy scalars become Python numbers, NaN/Inf become None."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def machine_info() -> dict[str, Any]:
    """What RESULTS.md should say about the machine a run was made on."""
    return {"python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()}


def write_json(records: Sequence[Any], path: str | os.PathLike,
               meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``{"meta": ..., "results": [...]}`` to ``path`` (a file or a folder -> results.json).

    ``meta`` defaults to :func:`machine_info` plus a UTC timestamp. Each
    record carries its ``"type"`` so :func:`read_json` can rebuild it.
    """
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta) if meta is not None else {
        **machine_info(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    doc = {"meta": _jsonable(meta),
           "results": [{"type": type(r).__name__, **_jsonable(dataclasses.asdict(r))}
                       for r in records]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike) -> list[Any]:
    """The records :func:`write_json` wrote (``null`` floats come back as NaN)."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    records = []
    for item in doc.get("results", []):
        item = dict(item)
        cls = _RECORDS[item.pop("type", "BenchResult")]
        kwargs = {}
        for fld in dataclasses.fields(cls):
            if fld.name in item:
                v = item[fld.name]
                kwargs[fld.name] = math.nan if v is None and fld.type == "float" else v
        records.append(cls(**kwargs))
    return records


# ----------------------------------------------------------------------------- progress

def progress(iterable: Iterable[T], desc: str = "", total: int | None = None,
             enabled: bool | None = None) -> Iterator[T]:
    """``iterable`` with a tqdm bar on stderr when it is a terminal, else unchanged.

    ``enabled`` forces the bar on (if tqdm is installed) or off.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            enabled = False
    if not enabled:
        yield from iterable
        return
    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
