"""What a store is: the frozen description every backend is built from and saved with."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

import torch

from kvmem.errors import InvalidInputError

__all__ = ["StoreConfig", "METRICS", "parse_dtype", "dtype_name"]

METRICS = ("ip", "l2", "cos")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(dtype: Any) -> torch.dtype:
    """A storage dtype from a torch dtype or its name ("float16", "bf16", ...)."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise InvalidInputError(
        f"dtype must be one of torch.float32, torch.float16, torch.bfloat16 (or their names); got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        want = "a positive int or None" if allow_none else "a positive int"
        raise InvalidInputError(f"{name} must be {want}; got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Shape and semantics of a store; identical for every backend."""

    dim: int                          # width of a key vector
    value_dim: int                    # width of a value vector
    partitions: int = 1               # independent memories; a query of partition p sees only p's rows
    metric: str = "ip"                # "ip" (q·k), "l2" (-||q-k||²) or "cos"; higher score is better
    dtype: torch.dtype = torch.float16  # storage dtype of keys and values
    capacity: int | None = None       # max rows per partition; the oldest are evicted past it (FIFO)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # backend options

    def __post_init__(self) -> None:
        for name in ("dim", "value_dim", "partitions"):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        object.__setattr__(self, "capacity", _positive_int("capacity", self.capacity, allow_none=True))
        if self.metric not in METRICS:
            raise InvalidInputError(f"metric must be one of {METRICS}; got {self.metric!r}")
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if not isinstance(self.options, Mapping):
            raise InvalidInputError(f"options must be a mapping; got {type(self.options).__name__}")
        object.__setattr__(self, "options", types.MappingProxyType(dict(self.options)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as written into a manifest."""
        return {"dim": self.dim, "value_dim": self.value_dim, "partitions": self.partitions,
                "metric": self.metric, "dtype": dtype_name(self.dtype), "capacity": self.capacity,
                "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoreConfig:
        fields = {"dim", "value_dim", "partitions", "metric", "dtype", "capacity", "options"}
        if not isinstance(data, Mapping) or set(data) != fields:
            raise InvalidInputError(f"config must have exactly the fields {sorted(fields)}; got {data!r}")
        return cls(**data)
