"""Every CUDA path of kvmem in one command, one line per check: ``PASS``/``FAIL``, name, figure.

    python -m kvmem.benchmarks.cuda_smoke                 # on the GPU (cuda), a few minutes
    python -m kvmem.benchmarks.cuda_smoke --device cpu    # tiny sizes, CUDA branches emulated (CI)

Checks: exact search for every storage dtype x metric x ranking against a
float64 brute force; a search of many blocks; the near-tie fallback of the
bfloat16 ranking; CPU stores asked with device queries; ``lmdb`` with and
without an index; ``MemoryAttention`` forward and backward in bfloat16; a
bfloat16 Hugging Face model fed, generating, saved and loaded (its stores stay
on its device); save/load keeping a store's device; search time and peak memory
of 1M x 128 bfloat16 keys (1 and 4,096 queries; ``--n`` to change); exactness
with TF32 switched on by the user. With ``--device cpu`` the sizes are tiny
(5,000 rows, 64 queries), torch uses one thread, and the CUDA-only branches run
under :data:`kvmem.devices.EMULATE_CUDA`. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import kvmem
from kvmem import devices, topk

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
METRICS = ("ip", "l2", "cos")
RANKINGS = ("auto", "bf16", "fp32")


class Smoke:
    def __init__(self, device: torch.device, n: int, small: int, many: int, work: Path) -> None:
        self.device, self.n, self.small, self.many, self.work = device, n, small, many, work
        self.failed = 0
        self.gen = torch.Generator().manual_seed(0)

    def run(self, name: str, check: Callable[[], str]) -> None:
        """Run one check; print ``PASS name figure`` or ``FAIL name why``."""
        try:
            figure = check()
            print(f"PASS  {name:<44} {figure}", flush=True)
        except Exception as exc:  # a smoke test reports every failure and goes on
            self.failed += 1
            where = traceback.extract_tb(exc.__traceback__)[-1]
            print(f"FAIL  {name:<44} {type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})",
                  flush=True)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def truth_scores(keys: torch.Tensor, queries: torch.Tensor, metric: str, k: int) -> torch.Tensor:
    """float64 top-k scores ``(P, q, k)`` over ``keys (P, n, d)`` (on the CPU)."""
    K, Q = keys.double().cpu(), queries.double().cpu()
    if metric == "l2":
        s = -(Q.pow(2).sum(-1)[..., None] - 2 * Q @ K.transpose(1, 2) + K.pow(2).sum(-1)[:, None])
    else:
        s = Q @ K.transpose(1, 2)
        if metric == "cos":
            s = s / (Q.norm(dim=-1)[..., None] * K.norm(dim=-1)[:, None])
    return s.topk(k, -1).values


def check_exact(result: kvmem.SearchResult, keys: torch.Tensor, queries: torch.Tensor, metric: str,
                k: int) -> float:
    """Raise unless ``result`` holds the true top-k scores; return the largest relative score error."""
    want = truth_scores(keys, queries, metric, k)
    got = result.scores.double().cpu()
    err = float(((got - want).abs() / (1 + want.abs().amax())).max())
    if err > 2e-5:
        raise AssertionError(f"scores differ from float64 brute force by {err:.2e} (relative)")
    return err


def stored(store: kvmem.MemoryStore) -> torch.Tensor:
    """The stored keys of every partition ``(P, n, dim)`` (all partitions hold n rows)."""
    n = store.count(0)
    return store.get(torch.arange(n).expand(store.partitions, n))[0]


def search_checks(s: Smoke) -> None:
    for dname, dtype in DTYPES.items():
        for metric in METRICS:
            for ranking in RANKINGS:
                def one(dtype=dtype, metric=metric, ranking=ranking) -> str:
                    store = kvmem.create("exact", dim=64, value_dim=8, partitions=2, metric=metric, dtype=dtype,
                                         device=s.device, ranking=ranking)
                    store.add(s.randn(2, s.small, 64), s.randn(2, s.small, 8))
                    queries = s.randn(2, 64, 64).to(s.device)
                    result = store.search(queries, 16)
                    assert result.scores.device == queries.device
                    return f"max rel err {check_exact(result, stored(store), queries, metric, 16):.1e}"
                s.run(f"exact {dname} {metric} {ranking}", one)


def multi_block(s: Smoke) -> str:
    store = kvmem.create("exact", dim=32, value_dim=1, partitions=3, metric="l2", dtype=torch.bfloat16,
                         device=s.device, block_elems=4096)
    store.add(s.randn(3, 4 * s.small, 32), torch.zeros(3, 4 * s.small, 1))
    queries = s.randn(3, 40, 32).to(s.device)
    err = check_exact(store.search(queries, 20), stored(store), queries, "l2", 20)
    return f"{4 * s.small // 1024} blocks, max rel err {err:.1e}"


@contextlib.contextmanager
def counting(module: object, name: str) -> Iterator[list[int]]:
    calls: list[int] = []
    original = getattr(module, name)
    setattr(module, name, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    try:
        yield calls
    finally:
        setattr(module, name, original)


def near_ties(s: Smoke) -> str:
    base = s.randn(1, 1, 32)
    store = kvmem.create("exact", dim=32, value_dim=1, partitions=2, dtype=torch.float32, device=s.device,
                         ranking="bf16")
    store.add(base + 1e-4 * s.randn(2, s.small, 32), torch.zeros(2, s.small, 1))
    queries = (base.expand(2, 16, 32) + 1e-3 * s.randn(2, 16, 32)).to(s.device)
    with counting(topk, "_redo") as calls:
        err = check_exact(store.search(queries, 10), stored(store), queries, "ip", 10)
    assert calls, "near-ties did not fail the bfloat16 certificate"
    return f"fallback ran {len(calls)}x, max rel err {err:.1e}"


def cpu_store_device_queries(s: Smoke) -> str:
    figures = []
    for backend in ("exact", "hnsw", "ivf"):
        store = kvmem.create(backend, dim=32, value_dim=4, partitions=2, dtype=torch.float16)
        store.add(s.randn(2, s.small, 32), s.randn(2, s.small, 4))
        queries = s.randn(2, 8, 32).to(s.device)
        result = store.search(queries, 8)
        assert all(t.device == queries.device for t in result), f"{backend} results left the queries' device"
        if backend == "exact":
            check_exact(result, stored(store), queries, "ip", 8)
        figures.append(backend)
    return "results on " + str(s.device) + ": " + ", ".join(figures)


def lmdb(s: Smoke, index: str | None) -> str:
    store = kvmem.create("lmdb", path=s.work / f"lmdb-{index}", dim=32, value_dim=4, partitions=2,
                         dtype=torch.float16, device=s.device, index=index, block_rows=1024)
    store.add(s.randn(2, 2 * s.small, 32), s.randn(2, 2 * s.small, 4))
    queries = s.randn(2, 32, 32).to(s.device)
    result = store.search(queries, 8)
    assert result.scores.device == queries.device
    keys = stored(store)
    store.close()
    if index is None:
        return f"max rel err {check_exact(result, keys, queries, 'ip', 8):.1e}"
    truth = kvmem.create("exact", dim=32, value_dim=1, partitions=2, dtype=torch.float16)
    truth.add(keys, torch.zeros(*keys.shape[:2], 1))
    want = truth.search(queries.cpu(), 8).ids
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(result.ids.cpu().flatten(0, 1),
                                                                        want.flatten(0, 1)))
    recall = hits / want.numel()
    assert recall >= 0.9, f"recall@8 {recall:.3f} < 0.9"
    return f"recall@8 {recall:.3f}"


def memory_attention(s: Smoke) -> str:
    from kvmem.adapters import MemoryAttention, RotaryEmbedding

    B, H, Hkv, d, T = 1, 4, 2, 32, 64
    store = kvmem.create("exact", dim=d, value_dim=d, partitions=B * Hkv, dtype=torch.bfloat16, device=s.device)
    attn = MemoryAttention(store, num_heads=H, k=16, positions="first", rope=RotaryEmbedding(d)).to(s.device)
    for _ in range(2):
        q = s.randn(B, H, T, d).to(s.device, torch.bfloat16).requires_grad_()
        k = s.randn(B, Hkv, T, d).to(s.device, torch.bfloat16).requires_grad_()
        v = s.randn(B, Hkv, T, d).to(s.device, torch.bfloat16).requires_grad_()
        out = attn(q, k, v)
        out.float().pow(2).sum().backward()
    assert out.dtype == torch.bfloat16 and out.device.type == s.device.type
    assert all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
    return f"{len(store)} rows, grad norm {float(q.grad.float().norm()):.3g}"


def hf_model(s: Smoke) -> str:
    from kvmem.adapters import hf
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = AutoModelForCausalLM.from_config(config).to(s.device, torch.bfloat16).eval()
    adapter = hf.attach(model, backend="exact", k=32, positions="first")
    adapter.feed(torch.randint(0, 128, (1, 512), generator=s.gen), chunk_size=128)
    where = {str(store.device) for store in adapter.stores.values()}
    assert where == {str(devices.resolve(s.device))}, f"stores on {where}, model on {s.device}"
    out = model.generate(torch.randint(0, 128, (1, 8), generator=s.gen).to(s.device), max_new_tokens=8,
                         do_sample=False, pad_token_id=0)
    adapter.save(s.work / "adapter")
    adapter.detach()
    adapter = hf.load(model, s.work / "adapter")
    back = {str(store.device) for store in adapter.stores.values()}
    assert back == where, f"loaded stores on {back}, saved from {where}"
    adapter.feed(torch.randint(0, 128, (1, 64), generator=s.gen))
    rows = len(adapter.stores[0])
    adapter.detach()
    return f"generated {out.shape[1] - 8} tokens, {rows} rows per layer, stores on {sorted(back)[0]}"


def save_load_device(s: Smoke) -> str:
    store = kvmem.create("exact", dim=16, value_dim=2, dtype=torch.float16, device=s.device)
    store.add(s.randn(100, 16), s.randn(100, 2))
    store.save(s.work / "store")
    back = kvmem.load(s.work / "store")
    assert back.device == store.device and len(back) == 100, (back.device, store.device)
    return f"saved and loaded on {back.device}"


def big_search(s: Smoke) -> str:
    store = kvmem.create("exact", dim=128, value_dim=1, dtype=torch.bfloat16, device=s.device)
    for first in range(0, s.n, 1 << 18):
        rows = min(1 << 18, s.n - first)
        store.add(torch.randn(rows, 128, generator=s.gen).to(s.device), torch.zeros(rows, 1, device=s.device))
    figures = []
    for q in (1, s.many):
        queries = torch.randn(q, 128, generator=s.gen).to(s.device)
        store.search(queries, 32)                                   # warm up
        times = []
        for _ in range(5):
            s.sync()
            start = time.perf_counter()
            result = store.search(queries, 32)
            s.sync()
            times.append(time.perf_counter() - start)
        peak = ""
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
            before = torch.cuda.memory_allocated(s.device)
            store.search(queries, 32)
            extra = torch.cuda.max_memory_allocated(s.device) - before
            budget = devices.search_budget(devices.free_bytes(s.device))
            assert extra <= budget + (64 << 20), f"a search held {extra >> 20} MiB, over its {budget >> 20} MiB budget"
            peak = f", peak +{extra / 2**20:.0f} MiB"
        sample = queries[:4]
        naive = (sample.float() @ stored_float(store).T).topk(32, -1).values
        gap = float((result.scores[:4] - naive).abs().max())
        assert gap <= 1e-3 * (1 + float(naive.abs().max())), f"scores differ from torch.topk(q @ K.T) by {gap}"
        figures.append(f"{q} q: {1e3 * statistics.median(times):.2f} ms{peak}")
    return f"{s.n} x 128 bf16: " + "; ".join(figures)


def stored_float(store: kvmem.MemoryStore) -> torch.Tensor:
    return store._table.data["keys"][0, :len(store)].float()


def tf32(s: Smoke) -> str:
    store = kvmem.create("exact", dim=256, value_dim=1, partitions=2, dtype=torch.float32, device=s.device,
                         ranking="fp32")
    store.add(s.randn(2, s.small, 256), torch.zeros(2, s.small, 1))
    queries = s.randn(2, 64, 256).to(s.device)
    saved = [devices._get(obj, name) for obj, name, _ in devices._switches()]
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    try:
        user = [devices._get(obj, name) for obj, name, _ in devices._switches()]
        err = check_exact(store.search(queries, 16), stored(store), queries, "ip", 16)
        after = [devices._get(obj, name) for obj, name, _ in devices._switches()]
        assert after == user, f"the user's matmul settings were not restored: {after} != {user}"
    finally:
        for (obj, name, _), value in zip(devices._switches(), saved):
            devices._set(obj, name, value)
    return f"TF32 on: max rel err {err:.1e}, settings restored"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (tiny, emulated)")
    parser.add_argument("--n", type=int, default=None, help="rows of the big search (1M on CUDA, 20k on CPU)")
    args = parser.parse_args(argv)
    device = devices.resolve(args.device)
    cpu = device.type == "cpu"
    if cpu:
        devices.EMULATE_CUDA = True
        torch.set_num_threads(1)              # tiny matmuls: more threads only contend
    n = args.n or (5_000 if cpu else 1_000_000)
    name = "CPU, CUDA branches emulated" if cpu else torch.cuda.get_device_name(device)
    capability = devices.capability(device)
    print(f"kvmem cuda smoke on {device} ({name}, capability {capability[0]}.{capability[1]}), "
          f"torch {torch.__version__}; auto ranking {topk.fast_rank_dtype(device)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kvmem-smoke-") as tmp:
        s = Smoke(device, n, 500 if cpu else 20_000, 64 if cpu else 4096, Path(tmp))
        search_checks(s)
        s.run("multi-block search", lambda: multi_block(s))
        s.run("near-tie fallback", lambda: near_ties(s))
        s.run("CPU stores, device queries", lambda: cpu_store_device_queries(s))
        s.run("lmdb exact", lambda: lmdb(s, None))
        s.run("lmdb with an hnsw index", lambda: lmdb(s, "hnsw"))
        s.run("MemoryAttention bf16 forward+backward", lambda: memory_attention(s))
        s.run("HF bf16 feed/generate/save/load", lambda: hf_model(s))
        s.run("save/load keeps the device", lambda: save_load_device(s))
        s.run("big search", lambda: big_search(s))
        s.run("exact under TF32", lambda: tf32(s))
    print(f"{'all checks passed' if not s.failed else f'{s.failed} check(s) FAILED'}", flush=True)
    return 1 if s.failed else 0


if __name__ == "__main__":
    sys.exit(main())
