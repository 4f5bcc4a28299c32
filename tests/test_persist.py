"""Saves are atomic: a save killed at any step leaves the old save or the new one, never a mix.

Each case saves store A, then runs a child process that saves store B into the same directory and
is killed (SIGKILL, no clean-up) at one step of :func:`kvmem.persist.save`. The directory must then
load as A when the kill came before the manifest was replaced, as B after, and a later save must
clear what the killed one left behind.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import kvmem
from kvmem import persist

BACKENDS = {"exact": {}, "ivf": {"train_size": 64, "nlist": 4}, "hnsw": {}}

# (where the child dies, what it patches to die there, which save must load afterwards)
KILLS = {
    "data-written": ("persist._fsync_file", "old"),             # data files on disk, none fsynced
    "before-manifest": ("persist.os.replace", "old"),           # new manifest written beside the old one
    "after-manifest": ("persist.fsync_dir", "new"),             # manifest renamed, directory not yet synced
    "deleting-old-files": ("persist.Path.unlink", "new"),       # new save in place, old files half deleted
}


def _rows(seed, n):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, 8, generator=gen), torch.randn(2, n, 4, generator=gen)


def _store(backend, n, seed):
    store = kvmem.create(backend, dim=8, value_dim=4, partitions=2, dtype=torch.float32, **BACKENDS[backend])
    store.add(*_rows(seed, n))
    return store


def _child(backend, target, path):
    owner, name = target.rsplit(".", 1)
    return textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from kvmem import persist
        from test_persist import _store
        store = _store({backend!r}, 120, seed=1)
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        setattr({owner}, {name!r}, die)
        store.save({str(path)!r})
        print("the save finished: the kill point was never reached", flush=True)
    """)


# Every step for the exact backend; the two around the manifest for the backends with index files.
CASES = {"exact": list(KILLS), "ivf": ["before-manifest", "deleting-old-files"],
         "hnsw": ["before-manifest", "deleting-old-files"]}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_killed_save_leaves_the_old_save_or_the_new_one(backend, tmp_path):
    with _store(backend, 70, seed=0) as old:
        old.save(tmp_path / "old")
        queries = _rows(5, 3)[0]
        before = old.search(queries, 4)
    children = {}
    for kill in CASES[backend]:                                 # one child per kill point, all at once
        shutil.copytree(tmp_path / "old", tmp_path / kill)
        children[kill] = subprocess.Popen([sys.executable, "-c", _child(backend, KILLS[kill][0], tmp_path / kill)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for kill, proc in children.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (kill, proc.returncode, out, err[-2000:])
        path, survivor = tmp_path / kill, KILLS[kill][1]
        with kvmem.load(path) as loaded:
            assert len(loaded) == (2 * 70 if survivor == "old" else 2 * 120), kill
            if survivor == "old":
                assert torch.equal(loaded.search(queries, 4).ids, before.ids), kill
            loaded.save(path)                                   # a later save clears what the killed one left
        manifest = json.loads((path / persist.MANIFEST).read_text())
        names = [persist.MANIFEST, *(e["name"] for e in manifest["files"].values())]
        assert sorted(os.listdir(path)) == sorted(names), kill
