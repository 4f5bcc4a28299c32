"""Saving and loading an adapter's memories: a manifest beside per-layer store snapshots.

Layout of a save folder::

    adapter.json                  manifest: format, settings, tokens fed, model shape, snapshot name
    snapshot-<hex>/layer-<i>/     what store.save wrote for layer i

``write`` saves the stores into a new snapshot folder, then replaces
``adapter.json`` atomically (temporary file, fsync, rename, fsync of the
folder), then deletes older snapshots. A crash leaves a manifest naming a
complete snapshot: the previous save or the new one. The manifest is JSON;
nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import kvmem.devices
from kvmem.errors import CorruptStoreError, InvalidInputError, path_error

FORMAT = "kvmem.adapters.hf/1"
MANIFEST = "adapter.json"
REQUIRED = {
    "snapshot": str, "tokens": int, "saved_layers": list, "layers": list, "backend": str, "k": (int, str),
    "positions": str, "chunk_size": int, "store_options": dict, "search_options": dict, "model": dict,
}


def write(root: Path, stores: Mapping[int, Any], manifest: dict[str, Any]) -> None:
    """Save ``stores`` (layer -> store) and ``manifest`` under ``root``; see the module docstring."""
    snapshot = f"snapshot-{uuid.uuid4().hex[:12]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / snapshot).mkdir()
    except OSError as exc:                          # a file on the way, a name too long, no permission
        raise path_error(exc, f"cannot save to {root}") from exc
    for i, store in stores.items():
        store.save(root / snapshot / f"layer-{i}")
    manifest = {"format": FORMAT, "snapshot": snapshot, "saved_layers": sorted(stores), **manifest}
    tmp = root / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    _fsync_dir(root)
    for old in root.glob("snapshot-*"):
        if old.name != snapshot:
            shutil.rmtree(old, ignore_errors=True)


def read(root: Path) -> dict[str, Any]:
    """The validated manifest at ``root``; :class:`CorruptStoreError` if unreadable or malformed."""
    where = root / MANIFEST
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptStoreError(f"{where}: cannot read the adapter manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptStoreError(f"{where}: expected format {FORMAT!r}")
    for key, kind in REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            name = kind.__name__ if isinstance(kind, type) else " or ".join(t.__name__ for t in kind)
            raise CorruptStoreError(f"{where}: expected {key!r} of type {name}")
    if not manifest["snapshot"].startswith("snapshot-") or "/" in manifest["snapshot"]:
        raise CorruptStoreError(f"{where}: bad snapshot name {manifest['snapshot']!r}")
    if not all(isinstance(i, int) for i in manifest["saved_layers"] + manifest["layers"]):
        raise CorruptStoreError(f"{where}: layer indices must be integers")
    manifest["store_options"] = from_jsonable(manifest["store_options"])
    return manifest


def fingerprint(model: Any) -> dict[str, Any]:
    """The shape facts a saved memory depends on."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(c, "num_attention_heads", None)
    return {
        "model_type": getattr(c, "model_type", None),
        "num_hidden_layers": getattr(c, "num_hidden_layers", None),
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", heads),
        "head_dim": getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else None),
    }


def jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        if isinstance(value, torch.dtype):
            value = {"torch.dtype": str(value).removeprefix("torch.")}
        elif isinstance(value, (torch.device, os.PathLike)):
            value = str(value)
        out[key] = value
    try:
        json.dumps(out)
    except TypeError as exc:
        raise InvalidInputError(f"store_options: expected JSON-serialisable values to save, got {options}") from exc
    return out


def from_jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        if isinstance(value, dict) and set(value) == {"torch.dtype"}:
            value = getattr(torch, str(value["torch.dtype"]), None)
            if not isinstance(value, torch.dtype):
                raise CorruptStoreError(f"store_options[{key!r}]: not a torch dtype")
        out[key] = value
    return out


def device_options(options: Mapping[str, Any], device: Any) -> dict[str, Any]:
    """Saved ``store_options`` for a load onto ``device``: a device given replaces the saved one; with
    None, a saved device this machine lacks is dropped with a ``RuntimeWarning`` (new stores then
    follow the model; saved ones fall back as :func:`kvmem.load` does)."""
    options = dict(options)
    if device is not None:
        options["device"] = device
    elif options.get("device") is not None:
        try:
            kvmem.devices.resolve(options["device"])
        except InvalidInputError:
            warnings.warn(f"store_options device {options['device']!r} is not on this machine; new layer "
                          "stores follow the model's device", RuntimeWarning, stacklevel=3)
            del options["device"]
    return options


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
