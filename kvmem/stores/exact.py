"""``exact``: brute-force search in torch, on CPU or CUDA — the ground truth.

Keys are stored in float32, float16 or bfloat16; every partition is searched
in one batched matmul per block of keys (:func:`kvmem.topk.blocked_search`),
so extra memory is O(block) whatever the number of rows. Returned scores are
float32 and exact for the stored (rounded) keys.

Options:
    ranking: ``"auto"`` (default) ranks with a certified bfloat16 matmul where it
        is fast (CUDA capability >= 8.0, AVX512-BF16/AMX CPUs) and a call has at least 8 queries
        per partition or the keys are bfloat16 already (ip); ``"bf16"`` always
        does; ``"fp32"`` never does. Results are exact in every mode.
    block_elems: score-block budget in elements (default 2**25 on CPU; on CUDA at most 2**28, and with
        the query tile and its rescoring within a quarter of the free device memory, at most 4 GiB:
        :func:`kvmem.topk.cuda_plan`).

On the CPU with a float32 ranking (NumPy's BLAS), a search of 128 queries or more is cut
into spans of queries, one per core the caller's ``torch.get_num_threads()`` allows, each
searched on one thread with BLAS on one thread: one BLAS pool and torch's pool taking turns
spin on each other's cores (200k x 128 keys, 1,000 queries, 2 cores: 0.95 -> 0.52 s; with the
compiled selection of :mod:`kvmem.kernels`, about 0.5 s against faiss ``IndexFlatIP``'s 0.55-0.75 s).
While it runs, NumPy's BLAS is limited to one thread process-wide.

Thread-safe: searches run concurrently; ``add``/``remove``/``clear`` take the write lock.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from kvmem import devices
from kvmem.errors import InvalidInputError
from kvmem.stores._threads import workers
from kvmem.tablestore import TableStore
from kvmem.topk import blocked_search, rank_dtype_for

__all__ = ["ExactStore", "TableKeys", "sqnorm_column", "sqnorm_rows"]

_RANKINGS = ("auto", "bf16", "fp32")


def sqnorm_column() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The extra column :class:`TableKeys` reads: ``|k|^2`` of the stored key (l2 bias, cos norm,
    the bfloat16 ranking's certificate bound)."""
    return {"sqnorm": ((), torch.float32)}


def sqnorm_rows(keys: torch.Tensor) -> dict[str, torch.Tensor]:
    """That column's values for stored ``keys (P, n, dim)``."""
    return {"sqnorm": keys.float().pow(2).sum(-1)}


class ExactStore(TableStore):
    backend = "exact"
    defaults = {"ranking": "auto", "block_elems": None}

    @property
    def exact(self) -> bool:
        return True

    @property
    def streams_rows(self) -> bool:
        return True

    @classmethod
    def check_options(cls, options: Mapping[str, Any], device: torch.device) -> None:
        if options["ranking"] not in _RANKINGS:
            raise InvalidInputError(f"exact option ranking must be one of {_RANKINGS}; got {options['ranking']!r}")
        elems = options["block_elems"]
        if elems is not None and (isinstance(elems, bool) or not isinstance(elems, int) or elems < 1024):
            raise InvalidInputError(f"exact option block_elems must be an int >= 1024 or None; got {elems!r}")

    def _extra_columns(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return sqnorm_column()

    def _extra_rows(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        return sqnorm_rows(keys)

    def _search(self, queries: torch.Tensor, k: int, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        rank = rank_dtype_for(self.options["ranking"], queries.shape[1], self.dtype, self.metric, self.device)
        return blocked_search(TableKeys(self), queries, k, self.metric, rank_dtype=rank,
                              block_elems=self.options["block_elems"], spans=workers(torch.get_num_threads()))


    def _row_blocks(self, rows: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        keys, values = self._table.data["keys"], self._table.data["values"]
        for first in range(0, int(self._book.counts.max(initial=0)), rows):
            yield first, keys[:, first:first + rows], values[:, first:first + rows]            # views


class TableKeys:
    """The key column of a table store (all partitions, or some) as a :class:`~kvmem.topk.KeySource`.

    The store keeps ``|k|^2`` of every key in a ``sqnorm`` column (:func:`sqnorm_column`).
    """

    def __init__(self, store: TableStore, partitions: list[int] | None = None) -> None:
        if partitions is not None and list(partitions) == list(range(store.partitions)):
            partitions = None                                                           # all: views, no copies
        self._store = store
        self._table = store._table
        self._parts = None if partitions is None else list(partitions)
        self._pick = None if partitions is None else devices.from_host(self._parts, store.device)
        self._counts = store._book.counts if partitions is None else store._book.counts[partitions]
        self.partitions = store.partitions if partitions is None else len(partitions)
        self.device = store.device
        self.dtype = store.dtype

    def _column(self, name: str, first: int, rows: int) -> torch.Tensor:
        col = self._table.data[name]
        if self._pick is None:
            return col[:, first:first + rows]                                           # a view
        if len(self._parts) == 1:
            p = self._parts[0]
            return col[p:p + 1, first:first + rows]                                     # a view
        return col[self._pick, first:first + rows]                                      # (P', b, ...), a copy

    def counts(self) -> np.ndarray:
        return self._counts

    def subset(self, partitions: list[int]) -> TableKeys:
        """Some of these partitions as a source of their own."""
        return TableKeys(self._store, [p if self._parts is None else self._parts[p] for p in partitions])

    def blocks(self, rows: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for first in range(0, int(self._counts.max(initial=0)), rows):
            yield first, self._column("keys", first, rows), self._column("sqnorm", first, rows)

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        return self._table.gather("keys", slots, self._pick)

    def max_sqnorm(self) -> torch.Tensor:
        top = int(self._counts.max(initial=0))
        sq = self._column("sqnorm", 0, top)
        counts = devices.from_host(self._counts, self.device)[:, None]
        held = torch.arange(top, device=self.device)[None, :] < counts
        return sq.masked_fill(~held, 0).amax(1) if top else torch.zeros(self.partitions, device=self.device)
