"""Batch probing studies: ``thinklens probe STUDY.toml`` (config: :mod:`thinklens.jobs.config`).

A study runs four stages, each resumable (a rerun after a kill redoes nothing finished):

1. **Traces and capture.** Prompts (a JSONL file, or held-out problems of the organism's
   task, ``task_named("organism").problems``) are thought on and captured into
   ``OUT/store`` in resumable rounds (:func:`thinklens.jobs.journal.run_capture`:
   generated traces are journaled before capture; each round is one atomic store append).
2. **Sharding.** Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1; gloo process
   group, so it works on CPU) rank ``r`` takes every N-th prompt not yet stored and
   captures into ``OUT/shards/rank<r>``; after a barrier rank 0 merges the shards into
   ``OUT/store`` in the prompts file's order (:func:`thinklens.hooks.merge.merge_stores`),
   so the store, and every result, is the same as a single-process run's.
3. **Probes.** Each ``[[probe]]`` is one :func:`thinklens.probes.sweep` (all layers and
   positions in one batched fit, shuffled-label control, bootstrap intervals), written
   to ``OUT/results/NAME.json`` with a hash of its inputs (probe config, stored traces):
   an unchanged probe is skipped on a rerun, a changed one recomputed.
4. **Figures and summary.** ``OUT/figures/NAME-by-layer.html`` (and ``-grid`` for several
   positions; SVG/PDF/PNG through :func:`thinklens.figures.export` if asked) and
   ``OUT/results.json`` with the best (position, site) cell of each probe, its control and
   selectivity. The best cell is the one with the highest *test* score among all cells
   (``"selected_on": "test"``, ``"n_cells"``): the maximum over N cells of a noisy score is
   optimistic, so read it as "the best of N, chosen on the test split", not as an unbiased
   estimate; the whole grid is in ``OUT/results/NAME.json``.

Every file is written to a temporary name and renamed into place. The capture settings
are recorded in ``OUT/study.json``; rerunning into the same folder with different ones
is refused (their stored activations would not match), naming the changed keys, except
batching settings that do not change the traces (:data:`thinklens.jobs.config.SCHEDULE_KEYS`).
Settings bind only once a run kept some work (a stored or journaled trace, a probe
result): a run that failed before that (a site typo, a missing prompts file) leaves
nothing that blocks the corrected rerun.
Progress goes to tqdm bars and to ``log`` (a callable taking one line), never to stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from thinklens.errors import ConfigError
from thinklens.figures import export
from thinklens.hooks._fileio import atomic_path, atomic_write_json
from thinklens.hooks.merge import merge_stores
from thinklens.hooks.model import load
from thinklens.hooks.store import Store
from thinklens.hooks.task import task_named
from thinklens.plots import plot_probe_by_layer, plot_probe_grid
from thinklens.probes import sweep

from . import labels as _labels
from .config import SCHEDULE_KEYS, load_config
from .journal import PENDING, read_prompts, run_capture

STAGE_KEYS = ("model", "prompts", "generate", "capture")
Log = Callable[[str], None]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the gloo process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def _records(cfg: dict[str, Any]) -> list[tuple[str, str, dict]]:
    """(id, prompt, row) for every prompt of the study, in order."""
    p = cfg["prompts"]
    if p["file"] is not None:
        return read_prompts(p["file"])
    o = p["organism"]
    rows = task_named("organism").problems(int(o["n"]), depths=list(o["depths"]), seed=o["seed"])
    return [(row["id"], row["prompt"], dict(row)) for row in rows]


def _changed(old: dict, new: dict) -> list[str]:
    """``section.key`` of every capture setting that differs (batching-only keys aside)."""
    greedy = not new["generate"].get("temperature")
    skip = set(SCHEDULE_KEYS) if greedy and not old.get("generate", {}).get("temperature") \
        else set()
    return sorted(f"{s}.{k}" for s in STAGE_KEYS for k in set(old.get(s, {})) | set(new[s])
                  if old.get(s, {}).get(k) != new[s].get(k) and f"{s}.{k}" not in skip)


def _stored_anything(out: Path) -> bool:
    """Whether an earlier run into ``out`` kept any work: traces stored or journaled (also
    in a rank's shard), or a probe result."""
    folders = [out / "store", *sorted((out / "shards").glob("rank*"))]
    return any((d / "manifest.json").exists() or (d / PENDING).exists() for d in folders) \
        or any((out / "results").glob("*.json"))


def _check_state(out: Path, cfg: dict[str, Any], rank: int) -> None:
    state = {k: cfg[k] for k in STAGE_KEYS}
    file = out / "study.json"
    if file.exists() and not _stored_anything(out):
        file.unlink(missing_ok=True)  # a run that failed before storing anything binds nothing
    if file.exists():
        changed = _changed(json.loads(file.read_text())["capture_config"], state)
        if changed:
            raise ConfigError(f"the output folder {str(out)!r} was made with other settings "
                              f"(changed: {', '.join(changed)}); its stored traces would "
                              "not match. Use a new 'out' folder, or restore those settings")
    elif rank == 0:
        atomic_write_json(file, {"capture_config": state,
                                 "created": time.strftime("%Y-%m-%d %H:%M:%S")})


def _check_fields(cfg: dict[str, Any], rows: list[dict]) -> None:
    for p in cfg["probe"]:
        if p["labels"].startswith("field:"):
            key = p["labels"][6:]
            absent = [k for k, r in enumerate(rows) if key not in r]
            if absent:
                keys = sorted({k for r in rows for k in r})
                raise ConfigError(f"[[probe]] {p['name']!r}: labels {p['labels']!r}, but "
                                  f"{len(absent)} prompt rows have no key {key!r} (first: row "
                                  f"{absent[0] + 1}); keys present: {keys}")


def _check_labels(cfg: dict[str, Any], task: Any) -> None:
    """Every probe's labels exist for the loaded model's task (before any generation)."""
    for p in cfg["probe"]:
        try:
            _labels.check(p["labels"], task)
        except ConfigError as e:
            raise ConfigError(f"[[probe]] {p['name']!r}: {e}") from None


def _shard_dirs(shards: Path) -> list[Path]:
    if not shards.exists():
        return []
    return sorted(d for d in shards.glob("rank*") if (d / "manifest.json").exists())


def _capture_stage(model, cfg, recs, out: Path, rank: int, world: int, progress: bool,
                   say: Log) -> Store | None:
    main, shards = out / "store", out / "shards"
    for trash in out.glob(".trash-*"):
        shutil.rmtree(trash, ignore_errors=True)
    have = set(Store.open(main, verify="size").trace_ids) if (main / "manifest.json").exists() \
        else set()
    for d in _shard_dirs(shards):
        have |= set(Store.open(d, verify="size").trace_ids)
    todo = [(pid, prompt) for pid, prompt, _ in recs if pid not in have]
    c, g = cfg["capture"], cfg["generate"]
    kw = {"sites": c["sites"], "positions": c["positions"], "dtype": c["dtype"],
          "budget": c["budget"], "batch_size": c["batch_size"], "chunk": c["chunk"],
          "max_new_tokens": g["max_new_tokens"], "temperature": g["temperature"],
          "seed": g["seed"], "generate_batch_size": g["batch_size"]}
    mine = todo[rank::world]
    say(f"traces: {len(recs) - len(todo)} of {len(recs)} already captured; "
        f"{len(mine)} to do here")
    if mine:
        run_capture(model, mine, main if world == 1 else shards / f"rank{rank}",
                    progress=progress, **kw)
    _barrier(world)
    if rank != 0:
        return None
    shard_dirs = _shard_dirs(shards)
    if shard_dirs:
        order = [pid for pid, _, _ in recs]
        sources = ([main] if (main / "manifest.json").exists() else []) + shard_dirs
        merge_stores(sources, main, order=order)
        trash = out / f".trash-{os.getpid()}"
        shards.rename(trash)  # atomic: a kill leaves either the shards or the trash
        shutil.rmtree(trash, ignore_errors=True)
    return Store.open(main, verify="size")


def _figures(result, name: str, out: Path, formats: list[str]) -> list[str]:
    best = result.positions.index(result.best()[0])
    figs = {f"{name}-by-layer": plot_probe_by_layer(result, position=best)}
    if len(result.positions) > 1:
        figs[f"{name}-grid"] = plot_probe_grid(result)
    folder = out / "figures"
    folder.mkdir(exist_ok=True)
    written = []
    for stem, fig in figs.items():
        for fmt in formats:
            path = folder / f"{stem}.{fmt}"
            with atomic_path(path) as tmp:
                if fmt == "html":
                    fig.write_html(tmp, include_plotlyjs="directory", full_html=True)
                else:
                    export(fig, tmp)
            written.append(str(path.relative_to(out)))
    return written


def _task(p: dict, labels: Any) -> str | None:
    """The probe's task (config key ``task``): ``"auto"`` makes numeric labels regression
    targets under ``kind = "ridge"``, else leaves it to the labels' types (None)."""
    if p.get("task", "auto") != "auto":
        return p["task"]
    if p["kind"] != "ridge" or callable(labels):
        return None
    flat = [v for x in labels for v in (x if isinstance(x, list) else [x]) if v is not None]
    numeric = flat and all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat)
    return "regression" if numeric else None


def _probe(store, p: dict, rows: list[dict], out: Path, formats: list[str], task: Any) -> dict:
    key = _digest({"probe": p, "traces": store.trace_ids, "sites": store.keys})
    file = out / "results" / f"{p['name']}.json"
    if file.exists():
        old = json.loads(file.read_text())
        if old.get("hash") == key:
            grid = old["result"]  # a record written before the summary said how it chose
            old["summary"].setdefault("selected_on", "test")
            old["summary"].setdefault("n_cells", len(grid["positions"]) * len(grid["sites"]))
            return {**old, "skipped": True}
    t0 = time.time()
    lab = _labels.resolve(p["labels"], store.traces, rows, task=task)
    res = sweep(store, p["sites"] or store.keys, lab.labels, level=lab.level,
                positions=p["positions"], kind=p["kind"], l2=float(p["l2"]),
                class_weight=p["class_weight"], control=p["control"], n_boot=p["n_boot"],
                test_frac=p["test_frac"], seed=p["seed"], task=_task(p, lab.labels))
    pos, site = res.best()
    k, s = res.positions.index(pos), res.sites.index(site)
    main = res.main_metric
    summary = {"best_site": site, "best_position": pos, main: float(res.grid()[k, s]),
               "selected_on": "test", "n_cells": len(res.positions) * len(res.sites),
               "control": float(res.grid("control")[k, s]) if p["control"] else None,
               "selectivity": float(res.selectivity[k, s]) if p["control"] else None,
               "ci": res.ci[main][k, s].tolist(), "n_train": res.n_train, "n_test": res.n_test,
               "n_test_traces": res.n_test_traces,
               "class_balance": res.to_dict()["balance"]}
    files = _figures(res, p["name"], out, formats)
    record = {"name": p["name"], "labels": p["labels"], "level": lab.level, "hash": key,
              "config": p, "summary": summary, "figures": files,
              "seconds": round(time.time() - t0, 2), "result": res.to_dict()}
    (out / "results").mkdir(exist_ok=True)
    atomic_write_json(file, record)
    return {**record, "skipped": False}


def _describe(name: str, record: dict) -> str:
    """One line about a probe's result, as ``thinklens probe`` reports it."""
    s = record["summary"]
    main = "accuracy" if "accuracy" in s else "r2"
    clip = ", control R² taken as 0 when below" if main == "r2" else ""
    ctrl = (f" (control {s['control']:.3f}, selectivity {s['selectivity']:.3f}{clip})"
            if s["control"] is not None else "")
    return (f"probe {name!r} ({record['labels']}): {main} {s[main]:.3f}{ctrl} at "
            f"{s['best_site']} position {s['best_position']}, best of {s['n_cells']} cells, "
            f"chosen on the test split{' [done before, skipped]' if record['skipped'] else ''}")


def run_study(config: str | Path | dict[str, Any], *, progress: bool = True,
              log: Log | None = None) -> dict[str, Any]:
    """Run (or resume) the study in ``config`` (a path or a parsed dict); returns the summary.

    Example::

        summary = run_study("study.toml", log=print)
        summary["probes"]["value"]["accuracy"]   # best cell's test accuracy (selected on test)

    ``log`` receives progress lines (prefixed ``[rank r/N]`` under torchrun). Under
    torchrun, ranks other than 0 return ``{}`` after the capture stage.
    """
    cfg = load_config(config) if not isinstance(config, dict) else config
    out = Path(cfg["out"])
    rank, world = _distributed()

    def say(msg: str) -> None:
        if log is not None:
            log(f"[rank {rank}/{world}] {msg}" if world > 1 else msg)

    try:
        out.mkdir(parents=True, exist_ok=True)
        _check_state(out, cfg, rank)
        t0 = time.time()
        recs = _records(cfg)
        _check_fields(cfg, [row for _, _, row in recs])  # before hours of generation
        m = cfg["model"]
        device = m["device"]
        if device is None and world > 1:
            import torch
            if torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        model = load(m["spec"], device=device, checkpoint=m["checkpoint"])
        _check_labels(cfg, model.task)
        store = _capture_stage(model, cfg, recs, out, rank, world, progress, say)
        if rank != 0:
            return {}
        t_capture = time.time() - t0
        by_id = {pid: row for pid, _, row in recs}
        rows = [by_id.get(tid, {}) for tid in store.trace_ids]
        results = {}
        for p in tqdm(cfg["probe"], desc="probes", unit="probe", disable=not progress):
            results[p["name"]] = r = _probe(store, p, rows, out, cfg["output"]["figures"],
                                            model.task)
            say(_describe(p["name"], r))
        summary = {"model": model.name, "traces": len(store), "world_size": world,
                   "capture_seconds": round(t_capture, 1),
                   "probes": {n: {"labels": r["labels"], "level": r["level"], **r["summary"],
                                  "figures": r["figures"], "file": f"results/{n}.json"}
                              for n, r in results.items()}}
        atomic_write_json(out / "results.json", summary)
        say(f"results: {out / 'results.json'} ({time.time() - t0:.1f} s)")
        return summary
    finally:
        if world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


__all__ = ["run_study"]
