"""Batch probing studies: ``thinklens probe STUDY.toml`` (config: :mod:`.jobconfig`).

A study runs four stages, each resumable (a rerun after a kill redoes nothing finished):

1. **Traces and capture.** Prompts (a JSONL file, or held-out organism problems) are
   thought on and captured into ``OUT/store`` in resumable rounds
   (:func:`thinklens._commands.run_capture`: generated traces are journaled before
   capture; each round is one atomic store append).
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
   ``OUT/results.json`` with the best site of each probe, its control and selectivity.

Every file is written to a temporary name and renamed into place. The capture settings
are recorded in ``OUT/study.json``; rerunning into the same folder with different ones
is refused (their stored activations would not match), naming the changed keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from thinklens.errors import ConfigError

from .jobconfig import load_config

STAGE_KEYS = ("model", "prompts", "generate", "capture")


def _say(rank: int, world: int, msg: str) -> None:
    print(f"[rank {rank}/{world}] {msg}" if world > 1 else msg, flush=True)  # noqa: T201


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    from thinklens.hooks._fileio import replace_durably

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    replace_durably(tmp, path)


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


def records(cfg: dict[str, Any]) -> list[tuple[str, str, dict]]:
    """(id, prompt, row) for every prompt of the study, in order."""
    p = cfg["prompts"]
    if p["file"] is not None:
        from thinklens._commands import _prompt_records
        from thinklens.cli import _json_lines

        ids = _prompt_records(p["file"])
        rows = _json_lines(p["file"])
        return [(pid, prompt, row) for (pid, prompt), row in zip(ids, rows)]
    from thinklens.zoo.evaluate import heldout_problems

    o = p["organism"]
    depths, n = list(o["depths"]), int(o["n"])
    per = {d: heldout_problems(d, -(-n // len(depths)), seed=o["seed"]) for d in depths}
    out = []
    for k in range(n):
        d = depths[k % len(depths)]
        prob = per[d][k // len(depths)]
        out.append((f"organism-{o['seed']}-{d}-{k // len(depths)}", prob.prompt,
                    {"prompt": prob.prompt, "answer": prob.answer, "depth": d}))
    return out


def _check_state(out: Path, cfg: dict[str, Any], rank: int) -> None:
    state = {k: cfg[k] for k in STAGE_KEYS}
    file = out / "study.json"
    if file.exists():
        old = json.loads(file.read_text())["capture_config"]
        changed = [f"{s}.{k}" for s in STAGE_KEYS for k in set(old.get(s, {})) | set(state[s])
                   if old.get(s, {}).get(k) != state[s].get(k)]
        if changed:
            raise ConfigError(f"the output folder {str(out)!r} was made with other settings "
                              f"(changed: {', '.join(sorted(changed))}); its stored traces would "
                              "not match. Use a new 'out' folder, or restore those settings")
    elif rank == 0:
        _write_json(file, {"capture_config": state, "created": time.strftime("%Y-%m-%d %H:%M:%S")})


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


def _capture_stage(model, cfg, recs, out: Path, rank: int, world: int):
    from thinklens._commands import run_capture
    from thinklens.hooks.merge import merge_stores
    from thinklens.hooks.store import Store

    main, shards = out / "store", out / "shards"
    for trash in out.glob(".trash-*"):
        shutil.rmtree(trash, ignore_errors=True)
    have = set(Store.open(main, verify="size").trace_ids) if (main / "manifest.json").exists() \
        else set()
    shard_dirs = sorted(d for d in shards.glob("rank*") if (d / "manifest.json").exists()) \
        if shards.exists() else []
    for d in shard_dirs:
        have |= set(Store.open(d, verify="size").trace_ids)
    todo = [(pid, prompt) for pid, prompt, _ in recs if pid not in have]
    c, g = cfg["capture"], cfg["generate"]
    kw = {"sites": c["sites"], "positions": c["positions"], "dtype": c["dtype"],
          "budget": c["budget"], "batch_size": c["batch_size"], "chunk": c["chunk"],
          "max_new_tokens": g["max_new_tokens"], "temperature": g["temperature"],
          "seed": g["seed"]}
    mine = todo[rank::world]
    _say(rank, world, f"traces: {len(recs) - len(todo)} of {len(recs)} already captured; "
                      f"{len(mine)} to do here")
    if mine:
        run_capture(model, mine, main if world == 1 else shards / f"rank{rank}", **kw)
    _barrier(world)
    if rank != 0:
        return None
    shard_dirs = sorted(d for d in shards.glob("rank*") if (d / "manifest.json").exists()) \
        if shards.exists() else []
    if shard_dirs:
        order = [pid for pid, _, _ in recs]
        sources = ([main] if (main / "manifest.json").exists() else []) + shard_dirs
        merge_stores(sources, main, order=order)
        trash = out / f".trash-{os.getpid()}"
        shards.rename(trash)  # atomic: a kill leaves either the shards or the trash
        shutil.rmtree(trash, ignore_errors=True)
    return Store.open(main, verify="size")


def _figures(result, name: str, out: Path, formats: list[str]) -> list[str]:
    from thinklens.figures import export
    from thinklens.plots import plot_probe_by_layer, plot_probe_grid

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
            tmp = folder / f".{stem}.tmp.{fmt}"
            if fmt == "html":
                fig.write_html(tmp, include_plotlyjs="directory", full_html=True)
            else:
                export(fig, tmp)
            tmp.replace(path)
            written.append(str(path.relative_to(out)))
    return written


def _probe(store, p: dict, rows: list[dict], out: Path, formats: list[str]) -> dict:
    from .labels import resolve
    from .sweep import sweep

    key = _digest({"probe": p, "traces": store.trace_ids, "sites": store.keys})
    file = out / "results" / f"{p['name']}.json"
    if file.exists():
        old = json.loads(file.read_text())
        if old.get("hash") == key:
            return {**old, "skipped": True}
    t0 = time.time()
    traces = store.traces
    lab = resolve(p["labels"], traces, rows)
    sites = p["sites"] or store.keys
    res = sweep(store, sites, lab.labels, level=lab.level, positions=p["positions"],
                kind=p["kind"], l2=float(p["l2"]), class_weight=p["class_weight"],
                control=p["control"], n_boot=p["n_boot"], test_frac=p["test_frac"],
                seed=p["seed"])
    pos, site = res.best()
    k, s = res.positions.index(pos), res.sites.index(site)
    main = res.main_metric
    summary = {"best_site": site, "best_position": pos, main: float(res.grid()[k, s]),
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
    _write_json(file, record)
    return {**record, "skipped": False}


def run_study(config: str | Path | dict[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the study in ``config`` (a path or a parsed dict); returns the summary.

    Under torchrun, ranks other than 0 return ``{}`` after the capture stage.
    """
    import thinklens

    cfg = load_config(config) if not isinstance(config, dict) else config
    out = Path(cfg["out"])
    rank, world = _distributed()
    try:
        out.mkdir(parents=True, exist_ok=True)
        _check_state(out, cfg, rank)
        t0 = time.time()
        recs = records(cfg)
        _check_fields(cfg, [row for _, _, row in recs])  # before hours of generation
        m = cfg["model"]
        device = m["device"]
        if device is None and world > 1:
            import torch
            if torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        model = thinklens.load(m["spec"], device=device, checkpoint=m["checkpoint"])
        store = _capture_stage(model, cfg, recs, out, rank, world)
        if rank != 0:
            return {}
        t_capture = time.time() - t0
        by_id = {pid: row for pid, _, row in recs}
        rows = [by_id.get(tid, {}) for tid in store.trace_ids]
        results = {}
        bar = tqdm(cfg["probe"], desc="probes", unit="probe", disable=not progress)
        for p in bar:
            r = _probe(store, p, rows, out, cfg["output"]["figures"])
            results[p["name"]] = r
            s = r["summary"]
            main = "accuracy" if "accuracy" in s else "r2"
            ctrl = (f" (control {s['control']:.3f}, selectivity {s['selectivity']:.3f})"
                    if s["control"] is not None else "")
            _say(rank, world, f"probe {p['name']!r} ({p['labels']}): best {s['best_site']} "
                 f"{main} {s[main]:.3f}{ctrl}{' [done before, skipped]' if r['skipped'] else ''}")
        summary = {"model": model.name, "traces": len(store), "world_size": world,
                   "capture_seconds": round(t_capture, 1),
                   "probes": {n: {"labels": r["labels"], "level": r["level"], **r["summary"],
                                  "figures": r["figures"], "file": f"results/{n}.json"}
                              for n, r in results.items()}}
        _write_json(out / "results.json", summary)
        _say(rank, world, f"results: {out / 'results.json'} ({time.time() - t0:.1f} s)")
        return summary
    finally:
        if world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
