"""Merge activation stores: the shards of a sharded (``torchrun``) job into one store.

Each rank of a sharded job captures its slice of the traces into a store of its own
(:mod:`thinklens.hooks.store`); :func:`merge_stores` copies them into one destination
store, in a given trace order (the order of the prompts file, so a sharded run and a
single-process run give the same store). The destination is written with the store's
ordinary atomic ``append``, in batches of about ``batch_bytes``, so a merge killed midway resumes:
traces already in the destination are skipped, never copied twice.

Sources must hold the same model, revision, dtype and sites; tensors are copied as they
are (no re-computation, no dtype change).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from safetensors import safe_open
from tqdm.auto import tqdm

from thinklens.errors import StoreError

from .store import Store


def _compatible(stores: list[Store]) -> dict:
    first = stores[0]
    spec = {"model_name": first.model_name, "revision": first.revision,
            "dtype": str(first.dtype).removeprefix("torch."), "sites": first.sites,
            **first.meta}
    for s in stores[1:]:
        for name in ("model_name", "revision", "dtype", "sites"):
            a, b = getattr(first, name), getattr(s, name)
            if a != b:
                raise StoreError(f"cannot merge '{s.path}' into '{first.path}': {name} is {b!r} "
                                 f"there and {a!r} here; merge stores of one capture config")
    return spec


def merge_stores(sources: Sequence[str | os.PathLike | Store], dest: str | os.PathLike, *,
                 order: Sequence[str] | None = None, batch_bytes: int = 256 << 20,
                 progress: bool | None = None) -> Store:
    """Copy every trace of ``sources`` into the store at ``dest`` (created if absent).

    ``order``: trace ids in the order the destination should hold them (default: the
    sources' order, one after the other); ids already in ``dest`` are skipped; an id in
    ``order`` that no source holds is an error. Returns the destination store.

    Example::

        merged = merge_stores(["out/shards/rank0", "out/shards/rank1"], "out/store",
                              order=[pid for pid, _ in prompts])
    """
    srcs = [s if isinstance(s, Store) else Store.open(s, verify="size") for s in sources]
    if not srcs:
        raise StoreError("merge_stores needs at least one source store")
    spec = _compatible(srcs)
    out = Store.open(dest, create=spec)
    _compatible([out, *srcs])
    where: dict[str, tuple[Store, dict]] = {}
    for s in srcs:
        for entry in s._m["traces"]:
            where.setdefault(entry["id"], (s, entry))
    order = list(order) if order is not None else list(where)
    missing = [tid for tid in order if tid not in where and tid not in out]
    if missing:
        raise StoreError(f"{len(missing)} trace id(s) are in neither the sources nor '{dest}' "
                         f"(first: {missing[:3]}); capture them first")
    todo = [tid for tid in order if tid not in out]
    axes = {k: v for src in srcs for k, v in src.axes.items()}
    bar = tqdm(total=len(todo), desc="merging stores", unit="trace",
               disable=not (progress if progress is not None else len(todo) > 64))
    with ExitStack() as files:
        handles: dict[Path, object] = {}
        records, size = [], 0
        for k, tid in enumerate(todo):
            s, e = where[tid]
            file = Path(s.path) / e["shard"]
            if file not in handles:
                handles[file] = files.enter_context(safe_open(file, framework="pt"))
            per_key = {key: handles[file].get_tensor(f"{key}/{e['n']}") for key in e["rows"]}
            records.append((tid, s.trace_dict(e), per_key))
            size += sum(t.numel() * t.element_size() for t in per_key.values())
            if size >= batch_bytes or k == len(todo) - 1:  # one atomic append per batch
                out.append(records, axes=axes)
                bar.update(len(records))
                records, size = [], 0
    bar.close()
    return out


__all__ = ["merge_stores"]
