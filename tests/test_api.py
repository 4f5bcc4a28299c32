"""kvmem.create / load / backends and the registry: names, hints, plugins, read-only views."""

import subprocess
import sys
import textwrap

import pytest
import torch

import kvmem
from kvmem.registry import registry


def test_backends_stays_callable_after_every_backend_is_imported():
    for name, info in kvmem.backends().items():
        if info.available:
            registry[name]
    info = kvmem.backends()
    assert callable(kvmem.backends) and info["exact"].available and info["exact"].reason is None


def test_the_registry_is_a_read_only_mapping_of_classes():
    assert set(registry) >= {"exact", "ivf", "hnsw", "lmdb"}
    assert issubclass(registry["exact"], kvmem.MemoryStore) and registry["exact"].backend == "exact"
    with pytest.raises(TypeError):
        registry["mine"] = object            # type: ignore[index]
    with pytest.raises(TypeError):
        registry.specs["exact"] = None       # type: ignore[index]
    with pytest.raises(KeyError):
        registry["nope"]


def _child(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_a_missing_library_names_the_extra_to_install():
    out = _child("""
        import sys
        sys.modules["hnswlib"] = None          # hnswlib cannot be imported in this process
        import kvmem
        try:
            kvmem.create("hnsw", dim=4)
        except ImportError as exc:             # BackendUnavailableError is an ImportError
            print(type(exc).__name__, exc)
        print("reason:", kvmem.backends()["hnsw"].reason)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("BackendUnavailableError") and 'pip install "kvmem[hnsw]"' in out.stdout
    assert "reason: backend 'hnsw' needs hnswlib" in out.stdout


def test_third_party_backends_join_through_entry_points(tmp_path):
    dist = tmp_path / "kvmem_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvmem-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kvmem.backends]\nmirror = kvmem_plugin:MirrorStore\n")
    (tmp_path / "kvmem_plugin.py").write_text(textwrap.dedent("""
        from kvmem.stores.exact import ExactStore

        class MirrorStore(ExactStore):
            backend = "mirror"
    """))
    out = _child("""
        import torch, kvmem
        store = kvmem.create("mirror", dim=4, value_dim=1)
        store.add(torch.randn(5, 4), torch.zeros(5, 1))
        print(store.backend, len(store), kvmem.backends()["mirror"].available)
    """, PYTHONPATH=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["mirror", "5", "True"]


def test_value_dim_defaults_to_dim_and_dtype_names_are_accepted():
    store = kvmem.create("exact", dim=6, dtype="bf16")
    assert store.value_dim == 6 and store.dtype == torch.bfloat16
    assert "ExactStore(backend='exact', dim=6, value_dim=6" in repr(store)


def test_in_ram_backends_take_no_path(tmp_path):
    with pytest.raises(kvmem.InvalidInputError, match="use save"):
        kvmem.create("exact", dim=4, path=tmp_path / "x")


def test_every_package_folder_is_in_the_wheel():
    """An installed (non-editable) kvmem holds only the packages pyproject names: a new subpackage left out of
    that list imports from a checkout and is missing from every wheel."""
    import pathlib

    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    root = pathlib.Path(__file__).resolve().parents[1]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"kvmem": "kvmem", **tool["package-dir"]}
    found = {".".join([name, *init.parent.relative_to(root / folder).parts])
             for name, folder in folders.items() for init in (root / folder).glob("**/__init__.py")}
    assert found and found == set(tool["packages"])
