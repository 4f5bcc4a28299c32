"""Why a lookup model misses in a large dictionary: its memory layer's scores, by kind of distractor.

For a checkpoint of :mod:`kvmem.benchmarks.fot_lookup` (positions ``"none"``)
and ``entries`` dictionary entries, scores each query's ``k3`` row (the row
that predicts the value) against every row the dictionary writes to memory,
as exact search ranks them (``q . k * scaling``, per query head), and reports:

- the rank of the true row (the entry's value row) per head, and how often it
  is first, or within the top ``k`` of some head;
- for value rows of other entries, grouped by how many key tokens they share
  with the query (0, 1 or 2), how many there are per query, how far the best
  of them lies below the true row (median), and how often it beats it;
- the same for the rows that are not value rows;
- how much of the spread of value-row scores each key position and the
  value token explain (between-group variance).

    python -m kvmem.benchmarks.fot_margins --model fot-run/crossbatch --entries 200000
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .fot_task import MEMORY_LAYERS, SLOT, Task, dictionary

__all__ = ["margins", "main"]

CHUNK = 8192  # entries per forward and per block of scores


def margins(path: Path, entries: int, queries: int = 200, k: int = 4, seed: int = 0) -> dict[str, Any]:
    """The score analysis above for the checkpoint at ``path``; a JSON-ready dict."""
    from transformers import AutoModelForCausalLM

    record = json.loads((Path(path) / "training.json").read_text())
    if record["train"]["positions"] != "none":
        raise ValueError("fot_margins: scores unrotated keys; the model must use positions='none'")
    task = Task(**record["task"])
    if task.window != SLOT:
        raise ValueError(f"fot_margins: reads one entry per window; the model's window is {task.window} tokens")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    codes, values = dictionary(task, entries, seed)
    pick = torch.randperm(entries, generator=torch.Generator().manual_seed(seed + 1))[:queries]
    K = _projected(model, task.entries(codes, values), "k")  # (N, 5, dh)
    Q = _projected(model, task.queries(codes[pick], values[pick]), "q")[:, 3]  # (n, dh * H) at k3
    n, dh = len(pick), K.shape[-1]
    Q = Q.view(n, -1, dh)
    scaling = model.model.layers[MEMORY_LAYERS[0]].self_attn.scaling
    true = torch.einsum("qhd,qd->qh", Q, K[pick, SLOT - 1]) * scaling  # (n, H)
    digits = task.digits(codes)  # (N, 3)
    above = torch.zeros(n, Q.shape[1], dtype=torch.long)
    best = torch.full((4, n, Q.shape[1]), -torch.inf)  # value rows sharing 0, 1, 2, 3 key tokens
    count = torch.zeros(4, n)
    other = torch.full((n, Q.shape[1]), -torch.inf)  # rows that are not value rows
    groups = {"k1": digits[:, 0], "k2": digits[:, 1], "k3": digits[:, 2], "value": values}
    sums = {g: torch.zeros(n, Q.shape[1], int(t.max()) + 1) for g, t in groups.items()}
    total, total_sq = torch.zeros(n, Q.shape[1]), torch.zeros(n, Q.shape[1])
    for first in range(0, entries, CHUNK):
        rows = slice(first, min(first + CHUNK, entries))
        s = torch.einsum("qhd,nkd->qhnk", Q, K[rows]) * scaling  # (n, H, c, 5)
        above += (s.flatten(2) > true[..., None]).sum(-1)
        shared = (digits[rows][None] == digits[pick][:, None]).sum(-1)  # (n, c)
        vs = s[..., SLOT - 1]  # (n, H, c): value rows
        for c in range(4):
            mask = shared == c
            count[c] += mask.sum(1)
            best[c] = torch.maximum(best[c], vs.masked_fill(~mask[:, None], -torch.inf).amax(-1))
        other = torch.maximum(other, s[..., : SLOT - 1].flatten(2).amax(-1))
        for g, t in groups.items():
            sums[g].index_add_(2, t[rows], vs)
        total += vs.sum(-1)
        total_sq += (vs * vs).sum(-1)
    mean = total / entries
    variance = total_sq / entries - mean**2
    explained = {}
    for g, t in groups.items():
        sizes = torch.bincount(t, minlength=sums[g].shape[-1]).float()
        group_mean = sums[g] / sizes.clamp(min=1)
        explained[g] = float((((group_mean - mean[..., None]) ** 2) * sizes).sum(-1).div(entries).mean())
    out: dict[str, Any] = {
        "entries": entries, "queries": n, "rows": entries * SLOT, "k": k,
        "true_first_per_head": (above == 0).float().mean(0).tolist(),
        "true_in_top_k_of_some_head": float((above < k).any(1).float().mean()),
        "true_score_median": float(true.median()), "value_row_score_mean": float(mean.mean()),
        "value_row_score_std": float(variance.clamp(min=0).sqrt().mean()),
        "variance_explained": explained, "value_row_variance": float(variance.mean()),
        "distractors": [],
    }
    for c in range(3):
        if count[c].sum() == 0:
            continue
        seen = best[c] > -torch.inf
        out["distractors"].append({
            "shared_key_tokens": c, "per_query": float(count[c].mean()),
            "true_minus_best_median": float((true - best[c])[seen].median()),
            "beats_true": float((best[c] > true).float().mean()),
        })
    out["other_rows"] = {"true_minus_best_median": float((true - other).median()),
                         "beats_true": float((other > true).float().mean())}
    return out


def _projected(model, ids: torch.Tensor, which: str) -> torch.Tensor:
    """``(n, 5, e)``: the memory layer's ``q_proj`` or ``k_proj`` output for windows ``ids (n, 5)``."""
    proj = getattr(model.model.layers[MEMORY_LAYERS[0]].self_attn, f"{which}_proj")
    held: list[torch.Tensor] = []
    hook = proj.register_forward_hook(lambda m, i, o: held.append(o))
    try:
        with torch.no_grad():
            for first in range(0, len(ids), CHUNK):
                rows = ids[first : first + CHUNK]
                model(input_ids=rows, position_ids=torch.arange(SLOT).expand(len(rows), SLOT), use_cache=False)
    finally:
        hook.remove()
    return torch.cat(held).view(len(ids), SLOT, -1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(margins(Path(args.model), args.entries, args.queries, args.k), indent=1))


if __name__ == "__main__":
    main()
