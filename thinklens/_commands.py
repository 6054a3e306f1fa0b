"""What the ``thinklens`` subcommands do (argument parsing lives in :mod:`thinklens.cli`)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from thinklens.errors import ConfigError

PENDING = "pending-traces.jsonl"  # traces generated but not yet captured (resume aid)


def _say(*parts) -> None:
    print(*parts, flush=True)  # noqa: T201 - the CLI talks to its user


def _prompt_records(path: str) -> list[tuple[str, str]]:
    from thinklens.cli import _json_lines

    if not Path(path).exists():
        raise ConfigError(f"prompts file {path!r} does not exist; give a JSONL file with one "
                          '{"prompt": "..."} object per line')
    out, seen = [], set()
    for n, row in enumerate(_json_lines(path), 1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f"{path}: line {n} has no string 'prompt' key: {row!r}")
        pid = str(row.get("id") or hashlib.sha256(row["prompt"].encode()).hexdigest()[:16])
        if pid in seen:
            raise ConfigError(f"{path}: line {n} repeats id {pid!r}; ids must be unique")
        seen.add(pid)
        out.append((pid, row["prompt"]))
    return out


def _drop_torn_tail(path: Path) -> None:
    """Cut a JSONL file after its last complete line (what a killed writer left)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def run_capture(model, records, out: Path, *, sites, positions="all", attention=None,
                max_new_tokens=256, temperature=0.0, seed=0, batch_size=8, dtype=None,
                budget=None, chunk: int = 32) -> object:
    """Think on every (id, prompt) not yet stored and capture it into the store at ``out``.

    Resumable at every step: generated traces are appended to ``pending-traces.jsonl``
    (fsynced per chunk) before capture, so a rerun neither regenerates them nor
    recaptures what the store holds.
    """
    from thinklens.cli import _json_lines
    from thinklens.hooks.store import Store
    from thinklens.hooks.trace import Trace

    out.mkdir(parents=True, exist_ok=True)
    keys = model.sites(sites) if sites else []
    store = None
    if (out / "manifest.json").exists():
        store = Store.open(out, verify="size")
    done = set(store.trace_ids) if store is not None else set()
    pending = {}
    if (out / PENDING).exists():
        _drop_torn_tail(out / PENDING)  # a kill mid-line; appending after it would bury it
        for row in _json_lines(out / PENDING):
            pending[row["meta"]["id"]] = Trace.from_dict(row)
    todo = [(pid, p) for pid, p in records if pid not in done]
    bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="prompts",
               unit="prompt")
    for start in range(0, len(todo), chunk):
        part = todo[start: start + chunk]
        fresh = [(pid, p) for pid, p in part if pid not in pending]
        if fresh:
            made = model.think_batch([p for _, p in fresh], max_new_tokens=max_new_tokens,
                                     temperature=temperature, seed=seed, progress=False)
            with open(out / PENDING, "a") as f:
                for (pid, _), tr in zip(fresh, made):
                    tr.meta["id"] = pid
                    pending[pid] = tr
                    f.write(json.dumps(tr.to_dict()) + "\n")
                f.flush()
                os.fsync(f.fileno())
        store = model.capture([pending[pid] for pid, _ in part], sites=keys,
                              positions=positions, attention=attention, dtype=dtype,
                              store=store if store is not None else out,
                              batch_size=batch_size, budget=budget, progress=False)
        bar.update(len(part))
    bar.close()
    if store is None:
        store = Store.open(out, verify="size")
    if (out / PENDING).exists() and all(pid in store for pid in pending):
        (out / PENDING).unlink()
    return store


def capture(args) -> int:
    import thinklens

    records = _prompt_records(args.prompts)
    model = thinklens.load(args.model, device=args.device)
    t0 = time.time()
    store = run_capture(model, records, Path(args.out), sites=args.sites,
                        positions=args.positions,
                        attention=None if args.attention == "none" else args.attention,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        seed=args.seed, batch_size=args.batch_size, dtype=args.dtype,
                        budget=args.budget, chunk=args.chunk)
    _say(f"stored {len(store)} traces × {len(store.keys)} keys in {args.out} "
         f"({time.time() - t0:.1f} s)")
    return 0


def demo(args) -> int:
    import thinklens
    from thinklens.cli import DEMO_PROMPTS

    t0 = time.time()
    out = Path(args.out)
    model = thinklens.load(args.model)
    _say(f"loaded {model}")
    records = [(f"demo-{i}", p) for i, p in enumerate(DEMO_PROMPTS)]
    store = run_capture(model, records, out / "store", sites=["blocks.*.hook_resid_post"],
                        attention="sentence", max_new_tokens=96)
    traces_dir = out / "traces"
    traces_dir.mkdir(parents=True, exist_ok=True)
    for tr in store.traces:
        tr.to_json(traces_dir / f"{tr.meta['id']}.json")
        _say(f"  {tr.prompt!r}\n    thinking: {tr.thinking_text}\n    answer: {tr.answer_text}"
             f"   ({len(tr.sentences)} sentences, tags {sorted(set(tr.tags))})")
    acts = store.stack("blocks.*.hook_resid_post")
    att = store["sentence_attention"]
    summary = {"model": model.name, "traces": len(store), "keys": store.keys,
               "resid_shape": list(acts.values.shape), "resid_axes": list(acts.axes),
               "sentence_attention_shape": list(att.values.shape),
               "seconds": round(time.time() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _say(f"residual streams {tuple(acts.values.shape)} {acts.axes}; sentence attention "
         f"{tuple(att.values.shape)} {att.axes}")
    _say(f"output: {out.resolve()}/ (store/, traces/*.json, summary.json) in "
         f"{summary['seconds']} s")
    return 0


def sites(args) -> int:
    import fnmatch

    import thinklens

    model = thinklens.load(args.model)
    for name in model.site_names:
        if fnmatch.fnmatchcase(name, args.match):
            _say(name)
    return 0


def organism_train(args) -> int:
    from thinklens.zoo.train import TrainConfig, train

    kw = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size,
                            "ckpt_every": args.ckpt_every}.items() if v is not None}
    t0 = time.time()
    final = train(TrainConfig(seed=args.seed, **kw), args.out)
    _say(f"final weights: {final} ({time.time() - t0:.0f} s this run); "
         f"log: {Path(args.out) / 'log.jsonl'}")
    return 0


def organism_ship(args) -> int:
    from thinklens.zoo.organism import HERE
    from thinklens.zoo.train import ship

    steps = [int(s) for s in args.checkpoints.split(",") if s.strip()]
    ship(Path(args.run), HERE, steps, final=args.final)
    _say(f"shipped final weights and checkpoints {steps} to {HERE}")
    return 0


def organism_eval(args) -> int:
    import thinklens
    from thinklens.zoo.evaluate import as_json, evaluate, table

    spec = args.model
    model = thinklens.load(spec, checkpoint=args.checkpoint) if spec == "organism" else \
        thinklens.load(spec)
    depths = [int(d) for d in args.depths.split(",")]
    t0 = time.time()
    res = evaluate(model, depths=depths, n=args.n)
    if args.json:
        _say(json.dumps(as_json(res), indent=1))
    else:
        _say(table(res))
        _say(f"({model.name}, {args.n} held-out problems per depth, {time.time() - t0:.0f} s)")
    return 0



def probe(args) -> int:
    from thinklens.probes.job import run_study

    run_study(args.config, progress=not args.no_progress)
    return 0


def report(args) -> int:
    from thinklens.report import report as run_report

    t0 = time.time()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    path = run_report(args.model, args.out, n_problems=args.n_problems, formats=formats,
                      max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    size = path.stat().st_size / 1e6
    figs = f", figures in {path.parent / 'figures'}" if formats else ""
    _say(f"report: {path.resolve()} ({size:.1f} MB{figs}) in {time.time() - t0:.0f} s")
    return 0
