"""The store's on-disk format: names, dtypes, the manifest's validation and reading."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from thinklens.errors import ConfigError, StoreError

from ._fileio import sha256

POSITIONS = "__positions__"
FORMAT, VERSION, MANIFEST = "thinklens.store", 2, "manifest.json"
SHARD_NAME = re.compile(r"shard-(\d{6,})\.safetensors")
TRACES_NAME = re.compile(r"shard-(\d{6,})\.traces\.json")
STORE_DTYPES = {"float64": torch.float64, "float32": torch.float32,
                "float16": torch.float16, "bfloat16": torch.bfloat16}
VERIFY_MODES = ("hash", "size", "none")


def check_create(create: Any) -> dict[str, Any]:
    """Validate ``create=`` and split it into the manifest's fields plus ``meta``."""
    need = ("model_name", "revision", "dtype", "sites")
    if not isinstance(create, dict) or any(k not in create for k in need):
        raise ConfigError(f"create must be a dict with {list(need)}, got {create!r}; e.g. "
                          "{'model_name': 'organism', 'revision': None, 'dtype': 'float32', "
                          "'sites': ['blocks.0.hook_resid_post']}")
    meta = {k: v for k, v in create.items() if k not in need}
    name, revision, dtype, sites = (create[k] for k in need)
    dtype = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    if dtype not in STORE_DTYPES:
        raise ConfigError(f"dtype {create['dtype']!r} cannot be stored; use one of {list(STORE_DTYPES)}")
    if not isinstance(name, str) or not name or not isinstance(revision, str | None):
        raise ConfigError(f"model_name must be a non-empty string and revision a string or "
                          f"None, got {name!r} and {revision!r}")
    if (isinstance(sites, str) or not isinstance(sites, Sequence) or not sites
            or not all(isinstance(s, str) and s != POSITIONS for s in sites)):
        raise ConfigError(f"sites must be a non-empty list of hook names, got {sites!r}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"create's extra fields {sorted(meta)} must be JSON-able ({e})") from e
    return {"model_name": name, "revision": revision, "dtype": dtype,
            "sites": list(dict.fromkeys(sites)), "meta": meta}


def load_manifest(file: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read '{file}' ({e}); it is only ever replaced whole, so it was "
                         "damaged outside thinklens: restore it or use a new --out folder") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"'{file}' is not a thinklens store manifest; use a new --out folder")
    if manifest.get("version", 0) > VERSION:
        raise StoreError(f"'{file}' has format version {manifest['version']}, newer than this "
                         f"thinklens reads ({VERSION}); upgrade thinklens")
    return manifest


def traces_file(shard: str) -> str:
    """``shard-000001.traces.json`` for ``shard-000001.safetensors``: the shard's traces."""
    return shard.removesuffix(".safetensors") + ".traces.json"


def shard_problem(folder: Path, entry: dict, traces: list[dict], verify: str) -> str | None:
    """What is wrong with one listed shard (and its traces file), or None if it checks out.

    ``verify="size"``: byte counts and the safetensors header (every tensor the manifest
    lists for it present, data ending at the file's end); ``"hash"``: also the sha256.
    """
    if "traces_file" in entry:
        side = folder / entry["traces_file"]
        size = side.stat().st_size if side.is_file() else None
        if size != entry["traces_bytes"]:
            return (f"expected its {entry['traces_file']} of {entry['traces_bytes']} bytes, "
                    f"found {size if size is not None else 'no file'}")
    file, want = folder / entry["file"], entry["bytes"]
    size = file.stat().st_size if file.is_file() else None
    if size != want:
        return f"expected {want} bytes, found {size if size is not None else 'no file'}" + (
            " (truncated)" if size is not None and size < want else "")
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, struct.error, KeyError, TypeError, IndexError) as e:
        return f"expected a safetensors header, found an unreadable one ({e})"
    names = {f"{k}/{t['n']}" for t in traces if t["shard"] == entry["file"] for k in t["rows"]}
    if 8 + n + end != size or not names <= header.keys():
        return f"expected {sorted(names)[:3]}… ending at byte {size}, found a different header"
    if verify == "hash" and (found := sha256(file)) != entry["sha256"]:
        return f"expected sha256 {entry['sha256'][:16]}…, found {found[:16]}… (altered)"
    return None


__all__ = ["check_create", "load_manifest", "traces_file", "shard_problem", "FORMAT",
           "MANIFEST", "POSITIONS", "SHARD_NAME", "STORE_DTYPES", "TRACES_NAME",
           "VERIFY_MODES", "VERSION"]
