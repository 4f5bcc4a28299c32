"""The manifest parser (``persist.read_manifest``, ``persist.verify_files``): each defect its own error.

These call the pure-Python parser in this process: no native loader sees the files, so nothing here can
crash the process (the loaders' corrupt-file tests run in a child, in the conformance suite).
"""

import json
import re

import pytest
import torch

import kvmem
from kvmem import persist
from kvmem.errors import CorruptStoreError


def _saved(tmp_path):
    store = kvmem.create("exact", dim=4, value_dim=2, partitions=2)
    store.add(torch.randn(2, 5, 4), torch.randn(2, 5, 2))
    store.save(tmp_path / "saved")
    return tmp_path / "saved"


def _rewrite(path, change):
    manifest = json.loads((path / persist.MANIFEST).read_text())
    (path / persist.MANIFEST).write_text(json.dumps(change(manifest)))


def _set(key, value):
    return lambda m: {**m, key: value}


def _file_entry(field, value):
    def change(m):
        role = next(iter(m["files"]))
        m["files"][role] = {**m["files"][role], field: value}
        return m
    return change


DEFECTS = [
    ("top-level-list", lambda m: [m], "top level must be an object"),
    ("format", _set("format", "other-store"), "format must be 'kvmem-store'; got 'other-store'"),
    ("format-missing", lambda m: {k: v for k, v in m.items() if k != "format"}, "got None"),
    ("version-future", _set("format_version", persist.FORMAT_VERSION + 1), "is not one this kvmem reads"),
    ("backend-number", _set("backend", 3), "backend must be a string"),
    ("device", _set("device", "tpu"), "device must be 'cpu' or 'cuda:N'; got 'tpu'"),
    ("counts-short", _set("counts", [5]), r"counts must be 2 non-negative ints; got \[5\]"),
    ("counts-empty", _set("counts", []), r"counts must be 2 non-negative ints; got \[\]"),
    ("counts-long", _set("counts", [5, 3, 0]), "counts must be 2 non-negative ints"),
    ("counts-negative", _set("counts", [5, -1]), "counts must be 2 non-negative ints"),
    ("counts-bool", _set("counts", [5, True]), "counts must be 2 non-negative ints"),
    ("counts-long-text", _set("counts", list(range(100))), r"got \[0, 1, 2, .{60,70}$"),
    ("next-ids-below-counts", _set("next_ids", [1, 1]), "more rows than ids it issued"),
    ("files-list", _set("files", []), "files must be an object"),
    ("file-entry-extra-key", _file_entry("mode", 1), r"files\.\w+ is malformed"),
    ("file-name-up", _file_entry("name", "../keys.bin"), r"name '\.\./keys\.bin' is not a plain file name"),
    ("file-name-absolute", _file_entry("name", "/etc/passwd"), "is not a plain file name"),
    ("file-name-number", _file_entry("name", 7), "name 7 is not a plain file name"),
    ("file-bytes-negative", _file_entry("bytes", -1), r"files\.\w+\.bytes is malformed"),
    ("file-sha-short", _file_entry("sha256", "abc"), r"files\.\w+\.sha256 is malformed"),
]


@pytest.mark.parametrize("name, change, message", DEFECTS, ids=[d[0] for d in DEFECTS])
def test_each_manifest_defect_is_refused_with_its_message(tmp_path, name, change, message):
    path = _saved(tmp_path)
    persist.read_manifest(path)                                  # the untouched save parses
    _rewrite(path, change)
    with pytest.raises(CorruptStoreError, match=message) as caught:
        persist.read_manifest(path)
    assert str(caught.value).startswith("manifest.json: ")
    if name == "counts-long-text":                              # the value is cut to 80 characters
        assert len(str(caught.value).split("got ", 1)[1]) == 80


def test_empty_partitions_and_a_zero_next_id_load_back(tmp_path):
    store = kvmem.create("exact", dim=4, value_dim=2, partitions=3)
    store.add(torch.randn(3, 4, 4), torch.randn(3, 4, 2))
    store.clear(partitions=[1])
    store.save(tmp_path / "cleared")
    manifest, _ = persist.read_manifest(tmp_path / "cleared")
    assert manifest["counts"] == [4, 0, 4]
    with kvmem.load(tmp_path / "cleared") as loaded:
        assert [loaded.count(p) for p in range(3)] == [4, 0, 4]
    empty = kvmem.create("exact", dim=4, value_dim=2, partitions=2)
    empty.save(tmp_path / "empty")
    manifest, _ = persist.read_manifest(tmp_path / "empty")
    assert manifest["counts"] == [0, 0] and manifest["next_ids"] == [0, 0]
    with kvmem.load(tmp_path / "empty") as loaded:
        assert len(loaded) == 0


@pytest.mark.parametrize("damage", ["missing", "short", "flipped"])
def test_verify_files_names_the_damaged_file(tmp_path, damage):
    path = _saved(tmp_path)
    manifest, _ = persist.read_manifest(path)
    persist.verify_files(path, manifest)                         # the untouched save verifies
    role, entry = next(iter(manifest["files"].items()))
    file = path / entry["name"]
    data = file.read_bytes()
    if damage == "missing":
        file.unlink()
        message = f"{role} file {entry['name']} is missing from {path}"
    elif damage == "short":
        file.write_bytes(data[:-1])
        message = f"{role} file {entry['name']} has {len(data) - 1} bytes; the manifest says {len(data)}"
    else:
        file.write_bytes(bytes([data[0] ^ 1]) + data[1:])
        message = f"{role} file {entry['name']} fails its SHA-256 check"
    with pytest.raises(CorruptStoreError, match=re.escape(message)):
        persist.verify_files(path, manifest)
