"""Start ``world`` processes on this machine as ``torchrun --nproc-per-node`` would (tests, benchmarks).

Each process gets torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so
``torch.distributed.init_process_group("gloo")`` finds its peers. Unlike
torchrun, a process that dies does not bring the others down: the tests
kill a rank on purpose and watch the rest.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Finished", "free_port", "launch"]


@dataclass(frozen=True)
class Finished:
    rank: int
    returncode: int      # negative: killed by that signal
    output: str          # stdout and stderr together


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], world: int, timeout: float, logs: Path,
           env: dict[str, str] | None = None) -> list[Finished]:
    """Run ``python argv...`` as ranks ``0..world-1``; kill them all past ``timeout`` seconds."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world),
                    "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = open(logs / f"rank-{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, *argv], env=rank_env, stdout=log, stderr=subprocess.STDOUT),
                      log))
    deadline = time.monotonic() + timeout
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return [Finished(r, proc.returncode, (logs / f"rank-{r}.log").read_text()) for r, (proc, _) in enumerate(procs)]
