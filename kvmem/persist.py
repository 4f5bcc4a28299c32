"""The saved-store format, written once for every backend.

A save is a directory::

    manifest.json                  format, version, backend, config, device, counts, next ids, files
    rows.<tag>.safetensors         keys, values and ids (in-RAM backends)
    <index>.<tag>.<ext>            backend files (faiss index, hnswlib graph, ...)

``manifest.json`` names every data file with its size and SHA-256. Saving
writes new data files under a fresh ``tag``, fsyncs them, then replaces the
manifest atomically (write, fsync, rename, fsync the directory) and only then
deletes the previous save's files: a crash at any moment leaves the old save
or the new one, never a mix. Loading parses the manifest with a size limit,
validates every field and checks every file's size and checksum before any
loader (safetensors, ``faiss.read_index``, ``hnswlib``) sees a byte. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmem.config import StoreConfig
from kvmem.devices import device_name, valid_name
from kvmem.errors import CorruptStoreError, InvalidInputError, KvmemError, path_error

if TYPE_CHECKING:
    from kvmem.store import MemoryStore

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "save", "check_target", "manifest_of", "write_manifest",
           "read_manifest", "verify_files", "fsync_dir"]

FORMAT = "kvmem-store"
FORMAT_VERSION = 2                  # 2: the manifest records the store's device
MANIFEST = "manifest.json"
_MANIFEST_LIMIT = 16 << 20          # bytes; a manifest is a few KB
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_OURS = re.compile(r"^([A-Za-z0-9_-]+\.[0-9a-f]{12}(\..*)?|\.manifest\.json\.[0-9a-f]{12}\.tmp)$")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def check_target(path: Path) -> None:
    """Raise unless ``path`` can receive a save: absent, empty, or holding a kvmem save."""
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"save path must be a directory or not exist; {path} is a file")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).exists():
        raise InvalidInputError(f"refusing to save into {path}: it is not empty and holds no kvmem save")


def manifest_of(store: MemoryStore, files: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a save of ``store`` whose data files are ``files`` (role -> name, bytes, sha256)."""
    from kvmem import __version__

    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kvmem_version": __version__,
        "backend": store.backend, "config": store.config.to_dict(), "device": device_name(store.device),
        "counts": store._book.counts.tolist(), "next_ids": store._book.next_ids.tolist(), "files": files,
    }


def write_manifest(path: Path, manifest: dict[str, Any], tag: str) -> None:
    """Replace ``path/manifest.json`` atomically (write, fsync, rename, fsync the directory)."""
    tmp = path / f".{MANIFEST}.{tag}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)
    fsync_dir(path)


def save(store: MemoryStore, path: Path) -> None:
    """Write ``store`` to directory ``path`` (see the module docstring). Caller holds the store's lock."""
    try:
        check_target(path)
        old = set(os.listdir(path)) if path.is_dir() else set()
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise path_error(exc, f"cannot save to {path}") from exc
    tag = secrets.token_hex(6)
    files = {}
    for role, name in store._save_files(path, tag).items():
        _fsync_file(path / name)
        size, sha = _digest(path / name)
        files[role] = {"name": name, "bytes": size, "sha256": sha}
    write_manifest(path, manifest_of(store, files), tag)
    keep = {entry["name"] for entry in files.values()}
    for name in old - keep:  # the previous save's files and leftovers of interrupted saves, nothing else
        if _OURS.match(name) and (path / name).is_file():
            (path / name).unlink()


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise CorruptStoreError(f"manifest.json: {msg}")


def _int_list(value: Any, n: int, what: str) -> list[int]:
    ok = isinstance(value, list) and len(value) == n and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    _require(ok, f"{what} must be {n} non-negative ints; got {str(value)[:80]}")
    return value


def read_manifest(path: Path) -> tuple[dict[str, Any], StoreConfig]:
    """The validated manifest of the save at ``path`` and its config; raises CorruptStoreError."""
    file = path / MANIFEST
    if not path.is_dir():
        raise CorruptStoreError(f"{path} is not a kvmem store directory")
    if not file.is_file():
        raise CorruptStoreError(f"{path} holds no {MANIFEST}: not a kvmem save, or a save that never finished")
    size = file.stat().st_size
    _require(size <= _MANIFEST_LIMIT, f"{size} bytes is over the {_MANIFEST_LIMIT}-byte limit")
    try:
        manifest = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptStoreError(f"manifest.json is not valid JSON: {exc}") from None
    _require(isinstance(manifest, dict), "top level must be an object")
    _require(manifest.get("format") == FORMAT, f"format must be {FORMAT!r}; got {manifest.get('format')!r}")
    version = manifest.get("format_version")
    _require(isinstance(version, int) and 1 <= version <= FORMAT_VERSION,
             f"format_version {version!r} is not one this kvmem reads (1..{FORMAT_VERSION}); upgrade kvmem")
    _require(isinstance(manifest.get("backend"), str), "backend must be a string")
    if version == 1:
        manifest["device"] = "cpu"                                  # version 1 saved no device: CPU stores
    _require(valid_name(manifest.get("device")),
             f"device must be 'cpu' or 'cuda:N'; got {str(manifest.get('device'))[:40]!r}")
    try:
        config = StoreConfig.from_dict(manifest.get("config"))
    except (KvmemError, TypeError) as exc:
        raise CorruptStoreError(f"manifest.json: config: {exc}") from None
    P = config.partitions
    counts = _int_list(manifest.get("counts"), P, "counts")
    nexts = _int_list(manifest.get("next_ids"), P, "next_ids")
    _require(all(c <= n for c, n in zip(counts, nexts)), "a partition holds more rows than ids it issued")
    if config.capacity is not None:
        _require(max(counts, default=0) <= config.capacity, "a partition holds more rows than its capacity")
    files = manifest.get("files")
    _require(isinstance(files, dict), "files must be an object")
    for role, entry in files.items():
        _require(isinstance(entry, dict) and set(entry) == {"name", "bytes", "sha256"}, f"files.{role} is malformed")
        _require(isinstance(entry["name"], str) and bool(_FILE_NAME.match(entry["name"])),
                 f"files.{role}.name {entry['name']!r} is not a plain file name")
        _require(isinstance(entry["bytes"], int) and entry["bytes"] >= 0, f"files.{role}.bytes is malformed")
        _require(isinstance(entry["sha256"], str) and bool(re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])),
                 f"files.{role}.sha256 is malformed")
    return manifest, config


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Check every data file's size and SHA-256 against the manifest."""
    for role, entry in manifest["files"].items():
        file = path / entry["name"]
        if not file.is_file():
            raise CorruptStoreError(f"{role} file {entry['name']} is missing from {path}")
        if file.stat().st_size != entry["bytes"]:
            raise CorruptStoreError(
                f"{role} file {entry['name']} has {file.stat().st_size} bytes; the manifest says {entry['bytes']}")
        if _digest(file)[1] != entry["sha256"]:
            raise CorruptStoreError(f"{role} file {entry['name']} fails its SHA-256 check: the file is damaged")
