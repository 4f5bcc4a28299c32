"""Forward time of one chunk through a tiny HF model with a large kvmem memory, per backend.

For each backend: a tiny random Llama (no download) gets a memory on its last
layer(s) through ``kvmem.adapters.hf.attach``; the memory is filled directly
with ``--memory`` rows per key-value head (random keys scaled like the model's
own keys, so the index sees a realistic spread), then one ``--chunk``-token
window is timed twice: a plain forward, which reads memory, and ``feed``,
which reads memory and then writes the window into it. The same model without memory is
timed in the same run and every figure is printed as a ratio to it.

    python -m kvmem.benchmarks.adapter_forward                      # 1M tokens per kv head
    python -m kvmem.benchmarks.adapter_forward --memory 20000 --backends exact,hnsw

Fill and build times are reported apart from the forward; they are not part
of the ratio. CPU only, torch threads as set by ``--threads``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from kvmem.benchmarks.report import machine_info

import kvmem


def settings(backend: str, args) -> tuple[dict, dict]:
    """(store_options, search_options) for ``backend``, using only the names it declares."""
    cls = kvmem.registry.resolve(backend)
    store, search = {}, {}
    accepted = cls.search_params if isinstance(cls.search_params, frozenset) else frozenset()   # lmdb: per store
    if "nlist" in cls.defaults:
        store["nlist"] = args.nlist or max(1, int(4 * args.memory**0.5))
    if "nprobe" in accepted:
        search["nprobe"] = args.nprobe
    for name in ("ef", "ef_search"):
        if name in accepted:
            search[name] = args.ef
    return store, search


def tiny_model(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def fill(store, rows: int, scale: float, batch: int, seed: int) -> None:
    """Add ``rows`` random rows to every partition of ``store``, ``batch`` rows at a time."""
    gen = torch.Generator().manual_seed(seed)
    P, d, dv = store.partitions, store.dim, store.value_dim
    done = len(store) // P
    while done < rows:
        n = min(batch, rows - done)
        keys = torch.randn(P, n, d, generator=gen) * scale  # (P, n, d)
        values = torch.randn(P, n, dv, generator=gen)  # (P, n, dv)
        store.add(keys, values)
        done += n


def run_backend(model, backend, args, chunk, rest):
    store_options, search_options = settings(backend, args)
    store_options = {"dtype": getattr(torch, args.dtype), **store_options}
    with tempfile.TemporaryDirectory(prefix="kvmem-bench-") as tmp:
        if backend == "lmdb":
            store_options.setdefault("path", tmp)
        return _run(model, backend, args, chunk, rest, store_options, search_options)


def _run(model, backend, args, chunk, rest, store_options, search_options):
    from kvmem.adapters import hf

    layers = "all" if args.memory_layers == "all" else list(range(args.layers - int(args.memory_layers), args.layers))
    adapter = hf.attach(model, backend=backend, layers=layers, k=args.k, positions=args.positions,
                        store_options=store_options, search_options=search_options, chunk_size=args.chunk)
    try:
        adapter.feed(rest)  # makes the stores and gives the real key scale
        t0 = time.perf_counter()
        for i, store in adapter.stores.items():
            scale = store.get(torch.zeros(store.partitions, 1, dtype=torch.long))[0].float().std().item()
            fill(store, args.memory, scale or 1.0, args.fill_batch, seed=i)
        fill_s = time.perf_counter() - t0
        rows = {i: len(s) // s.partitions for i, s in adapter.stores.items()}

        def read():
            with torch.no_grad():
                model(chunk, use_cache=False)  # outside feed: memory is read, not written

        read_s = timed(read, args.repeats)
        feed_s = timed(lambda: adapter.feed(chunk), args.repeats)
        return fill_s, read_s, feed_s, rows
    finally:
        adapter.detach()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", type=int, default=1_000_000, help="memory rows per kv head (tokens)")
    p.add_argument("--chunk", type=int, default=512, help="tokens in the timed window")
    p.add_argument("--backends", default="exact,ivf,hnsw,lmdb", help="comma-separated backend names")
    p.add_argument("--k", type=int, default=32, help="memory keys per query")
    p.add_argument("--positions", default="first", choices=["first", "absolute", "none"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--memory-layers", default="1", help='"all" or how many last layers get memory')
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0: 4 * sqrt(memory))")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists searched per query")
    p.add_argument("--ef", type=int, default=128, help="HNSW search breadth")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fill-batch", type=int, default=65536)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = tiny_model(args.hidden, args.layers, args.heads, args.kv_heads, args.vocab)
    gen = torch.Generator().manual_seed(1)
    chunk = torch.randint(0, args.vocab, (1, args.chunk), generator=gen)
    rest = torch.randint(0, args.vocab, (1, args.chunk), generator=gen)

    def plain():
        with torch.no_grad():
            model(chunk, use_cache=False)

    base = timed(plain, args.repeats)
    head_dim = args.hidden // args.heads
    result = {"machine": ", ".join(f"{k} {v}" for k, v in machine_info().items()),
              "setup": (f"chunk {args.chunk} tokens, memory {args.memory:,} tokens per kv head, k={args.k}, "
                        f"positions={args.positions}, hidden {args.hidden}, layers {args.layers} "
                        f"(memory on {args.memory_layers}), heads {args.heads}/{args.kv_heads}, head_dim "
                        f"{head_dim}, store {args.dtype}, torch threads {torch.get_num_threads()}"),
              "no_memory_s": base, "rows": []}
    available = kvmem.backends()
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        info = available.get(backend)
        if info is None or not info.available:
            reason = "not registered" if info is None else info.reason
            result["rows"].append({"backend": backend, "unavailable": reason})
            continue
        store_options, search_options = settings(backend, args)
        fill_s, read_s, feed_s, rows = run_backend(model, backend, args, chunk, rest)
        opts = ", ".join(f"{k}={v}" for k, v in {**store_options, **search_options}.items())
        result["rows"].append({"backend": f"{backend} ({opts})" if opts else backend, "rows": min(rows.values()),
                               "fill_s": fill_s, "read_s": read_s, "feed_s": feed_s})
    print(render(result))
    return result


def render(result: dict) -> str:
    """The Markdown table of one run: forward time per backend beside the model without memory."""
    base = result["no_memory_s"]
    lines = [f"Adapter forward: {result['setup']}. Medians of the timed calls; ratios to the model without "
             "memory, same run.", "",
             "| backend | rows per kv head | fill+build s | forward s (read) | x no memory "
             "| feed s (read + write) | x no memory |", "|---|---:|---:|---:|---:|---:|---:|",
             f"| (no memory) | 0 | - | {base:.4f} | 1.00 | - | - |"]
    for r in result["rows"]:
        if "unavailable" in r:
            lines.append(f"| {r['backend']} | - | - | unavailable: {r['unavailable']} | - | - | - |")
            continue
        lines.append(f"| {r['backend']} | {r['rows']:,} | {r['fill_s']:.1f} | {r['read_s']:.4f} "
                     f"| {r['read_s'] / base:.2f} | {r['feed_s']:.4f} | {r['feed_s'] / base:.2f} |")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
