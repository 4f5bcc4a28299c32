"""Peak memory of dense memory attention (``k="all"``): a window of queries over a large memory.

One LongLLaMA-3B-shaped attention call (``--heads`` heads of ``--head-dim``,
MHA) through :func:`kvmem.adapters.memory_attention`: ``--window`` queries
attend to their causal window and to every one of ``--memory`` rows per head
in an ``exact`` store. The process's resident memory is sampled every 2 ms
during the call; the figure is the peak above the resident memory before the
call, with the memory full and, in the same run, empty (local attention
only): their difference is what holding the memory costs. The gather a
top-k of k = memory would need, ``(B, H, T, k, d)`` keys and values in
float32, is printed beside it for scale (not run).

    python -m kvmem.benchmarks.dense_memory                     # 32k memory, 2048-token window
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from kvmem.adapters import memory_attention

import kvmem

_PAGE = 4096


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_during(fn) -> tuple[int, float]:
    """(peak resident bytes above the start, seconds) of ``fn()``, sampled every 2 ms."""
    start, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss() - start)
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    return max(peak[0], rss() - start), seconds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", type=int, default=32768, help="memory rows per head")
    p.add_argument("--window", type=int, default=2048, help="queries (and local keys) in the call")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=100)
    args = p.parse_args(argv)
    H, d, T, M = args.heads, args.head_dim, args.window, args.memory
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, d, generator=gen) for _ in range(3))
    store = kvmem.create("exact", dim=d, value_dim=d, partitions=H, dtype=torch.float32)
    empty_peak, empty_s = peak_during(lambda: memory_attention(q, k, v, store, "all", write=False))
    for s in range(0, M, 4096):
        n = min(4096, M - s)
        store.add(torch.randn(H, n, d, generator=gen) * 0.3, torch.randn(H, n, d, generator=gen))
    full_peak, full_s = peak_during(lambda: memory_attention(q, k, v, store, "all", write=False))
    gather = 2 * H * T * M * d * 4
    result = {"setup": f"{H} heads x head_dim {d}, window {T} queries, memory {M:,} rows per head, float32, "
                       f"torch threads {torch.get_num_threads()}",
              "empty_peak": empty_peak, "full_peak": full_peak, "empty_s": empty_s, "full_s": full_s,
              "store_bytes": store.nbytes(), "gather_bytes": gather}
    print(render(result))
    return result


def render(r: dict) -> str:
    gb = 1 << 30
    return "\n".join([
        f"Dense memory attention (k=\"all\"): {r['setup']}.", "",
        "| memory | peak RSS above the call's start | seconds |", "|---|---:|---:|",
        f"| empty (local attention only) | {r['empty_peak'] / gb:.2f} GB | {r['empty_s']:.1f} |",
        f"| full | {r['full_peak'] / gb:.2f} GB | {r['full_s']:.1f} |",
        "", f"Extra for holding the memory: {(r['full_peak'] - r['empty_peak']) / gb:.2f} GB "
            f"(the store itself: {r['store_bytes'] / gb:.2f} GB, allocated before the call); a (B, H, T, k, d) "
            f"gather of keys and values at k = memory would be {r['gather_bytes'] / gb:.0f} GB.", ""])


if __name__ == "__main__":
    main()
