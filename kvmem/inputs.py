"""Input validation, written once for every backend.

Each function checks one argument completely and either returns it in the one
form the backends work with, or raises :class:`InvalidInputError` naming the
expected and the received value. Nothing here touches a store, so a store can
validate everything before it mutates anything.
"""

from __future__ import annotations

import itertools
import numbers
import operator
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvmem.errors import InvalidInputError

__all__ = ["vectors", "ids_array", "check_k", "partition_list", "partition_index", "out_device", "path",
           "byte_limit", "check_rows", "row_bytes"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(x: Any) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"{what} must be a numeric tensor or array; got {type(x).__name__} ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise InvalidInputError(f"{what} must be a numeric tensor or array; got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and arr.dtype.itemsize not in (2, 4, 8):
        raise InvalidInputError(f"{what} must be float16/32/64; got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def out_device(x: Any) -> torch.device:
    """Where results for input ``x`` go: a tensor's own device, else the CPU."""
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def vectors(x: Any, what: str, partitions: int, width: int, width_name: str,
            *, n: int | None = None) -> tuple[torch.Tensor, bool]:
    """``x`` as a float tensor ``(P, n, width)`` and whether it came 2-D.

    2-D input ``(n, width)`` is accepted only when ``partitions == 1``. ``n``,
    when given, is the row count ``x`` must have (values matching keys).
    Rejects non-float dtypes and NaN/Inf.
    """
    t = _as_tensor(x, what)
    squeezed = t.dim() == 2 and partitions == 1
    if squeezed:
        t = t.unsqueeze(0)
    n_want = "n" if n is None else str(n)
    if t.dim() != 3 or t.shape[0] != partitions or t.shape[2] != width or (n is not None and t.shape[1] != n):
        two_d = f" or [{n_want}, {width_name}={width}]" if partitions == 1 else ""
        raise InvalidInputError(
            f"{what} must have shape [partitions={partitions}, {n_want}, {width_name}={width}]{two_d}; "
            f"got {_shape(t if not squeezed else t[0])}")
    if t.dtype not in _FLOATS:
        raise InvalidInputError(f"{what} must be floating point (float16, bfloat16, float32, float64); got {t.dtype}")
    check_finite(t, what)
    return t, squeezed


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise if ``t`` holds NaN or Inf (also after rounding to a storage dtype)."""
    if not t.numel() or bool(t.abs().amax() < float("inf")):   # NaN propagates through amax; 10x isfinite on fp16
        return
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise InvalidInputError(f"{what} must be finite; got {t[tuple(bad)].item()} at index {bad}")


def ids_array(ids: Any, what: str, partitions: int) -> tuple[np.ndarray, bool]:
    """``ids`` as int64 ``(P, m)`` and whether it came 1-D. ``-1`` is padding."""
    t = _as_tensor(ids, what)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise InvalidInputError(f"{what} must be integers; got {t.dtype}")
    squeezed = t.dim() == 1 and partitions == 1
    arr = t.cpu().numpy().astype(np.int64, copy=False)
    if squeezed:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[0] != partitions:
        one_d = " or [m]" if partitions == 1 else ""
        raise InvalidInputError(f"{what} must have shape [partitions={partitions}, m]{one_d}; got {_shape(t)}")
    if arr.size and arr.min() < -1:
        raise InvalidInputError(f"{what} must be >= 0 (or -1 for padding); got {arr.min()}")
    return arr, squeezed


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise InvalidInputError(f"k must be a positive int; got {k!r}")
    return int(k)


def path(value: Any, what: str) -> Path:
    """``value`` as a Path: a non-empty ``str`` or ``os.PathLike`` of one, without NUL bytes."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text or "\x00" in text:
        raise InvalidInputError(f"{what} must be a non-empty str or os.PathLike without NUL bytes; got {value!r}")
    return Path(text)


def _index(p: Any) -> int | None:
    """``p`` as an int when it is one (Python, NumPy or 0-d torch integer; not bool), else None."""
    if isinstance(p, (bool, np.bool_)) or (isinstance(p, torch.Tensor) and p.dtype == torch.bool):
        return None
    try:
        return operator.index(p)
    except TypeError:
        return None


def partition_index(partition: Any, total: int) -> int:
    """One partition number in ``[0, total)`` (``count(partition=...)``)."""
    p = _index(partition)
    if p is None or not 0 <= p < total:
        raise InvalidInputError(f"partition must be an int in [0, {total}); got {partition!r}")
    return p


def partition_list(partitions: int | Iterable[int] | None, total: int) -> list[int]:
    """The partitions named by ``clear(partitions=...)``: None means all, else an int or an iterable of ints.

    An iterable is checked item by item and read at most ``8 * total + 1024`` items far, so a huge
    or endless one is refused, not drained.
    """
    if partitions is None:
        return list(range(total))
    if _index(partitions) is not None:
        return [partition_index(partitions, total)]
    most = 8 * total + 1024
    try:                                                        # iterating a 0-d array or tensor: TypeError
        if isinstance(partitions, (str, bytes)):
            raise TypeError
        items = [partition_index(p, total) for p in itertools.islice(partitions, most + 1)]
    except TypeError:
        raise InvalidInputError(f"partitions must be None, an int or an iterable of ints in [0, {total}); "
                                f"got {partitions!r} ({type(partitions).__name__})") from None
    if len(items) > most:
        raise InvalidInputError(f"partitions must name at most {most} partitions (of {total}); got more")
    return sorted(set(items))


# ---------------------------------------------------------------------------------------------- limits
# A call is refused before anything is allocated when the rows it would allocate (the result of a search
# or a get, the stored copy of an add) take more than ``byte_limit()``: a quarter of physical memory (of
# the device's memory for a CUDA store), or ``KVMEM_MAX_CALL_BYTES`` bytes when that is set. A call's
# working memory is a small multiple of those rows, so a call under the limit fits beside the store.
LIMIT_ENV = "KVMEM_MAX_CALL_BYTES"
LIMIT_FRACTION = 4                  # a call may take 1 / LIMIT_FRACTION of the memory it runs in


def byte_limit(device: torch.device) -> int:
    """The most bytes the rows of one call may take on ``device``; see above."""
    env = os.environ.get(LIMIT_ENV)
    if env:
        try:
            return int(env)
        except ValueError:
            raise InvalidInputError(f"{LIMIT_ENV} must be an int (bytes); got {env!r}") from None
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // LIMIT_FRACTION
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // LIMIT_FRACTION


def row_bytes(dim: int, value_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one row a call returns or stores: key and value in ``dtype``, an int64 id, a float32 score."""
    return (dim + value_dim) * dtype.itemsize + 8 + 4


def check_rows(what: str, knob: str, value: int, rows_per_unit: int, per_row: int, device: torch.device,
               *, rows: str = "rows") -> None:
    """Refuse a call of ``value * rows_per_unit`` rows of ``per_row`` bytes over :func:`byte_limit`.

    ``knob`` (``k``, ``n``, ``m``, ``partitions``) is what the caller can lower; the message names its
    largest value. ``rows`` names the things counted.
    """
    limit, count = byte_limit(device), value * rows_per_unit
    if count * per_row > limit:
        raise InvalidInputError(
            f"{what} with {knob}={value:,} would take {count:,} {rows} x {per_row:,} bytes = {count * per_row:,} "
            f"bytes, over the limit of {limit:,} bytes (1/{LIMIT_FRACTION} of the {device.type} memory, or "
            f"{LIMIT_ENV}); the largest {knob} that fits is {limit // (rows_per_unit * per_row):,}")
