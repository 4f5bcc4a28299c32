"""The hub: the query-aware part of both approximate indexes, learned from the queries a partition is asked.

Attention queries lie elsewhere than the keys, so an index built on keys (IVF
centroids, a graph whose edges join keys to keys) routes a query by the keys
that look like it, not by the keys it scores highest. Queries near each other
in query space share true neighbours, and deeper than the top-k: the union of
the true top-256 of a few nearby asked queries holds most of a new query's
top-32 (``benchmarks/RESULTS.md``, issue 13). So the hub is an inverted file
whose lists are made from queries, not keys:

- the sampled asked queries are clustered (seeded k-means, spherical for
  ``ip`` / ``cos``, Euclidean for ``l2``; about :data:`PER_LIST` queries per
  centroid);
- list ``c`` holds every key that is among the exact nearest of some sampled
  query in cluster ``c`` (:func:`depth_for`: 256 of them, more past 512k rows,
  fewer for a sample larger than 1,024; found when the partition was last
  calibrated on them), with a copy of its
  key in float32;
- a query is routed to its :data:`PROBES` nearest centroids and scores those
  lists' keys with one dense product per list (the queries of a batch that
  probe a list share it); each list's best ``k`` join the index's candidates
  before the store's exact rescoring.

This is the query-to-key routing of RoarGraph / RetrievalAttention, as lists
instead of graph edges. Neither library can hold it: hnswlib's links are
key-to-key and its search starts from one entry point, and a faiss IVF list
holds keys by their own centroid, so the lists live here. A query's work is
the lists it probes (about ``PROBES * PER_LIST * depth / overlap`` keys, a few
thousand), which grows far slower than the partition. Ids are kept, not slots,
and a key added later joins the lists of the sampled queries whose worst kept
neighbour it beats (:meth:`Hub.extend`); removed and evicted ids leave them
(:meth:`Hub.forget`), and a save keeps the lists as they are, so a reloaded
store searches exactly as the live one did. That upkeep is not free: an add
scores its keys against the ``S`` sampled queries and re-concatenates every
list it touches. The key copy is at most
``S * depth`` rows (``S`` the sampled queries; 1M attention keys of dim 32 and
1,000 asked queries: 234k rows, 35 MB), counted in ``store.nbytes()``, and is
rebuilt at each calibration, which uses the hub only as far as it pays
(:mod:`kvmem.stores._calibrate`): on a small partition the lists hold nearly
every key, and the plain index at a larger knob is faster; where the index
finds next to nothing of the queries, the lists answer alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from kvmem.topk import NEG_INF

if TYPE_CHECKING:
    from kvmem.stores._ann import AnnStore

__all__ = ["Hub", "DEPTH", "MIN_DEPTH", "PER_LIST", "PROBES", "depth_for", "merge"]

DEPTH = 256        # exact neighbours kept per sampled query (at least): what its list hands over
ROWS_PER_DEPTH = 2048   # and one more per this many rows, up to MAX_DEPTH: a denser memory needs deeper
MAX_DEPTH = 1024        # lists (1M attention keys: recall 0.92 at depth 256, 0.97 at 512, same probes)
SAMPLE_DEPTH = 1024     # past this many sampled queries, each keeps proportionally fewer, down to
MIN_DEPTH = 128         # this: a denser sample's queries lie nearer a new one (see depth_for)
PER_LIST = 8       # sampled queries per list (centroid), on average
PROBES = 2         # lists a query scores (hnsw: more at a larger ef, see HNSWStore._hub_probes)
_ITERATIONS = 12   # k-means rounds
_EXTEND_CHUNK = 8192   # added keys scored against the sample at once


def depth_for(rows: int, sample: int = SAMPLE_DEPTH) -> int:
    """Exact neighbours each of ``sample`` sampled queries keeps in a partition of ``rows`` rows.

    Up to :data:`SAMPLE_DEPTH` queries, the depth grows with the partition alone. A larger sample
    keeps the sample's total (``sample * depth``, so the hub's size and its calibration's top-k)
    where 1,024 queries would have it, but not below :data:`MIN_DEPTH`: a new query's nearest
    sampled queries are nearer, so fewer of their neighbours cover its own. On 1M attention keys
    (lists alone, 2 probes): 1,000 queries x 512 reach recall 0.967 scoring 0.53 % of the keys;
    8,000 x 128 reach 0.963 scoring 0.20 % (``benchmarks/RESULTS.md``, issue 13)."""
    depth = min(MAX_DEPTH, max(DEPTH, rows // ROWS_PER_DEPTH))
    return depth if sample <= SAMPLE_DEPTH else max(MIN_DEPTH, depth * SAMPLE_DEPTH // sample)


class Hub:
    """The query-routed lists of one partition (see the module docstring).

    ``queries (S, dim)`` are the sampled asked queries, ``ids (S, depth)`` their exact nearest ids (-1 pads);
    ``centroids (C, dim)`` are learned from ``queries`` when None (seeded by ``seed``).
    """

    def __init__(self, store: AnnStore, p: int, queries: torch.Tensor, ids: torch.Tensor,
                 centroids: torch.Tensor | None = None, seed: int = 0) -> None:
        self.queries, self.ids, self.metric = queries.float(), ids.long(), store.metric
        routed = self._route(self.queries)
        if centroids is None:
            centroids = kmeans(routed, max(1, round(len(routed) / PER_LIST)), self.metric, seed)
        self.centroids = centroids.float()
        self._sq = self.centroids.square().sum(1)                                       # (C,)
        self.owner = self._near(routed).argmax(1)                                       # (S,) each query's list
        rows = store._table.data["keys"][p]
        self.lists: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []    # (ids, keys, bias)
        self.sole: list[torch.Tensor] = []             # (L,) the one sampled query that brought an id, else -1
        self.floor = torch.full((len(self.queries),), NEG_INF)   # (S,) its worst kept neighbour's score
        for c in range(len(self.centroids)):
            members = (self.owner == c).nonzero().view(-1)
            got = self.ids[members]                                                     # (m, depth)
            lid, inverse, count = torch.unique(got.view(-1), return_inverse=True, return_counts=True)
            bringer = torch.full((len(lid),), -1, dtype=torch.long)
            bringer.scatter_(0, inverse.view(-1), members.repeat_interleave(got.shape[1]))
            slots = torch.from_numpy(store._book.slots_in(p, lid.numpy(), strict=False))
            keep = (lid >= 0) & (slots >= 0)                                            # pads; rows removed since
            keys, bias = self._prepared(rows[slots[keep]])
            self.lists.append((lid[keep], keys, bias))
            self.sole.append(bringer[keep].masked_fill(count[keep] > 1, -1))
            if len(members):                      # a pad (fewer rows than depth) leaves the floor at -inf
                at = torch.full((len(lid),), -1, dtype=torch.long)
                at[keep] = torch.arange(int(keep.sum()))
                mine = at[inverse.view(got.shape)]                                      # (m, depth) in the list
                scores = self._score(self.queries[members], keys, bias).gather(1, mine.clamp(min=0))
                scores = scores.masked_fill(mine < 0, float("inf")).masked_fill(got < 0, NEG_INF)
                self.floor[members] = scores.min(1).values
        self.floor.masked_fill_(self.floor == float("inf"), NEG_INF)    # every neighbour removed: take all

    def _prepared(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A list's key copy (float32; unit for cos) and its bias (l2: -|x|^2, so 2 q.x + bias ranks as -|q-x|^2)."""
        keys = keys.float()
        if self.metric == "cos":
            return torch.nn.functional.normalize(keys, dim=1).contiguous(), None
        if self.metric == "l2":
            return keys.contiguous(), -keys.square().sum(1)
        return keys.contiguous(), None

    def _score(self, q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Scores ``(n, L)`` of queries against prepared keys, ranked as the metric ranks (``bias``: l2's)."""
        return q @ keys.T if bias is None else torch.addmm(bias, q, keys.T, alpha=2)

    def extend(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        """Keys ``(n, dim)`` just added under ``ids (n,)``: each joins the list of every sampled query whose
        worst kept neighbour it beats (it would be among that query's neighbours now), so the lists stay the
        union of their queries' neighbours as the memory grows, until the next calibration rebuilds them."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        for lo in range(0, len(ids), _EXTEND_CHUNK):                     # the (S, chunk) scores stay small
            self._extend(ids[lo:lo + _EXTEND_CHUNK], keys[lo:lo + _EXTEND_CHUNK])

    def _extend(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        prepared, bias = self._prepared(keys)
        member, key = (self._score(self.queries, prepared, bias) >= self.floor[:, None]).nonzero(as_tuple=True)
        if not len(member):
            return
        n = len(ids)                                  # (list, key) pairs, sorted by list: who joins where
        pair, inverse, count = torch.unique(self.owner[member] * n + key, return_inverse=True, return_counts=True)
        brought = torch.empty_like(pair).scatter_(0, inverse, member).masked_fill_(count > 1, -1)
        lists, sizes = torch.unique_consecutive(pair // n, return_counts=True)
        for c, joined, sole in zip(lists.tolist(), (pair % n).split(sizes.tolist()), brought.split(sizes.tolist())):
            lid, old, old_bias = self.lists[c]
            self.lists[c] = (torch.cat([lid, ids[joined]]), torch.cat([old, prepared[joined]]),
                             None if old_bias is None else torch.cat([old_bias, bias[joined]]))
            self.sole[c] = torch.cat([self.sole[c], sole])

    def forget(self, ids: torch.Tensor) -> None:
        """Drop ``ids`` (removed or evicted) from every list."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if not len(ids):
            return
        for c, (lid, keys, bias) in enumerate(self.lists):
            keep = ~torch.isin(lid, ids)
            if not bool(keep.all()):
                self.lists[c] = (lid[keep], keys[keep], None if bias is None else bias[keep])
                self.sole[c] = self.sole[c][keep]

    def flat(self) -> dict[str, torch.Tensor]:
        """The lists as they are now (built, extended, pruned): ``list_ids``, ``list_sizes``, ``sole``."""
        return {"list_ids": torch.cat([lid for lid, _, _ in self.lists]),
                "list_sizes": torch.tensor([len(lid) for lid, _, _ in self.lists], dtype=torch.long),
                "sole": torch.cat(self.sole)}

    def restore(self, store: AnnStore, p: int, list_ids: torch.Tensor, sizes: torch.Tensor,
                sole: torch.Tensor) -> None:
        """Make the lists those :meth:`flat` gave (validated by the caller), their keys read from ``store``.
        Raises ValueError when an id is not in the partition."""
        slots = torch.from_numpy(store._book.slots_in(p, list_ids.numpy(), strict=False))
        if bool((slots < 0).any()):
            raise ValueError("a hub list names a row the partition does not hold")
        rows = store._table.data["keys"][p]
        self.lists, self.sole = [], []
        for lid, at, brought in zip(list_ids.split(sizes.tolist()), slots.split(sizes.tolist()),
                                    sole.split(sizes.tolist())):
            self.lists.append((lid.clone(), *self._prepared(rows[at])))
            self.sole.append(brought.clone())

    def nbytes(self) -> int:
        """Bytes held: the key copy, the ids, the sample and its neighbours."""
        tensors = [self.queries, self.ids, self.centroids, self.owner, self.floor, *self.sole]
        tensors += [t for lists in self.lists for t in lists if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.metric == "l2" else torch.nn.functional.normalize(x, dim=1)

    def _near(self, routed: torch.Tensor) -> torch.Tensor:
        """Closeness ``(n, C)`` of routed queries to the centroids (larger is nearer)."""
        if self.metric == "l2":
            return torch.addmm(self._sq, routed, self.centroids.T, alpha=-2).neg_()     # 2 q.c - |c|^2
        return routed @ self.centroids.T

    def probes(self, queries: torch.Tensor, probes: int = PROBES) -> torch.Tensor:
        """The lists ``(n, r)`` each of ``queries (n, dim)`` scores: its ``probes`` nearest (r of them, r <= C)."""
        return self._near(self._route(queries)).topk(min(probes, len(self.centroids)), -1).indices

    def scored(self, queries: torch.Tensor, probes: int = PROBES) -> torch.Tensor:
        """Keys each of ``queries (n, dim)`` scores in the hub: ``(n,)`` (the centroids included)."""
        sizes = torch.tensor([len(lid) for lid, _, _ in self.lists])
        return sizes[self.probes(queries, probes)].sum(-1) + len(self.centroids)

    def candidates(self, store: AnnStore, p: int, queries: torch.Tensor, k: int,
                   leave_out: bool = False, probes: int = PROBES) -> torch.Tensor:
        """Slots ``(n, r * k)`` of the best ``k`` keys of each of the ``r`` lists probed (:meth:`probes`) for
        ``queries (n, dim)``; -1 pads. ``leave_out``: ``queries`` are the sample itself, in order, and none
        is handed the ids only it brought."""
        n = len(queries)
        probe = self.probes(queries, probes)                                            # (n, r)
        r = probe.shape[1]
        order = probe.view(-1).argsort()                                                # the pairs, list by list
        rows = order // r                                                               # their queries, in order
        asking = queries[rows]
        found, start = [], 0                       # each list's (m, k) best, gathered once at the end
        for c, m in enumerate(torch.bincount(probe.view(-1), minlength=len(self.lists)).tolist()):
            lid, keys, bias = self.lists[c]
            if not m:
                continue
            if not len(lid):                                                            # emptied by forget
                found.append(torch.full((m, k), -1, dtype=torch.long))
                start += m
                continue
            s = self._score(asking[start:start + m], keys, bias)                        # (m, L)
            if leave_out:
                s.masked_fill_(self.sole[c][None, :] == rows[start:start + m, None], NEG_INF)
            at = _best(s, k)
            got = lid[at]
            if leave_out:
                got.masked_fill_(s.gather(1, at) == NEG_INF, -1)
            if at.shape[1] < k:                                                         # a list shorter than k
                got = torch.nn.functional.pad(got, (0, k - at.shape[1]), value=-1)
            found.append(got)
            start += m
        out = torch.full((n * r, k), -1, dtype=torch.long)                              # row i * r + j: probe j of i
        if found:
            out.index_copy_(0, order, torch.cat(found))
        return torch.from_numpy(store._book.slots_in(p, out.view(n, -1).numpy(), strict=False))


def _best(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Columns ``(m, min(k, L))`` of the ``k`` best of each row of ``scores (m, L)``, in no order.
    NumPy's introselect: twice as fast as ``torch.topk`` on a list's scores (1,000 queries x 2 lists of
    ~1,000 keys each: 12 ms against 25 ms, one thread), and a list's best need no order (they are
    rescored)."""
    m, L = scores.shape
    if L <= k:
        return torch.arange(L).expand(m, L)
    return torch.from_numpy(np.argpartition(scores.numpy(), L - k, axis=1)[:, L - k:])


def kmeans(x: torch.Tensor, count: int, metric: str, seed: int, rounds: int = _ITERATIONS) -> torch.Tensor:
    """``count`` centroids of ``x (n, dim)``: spherical (unit centroids, cosine) unless ``metric`` is l2.
    Seeded; a centroid that loses all its points keeps its place. Written here rather than faiss's
    ``Kmeans`` so that the ``hnsw`` backend does not need faiss to import (``kvmem.backends()`` reports
    each library on its own)."""
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=g)[:count]].clone()
    for _ in range(rounds):
        if metric == "l2":
            near = torch.addmm(centroids.square().sum(1), x, centroids.T, alpha=-2).argmin(1)
        else:
            near = (x @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, near, x)
        sizes = torch.bincount(near, minlength=len(centroids))
        held = sizes > 0
        centroids[held] = sums[held] / sizes[held, None]
        if metric != "l2":
            centroids = torch.nn.functional.normalize(centroids, dim=1)
    return centroids


def merge(index: torch.Tensor, hub: torch.Tensor) -> torch.Tensor:
    """Candidate slots ``(n, a)`` and ``(n, b)`` as one ``(n, a + b)`` with duplicates made -1."""
    both = torch.cat([index, hub], 1).sort(-1).values
    both[:, 1:].masked_fill_(both[:, 1:] == both[:, :-1], -1)
    return both
