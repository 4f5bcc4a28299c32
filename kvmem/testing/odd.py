"""Odd values for every kind of argument, as Hypothesis strategies (what :mod:`kvmem.testing.fuzz` draws).

Each strategy mixes well-formed values (so that calls also succeed and change
the store) with odd ones: wrong types, NumPy and torch scalars, negative, zero
and huge ints, NaN and Inf, wrong shapes, ranks and dtypes, empty,
non-contiguous and broadcast tensors, NumPy arrays, nested lists, and ids out
of range.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

__all__ = ["SCALARS", "HUGE_INTS", "ints", "scalars_or", "vectors", "ids", "paths", "names"]

HUGE_INTS = (2**20, 2**31, 2**40, 2**63 - 1, -2**63, 2**64, 10**30)

# Anything a caller might pass where a number, a name or a flag is wanted.
SCALARS = st.sampled_from([
    None, True, False, 0, -1, 1, 2, 3, *HUGE_INTS, 0.0, 1.0, 2.0, 2.5, -0.0, float("nan"), float("inf"),
    float("-inf"), 1e39, 1j, "", "0", "3", "all", "abc", "\x00", b"1", (), (0,), (0, 0), {}, {"a": 1},
    np.int64(1), np.int32(-1), np.uint64(2**64 - 1), np.float32(2.0), np.float64("nan"), np.bool_(True),
    np.array(1), np.array([0, 1]), np.array(1.5), torch.tensor(1), torch.tensor(1.5), torch.tensor([0]),
    torch.tensor(True), range(3), object(),
])


def ints(low: int = -3, high: int = 40) -> st.SearchStrategy[int]:
    """Ints from a small range (mostly valid) and the huge ones of :data:`HUGE_INTS`."""
    return st.one_of(st.integers(low, high), st.sampled_from(HUGE_INTS))


def scalars_or(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` three times out of four, else any of :data:`SCALARS` or a huge int."""
    return st.one_of(valid, valid, valid, SCALARS, ints())


_FLOATS = [torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64]
_OTHERS = [torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64]
_FILLS = ["normal", "normal", "normal", "zeros", "nan", "inf", "-inf", "1e39", "6e4", "1e-45"]
_FORMS = ["tensor", "tensor", "noncontiguous", "broadcast", "numpy", "list", "grad", "numpy-f64"]


def _shapes(partitions: int, rows: int, width: int) -> st.SearchStrategy[tuple[int, ...]]:
    right = (partitions, rows, width)
    return st.one_of(st.just(right), st.just(right), st.just(right), st.sampled_from([
        (rows, width), (partitions + 1, rows, width), (partitions, rows, width + 1), (partitions, rows, 0),
        (partitions, 0, width), (0, rows, width), (), (width,), (1, partitions, rows, width), (partitions, rows, 1),
    ]))


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, fill: str, seed: int) -> torch.Tensor:
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if fill == "zeros":
        t.zero_()
    elif fill != "normal" and t.numel():
        t.view(-1)[seed % t.numel()] = float(fill)
    if dtype == torch.complex64 or dtype.is_floating_point:
        return t.to(dtype)
    return t.clamp(-100, 100).to(dtype)


def _form(t: torch.Tensor, form: str) -> Any:
    if form == "noncontiguous" and t.dim():
        wide = torch.zeros(*t.shape, 2, dtype=t.dtype)
        wide[..., 0] = t
        return wide[..., 0]                                   # same values, every stride doubled
    if form == "broadcast" and t.dim() >= 2 and t.shape[1]:
        return t[:, :1].expand(t.shape)                       # stride 0 along the rows
    if form == "numpy" and t.dtype != torch.bfloat16:
        return t.numpy()
    if form == "numpy-f64" and t.dtype.is_floating_point:
        return t.double().numpy()
    if form == "list" and t.numel() <= 64:
        return t.tolist()
    if form == "grad" and t.dtype.is_floating_point:
        return t.float().requires_grad_(True)
    return t


@st.composite
def vectors(draw: st.DrawFn, partitions: int, width: int, rows: int | None = None) -> Any:
    """Keys, values or queries: ``(partitions, rows, width)`` float, or something odd in its place."""
    # Hypothesis leans to the smallest draws (0, False), so those give the well-formed case.
    if draw(st.integers(0, 19)) == 19:
        return draw(SCALARS)
    rows = draw(st.sampled_from([1, 2, 3, 5, 0])) if rows is None else rows
    if not draw(st.booleans()):                               # well-formed, in any of the accepted forms
        t = _tensor((partitions, rows, width), torch.float32, "normal", draw(st.integers(0, 2**16)))
        return _form(t, draw(st.sampled_from(_FORMS)))
    shape = draw(_shapes(partitions, rows, width))
    dtype = draw(st.sampled_from(_FLOATS * 3 + _OTHERS))
    t = _tensor(shape, dtype, draw(st.sampled_from(_FILLS)), draw(st.integers(0, 2**16)))
    return _form(t, draw(st.sampled_from(_FORMS)))


@st.composite
def ids(draw: st.DrawFn, partitions: int, issued: int) -> Any:
    """Ids ``(partitions, m)``: live, padding, removed, never issued, negative, huge, or oddly typed."""
    if draw(st.integers(0, 19)) == 19:                         # (the smallest draws: well-formed)
        return draw(SCALARS)
    m = draw(st.sampled_from([1, 2, 4, 0]))
    if not draw(st.booleans()):                               # well-formed: live ids and padding
        return np.array(draw(st.lists(st.lists(st.integers(-1, issued - 1), min_size=m, max_size=m),
                                      min_size=partitions, max_size=partitions)), np.int64).reshape(partitions, m)
    shape = draw(st.sampled_from([(partitions, m)] * 4 + [(m,), (partitions, m, 1), (), (partitions + 1, m)]))
    pick = st.one_of(st.integers(-1, issued + 2), st.integers(-1, issued + 2), st.sampled_from([-2, *HUGE_INTS[:4]]))
    n = int(np.prod(shape)) if shape else 1
    values = draw(st.lists(pick, min_size=n, max_size=n))
    dtype = draw(st.sampled_from(["int64", "int64", "int32", "uint8", "uint64", "float64", "bool", "object"]))
    arr = np.array(values, dtype=object).reshape(shape)
    try:
        arr = arr.astype(dtype)
    except (OverflowError, ValueError, TypeError):
        pass                                                  # stays an object array: odd too
    form = draw(st.sampled_from(["numpy", "tensor", "tensor", "list", "noncontiguous"]))
    if form == "list":
        return arr.tolist()
    if form in ("tensor", "noncontiguous") and arr.dtype != object and arr.dtype != np.uint64:
        t = torch.from_numpy(np.ascontiguousarray(arr))
        return _form(t, form)
    return arr


def paths(root: str) -> st.SearchStrategy[Any]:
    """Paths under ``root`` (new, existing, a file, inside a file, too long, with NUL) and non-paths."""
    return st.one_of(st.sampled_from([
        f"{root}/new", f"{root}/new", f"{root}/sub/deeper", f"{root}/a-file", f"{root}/a-file/inside",
        f"{root}/not-a-store", f"{root}/" + "x" * 300, f"{root}/nul\x00byte", root, "", "\x00",
    ]), SCALARS.filter(lambda v: not isinstance(v, (str, bytes))))   # no relative paths: nothing in the cwd


def names(valid: list[str]) -> st.SearchStrategy[Any]:
    """One of ``valid``, or a near miss (case, spaces), or any odd scalar."""
    near = [v.upper() for v in valid] + [f" {v}" for v in valid[:1]] + ["nope", ""]
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(near), SCALARS)
