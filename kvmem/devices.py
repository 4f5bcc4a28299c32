"""Where a store lives, and what kvmem asks of a CUDA device.

- :func:`resolve`: a ``device=`` argument as a ``torch.device``; ``"cuda"`` becomes
  ``cuda:N`` (the current device) at create, so a store never follows a later
  ``torch.cuda.set_device``.
- :func:`restore`: the device a save recorded, or the CPU with a ``RuntimeWarning``
  when this machine has no such device.
- :func:`fast_bf16`: whether bfloat16 matmuls are native on a device: capability
  >= 8.0 asked of that device (``torch.cuda.is_bf16_supported()`` also counts
  emulation, and asks the current device).
- :func:`search_budget`: bytes a search may hold on a device: a quarter of what
  ``torch.cuda.mem_get_info`` says is free, at most 4 GiB.
- :func:`exact_matmuls`: TF32 and reduced-precision reductions off around kvmem's
  own matmuls, restored after.

Emulation: with ``KVMEM_EMULATE_CUDA=1`` in the environment at import (or
``kvmem.devices.EMULATE_CUDA = True``), CPU stores take the CUDA-only branches
of the search (block limits and memory budget, the ``bmm`` scorer, dense top-k
merges, bfloat16 ranking chosen by capability, pinned-style double-buffered
``lmdb`` staging), so that CI exercises them without a GPU. Results stay exact
either way; only speed differs.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from kvmem.errors import InvalidInputError

__all__ = ["EMULATE_CUDA", "cuda_like", "resolve", "restore", "device_name", "valid_name", "from_host", "fast_bf16",
           "search_budget", "exact_matmuls"]

EMULATE_CUDA = os.environ.get("KVMEM_EMULATE_CUDA", "") == "1"
EMULATED_CAPABILITY = (8, 0)        # what an emulated CUDA device reports
EMULATED_FREE = 8 << 30             # bytes free on an emulated CUDA device
BUDGET_FRACTION = 4                 # a search holds at most free / 4 bytes ...
BUDGET_CAP = 4 << 30                # ... and never more than this,
BUDGET_FLOOR = 64 << 20             # nor less than this
_NAME = re.compile(r"^(cpu|cuda(:[0-9]{1,4})?)$")


def cuda_like(device: torch.device) -> bool:
    """Whether searches on ``device`` take the CUDA branches (a CUDA device, or the CPU under emulation)."""
    return device.type == "cuda" or (EMULATE_CUDA and device.type == "cpu")


def resolve(device: Any, backend: str = "", devices: frozenset[str] = frozenset({"cpu", "cuda"})) -> torch.device:
    """``device`` (None: the CPU) as a ``torch.device`` a store can be made on.

    ``devices`` are the device types the backend lives on; ``"cuda"`` is made
    ``cuda:N`` of the current device. Raises :class:`InvalidInputError`.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"device must be a torch device or its name (e.g. 'cpu', 'cuda:0'); got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"device must be a CPU or CUDA device; got {device!r}")
    if dev.type not in devices:
        raise InvalidInputError(
            f"{backend or 'this backend'} keeps its index in RAM; device must be one of {sorted(devices)}; "
            f"got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device {device!r} was asked for, but torch.cuda.is_available() is False")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise InvalidInputError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0..")
        dev = torch.device("cuda", index)
    return dev


def device_name(device: torch.device) -> str:
    """``"cpu"`` or ``"cuda:N"``, as a manifest records it."""
    return "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"


def valid_name(name: Any) -> bool:
    """Whether ``name`` is a device a manifest may record."""
    return isinstance(name, str) and bool(_NAME.match(name))


def restore(saved: str, backend: str = "", devices: frozenset[str] = frozenset({"cpu", "cuda"})) -> torch.device:
    """The device a save recorded; where this machine lacks it, the CPU (or cuda:0 when CUDA is
    here but has fewer devices), with a ``RuntimeWarning`` saying so."""
    try:
        return resolve(saved, backend, devices)
    except InvalidInputError:
        pass
    fallback = "cuda:0" if torch.cuda.is_available() and "cuda" in devices else "cpu"
    warnings.warn(f"this store was saved on {saved}, which this machine does not have; loading it on {fallback} "
                  f"(pass device= to choose)", RuntimeWarning, stacklevel=3)
    return resolve(fallback, backend, devices)


def from_host(array: Any, device: torch.device) -> torch.Tensor:
    """A small host array (counts, partition numbers) on ``device`` without waiting for the device:
    an asynchronous copy (CUDA stages pageable memory before it returns, so ``array`` may go at once)."""
    return torch.as_tensor(array).to(device, non_blocking=True)


def capability(device: torch.device) -> tuple[int, int]:
    """CUDA compute capability of ``device`` (the emulated one on the CPU under emulation)."""
    if device.type == "cuda":
        return tuple(torch.cuda.get_device_capability(device))
    return EMULATED_CAPABILITY


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` (CUDA, or emulated) has native bfloat16 matmuls: capability >= 8.0 (Ampere on)."""
    return capability(device) >= (8, 0)


def free_bytes(device: torch.device) -> int:
    """Bytes free on a CUDA device now: ``torch.cuda.mem_get_info`` plus what torch's caching allocator
    holds unused (the emulated figure on the CPU)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + max(0, cached)
    return EMULATED_FREE


def search_budget(free: int) -> int:
    """Bytes a search may hold when ``free`` bytes are free: ``free / 4``, at most 4 GiB, at least 64 MiB."""
    return max(BUDGET_FLOOR, min(BUDGET_CAP, free // BUDGET_FRACTION))


# ---------------------------------------------------------------------- TF32 and reduced-precision reductions
_GUARD = threading.Lock()
_depth = 0
_saved: list[tuple[Any, str, Any]] = []             # the switches the outermost guard changed, and their values
_found: list[tuple[Any, str, Any]] | None = None    # _switches(), looked up once


def _switches() -> list[tuple[Any, str, Any]]:
    """``(object, attribute, exact value)`` of every switch that makes float32 / bfloat16 matmuls inexact.

    torch >= 2.9 has per-backend ``fp32_precision`` (and reading the legacy
    ``float32_matmul_precision`` raises once they differ), so those are used where they exist.
    """
    b = torch.backends
    out: list[tuple[Any, str, Any]] = []
    if hasattr(b.cuda.matmul, "fp32_precision"):
        out.append((b.cuda.matmul, "fp32_precision", "ieee"))
        mkldnn = getattr(getattr(b, "mkldnn", None), "matmul", None)
        if mkldnn is not None and hasattr(mkldnn, "fp32_precision"):
            out.append((mkldnn, "fp32_precision", "ieee"))
    else:
        out.append((torch, "float32_matmul_precision", "highest"))
        out.append((b.cuda.matmul, "allow_tf32", False))
        out.append((b.cudnn, "allow_tf32", False))
    for name in ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction"):
        if hasattr(b.cuda.matmul, name):
            out.append((b.cuda.matmul, name, False))
    return out


def _get(obj: Any, name: str) -> Any:
    return torch.get_float32_matmul_precision() if obj is torch else getattr(obj, name)


def _set(obj: Any, name: str, value: Any) -> None:
    if obj is torch:
        torch.set_float32_matmul_precision(value)
    else:
        setattr(obj, name, value)


@contextlib.contextmanager
def exact_matmuls() -> Iterator[None]:
    """Inside: float32 matmuls in full float32 (no TF32, no bfloat16 on oneDNN) and no reduced-precision
    reductions in half-precision matmuls; the user's settings are restored on exit.

    The switches are process-wide: the first of concurrent searches to enter
    turns them off and the last to leave restores them; other threads' matmuls
    meanwhile run in full precision too (slower, never wrong).
    """
    global _depth, _saved, _found
    with _GUARD:
        if _depth == 0:
            _found = _found or _switches()
            _saved = []
            for obj, name, exact in _found:
                value = _get(obj, name)
                if value != exact:                          # set only what differs: a property call each
                    _saved.append((obj, name, value))
                    _set(obj, name, exact)
        _depth += 1
    try:
        yield
    finally:
        with _GUARD:
            _depth -= 1
            if _depth == 0:
                for obj, name, value in _saved:
                    _set(obj, name, value)
