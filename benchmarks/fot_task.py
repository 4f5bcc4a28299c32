"""The dictionary-lookup task of :mod:`kvmem.benchmarks.fot_lookup`, its model, and CrossBatch training.

Tokens: ``SEP``, ``ASK``, ``values`` value tokens and ``keys`` key tokens for
each of the three key positions (``split``; or ``keys`` shared by all three).
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
    keys: int = 256  # key tokens per key position; a key is 3 of them (keys ** 3 distinct keys)
    values: int = 64  # value tokens; chance is 1 / values
    window: int = 5  # tokens per window: window // 5 entries or queries
    split: bool = True  # each key position has its own ``keys`` tokens (False: the three share them)

    @property
    def vocab(self) -> int:
        return 2 + self.values + self.keys * (3 if self.split else 1)

    @property
    def slots(self) -> int:
        return self.window // SLOT

    def entries(self, codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """codes (n,) in [0, keys**3), values (n,) -> (n, 5) tokens ``SEP k1 k2 k3 v``."""
        return torch.cat([torch.full_like(values, SEP)[:, None], self._key(codes), (2 + values)[:, None]], 1)

    def queries(self, codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(n,), (n,) -> (n, 5) tokens ``ASK k1 k2 k3 v``."""
        return torch.cat([torch.full_like(values, ASK)[:, None], self._key(codes), (2 + values)[:, None]], 1)

    def digits(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (n,) -> (n, 3): the key token index at each key position, before any offset."""
        K = self.keys
        return torch.stack([codes // (K * K), (codes // K) % K, codes % K], 1)

    def _key(self, codes: torch.Tensor) -> torch.Tensor:
        K = self.keys
        digits = self.digits(codes)  # (n, 3)
        if self.split:
            digits = digits + K * torch.arange(3, device=codes.device)
        return 2 + self.values + digits


@dataclass(frozen=True)
class TrainConfig:
    d: str = "1,2,4,8,16,32,64,128"  # CrossBatch documents per memory, a curriculum: next once the loss < `advance`
    advance: float = 0.3  # loss (mean of the last 50 steps) that moves training to the next d
    hard: float = 0.0  # in the last d: fraction of documents whose key is the previous one's, one token changed
    docs: int = 128  # documents per batch: d = docs puts every other one in each memory
    windows: int = 2  # windows per document: entries, queries, entries, ...
    steps: int = 6000  # at most; training also stops at `minutes`
    minutes: float = 25.0
    lr: float = 1e-3
    warmup: int = 100
    positions: str = "none"  # memory position mode
    hidden: int = 128
    heads: int = 4  # query heads of head_dim; one key-value head
    head_dim: int = 64
    seed: int = 0

    @property
    def schedule(self) -> list[int]:
        return [int(x) for x in str(self.d).split(",")]


def training_batch(task: Task, docs: int, windows: int, gen: torch.Generator,
                   hard: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), both (docs, windows * window); labels are -100 except at the answers.

    Even windows hold ``slots`` entries, odd windows ``slots`` queries about the
    entries of the window before, in random order (as at evaluation: a window
    of queries, the dictionary in memory). A ``hard`` fraction of documents
    take the keys of the document before with one key token changed: to its
    queries those are negatives that differ in one token, as in a large
    dictionary.
    """
    U = task.slots
    ids = torch.full((docs, windows, task.window), SEP, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for j in range(0, windows, 2):
        codes = _keys(task, docs, U, hard, gen)
        vals = torch.randint(0, task.values, (docs, U), generator=gen)
        ids[:, j, : U * SLOT] = task.entries(codes.flatten(), vals.flatten()).view(docs, -1)
        if j + 1 < windows:
            order = torch.argsort(torch.rand(docs, U, generator=gen), dim=1)  # (docs, U)
            q = task.queries(codes.gather(1, order).flatten(), vals.gather(1, order).flatten()).view(docs, U, SLOT)
            ids[:, j + 1, : U * SLOT] = q.view(docs, -1)
            labels[:, j + 1, 4 : U * SLOT : SLOT] = q[:, :, -1]
    return ids.view(docs, -1), labels.view(docs, -1)


def _keys(task: Task, docs: int, U: int, hard: float, gen: torch.Generator) -> torch.Tensor:
    """(docs, U) key codes; a ``hard`` fraction are the previous document's with one digit redrawn."""
    K = task.keys
    codes = torch.randint(0, K**3, (docs, U), generator=gen)
    if hard <= 0:
        return codes
    near = torch.rand(docs, generator=gen) < hard
    for b in range(1, docs):
        if near[b]:
            place = K ** torch.randint(0, 3, (U,), generator=gen)  # (U,) the digit to redraw
            old = codes[b - 1] // place % K
            new = (old + torch.randint(1, K, (U,), generator=gen)) % K
            codes[b] = codes[b - 1] + (new - old) * place
    return codes


def dictionary(task: Task, entries: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``entries`` distinct key codes (n,) and their values (n,)."""
    gen = torch.Generator().manual_seed(seed)
    if entries > task.keys**3:
        raise ValueError(f"entries: at most {task.keys ** 3} distinct keys, got {entries}")
    codes = torch.randperm(task.keys**3, generator=gen)[:entries]
    return codes, torch.randint(0, task.values, (entries,), generator=gen)


def query_windows(task: Task, codes: torch.Tensor, values: torch.Tensor, n: int, seed: int, skip: int = 0):
    """(ids (w, window), answer positions (w, slots), answer tokens (w, slots)) for ``n`` distinct entries.

    The entries are a seeded permutation's ``skip``-th to ``skip + n``-th: the
    same seed with ``skip = n`` asks ``n`` others.
    """
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(codes), generator=gen)[skip : skip + n]
    U = task.slots
    n = len(pick) // U * U
    q = task.queries(codes[pick[:n]], values[pick[:n]]).view(-1, U * SLOT)  # (w, U*5)
    ids = torch.full((q.shape[0], task.window), SEP, dtype=torch.long)
    ids[:, : U * SLOT] = q
    where = (torch.arange(U) * SLOT + 3).expand(q.shape[0], U)  # the k3 positions
    return ids, where, q.view(-1, U, SLOT)[:, :, -1]


def make_model(task: Task, config: TrainConfig | None = None):
    """A 2-layer Llama (``config``'s width, one key-value head), random (seeded by ``config.seed``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = TrainConfig() if config is None else config
    torch.manual_seed(config.seed)
    llama = LlamaConfig(hidden_size=config.hidden, intermediate_size=2 * config.hidden, num_hidden_layers=2,
                        num_attention_heads=config.heads, num_key_value_heads=1, head_dim=config.head_dim,
                        vocab_size=task.vocab, max_position_embeddings=4 * task.window, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(llama)


MEMORY_LAYERS = [1]


def train(task: Task, config: TrainConfig, out: Path | None = None, log: Any = print) -> dict[str, Any]:
    """Train a fresh model with CrossBatch; save it (safetensors) under ``out``; return the log.

    ``config.d`` is a curriculum: training moves to the next d once the mean
    loss of the last 50 steps of the current one is below ``config.advance``,
    and spends the rest of its steps or minutes on the last, where a
    ``config.hard`` fraction of documents are hard negatives (:func:`training_batch`).
    """
    from kvmem.adapters import hf

    model = make_model(task, config).train()
    adapter = hf.attach(model, backend="exact", layers=MEMORY_LAYERS, positions=config.positions,
                        chunk_size=task.window)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(config.seed + 1)
    losses: list[float] = []
    phases: list[tuple[int, int]] = []  # (d, first step)
    start, i, schedule = time.perf_counter(), 0, config.schedule
    for n, phase_d in enumerate(schedule):
        phases.append((phase_d, i))
        with adapter.crossbatch(d=phase_d, window=task.window) as step:
            while True:
                done = max(i / config.steps, (time.perf_counter() - start) / (60 * config.minutes))
                recent = losses[-50:] if i - phases[-1][1] >= 50 else [math.inf]
                if done >= 1 or (n + 1 < len(schedule) and sum(recent) / len(recent) < config.advance):
                    break
                lr = config.lr * min(1.0, (i + 1) / config.warmup) * (0.55 + 0.45 * math.cos(math.pi * done))
                for group in opt.param_groups:
                    group["lr"] = lr
                hard = config.hard if n + 1 == len(schedule) else 0.0
                ids, labels = training_batch(task, config.docs, config.windows, gen, hard)
                loss = step(ids, labels).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(loss.item())
                if i % 50 == 0:
                    log(f"step {i} d {phase_d} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                        f"({time.perf_counter() - start:.0f} s)")
                i += 1
        if done >= 1:
            break
    adapter.detach()
    record = {"task": asdict(task), "train": asdict(config), "steps": len(losses), "phases": phases,
              "seconds": time.perf_counter() - start, "losses": losses,
              "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:]))}
    if out is not None:
        out = Path(out)
        model.save_pretrained(out)  # safetensors
        (out / "training.json").write_text(json.dumps(record))
    return record
