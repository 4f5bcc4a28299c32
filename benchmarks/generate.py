"""Tokens per second of greedy ``generate`` with a large memory, per backend, beside the model without memory.

A tiny random Llama (no download) gets a memory on its last layer through
``kvmem.adapters.hf.attach`` (positions "first", rolling local context of
``--window`` tokens, as LongLLaMA generates); the memory is filled directly
with random keys scaled like the model's own, ``--memory`` rows per kv head
for each size, then ``--new`` tokens are generated greedily after a short
prompt. Backends: ``exact``, ``ivf`` and ``hnsw`` retrieve the top ``--k``;
``dense`` is ``exact`` with ``k="all"`` (every row, streamed). The model
without memory runs the same generate in the same run; every figure is also
printed as a ratio to it.

    python -m kvmem.benchmarks.generate --memory 65536,1048576

Fill and index build times are reported apart; they are not part of the tokens per second.
"""

from __future__ import annotations

import argparse
import time

import torch
from kvmem.benchmarks.adapter_forward import fill, settings, timed, tiny_model
from kvmem.benchmarks.report import machine_info

import kvmem


def _generate(model, prompt, new):
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


def run(model, backend, rows, args, prompt, warm):
    from kvmem.adapters import hf

    name, k = ("exact", "all") if backend == "dense" else (backend, args.k)
    store_options, search_options = settings(name, argparse.Namespace(**{**vars(args), "memory": rows}))
    if name == "hnsw":
        store_options.update(M=args.M, ef_construction=args.ef_construction)
    adapter = hf.attach(model, backend=name, layers=[args.layers - 1], k=k, chunk_size=args.window,
                        store_options={"dtype": torch.float32, **store_options}, search_options=search_options)
    try:
        adapter.feed(warm)  # makes the store and gives the real key scale
        t0 = time.perf_counter()
        for i, store in adapter.stores.items():
            scale = store.get(torch.zeros(store.partitions, 1, dtype=torch.long))[0].float().std().item()
            fill(store, rows, scale or 1.0, args.fill_batch, seed=i)
        fill_s = time.perf_counter() - t0
        seconds = timed(lambda: _generate(model, prompt, args.new), args.repeats)
        opts = ", ".join(f"{a}={b}" for a, b in {**store_options, **search_options}.items())
        label = f"{backend} ({opts})" if opts and backend != "dense" else backend
        return {"backend": label, "rows": rows, "fill_s": fill_s, "tok_s": args.new / seconds}
    finally:
        adapter.detach()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", default="65536,1048576", help="comma-separated memory rows per kv head")
    p.add_argument("--backends", default="exact,ivf,hnsw,dense")
    p.add_argument("--new", type=int, default=32, help="tokens generated per timed call")
    p.add_argument("--window", type=int, default=64, help="local context (rolls into memory when full)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0: 4 * sqrt(memory))")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--ef", type=int, default=64)
    p.add_argument("--M", type=int, default=8, help="hnsw graph degree (small: the 1M build runs on 2 cores)")
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fill-batch", type=int, default=65536)
    args = p.parse_args(argv)

    model = tiny_model(args.hidden, args.layers, args.heads, args.kv_heads, args.vocab)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab, (1, 8), generator=gen)
    warm = torch.randint(0, args.vocab, (1, args.window), generator=gen)
    base = args.new / timed(lambda: _generate(model, prompt, args.new), args.repeats)
    result = {"machine": ", ".join(f"{k} {v}" for k, v in machine_info().items()),
              "setup": (f"{args.new} new tokens after an 8-token prompt, window {args.window}, k={args.k}, "
                        f"hidden {args.hidden}, {args.layers} layers (memory on the last), heads "
                        f"{args.heads}/{args.kv_heads}, head_dim {args.hidden // args.heads}, float32 store, "
                        f"torch threads {torch.get_num_threads()}"),
              "no_memory_tok_s": base, "rows": []}
    available = kvmem.backends()
    for rows in [int(x) for x in args.memory.split(",")]:
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            info = available.get("exact" if backend == "dense" else backend)
            if info is None or not info.available:
                result["rows"].append({"backend": backend, "rows": rows, "unavailable": "unavailable"})
                continue
            result["rows"].append(run(model, backend, rows, args, prompt, warm))
            print(render(result), flush=True)
    return result


def render(result: dict) -> str:
    base = result["no_memory_tok_s"]
    lines = [f"Greedy generate: {result['setup']}. Medians of the timed calls; ratios to the model "
             "without memory, same run.", "",
             "| backend | memory rows per kv head | fill+build s | tokens/s | x no memory |",
             "|---|---:|---:|---:|---:|", f"| (no memory) | 0 | - | {base:.1f} | 1.00 |"]
    for r in result["rows"]:
        if "unavailable" in r:
            lines.append(f"| {r['backend']} | {r['rows']:,} | - | unavailable | - |")
            continue
        lines.append(f"| {r['backend']} | {r['rows']:,} | {r['fill_s']:.1f} | {r['tok_s']:.1f} "
                     f"| {r['tok_s'] / base:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
