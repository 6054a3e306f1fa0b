"""On-disk activation store: safetensors shards plus one JSON manifest, safe to kill.

A store is a folder::

    out/
      manifest.json              the only source of truth: what is stored, and where
      shard-000000.safetensors   the tensors of one ``append`` call
      shard-000000.traces.json   its traces (``{id: Trace.to_dict()}``)
      shard-000001.safetensors
      shard-000001.traces.json

Inside a shard, the rows of trace number ``n`` for key ``k`` are the tensor ``"k/n"``
(first axis = rows of that trace); the reserved key ``__positions__`` holds the token
index of each row. ``n`` is a serial number that is never reused. The manifest::

    {"format": "thinklens.store", "version": 1,
     "model_name": str, "revision": str | None, "dtype": "float32", "sites": [key, ...],
     "axes": {key: [axis, ...]}, "meta": {...},
     "shards": [{"file", "sha256", "bytes", "trace_ids", "traces_file", "traces_bytes"}, ...],
     "traces": [{"id", "n", "shard", "rows": {key: rows}}, ...]}

The trace dicts (tokens, offsets, sentences: the bulk of the metadata) live in each
shard's ``traces.json`` beside it, written once, so an append rewrites a manifest that
grows by a few dozen bytes per trace, not by whole traces. (Version-1 stores kept each
``"trace"`` inside the manifest; they are still read.)

``traces`` is in append order. One ``append`` commits like this (one writer at a time):

1. Remove what a killed writer left: ``*.tmp`` files and shard files that the manifest
   does not list (orphans, from a kill between steps 3 and 5).
2. Write the new shard to ``shard-NNNNNN.safetensors.tmp`` (``NNNNNN`` above every
   listed or present shard), fsync it and take its sha256; the same for its
   ``shard-NNNNNN.traces.json.tmp``.
3. ``os.replace`` both to their names; fsync the folder.
4. Write the new manifest (old one + the shard + its traces) to ``manifest.json.tmp``
   and fsync it.
5. ``os.replace`` it over ``manifest.json``; fsync the folder. This is the commit point:
   a reader sees the old manifest or the new one, and every shard a manifest lists was
   complete on disk before that manifest existed. A kill anywhere before it leaves only
   files that readers ignore and the next append removes.

``Store.open`` then checks the listed shards (``verify="hash"``: sha256; ``"size"``: byte
count and safetensors header; ``"none"``) so that a shard truncated or altered after
the fact is refused by name. :meth:`Store.repair` drops such shards from the manifest;
their trace ids are then no longer stored, so a rerun recomputes them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from thinklens.errors import ConfigError, SiteError, StoreError, did_you_mean

from ._fileio import replace_durably, sha256
from ._store_format import (
    FORMAT,
    MANIFEST,
    POSITIONS,
    SHARD_NAME,
    STORE_DTYPES,
    TRACES_NAME,
    VERIFY_MODES,
    VERSION,
    check_create,
    load_manifest,
    shard_problem,
    traces_file,
)
from .activations import ActivationReader, ragged_axis
from .trace import Trace

Record = tuple[str, dict, dict[str, Tensor]]


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Steps 4 and 5."""
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, separators=(",", ":")))  # compact: C encoder, small
        f.flush()
        os.fsync(f.fileno())
    replace_durably(tmp, folder / MANIFEST)


class Store(ActivationReader):
    """A folder of activations, one tensor per (key, trace); see the module docstring.

    Example::

        with Store.open("out", create={"model_name": "organism", "revision": None,
                                       "dtype": "float32", "sites": [site]}) as store:
            store.append([("t0", trace.to_dict(), {site: acts, "__positions__": pos})],
                         axes={site: ("pos", "d_model")})   # acts: [rows, d_model]
            store.read(site)[0].shape                       # (rows, d_model)
            store[site].values.shape                        # (trace, pos, d_model), padded
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path, self._m = path, manifest  # use Store.open, which validates and verifies
        self.model_name: str = manifest["model_name"]
        self.revision: str | None = manifest["revision"]
        self.dtype: torch.dtype = STORE_DTYPES[manifest["dtype"]]
        self.sites: list[str] = list(manifest["sites"])  # as created; some may hold no data
        self.meta: dict[str, Any] = dict(manifest["meta"])  # create's extra fields

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: dict | None = None,
             verify: str = "hash") -> Store:
        """Open the store at ``path``; with ``create``, start one there if none exists."""
        if verify not in VERIFY_MODES:
            raise ConfigError(f"verify={verify!r} is not a mode; use one of {list(VERIFY_MODES)}")
        path = Path(path)
        spec = check_create(create) if create is not None else None
        if path.exists() and not path.is_dir():
            raise StoreError(f"store path '{path}' is a file, not a folder; pass a folder path")
        if not (path / MANIFEST).is_file():
            if spec is None:
                what = "does not exist" if not path.exists() else f"has no {MANIFEST}"
                raise StoreError(f"no activation store at '{path}': the folder {what}. Check the "
                                 "path, or pass create={...} to start a new store there")
            path.mkdir(parents=True, exist_ok=True)
            manifest = {"format": FORMAT, "version": VERSION, **spec, "axes": {},
                        "shards": [], "traces": []}
            _write_manifest(path, manifest)
            return cls(path, manifest)
        store = cls(path, load_manifest(path / MANIFEST))
        if spec is not None:
            store._check_compatible(spec)
        bad = store._problems(verify)
        if bad:
            lines = "\n".join(f"  {file}: {why}" for file, why in bad)
            raise StoreError(
                f"{len(bad)} shard(s) of the store at '{path}' failed verify={verify!r}:\n{lines}\n"
                f"Drop them with Store.open('{path}', verify='none').repair(), then rerun the "
                "same command: their traces are recomputed")
        return store

    def _check_compatible(self, spec: dict[str, Any]) -> None:
        for name in ("model_name", "revision", "dtype"):
            if self._m[name] != spec[name]:
                raise StoreError(
                    f"the store at '{self.path}' holds {name}={self._m[name]!r}, but this run has "
                    f"{name}={spec[name]!r}; use a new --out folder or the same model")
        new = [s for s in spec["sites"] if s not in self._m["sites"]]
        if new:
            raise StoreError(f"sites {new} are not in the store at '{self.path}' (it holds "
                             f"{self._m['sites']}); use a new --out folder or the stored sites")

    def _problems(self, verify: str) -> list[tuple[str, str]]:
        """(file, what was expected and found) for each listed shard that fails ``verify``."""
        found = [(s["file"], shard_problem(self.path, s, self._m["traces"], verify))
                 for s in self._m["shards"] if verify != "none"]
        return [(file, why) for file, why in found if why]

    def repair(self, verify: str = "hash") -> list[str]:
        """Drop every shard that fails ``verify`` (and delete it); return the dropped trace ids."""
        bad = {file for file, _ in self._problems(verify)}
        if not bad:
            return []
        traces = self._m["traces"]
        self._commit({**self._m, "shards": [s for s in self._m["shards"] if s["file"] not in bad],
                      "traces": [t for t in traces if t["shard"] not in bad]})
        for file in bad:  # after the commit, so a kill here only leaves orphans
            (self.path / file).unlink(missing_ok=True)
            (self.path / traces_file(file)).unlink(missing_ok=True)
        return [t["id"] for t in traces if t["shard"] in bad]

    # -- writing -----------------------------------------------------------------------

    def append(self, records: Sequence[Record], axes: dict[str, Sequence[str]]) -> int:
        """Write the records whose trace id is not stored yet as one shard; return how many."""
        todo, new_axes = self._check_records(records, axes)
        if not todo:
            return 0
        self._clean_leftovers()
        taken = [int(m.group(1)) for f in [*(s["file"] for s in self._m["shards"]),
                                           *(p.name for p in self.path.iterdir())]
                 if (m := SHARD_NAME.fullmatch(f))]
        name = f"shard-{max(taken, default=-1) + 1:06d}.safetensors"
        first = 1 + max((t["n"] for t in self._m["traces"]), default=-1)
        tensors: dict[str, Tensor] = {}
        storages: set[int] = set()
        entries = []
        for n, (tid, _trace, per_key) in enumerate(todo, start=first):
            for key, t in per_key.items():
                t = t.detach().cpu().contiguous()
                ptr = t.untyped_storage().data_ptr()
                if ptr in storages:  # views of one tensor; safetensors refuses shared memory
                    t = t.clone()
                storages.add(ptr)
                tensors[f"{key}/{n}"] = t
            entries.append({"id": tid, "n": n, "shard": name,
                            "rows": {k: int(t.shape[0]) for k, t in per_key.items()}})
        final, tmp = self.path / name, self.path / (name + ".tmp")
        side = self.path / traces_file(name)
        side_tmp = side.with_name(side.name + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        with open(side_tmp, "w") as f:
            f.write(json.dumps({tid: trace for tid, trace, _ in todo}, separators=(",", ":")))
            f.flush()
            os.fsync(f.fileno())
        shard = {"file": name, "sha256": sha256(tmp), "bytes": tmp.stat().st_size,
                 "trace_ids": [e["id"] for e in entries], "traces_file": side.name,
                 "traces_bytes": side_tmp.stat().st_size}
        replace_durably(side_tmp, side)
        replace_durably(tmp, final)
        self._commit({**self._m, "version": VERSION, "axes": {**self._m["axes"], **new_axes},
                      "shards": [*self._m["shards"], shard], "traces": [*self._m["traces"], *entries]})
        return len(entries)

    def _check_records(self, records: Sequence[Record], axes: dict[str, Sequence[str]]
                       ) -> tuple[list[Record], dict[str, list[str]]]:
        """Validate every record before anything is written; drop stored or repeated ids."""
        seen = set(self.trace_ids)
        todo, new_axes = [], {}
        for record in records:
            if not isinstance(record, tuple | list) or len(record) != 3:
                raise ConfigError(f"a record is (trace_id, trace_dict, {{key: tensor}}), "
                                  f"got {record!r:.80}")
            tid, trace, per_key = record
            if not isinstance(tid, str) or not tid:
                raise ConfigError(f"trace ids must be non-empty strings, got {tid!r}")
            if tid in seen:
                continue
            trace = trace.to_dict() if hasattr(trace, "to_dict") else trace
            try:
                json.dumps(trace)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"trace {tid!r}: the trace dict must be JSON-able ({e}); "
                                  "pass Trace.to_dict()") from e
            if not per_key or not isinstance(per_key, dict):
                raise ConfigError(f"trace {tid!r}: give a dict {{site: tensor}}, got {per_key!r}")
            for key, t in per_key.items():
                new_axes.update(self._check_tensor(tid, key, t, axes, new_axes))
            pos = per_key.get(POSITIONS)
            for key, t in per_key.items():
                names = new_axes.get(key, [""])
                k = ragged_axis(names) if {"pos", "query_pos"} & set(names) else None
                if pos is not None and k is not None and t.shape[k] != len(pos):
                    raise ConfigError(f"trace {tid!r}: {key!r} has {t.shape[k]} rows along "
                                      f"{names[k]!r} but {POSITIONS} has {len(pos)}; give one "
                                      "position per row")
            seen.add(tid)
            todo.append((tid, trace, per_key))
        return todo, new_axes

    def _check_tensor(self, tid: str, key: str, t: Any, axes: dict[str, Sequence[str]],
                      new_axes: dict[str, list[str]]) -> dict[str, list[str]]:
        where = f"trace {tid!r}, key {key!r}"
        if not isinstance(t, Tensor):
            raise ConfigError(f"{where}: expected a tensor, got {type(t).__name__}")
        if key == POSITIONS:
            if t.dtype != torch.int64 or t.ndim != 1:
                raise ConfigError(f"{where}: must be int64 [rows], got {t.dtype} "
                                  f"{tuple(t.shape)}; pass torch.tensor(token_indices)")
            return {}
        if key not in self._m["sites"]:
            raise SiteError(f"{where}: not a site of the store at '{self.path}'."
                            f"{did_you_mean(key, self._m['sites'])} Its sites: "
                            f"{self._m['sites']}; create a new store to add sites")
        if t.dtype != self.dtype:
            raise ConfigError(f"{where}: dtype {t.dtype}, but the store holds {self.dtype}; "
                              f"cast with .to({self.dtype}) or use a store created with "
                              f"dtype={str(t.dtype).removeprefix('torch.')!r}")
        given = [str(a) for a in axes[key]] if key in axes else None
        if given is None or t.ndim == 0 or len(given) != t.ndim:
            raise ConfigError(f"{where}: axes {given} do not fit shape {tuple(t.shape)}; pass "
                              f"axes={{{key!r}: (...)}} with one name per dimension, rows first")
        recorded = new_axes.get(key) or self._m["axes"].get(key)
        if recorded is not None and list(recorded) != given:
            raise StoreError(f"{where}: stored with axes {list(recorded)}, this append gives "
                             f"{given}; use the same axes or a new --out folder")
        return {key: given}

    def _clean_leftovers(self) -> None:
        """Step 1: remove temp files and orphan shards of a killed writer."""
        listed = {f for s in self._m["shards"] for f in (s["file"], s.get("traces_file"))}
        for file in self.path.iterdir():
            name = file.name.removesuffix(".tmp")
            ours = name == MANIFEST or SHARD_NAME.fullmatch(name) or TRACES_NAME.fullmatch(name)
            if ours and (file.name != name or name not in listed | {MANIFEST}):
                file.unlink(missing_ok=True)

    def _commit(self, manifest: dict[str, Any]) -> None:
        _write_manifest(self.path, manifest)
        self._m = manifest

    # -- reading -----------------------------------------------------------------------

    @property
    def keys(self) -> list[str]:  # type: ignore[override]
        """The sites with data for at least one trace, in creation order."""
        present = {k for t in self._m["traces"] for k in t["rows"]}
        return [s for s in self._m["sites"] if s in present]

    @property
    def axes(self) -> dict[str, tuple[str, ...]]:  # type: ignore[override]
        """Axis names of each key's per-trace tensor, e.g. ``('pos', 'd_model')``."""
        return {k: tuple(v) for k, v in self._m["axes"].items()}

    @property
    def trace_ids(self) -> list[str]:
        return [t["id"] for t in self._m["traces"]]

    @property
    def trace_dicts(self) -> list[dict]:
        return [self.trace_dict(t) for t in self._m["traces"]]

    def trace_dict(self, entry: dict) -> dict:
        """The ``Trace.to_dict()`` of one manifest entry (read from its shard's traces.json)."""
        if "trace" in entry:  # version 1
            return entry["trace"]
        cache = self.__dict__.setdefault("_sidecars", {})
        if entry["shard"] not in cache:
            file = self.path / traces_file(entry["shard"])
            try:
                cache[entry["shard"]] = json.loads(file.read_text())
            except (OSError, ValueError) as e:
                raise StoreError(f"cannot read '{file}' ({e}); drop its shard with "
                                 f"Store.open('{self.path}', verify='none').repair() and rerun "
                                 "to recompute its traces") from e
        return cache[entry["shard"]][entry["id"]]

    @property
    def traces(self) -> list:
        """The stored traces as ``Trace`` objects (``trace_dicts`` has the raw dicts)."""
        return [Trace.from_dict(d) for d in self.trace_dicts]

    def __contains__(self, trace_id: object) -> bool:
        ids = self.__dict__.get("_id_cache")
        if ids is None or ids[0] is not self._m:  # rebuilt only when the manifest changes
            ids = (self._m, {t["id"] for t in self._m["traces"]})
            self.__dict__["_id_cache"] = ids
        return trace_id in ids[1]

    def __len__(self) -> int:
        return len(self._m["traces"])

    def __repr__(self) -> str:
        return f"Store('{self.path}', {len(self)} traces, keys={self.keys})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:  # nothing stays open between calls
        return None

    def read(self, key: str) -> list[Tensor]:
        """One tensor ``[rows, ...]`` per trace for ``key``, reading only that key's tensors."""
        if key not in self.keys:
            raise SiteError(f"no key {key!r} in the store at '{self.path}'."
                            f"{did_you_mean(key, self.keys)} Stored keys: {self.keys}")
        return self._load(key)

    def _load(self, key: str) -> list[Tensor]:
        traces = self._m["traces"]
        missing = [t["id"] for t in traces if key not in t["rows"]]
        if missing:
            raise StoreError(f"{key!r} is stored for {len(traces) - len(missing)} of "
                             f"{len(traces)} traces (missing: {missing[:5]}); rerun the capture "
                             f"of those traces with this site, or read another key")
        by_shard: dict[str, list[int]] = {}
        for i, t in enumerate(traces):
            by_shard.setdefault(t["shard"], []).append(i)
        out: list[Tensor] = [torch.empty(0)] * len(traces)
        for shard, idx in by_shard.items():
            with safe_open(self.path / shard, framework="pt") as f:  # memory-mapped
                for i in idx:
                    out[i] = f.get_tensor(f"{key}/{traces[i]['n']}")
        return out

    def _per_trace(self, key: str) -> list[Tensor]:
        return self.read(key)

    def _positions(self) -> list[Tensor] | None:
        traces = self._m["traces"]
        has_all = traces and all(POSITIONS in t["rows"] for t in traces)
        return self._load(POSITIONS) if has_all else None


__all__ = ["Store"]
