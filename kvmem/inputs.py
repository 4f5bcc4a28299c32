"""Input validation, written once for every backend.

Each function checks one argument completely and either returns it in the one
form the backends work with, or raises :class:`InvalidInputError` naming the
expected and the received value. Nothing here touches a store, so a store can
validate everything before it mutates anything.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from kvmem.errors import InvalidInputError

__all__ = ["vectors", "ids_array", "check_k", "partition_list", "out_device"]

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


def partition_list(partitions: int | Iterable[int] | None, total: int) -> list[int]:
    """The partitions named by ``clear(partitions=...)``: None means all."""
    if partitions is None:
        return list(range(total))
    items = [partitions] if isinstance(partitions, numbers.Integral) else list(partitions)
    for p in items:
        if isinstance(p, bool) or not isinstance(p, numbers.Integral) or not 0 <= p < total:
            raise InvalidInputError(f"partition must be an int in [0, {total}); got {p!r}")
    return sorted({int(p) for p in items})
