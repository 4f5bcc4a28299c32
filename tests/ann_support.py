"""Helpers shared by the ``ivf`` and ``hnsw`` tests."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from kvmem.benchmarks.recall import recall_at_k

import kvmem
from kvmem.testing.child import load_in_child


def recall(store: kvmem.MemoryStore, data, truth, **params) -> float:
    ids = store.search(torch.from_numpy(data.queries), 32, **params).ids.numpy()
    return recall_at_k(ids, truth, data.base, data.queries)


def resave(directory: Path, role: str, data: bytes) -> None:
    """Replace one file of a save and recompute its manifest entry: a foreign file that passes the checksum."""
    manifest = json.loads((directory / "manifest.json").read_text())
    entry = manifest["files"][role]
    (directory / entry["name"]).write_bytes(data)
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))


def index_bytes_of(path: Path) -> bytes:
    """The bytes of partition 0's native index file in a save."""
    manifest = json.loads((path / "manifest.json").read_text())
    return (path / manifest["files"]["index.p0"]["name"]).read_bytes()


def assert_foreign_indexes_refused(good: Path, foreign: dict[str, bytes], work: Path, count: int) -> None:
    """Each ``foreign`` index file, put into a copy of the save ``good`` with a valid checksum, makes the
    loader (in a child process) raise CorruptStoreError, while ``good`` itself loads with ``count`` rows."""
    cases = []
    for name, blob in foreign.items():
        shutil.copytree(good, work / f"case-{name}")
        resave(work / f"case-{name}", "index.p0", blob)
        cases.append(work / f"case-{name}")
    results = load_in_child([good, *cases])
    assert results[0]["ok"] and results[0]["count"] == count
    for case, result in zip(cases, results[1:]):
        assert result["ok"] is False and result["error"] == "CorruptStoreError", (case.name, result)
