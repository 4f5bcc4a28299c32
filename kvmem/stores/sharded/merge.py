"""Merging the shards' answers on the driver: one top-k out of ``world`` top-k lists, and rows by id."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["merge_topk", "split_ids", "place_rows"]


def merge_topk(answers: list[list[torch.Tensor]], k: int) -> tuple[torch.Tensor, ...]:
    """The best ``k`` of every shard's ``[scores (P, q, k), ids, keys (P, q, k, dim), values]``.

    Ties in score go to the smaller id, so the answer does not depend on the order of the shards.
    """
    scores = torch.cat([a[0] for a in answers], -1)                                  # (P, q, W*k)
    ids = torch.cat([a[1] for a in answers], -1)                                     # (P, q, W*k)
    by_id = torch.where(ids >= 0, ids, torch.iinfo(torch.int64).max).argsort(dim=-1, stable=True)
    by_score = scores.gather(-1, by_id).argsort(dim=-1, descending=True, stable=True)
    pick = by_id.gather(-1, by_score)[..., :k]                                         # (P, q, k)
    out = [scores.gather(-1, pick), ids.gather(-1, pick)]
    for j in (2, 3):
        rows = torch.cat([a[j] for a in answers], -2)                                  # (P, q, W*k, width)
        out.append(rows.gather(-2, pick[..., None].expand(*pick.shape, rows.shape[-1])))
    return tuple(out)


def split_ids(ids: np.ndarray, world: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per rank, ``(ids (P, m_r), columns (P, m_r))``: that rank's ids of ``ids (P, m)`` packed to the
    left (``-1`` padded) and the column each came from (``-1`` there)."""
    P, m = ids.shape
    out = []
    for r in range(world):
        mine = (ids >= 0) & (ids % world == r)                                        # (P, m)
        width = int(mine.sum(1).max(initial=0))
        packed = np.full((P, width), -1, np.int64)
        cols = np.full((P, width), -1, np.int64)
        for p in range(P):
            where = np.flatnonzero(mine[p])
            packed[p, :len(where)], cols[p, :len(where)] = ids[p, where], where
        out.append((packed, cols))
    return out


def place_rows(shape: tuple[int, int], parts: list[tuple[np.ndarray, torch.Tensor]]) -> torch.Tensor:
    """Rows ``(P, m, width)`` from each rank's ``(columns (P, m_r), rows (P, m_r, width))``; zeros elsewhere."""
    first = parts[0][1]
    out = torch.zeros((*shape, first.shape[-1]), dtype=first.dtype, device=first.device)
    for cols, rows in parts:
        p, j = np.nonzero(cols >= 0)
        if len(p):
            out[torch.from_numpy(p), torch.from_numpy(cols[p, j])] = rows[torch.from_numpy(p), torch.from_numpy(j)]
    return out
