"""Run kvmem in a child process: loaders must never crash the process that calls them.

A child is forked from a forkserver (``multiprocessing``'s) that has imported torch, kvmem and its
backends' libraries, and nothing else: each child is a new process with none of the caller's state, and
costs milliseconds rather than an interpreter start and a torch import (seconds, dozens of times a suite).
The child runs the code as ``python -c`` would, with the caller's environment, working directory and
``sys.argv``; its file descriptors 1 and 2 go to files, so native output is captured too. The libraries
the server imported read their own settings then: a variable they read only at import (a thread count,
``OMP_NUM_THREADS``) reaches them from the environment of the first caller, not of later ones.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["run_child", "load_in_child", "corruptions", "forkserver"]

# Imported once, in the forkserver. Only imports: no thread pool may be started before the server forks.
PRELOAD = ("numpy", "torch", "kvmem", "kvmem.stores.exact", "kvmem.stores.ivf", "kvmem.stores.hnsw",
           "kvmem.stores.lmdb", "kvmem.testing", "faiss", "hnswlib", "lmdb", "transformers")


def forkserver() -> Any:
    """The ``multiprocessing`` forkserver context, with :data:`PRELOAD` (those installed) imported."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([name for name in PRELOAD if _installed(name)])
    return context


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def _exec(code: str, argv: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """The child: the caller's environment, folder and argv; fds 1 and 2 to files; run ``code``."""
    for fd, file in ((1, out), (2, err)):
        with open(file, "wb") as f:
            os.dup2(f.fileno(), fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = ["-c", *argv]
    faulthandler.enable()
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})


def run_child(code: str, timeout: float = 300, args: list[str] | tuple[str, ...] = (),
              cwd: str | os.PathLike[str] | None = None) -> str:
    """Run ``code`` in a new process (as ``python -c code *args`` would); return its stdout.

    A signal, a non-zero exit or running past ``timeout`` seconds raises AssertionError with the child's
    output."""
    with tempfile.TemporaryDirectory(prefix="kvmem-child-") as scratch:
        out, err = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
        child = forkserver().Process(target=_exec, args=(textwrap.dedent(code), list(args), dict(os.environ),
                                                         os.fspath(cwd or os.getcwd()), out, err))
        child.start()
        child.join(timeout)
        timed_out = child.exitcode is None
        if timed_out:
            child.kill()
            child.join()
        stdout, stderr = (Path(f).read_text(errors="replace") if os.path.exists(f) else "" for f in (out, err))
    if timed_out:
        died = f"ran past {timeout} s"
    elif child.exitcode < 0:
        died = f"died of {signal.Signals(-child.exitcode).name}"
    elif child.exitcode > 0:
        died = f"exited {child.exitcode}"
    else:
        return stdout
    raise AssertionError(f"child process {died}\nstdout:\n{stdout}\nstderr:\n{stderr}")


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
