"""The dictionary-lookup task of :mod:`kvmem.benchmarks.fot_lookup`, its model, and CrossBatch training.

Tokens: ``SEP``, ``ASK``, ``values`` value tokens and ``keys`` key tokens.
A dictionary entry is ``SEP k1 k2 k3 v``; a query is ``ASK k1 k2 k3 v``: at
``k3`` the model must predict ``v``. In memory the row of ``v`` holds the
value token itself and, through the first layer's attention, the key tokens
before it; the query's row of ``k3`` holds the same key tokens.

Training documents (:func:`training_batch`) are windows of ``window`` tokens:
a window of entries, then a window of queries about them in random order, so
a query can be answered only through memory attention. Only the answers are
scored.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Task", "TrainConfig", "training_batch", "dictionary", "query_windows", "make_model", "train"]

SEP, ASK = 0, 1
SLOT = 5  # tokens of an entry or a query


@dataclass(frozen=True)
class Task:
    keys: int = 256  # key-token vocabulary; a key is 3 of them (keys ** 3 distinct keys)
    values: int = 64  # value tokens; chance is 1 / values
    window: int = 5  # tokens per window: window // 5 entries or queries

    @property
    def vocab(self) -> int:
        return 2 + self.values + self.keys

    @property
    def slots(self) -> int:
        return self.window // SLOT

    def entries(self, codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """codes (n,) in [0, keys**3), values (n,) -> (n, 5) tokens ``SEP k1 k2 k3 v``."""
        return torch.cat([torch.full_like(values, SEP)[:, None], self._key(codes), (2 + values)[:, None]], 1)

    def queries(self, codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(n,), (n,) -> (n, 5) tokens ``ASK k1 k2 k3 v``."""
        return torch.cat([torch.full_like(values, ASK)[:, None], self._key(codes), (2 + values)[:, None]], 1)

    def _key(self, codes: torch.Tensor) -> torch.Tensor:
        K = self.keys
        digits = torch.stack([codes // (K * K), (codes // K) % K, codes % K], 1)  # (n, 3)
        return 2 + self.values + digits


@dataclass(frozen=True)
class TrainConfig:
    d: int = 8  # CrossBatch documents per memory (1: own previous window only)
    d_warmup: int = 0  # first steps trained with d = 1 (the value path), then d
    docs: int = 32  # documents per batch
    windows: int = 2  # windows per document: entries, queries, entries, ...
    steps: int = 6000  # at most; training also stops at `minutes`
    minutes: float = 15.0
    lr: float = 5e-3
    warmup: int = 100
    positions: str = "none"  # memory position mode
    seed: int = 0


def training_batch(task: Task, docs: int, windows: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), both (docs, windows * window); labels are -100 except at the answers.

    Even windows hold ``slots`` entries, odd windows ``slots`` queries about the
    entries of the window before, in random order (as at evaluation: a window
    of queries, the dictionary in memory).
    """
    U = task.slots
    ids = torch.full((docs, windows, task.window), SEP, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for j in range(0, windows, 2):
        codes = torch.randint(0, task.keys**3, (docs, U), generator=gen)
        vals = torch.randint(0, task.values, (docs, U), generator=gen)
        ids[:, j, : U * SLOT] = task.entries(codes.flatten(), vals.flatten()).view(docs, -1)
        if j + 1 < windows:
            order = torch.argsort(torch.rand(docs, U, generator=gen), dim=1)  # (docs, U)
            q = task.queries(codes.gather(1, order).flatten(), vals.gather(1, order).flatten()).view(docs, U, SLOT)
            ids[:, j + 1, : U * SLOT] = q.view(docs, -1)
            labels[:, j + 1, 4 : U * SLOT : SLOT] = q[:, :, -1]
    return ids.view(docs, -1), labels.view(docs, -1)


def dictionary(task: Task, entries: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``entries`` distinct key codes (n,) and their values (n,)."""
    gen = torch.Generator().manual_seed(seed)
    if entries > task.keys**3:
        raise ValueError(f"entries: at most {task.keys ** 3} distinct keys, got {entries}")
    codes = torch.randperm(task.keys**3, generator=gen)[:entries]
    return codes, torch.randint(0, task.values, (entries,), generator=gen)


def query_windows(task: Task, codes: torch.Tensor, values: torch.Tensor, n: int, seed: int):
    """(ids (w, window), answer positions (w, slots), answers (w, slots)) for ``n`` distinct entries."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(codes), generator=gen)[:n]
    U = task.slots
    n = len(pick) // U * U
    q = task.queries(codes[pick[:n]], values[pick[:n]]).view(-1, U * SLOT)  # (w, U*5)
    ids = torch.full((q.shape[0], task.window), SEP, dtype=torch.long)
    ids[:, : U * SLOT] = q
    where = (torch.arange(U) * SLOT + 3).expand(q.shape[0], U)  # the k3 positions
    return ids, where, q.view(-1, U, SLOT)[:, :, -1]


def make_model(task: Task, seed: int = 0):
    """A 2-layer Llama (hidden 128, 4 query heads of dim 32, one key-value head), random."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=32, vocab_size=task.vocab,
                         max_position_embeddings=4 * task.window, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config)


MEMORY_LAYERS = [1]


def train(task: Task, config: TrainConfig, out: Path | None = None, log: Any = print) -> dict[str, Any]:
    """Train a fresh model with CrossBatch; save it (safetensors) under ``out``; return the log."""
    from kvmem.adapters import hf

    model = make_model(task, config.seed).train()
    adapter = hf.attach(model, backend="exact", layers=MEMORY_LAYERS, positions=config.positions,
                        chunk_size=task.window)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(config.seed + 1)
    losses, start = [], time.perf_counter()
    for phase_d, first, last in ((1, 0, config.d_warmup), (config.d, config.d_warmup, config.steps)):
        with adapter.crossbatch(d=phase_d, window=task.window) as step:
            for i in range(first, last):
                done = max(i / config.steps, (time.perf_counter() - start) / (60 * config.minutes))
                if done >= 1:
                    break
                lr = config.lr * min(1.0, (i + 1) / config.warmup) * (0.55 + 0.45 * math.cos(math.pi * done))
                for group in opt.param_groups:
                    group["lr"] = lr
                ids, labels = training_batch(task, config.docs, config.windows, gen)
                loss = step(ids, labels).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(loss.item())
                if i % 50 == 0:
                    log(f"step {i} d {phase_d} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                        f"({time.perf_counter() - start:.0f} s)")
    adapter.detach()
    record = {"task": asdict(task), "train": asdict(config), "steps": len(losses),
              "seconds": time.perf_counter() - start, "losses": losses,
              "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:]))}
    if out is not None:
        out = Path(out)
        model.save_pretrained(out)  # safetensors
        (out / "training.json").write_text(json.dumps(record))
    return record
