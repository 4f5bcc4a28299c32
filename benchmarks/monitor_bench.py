"""The recall monitor: its estimate against the true recall, and its cost in QPS.

    python -m kvmem.benchmarks.monitor_bench --size 50000 --dim 64

One ``ood`` dataset; per monitor rate (0, 0.01, 0.1), an ``ivf`` store at its
defaults is asked the dataset's asked queries, frozen, and searched with the
held-out queries in batches of 100 (``repeats`` rounds); the table gives the
monitor's estimate and interval once its queue has drained, the true recall of
the same searches, and QPS relative to the store without a monitor.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
import torch

import kvmem

from .contenders import add_rows
from .datasets import ood
from .recall import ground_truth, recall_at_k


def run(size: int, dim: int, repeats: int, rates: Sequence[float] = (0.0, 0.01, 0.1)) -> list[dict]:
    data = ood(size, dim, queries=1000, asked=1000)
    truth = ground_truth(data.base, data.queries, 32, data.metric)
    rows = []
    for rate in rates:
        store = kvmem.create("ivf", dim=dim, value_dim=1, dtype=torch.float32, monitor=rate)
        add_rows(store, data.base)
        for lo in range(0, len(data.asked), 100):
            store.search(torch.from_numpy(data.asked[lo:lo + 100]), 32)
        store._settle()
        store.freeze()
        store._monitor.reset()
        q = torch.from_numpy(np.ascontiguousarray(data.queries))
        start, ids = time.perf_counter(), []
        for _ in range(repeats):
            ids = [store.search(q[lo:lo + 100], 32).ids.numpy() for lo in range(0, len(q), 100)]
        secs = time.perf_counter() - start
        store._monitor.wait()
        est = store.stats()["monitor"]
        rows.append({"rate": rate, "qps": repeats * len(q) / secs, "true": recall_at_k(np.concatenate(ids), truth,
                     data.base, data.queries, 32), **{k: est[k] for k in ("checked", "recall", "low", "high")}})
        store.close()
    base = rows[0]["qps"]
    print("| monitor rate | rows checked | estimate [95% interval] | true recall | QPS vs no monitor |")
    print("|---|---|---|---|---|")
    for r in rows:
        est = "–" if r["recall"] is None else f"{r['recall']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"
        print(f"| {r['rate']} | {r['checked']} | {est} | {r['true']:.3f} | {r['qps'] / base:.2f} |")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    run(args.size, args.dim, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
