"""The sharded store's messages: point-to-point between the driver and each serving rank.

A message is a small int64 header (the length of a JSON description), the
JSON bytes (the operation, its arguments, and the dtype and shape of every
tensor that follows), then the tensors. Everything travels on the comm
device of the group: CPU tensors for gloo, CUDA tensors for nccl.

Every wait on the driver has a deadline, so a rank that died or hangs raises
:class:`KvmemError` naming it within ``timeout`` seconds, never a hang. A rank
waiting for the driver's next operation waits as long as it takes (the model
may be busy), and learns of a dead driver when its connection closes.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from kvmem.config import dtype_name, parse_dtype
from kvmem.errors import KvmemError

__all__ = ["Link", "LostRankError", "comm_device", "message_device_type"]

_DTYPES = {"int64": torch.int64, "uint8": torch.uint8}
IDLE = datetime.timedelta(days=365)   # how long a serving rank waits for the driver's next operation


class LostRankError(KvmemError):
    """A rank of a sharded store did not answer in time, or its connection broke."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


def message_device_type(backend: str) -> str:
    """``"cuda"`` for a group whose only transport is nccl, else ``"cpu"``: a group with gloo (alone, or
    ``"cpu:gloo,cuda:nccl"`` as ``init_process_group()`` makes by default) or any other backend moves CPU tensors."""
    backend = backend.lower()
    return "cpu" if "gloo" in backend or "nccl" not in backend else "cuda"


def comm_device(group: Any) -> torch.device:
    """Where messages travel: the CPU for gloo groups, the current CUDA device for nccl."""
    if message_device_type(str(dist.get_backend(group))) == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _dtype(name: str) -> torch.dtype:
    return _DTYPES[name] if name in _DTYPES else parse_dtype(name)


class Link:
    """Messages between this rank and the others of ``group``; ranks are group ranks.

    ``exchange`` is one round of the driver (post to every serving rank,
    then receive every answer), taken under ``lock`` (the group's, shared by
    its stores): one operation is on the wire at a time. ``seconds`` accumulates time spent waiting for answers
    beyond the serving ranks' own work (transport, serialisation, queueing).
    """

    def __init__(self, group: Any, driver: int, timeout: float, lock: threading.Lock | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.driver = driver
        self.timeout = timeout
        self.device = comm_device(group)
        self.lock = lock or threading.Lock()   # shared by every store on the group: one message stream
        self.comm_seconds = 0.0
        self.exchanges = 0
        self.last_busy: dict[int, float] = {}   # seconds each rank worked on the last operation

    @property
    def servers(self) -> list[int]:
        return [r for r in range(self.world) if r != self.driver]

    def _peer(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    # ------------------------------------------------------------------ one message
    def post(self, rank: int, meta: dict[str, Any], tensors: list[torch.Tensor] = ()) -> list[Any]:
        """Start sending one message to ``rank``; returns what :meth:`settle` waits on."""
        tensors = [t.detach().contiguous().to(self.device) for t in tensors]
        blob = json.dumps({**meta, "tensors": [[dtype_name(t.dtype), list(t.shape)] for t in tensors]}).encode()
        head = torch.tensor([len(blob)], dtype=torch.int64, device=self.device)
        body = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(self.device)
        peer = self._peer(rank)
        try:
            return [(dist.isend(t, peer, group=self.group), t) for t in (head, body, *tensors) if t.numel()]
        except RuntimeError as exc:
            raise self._lost(rank, meta.get("op"), exc) from exc

    def settle(self, rank: int, sent: list[Any], op: str | None, timeout: datetime.timedelta | None = None) -> None:
        """Wait until ``sent`` (from :meth:`post`) left, within the deadline."""
        for work, _ in sent:
            self._wait(work, rank, op, timeout)

    def receive(self, rank: int, op: str | None, timeout: datetime.timedelta | None = None
                ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """One message from ``rank``: its JSON description and its tensors."""
        head = torch.empty(1, dtype=torch.int64, device=self.device)
        self._recv(head, rank, op, timeout)
        body = torch.empty(int(head.item()), dtype=torch.uint8, device=self.device)
        self._recv(body, rank, op, timeout)
        meta = json.loads(bytes(body.cpu().numpy()).decode())
        tensors = []
        for name, shape in meta.pop("tensors"):
            t = torch.empty(shape, dtype=_dtype(name), device=self.device)
            if t.numel():
                self._recv(t, rank, op, timeout)
            tensors.append(t)
        return meta, tensors

    def _recv(self, t: torch.Tensor, rank: int, op: str | None, timeout: datetime.timedelta | None) -> None:
        try:
            work = dist.irecv(t, self._peer(rank), group=self.group)
        except RuntimeError as exc:
            raise self._lost(rank, op, exc) from exc
        self._wait(work, rank, op, timeout)

    def _wait(self, work: Any, rank: int, op: str | None, timeout: datetime.timedelta | None) -> None:
        deadline = timeout or datetime.timedelta(seconds=self.timeout)
        try:
            if not work.wait(deadline):
                raise RuntimeError(f"no answer within {deadline.total_seconds():g} s")
        except RuntimeError as exc:   # DistBackendError, DistNetworkError: a closed connection or a timeout
            raise self._lost(rank, op, exc) from exc

    def _lost(self, rank: int, op: str | None, exc: BaseException) -> LostRankError:
        what = f" during {op!r}" if op else ""
        cause = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if self.rank != self.driver:       # gloo fails every pending operation when any peer's connection drops
            return LostRankError(rank, f"sharded store: rank {self.rank} lost its connection{what} (the driver, "
                                       f"rank {rank}, or another rank died): {cause}")
        return LostRankError(rank, f"sharded store: serving rank {rank} is lost{what} (timeout {self.timeout:g} s): "
                                   f"{cause}")

    # ------------------------------------------------------------------ one round of the driver
    def exchange(self, requests: dict[int, tuple[dict[str, Any], list[torch.Tensor]]], local: Any
                 ) -> dict[int, tuple[dict[str, Any], list[torch.Tensor]]]:
        """Post ``requests[rank]`` to every serving rank, run ``local()`` meanwhile, receive every answer.

        Answers are ``(meta, tensors)``; ``meta["busy"]`` is the seconds a rank worked. The driver's
        own answer is ``local()``'s. Raises :class:`LostRankError` naming the first rank that failed,
        once every other rank's answer is in.
        """
        with self.lock:
            start = time.perf_counter()
            sent, lost = {}, None              # past a lost rank, the others are still served and their
            for r in self.servers:             # answers taken in, so that no living rank is left waiting
                try:
                    sent[r] = self.post(r, *requests[r])
                except LostRankError as exc:
                    lost = lost or exc
            answers = {self.driver: local()}
            for r in sent:
                op = requests[r][0].get("op")
                try:
                    self.settle(r, sent[r], op)
                    answers[r] = self.receive(r, op)
                except LostRankError as exc:
                    lost = lost or exc
            if lost is not None:
                raise lost
            wall = time.perf_counter() - start
            self.last_busy = {r: answers[r][0].get("busy", 0.0) for r in answers}
            self.comm_seconds += max(0.0, wall - max(self.last_busy.values()))
            self.exchanges += 1
            return answers
