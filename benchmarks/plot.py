"""PNG plots of benchmark records: recall vs QPS, and lookup accuracy vs memory size.

matplotlib is imported only when a plot is drawn, and only its object API is
used (a ``Figure`` on an Agg canvas, never ``pyplot``), so plotting needs no
display and leaves the caller's matplotlib backend alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from kvmem.errors import BackendUnavailableError

from .report import BenchResult, LookupResult

__all__ = ["plot_recall_qps", "plot_lookup"]

_MARKERS = "os^Dv<>pPX*h"


def _figure():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise BackendUnavailableError(
            "plotting benchmark results needs matplotlib: pip install 'kvmem[bench]'") from exc
    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _entries(value: float, _pos=None) -> str:
    """Tick label for a number of memory entries: 16384 -> 16k, 4194304 -> 4M."""
    for unit, scale in (("M", 1 << 20), ("k", 1 << 10)):
        if value >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


def _lines(records, x, y):
    """label -> [(x, y), ...] sorted by x, finite points only, in first-seen label order."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        px, py = float(getattr(r, x)), float(getattr(r, y))
        if math.isfinite(px) and math.isfinite(py):
            lines.setdefault(r.label, []).append((px, py))
    return {label: sorted(points) for label, points in lines.items()}


def _save(fig, ax, path: str | os.PathLike, title: str | None) -> Path:
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_recall_qps(records: Sequence[BenchResult], path: str | os.PathLike,
                    title: str | None = None, k: int | None = None) -> Path:
    """Recall (x) against queries per second (y, log scale), one line per backend and setting.

    Points of one line differ only in the swept search parameters
    (``nprobe``, ``ef``): up and to the right is better, as in ann-benchmarks.
    """
    fig, ax = _figure()
    for i, (label, points) in enumerate(_lines(records, "recall", "qps").items()):
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], label=label)
    ax.set_yscale("log")
    ax.set_xlabel(f"recall@{k}" if k else "recall")
    ax.set_ylabel("queries per second (log)")
    ax.set_xlim(right=1.01)
    return _save(fig, ax, path, title)


def plot_lookup(records: Sequence[LookupResult], path: str | os.PathLike,
                title: str | None = None) -> Path:
    """Lookup accuracy (y) against memory size in entries (x, log scale), one line per backend."""
    fig, ax = _figure()
    for i, (label, points) in enumerate(_lines(records, "size", "accuracy").items()):
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(_entries)
    ax.set_xlabel("memory size (entries, log)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    return _save(fig, ax, path, title)
