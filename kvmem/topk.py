"""Blocked exact top-k search, shared by the ``exact`` and ``lmdb`` backends.

A search never materialises a ``q x N`` score matrix: keys stream past in
blocks, each block's scores are reduced into a :class:`RunningTopK`, and the
memory of a call is O(block), whatever N is.

Two ways to score a block:

- **float32** ranking, and
- **bfloat16** ranking (the default where a fast bfloat16 matmul exists: CUDA
  devices of capability >= 8.0, and CPUs with AVX512-BF16 or AMX).

Either way a block is ranked in the working dtype, ``k + margin`` candidates
are kept and rescored exactly in float32 (:func:`exact_scores`), and each query
is *certified*: the rounding error of any ranking score is bounded
(Cauchy-Schwarz on the rounding of query and key, the accumulation and the
output), so if the worst key left out cannot beat the k-th rescored candidate
even with that error, the answer is the exact one. Queries that fail are
searched again one precision finer (bfloat16 -> float32 -> float64); float64
is final. "Exact" means: the true top-k of the stored keys, up to ties closer
than the float32 rounding of a score. Near-ties in ``l2`` under a large shared
offset (attention keys) are where float32 ranking, which scores
``2 q.k - |k|^2``, cannot tell rows apart and float64 is needed.

The running top-k: on the CPU with a float32 ranking, blocks of about 1 MiB of scores
(:data:`_FUSED_ELEMS`) go, while still in cache, to the compiled per-row heaps of
:class:`HeapTopK` (``kvmem/_kernels.c``); elsewhere (CUDA, bfloat16 ranking, float64
second passes, a build without the extension) :class:`RunningTopK` selects with torch ops.

Metrics are folded into the matmul so one kernel serves all three
(``r`` is the ranking score, monotone in the returned score):

======  ==================  ===================  ======================
metric  query row           key row              r = query . key
======  ==================  ===================  ======================
ip      q                   k                    q.k
l2      [2q, -1]            [k, |k|^2]           |q|^2 - |q-k|^2
cos     q/|q|               k/|k|                cos(q, k)
======  ==================  ===================  ======================
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import NamedTuple, Protocol

import numpy as np
import torch

from kvmem import devices, kernels
from kvmem.stores._threads import spread, torch_threads

__all__ = ["HeapTopK", "KeySource", "RunningTopK", "blas_threads", "blocked_search", "exact_scores",
           "fast_rank_dtype", "rank_dtype_for"]

NEG_INF = float("-inf")
_GROUP = 16          # columns per group in the group-max prefilter
_MARGIN = {torch.bfloat16: 48, torch.float32: 8, torch.float64: 0}   # extra candidates kept per working dtype
# (bfloat16: 16 left 90% of Gaussian queries uncertified at 1M; float32 fails only on near-ties)
_FINER = {torch.bfloat16: torch.float32, torch.float32: torch.float64}  # where an uncertified query goes next
_U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16
_U_F32 = 2.0 ** -24
_UNIT = {torch.bfloat16: _U_BF16, torch.float32: _U_F32}
_SMALL_Q = 8         # fewer queries than this: a memory-bound matvec, one BLAS thread is enough
_SPAN_ROWS = 64      # query rows per span of a search split across threads, at least
_FUSED_ELEMS = 1 << 18   # a score block the fused selection reads while it is in cache (1 MiB: a core's L2)


class _Limits(NamedTuple):
    score_elems: int     # a score block holds at most this many elements
    max_rows: int        # keys per block at most (more blocks cost Python overhead; fewer, cache)
    query_rows: int      # partitions x queries per tile


_LIMITS = {"cpu": _Limits(1 << 25, 1 << 17, 4096), "cuda": _Limits(1 << 28, 1 << 20, 65536)}


class KeySource(Protocol):
    """Where the keys of a blocked search come from (a tensor table, an LMDB map, ...)."""

    partitions: int
    device: torch.device
    dtype: torch.dtype                  # of the keys ``blocks`` yields

    def counts(self) -> np.ndarray:
        """Rows held per partition, ``(P,)``; partition p's rows are slots ``[0, counts[p])``."""

    def blocks(self, rows: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(first slot, keys (P, b, dim), sqnorm (P, b) float32)`` covering every slot."""

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """Keys at ``slots (P, q, c)`` (``-1``: zeros) -> ``(P, q, c, dim)``."""

    def max_sqnorm(self) -> torch.Tensor:
        """Largest ``|k|^2`` of each partition's rows, ``(P,)`` float32 (an upper bound will do)."""

    def subset(self, partitions: list[int]) -> KeySource:
        """Those partitions as a source of their own, reading only their rows (a second pass over the
        uncertified queries of one partition must not gather the others)."""


def fast_rank_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 where its matmul is fast (CUDA capability >= 8.0 of ``device``, AVX512-BF16/AMX CPUs), else None."""
    if devices.cuda_like(device):
        return torch.bfloat16 if devices.fast_bf16(device) else None
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        probe = getattr(cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(cpu, "_is_amx_tile_supported", None)
        if (probe is not None and probe()) or (amx is not None and amx()):
            return torch.bfloat16
    return None


def rank_dtype_for(ranking: str, queries: int, dtype: torch.dtype, metric: str,
                   device: torch.device) -> torch.dtype | None:
    """``rank_dtype`` for :func:`blocked_search` under a store's ``ranking`` option.

    ``"bf16"``: always; ``"fp32"``: never; ``"auto"``: where bfloat16 is fast and
    it pays, for a matmul (>= 8 queries per partition) or when bfloat16 keys
    enter it as they are (ip).
    """
    if ranking == "bf16":
        return torch.bfloat16
    if ranking == "auto" and (queries >= 8 or (dtype == torch.bfloat16 and metric == "ip")):
        return fast_rank_dtype(device)
    return None


class RunningTopK:
    """The ``k`` best ``(score, column)`` pairs per row over streamed blocks.

    ``push(scores (R, b), first_column)`` folds one block in. On the CPU a block
    is first reduced to group maxima and only groups that beat the running
    k-th score are looked at (after the first blocks, few do); elsewhere the
    top-k groups are kept, which needs no data-dependent shapes.
    """

    def __init__(self, rows: int, k: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.k = k
        self.values = torch.full((rows, k), NEG_INF, dtype=dtype, device=device)     # (R, k)
        self.columns = torch.full((rows, k), -1, dtype=torch.long, device=device)    # (R, k)
        self.threshold = self.values[:, 0].clone()                                    # (R,) k-th best so far
        self._sparse = not devices.cuda_like(device)
        self._pushed = False            # before the first block every group passes: go dense at once

    def push(self, scores: torch.Tensor, first: int) -> None:
        R, b = scores.shape
        m = b // _GROUP
        tail = m * _GROUP if m >= self.k else 0
        if tail < b:                                                                  # a few ragged columns
            cols = torch.arange(first + tail, first + b, device=scores.device).expand(R, b - tail)
            self._merge(scores[:, tail:].to(self.values.dtype), cols)
        if not tail:
            return
        gmax = scores[:, :tail].unflatten(1, (_GROUP, m)).amax(1)                     # (R, m)
        if self._sparse and self._pushed and self._push_sparse(scores, gmax, first, m):
            return
        _, group = gmax.topk(self.k, 1, sorted=False)                                 # (R, k)
        cols = (torch.arange(_GROUP, device=scores.device)[None, :, None] * m + group[:, None, :]).reshape(R, -1)
        self._merge(scores.gather(1, cols).to(self.values.dtype), cols + first)

    def _push_sparse(self, scores: torch.Tensor, gmax: torch.Tensor, first: int, m: int) -> bool:
        rows, group = (gmax.to(self.threshold.dtype) > self.threshold[:, None]).nonzero(as_tuple=True)
        if rows.numel() > scores.shape[0] * self.k // 2:
            return False                                                              # dense block: top-k path
        if rows.numel() == 0:
            return True
        R = scores.shape[0]
        per_row = torch.bincount(rows, minlength=R)
        width = int(per_row.max())
        if width > 2 * self.k:
            return False
        slot = torch.arange(rows.numel(), device=rows.device) - (per_row.cumsum(0) - per_row)[rows]
        cols = group[:, None] + torch.arange(_GROUP, device=rows.device)[None, :] * m  # (hits, G)
        cand = torch.full((R, width, _GROUP), NEG_INF, dtype=self.values.dtype, device=scores.device)
        cand_cols = torch.full((R, width, _GROUP), -1, dtype=torch.long, device=scores.device)
        cand[rows, slot] = scores[rows[:, None], cols].to(self.values.dtype)
        cand_cols[rows, slot] = cols + first
        self._merge(cand.view(R, -1), cand_cols.view(R, -1))
        return True

    def _merge(self, values: torch.Tensor, columns: torch.Tensor) -> None:
        values = torch.cat([self.values, values], 1)
        columns = torch.cat([self.columns, columns], 1)
        self.values, pick = values.topk(self.k, 1, sorted=False)
        self.columns = columns.gather(1, pick)
        self.threshold = self.values.amin(1)
        self._pushed = True

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, columns)`` sorted best first; ``-1`` where fewer than k were seen."""
        return _best_first(self.values, self.columns)


class HeapTopK:
    """:class:`RunningTopK`'s contract on the fused selection's per-row heaps (``kvmem/_kernels.c``).

    CPU float32 blocks only. ``limits (R,)``: row r ignores columns from ``limits[r]`` on (a partition
    holding fewer rows than a block reaches), so no block is masked first. Blocks should be small
    enough to still be in cache when pushed (:data:`_FUSED_ELEMS`): the selection is one read of them.
    """

    def __init__(self, rows: int, k: int, limits: np.ndarray | None = None) -> None:
        self.k = k
        self._values = np.full((rows, k), NEG_INF, dtype=np.float32)
        self._columns = np.full((rows, k), -1, dtype=np.int64)
        self._limits = limits

    def push(self, scores: torch.Tensor, first: int) -> None:
        kernels.native.push(scores.numpy(), first, self._limits, self._values, self._columns)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _best_first(torch.from_numpy(self._values), torch.from_numpy(self._columns))


def _best_first(values: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, order = values.sort(dim=1, descending=True)
    columns = columns.gather(1, order)
    return values, columns.masked_fill(values == NEG_INF, -1)


def exact_scores(queries: torch.Tensor, keys: torch.Tensor, metric: str) -> torch.Tensor:
    """float32 scores of ``queries (P, q, d)`` against their own ``keys (P, q, c, d)`` -> ``(P, q, c)``.

    A score depends only on its query and key, not on where the key sits among the ``c``
    (a matrix-vector product per query; einsum's kernels round some columns differently),
    so stores that split the candidates, as ``sharded`` does, score them as one store would.
    On the CPU the compiled kernel scores them (:func:`kvmem.kernels.scores`), as it scores the rows
    the approximate backends return.
    """
    if kernels.applies(keys) and not devices.cuda_like(keys.device) and queries.device.type == "cpu":
        return kernels.scores(queries, keys, metric)
    q = queries.float()
    k = keys.float()
    if metric == "l2":
        return -((q[:, :, None, :] - k) ** 2).sum(-1)
    dots = torch.matmul(k, q[..., None])[..., 0]                                       # (P, q, c)
    if metric == "cos":
        norms = q.norm(dim=-1)[:, :, None] * k.norm(dim=-1)
        dots = torch.where(norms > 0, dots / norms.clamp(min=1e-30), torch.zeros_like(dots))
    return dots


def _rank_rows(queries: torch.Tensor, metric: str) -> torch.Tensor:
    """The query rows of the table in the module docstring, float32 ``(P, q, d')``."""
    if metric == "l2":
        return torch.cat([2 * queries, -torch.ones_like(queries[..., :1])], -1)
    if metric == "cos":
        return queries / queries.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    return queries


def _rank_keys(keys: torch.Tensor, sqnorm: torch.Tensor, metric: str, out: torch.Tensor) -> torch.Tensor:
    """The key rows of the table in the module docstring, written into ``out (P, b, d')``."""
    b, d = keys.shape[1], keys.shape[2]
    out = out[:, :b]
    if out.dtype == torch.float64:
        keys = keys.double()
        sqnorm = keys.pow(2).sum(-1)            # a float32 |k|^2 would limit float64 ranking to float32's resolution
    if keys.dtype == torch.float16 and out.dtype == torch.bfloat16 and not devices.cuda_like(out.device):
        keys = keys.float()                     # CPUs have no fast float16 -> bfloat16 path; via float32 is 4x faster
    if metric == "cos":
        inv = torch.where(sqnorm > 0, sqnorm.clamp(min=1e-30).rsqrt(), torch.zeros_like(sqnorm))
        out.copy_(keys.to(inv.dtype) * inv[..., None])
    else:
        out[..., :d] = keys
        if metric == "l2":
            out[..., d] = sqnorm
    return out


class _BlockScorer:
    """Ranking scores ``(P, q, b)`` of one tile of queries against one block of keys at a time.

    Buffers are allocated once per tile, so the memory of a search is O(block).
    float32 matmuls on the CPU go through NumPy's BLAS (zero-copy views), which
    is faster than torch's on the CPUs where the two differ (MKL on AMD).
    """

    def __init__(self, queries: torch.Tensor, metric: str, work: torch.dtype, rows: int) -> None:
        self.metric, self.work = metric, work
        wide = torch.float64 if work == torch.float64 else torch.float32
        self.qrows = _rank_rows(queries.to(wide), metric).to(work)                  # (P, q, d')
        P, q, width = self.qrows.shape
        device = queries.device
        self.scores = torch.empty(P * q * rows, dtype=work, device=device)
        self.keys = torch.empty((P, rows, width), dtype=work, device=device)
        self.rounded_keys = False               # some key entered the matmul rounded (certificate bound)
        self._numpy = not devices.cuda_like(device) and work in (torch.float32, torch.float64)

    def __call__(self, keys: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
        if self.metric == "ip" and keys.dtype == self.work:
            krows = keys
        else:
            krows = _rank_keys(keys, sqnorm, self.metric, self.keys)
            self.rounded_keys |= self.work != torch.float32
        P, q, _ = self.qrows.shape
        b = keys.shape[1]
        block = self.scores[:P * q * b].view(P, q, b)
        if self._numpy:
            with blas_threads(1 if q < _SMALL_Q else None):
                np.matmul(self.qrows.numpy(), krows.numpy().transpose(0, 2, 1), out=block.numpy())
        elif devices.cuda_like(block.device):
            torch.bmm(self.qrows, krows.transpose(1, 2), out=block)
        elif q == 1:                            # torch dispatches bf16 matvecs to oneDNN only as K @ q
            for p in range(P):
                torch.mm(krows[p], self.qrows[p].T, out=block[p].view(b, 1))
        else:                                   # 2-D mm reaches oneDNN's bf16 kernels; bmm does not on CPU
            for p in range(P):
                torch.mm(self.qrows[p], krows[p].T, out=block[p])
        return block


def blas_threads(limit: int | None) -> contextlib.AbstractContextManager[object]:
    """NumPy's BLAS on one thread inside when ``limit`` is 1 (no-op for None or without threadpoolctl).

    A matvec is memory-bound: one thread streams as fast as two, and an idle
    OpenBLAS worker spinning beside torch's OpenMP threads slows everything after it.
    The limit is process-wide, so it is held while any search is inside and the
    count BLAS had before is put back when the last one leaves (two searches
    restoring each other's saved counts would leave BLAS on one thread for good).
    """
    if limit is None:
        return contextlib.nullcontext()
    return _one_blas_thread()


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    global _CONTROLLER, _HOLDERS, _HELD
    with _BLAS_LOCK:
        if _CONTROLLER is None:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:
                _CONTROLLER = False
            else:
                _CONTROLLER = ThreadpoolController()
        if _CONTROLLER and _HOLDERS == 0:
            _HELD = _CONTROLLER.limit(limits=1, user_api="blas")
        _HOLDERS += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _HOLDERS -= 1
            if _HOLDERS == 0 and _HELD is not None:
                _HELD.restore_original_limits()
                _HELD = None


_CONTROLLER = None      # threadpoolctl's controller, made at first use (False: no threadpoolctl)
_BLAS_LOCK = threading.Lock()
_HOLDERS = 0            # searches inside _one_blas_thread now
_HELD = None            # the limit they share, restored when the last one leaves


def _block_rows(partitions: int, queries: int, width: int, budget: int, longest: int, converts: bool,
                max_rows: int) -> int:
    """Keys per block: the score block ``P x q x rows`` within ``budget`` elements, and where keys are
    converted, the key buffer within a cache-sized eighth of it (converted blocks are read twice)."""
    rows = budget // max(1, partitions * queries)
    if converts:
        rows = min(rows, budget // 8 // max(1, partitions * width))
    rows = max(1024, min(max_rows, rows))
    rows -= rows % 256
    return max(1, min(rows, longest))


def blocked_search(source: KeySource, queries: torch.Tensor, k: int, metric: str, *,
                   rank_dtype: torch.dtype | None = None, block_elems: int | None = None,
                   query_tile: int | None = None, spans: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``queries (P, q, d)`` over ``source``: ``(scores (P, q, k) f32, slots (P, q, k))``.

    Scores are the float32 scores of :func:`exact_scores`, sorted best first;
    slots are ``-1`` (score ``-inf``) where a partition holds fewer than k rows.
    ``rank_dtype``: the working dtype of the ranking, ``torch.bfloat16`` or float32 (None).
    ``spans``: where the matmuls go through NumPy's BLAS, the queries are cut into up to this many
    spans searched side by side, each on one thread (BLAS included; ``source.blocks`` must then be
    safe to call from several threads at once): one BLAS pool and one torch pool taking turns spin on
    each other's cores (200k x 128 keys, 1,000 queries, 2 cores: 0.95 s a search with both pools,
    0.68 s with torch on one thread, 0.50 s in two spans; ``benchmarks/exact_parts.py``, issue 14).
    """
    P, q, _ = queries.shape
    device = source.device
    scores = torch.full((P, q, k), NEG_INF, device=device)
    slots = torch.full((P, q, k), -1, dtype=torch.long, device=device)
    counts = source.counts()
    if q == 0 or counts.max(initial=0) == 0:
        return scores, slots
    limits = _LIMITS["cuda" if devices.cuda_like(device) else "cpu"]
    budget, tile = limits.score_elems, max(1, limits.query_rows // P)
    if devices.cuda_like(device):
        keep = k + _MARGIN[rank_dtype or torch.float32]
        budget, tile = cuda_plan(P, keep, queries.shape[-1], (rank_dtype or torch.float32).itemsize,
                                 devices.search_budget(devices.free_bytes(device)))
    budget = block_elems or budget
    tile = query_tile or tile
    work = rank_dtype or torch.float32

    def rows(lo: int, hi: int, elems: int) -> None:
        for t in range(lo, hi, tile):
            part = slice(t, min(hi, t + tile))
            scores[:, part], slots[:, part] = _search_tile(source, queries[:, part], k, metric, work, elems,
                                                           limits.max_rows)

    if devices.cuda_like(device) or work not in (torch.float32, torch.float64):
        rows(0, q, budget)                                      # torch's matmuls: torch's threads
        return scores, slots
    if spans <= 1 or q < 2 * _SPAN_ROWS:
        with torch_threads(1):
            rows(0, q, budget)
    else:
        with blas_threads(1):
            spread(lambda lo, hi: rows(lo, hi, max(1024, budget // spans)), q, spans, _SPAN_ROWS)
    return scores, slots


def cuda_plan(partitions: int, keep: int, dim: int, itemsize: int, budget: int) -> tuple[int, int]:
    """``(score elements per block, queries per partition per tile)`` of a CUDA search holding at most
    ``budget`` bytes (:func:`kvmem.devices.search_budget`).

    Half the budget goes to the query rows of a tile: each holds its rescoring
    (``keep`` gathered keys, their float32 copy and the l2 difference: 12 bytes
    per element) and the running top-k's merge buffers (about 384 bytes per
    candidate). What is left goes to the score block and the converted key
    block beside it (half each, at most).
    """
    limits = _LIMITS["cuda"]
    per_row = keep * (12 * dim + 384)
    rows = min(limits.query_rows, budget // 2 // per_row)
    tile = max(1, rows // partitions)
    left = max(0, budget - tile * partitions * per_row)
    return max(1024, min(limits.score_elems, left // (2 * itemsize))), tile


def _search_tile(source: KeySource, queries: torch.Tensor, k: int, metric: str,
                 work: torch.dtype, budget: int, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    P, q, d = queries.shape
    counts = source.counts()
    keep = k + _MARGIN[work]
    converts = not (metric == "ip" and source.dtype == work)
    rows = _block_rows(P, q, d + 1, budget, int(counts.max()), converts, max_rows)
    if kernels.available() and work == torch.float32 and not devices.cuda_like(source.device):
        score, approx, cand = _fused_scan(source, queries, metric, keep, rows)
    else:
        score = _BlockScorer(queries, metric, work, rows)
        running = RunningTopK(P * q, keep, source.device, torch.float64 if work == torch.float64 else torch.float32)
        held = devices.from_host(counts, source.device)[:, None, None]                # (P, 1, 1)
        for first, keys, sqnorm in source.blocks(rows):
            block = score(keys, sqnorm)                                                # (P, q, b)
            b = block.shape[-1]
            if bool((counts < first + b).any()):
                block.masked_fill_(torch.arange(first, first + b, device=source.device) >= held, NEG_INF)
            running.push(block.view(P * q, b), first)
        approx, cand = running.result()                                                # (P*q, keep)
    cand = cand.view(P, q, keep)
    exact = exact_scores(queries, source.gather(cand), metric).masked_fill(cand < 0, NEG_INF)
    by_slot = torch.where(cand >= 0, cand, torch.iinfo(torch.int64).max).argsort(dim=-1, stable=True)
    cand, exact = cand.gather(-1, by_slot), exact.gather(-1, by_slot)                 # equal scores: slot order,
    best, pick = exact.sort(dim=-1, descending=True, stable=True)                     # whichever selection ran
    best, pick = best[..., :k], pick[..., :k]                                          # (P, q, k)
    best_slots = cand.gather(-1, pick).masked_fill(best == NEG_INF, -1)
    finer = _FINER.get(work)
    if finer is not None:
        failed = ~_certified(queries, score.qrows, approx.view(P, q, keep), best, source, metric, _UNIT[work],
                             score.rounded_keys)
        if bool(failed.any()):
            _redo(source, queries, k, metric, budget, max_rows, failed, best, best_slots, finer)
    return best, best_slots


def _fused_scan(source: KeySource, queries: torch.Tensor, metric: str, keep: int,
                rows: int) -> tuple[_BlockScorer, torch.Tensor, torch.Tensor]:
    """The CPU float32 ranking with the fused selection: each block of ``rows`` keys is scored in steps
    whose scores fit in cache, and each step goes to the heaps before the next is scored.

    A step is a few hundred keys (about 1 ms of matmul), so its Python is kept to NumPy views made
    once: the conversion of keys that are not float32 ``ip`` rows, the matmul and the push.
    """
    P, q, _ = queries.shape
    step = max(256, min(rows, _FUSED_ELEMS // (P * q)))
    score = _BlockScorer(queries, metric, torch.float32, step)
    qrows, scores = score.qrows.numpy(), score.scores.numpy()
    heaps = HeapTopK(P * q, keep, np.repeat(source.counts().astype(np.int64), q))
    push, values, columns, limits = kernels.native.push, heaps._values, heaps._columns, heaps._limits
    with blas_threads(1 if q < _SMALL_Q else None):
        for first, keys, sqnorm in source.blocks(rows):
            direct = keys.numpy().transpose(0, 2, 1) if metric == "ip" and keys.dtype == torch.float32 else None
            for a in range(0, keys.shape[1], step):
                if direct is not None:
                    krows = direct[:, :, a:a + step]                                     # (P, d, b) views
                else:
                    krows = _rank_keys(keys[:, a:a + step], sqnorm[:, a:a + step], metric, score.keys).numpy()
                    krows = krows.transpose(0, 2, 1)
                b = krows.shape[2]
                block = scores[:P * q * b].reshape(P, q, b)
                np.matmul(qrows, krows, out=block)
                push(block.reshape(P * q, b), first + a, limits, values, columns)
    approx, cand = heaps.result()
    return score, approx, cand


def _certified(queries: torch.Tensor, qrows: torch.Tensor, approx: torch.Tensor, best: torch.Tensor,
               source: KeySource, metric: str, u: float, rounded_keys: bool) -> torch.Tensor:
    """``(P, q)`` True where no key left out by a ranking of unit roundoff ``u`` can be in the true top-k.

    ``rounded_keys``: the keys were rounded to the working dtype on their way into the matmul.
    """
    qnorm = qrows.float().norm(dim=-1)                                                 # (P, q)
    top = source.max_sqnorm().to(qnorm.device).clamp(min=0)[:, None]                   # (P, 1)
    knorm = {"ip": top.sqrt(), "l2": (top + top * top).sqrt(), "cos": torch.ones_like(top)}[metric]
    uk = u if rounded_keys else 0.0
    dim = qrows.shape[-1]
    bound = qnorm * knorm * (u + uk + u * uk + (dim + 8) * 2 * _U_F32)                # (P, q)
    left_out = approx[..., -1]                                                          # kk-th approx score
    worst = left_out + u * left_out.abs() + bound
    kth = best[..., -1]
    if metric == "l2":
        kth = kth + queries.float().pow(2).sum(-1)                                       # into r = |q|^2 - |q-k|^2
    counts = devices.from_host(source.counts(), qnorm.device)[:, None]
    worst = worst + 2 * _U_F32 * kth.abs()                                             # kth itself is rounded
    return (left_out == NEG_INF) | (worst < kth) | (counts <= approx.shape[-1])


def _redo(source: KeySource, queries: torch.Tensor, k: int, metric: str, budget: int, max_rows: int,
          failed: torch.Tensor, best: torch.Tensor, best_slots: torch.Tensor, work: torch.dtype) -> None:
    """Search the uncertified queries again with a ``work`` ranking, in place."""
    for p in failed.any(1).nonzero().flatten().tolist():
        who = failed[p].nonzero().flatten()
        sub = source.subset([p])                                                          # gathers p's rows only
        s, i = _search_tile(sub, queries[p:p + 1, who], k, metric, work, budget, max_rows)
        best[p, who], best_slots[p, who] = s[0], i[0]

