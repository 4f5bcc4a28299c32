"""Run kvmem in a child process: loaders must never crash the process that calls them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["run_child", "load_in_child", "corruptions"]


def run_child(code: str, timeout: float = 300) -> str:
    """Run ``code`` in a fresh interpreter; return its stdout. A signal or a non-zero exit fails."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise AssertionError(f"child process died of {name}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    if proc.returncode != 0:
        raise AssertionError(f"child process exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc.stdout


def load_in_child(paths: list[Path], queries: list[list[float]] | None = None, k: int = 3) -> list[dict[str, Any]]:
    """``kvmem.load`` each path in one child process; per path, the error class or the search result."""
    code = f"""
        import json, torch, kvmem
        for path in {json.dumps([str(p) for p in paths])}:
            try:
                store = kvmem.load(path)
                out = {{"ok": True, "count": len(store), "counts": [store.count(p) for p in range(store.partitions)]}}
                queries = json.loads({json.dumps(queries)!r})
                if queries is not None:
                    q = torch.tensor(queries, dtype=torch.float32).expand(store.partitions, -1, -1)
                    res = store.search(q, {k})
                    out["ids"] = res.ids.tolist()
                    out["scores"] = res.scores.tolist()
                store.close()
            except kvmem.KvmemError as exc:
                out = {{"ok": False, "error": type(exc).__name__, "message": str(exc)}}
            print(json.dumps(out), flush=True)
    """
    return [json.loads(line) for line in run_child(code).splitlines() if line.startswith("{")]


def corruptions(file: Path) -> dict[str, bytes]:
    """Damaged versions of ``file``'s bytes: truncated, bit-flipped, zeroed, foreign."""
    data = file.read_bytes()
    flipped = bytearray(data)
    if flipped:
        flipped[len(flipped) // 2] ^= 0x10
    return {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "bitflip": bytes(flipped),
        "zeroed": bytes(len(data)),
        "foreign": (b"\x89PNG\r\n\x1a\n" + os.urandom(64)) * max(1, len(data) // 72),
    }
