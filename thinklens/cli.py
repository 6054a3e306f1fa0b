"""The ``thinklens`` command line: one job call per command (arguments: :mod:`thinklens.cli_args`).

Run ``thinklens --help`` or ``thinklens CMD --help``. Each command calls one function of
:mod:`thinklens.jobs` (demo, think, capture, sites, probe), :mod:`thinklens.report` or
:mod:`thinklens.zoo` (organism train/ship/eval) and prints what it returns; the work and
its progress bars live there, and nothing imports this module.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from thinklens import cli_args
from thinklens.errors import ConfigError, ThinklensError
from thinklens.hooks.model import load
from thinklens.jobs import commands
from thinklens.jobs.anchors import run_anchors
from thinklens.jobs.dynamics import dynamics_job
from thinklens.jobs.study import run_study
from thinklens.report import report as run_report
from thinklens.zoo.evaluate import as_json, evaluate, table
from thinklens.zoo.organism import HERE
from thinklens.zoo.train import TrainConfig, ship, train


def _say(*parts: object) -> None:
    print(*parts, flush=True)


def _demo(args) -> int:
    res = commands.demo(args.model, args.out, log=_say)
    for tr in res.store.traces:
        _say(f"  {tr.prompt!r}\n    thinking: {tr.thinking_text}\n    answer: {tr.answer_text}"
             f"   ({len(tr.sentences)} sentences, tags {sorted(set(tr.tags))})")
    s = res.summary
    _say(f"residual streams {tuple(s['resid_shape'])} {tuple(s['resid_axes'])}; sentence "
         f"attention {tuple(s['sentence_attention_shape'])} {tuple(s['sentence_attention_axes'])}")
    _say(f"output: {res.out.resolve()}/ (store/, traces/*.json, summary.json) in "
         f"{s['seconds']} s")
    return 0


def _think(args) -> int:
    res = commands.think(args.prompts, args.out, model=args.model, device=args.device,
                         engine=args.engine, samples=args.samples,
                         temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, seed=args.seed,
                         thinking=args.thinking, batch_size=args.batch_size, chunk=args.chunk,
                         progress=not args.no_progress)
    cut = sum(t.truncated for t in res.traces)
    _say(f"{len(res.traces)} traces in {args.out} ({res.written} written this run, {cut} "
         f"truncated at --max-new-tokens) in {res.seconds:.1f} s")
    return 0


_GENERATION = {"max_new_tokens": 256, "temperature": 0.0, "seed": 0, "thinking": "auto"}


def _capture(args) -> int:
    gen = {k: getattr(args, k) for k in _GENERATION}
    common = {"positions": args.positions, "batch_size": args.batch_size, "dtype": args.dtype,
              "budget": args.budget,
              "attention": None if args.attention == "none" else args.attention}
    if args.traces is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in gen.items() if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} set(s) generation, but --traces captures "
                              "traces already made; drop it, or generate with `thinklens think`")
        res = commands.capture(None, args.out, traces=args.traces, model=args.model,
                               device=args.device, sites=args.sites, **common)
    else:
        gen = {k: v if v is not None else _GENERATION[k] for k, v in gen.items()}
        res = commands.capture(args.prompts, args.out, model=args.model, device=args.device,
                               sites=args.sites, chunk=args.chunk, **gen, **common)
    _say(f"stored {len(res.store)} traces × {len(res.store.keys)} keys in {args.out} "
         f"({res.seconds:.1f} s)")
    return 0


def _dynamics(args) -> int:
    heads = None
    if args.heads:
        try:
            heads = [tuple(int(x) for x in h.split(".")) for h in args.heads.split(",")]
        except ValueError:
            raise ConfigError(f"--heads {args.heads!r}; give LAYER.HEAD pairs, e.g. 1.0,1.3") \
                from None
    revisions = [r for r in args.revisions.split(",") if r] if args.revisions else None
    job = dynamics_job(args.model, args.out, measure=args.measure, revisions=revisions,
                       heads=heads, device=args.device, progress=not args.no_progress,
                       formats=[f.strip() for f in args.formats.split(",") if f.strip()])
    dyn = job.dynamics
    for key in [k for k in dyn.rows[-1] if k.startswith("heads.")]:
        v = dyn.values(key)
        layer, head = divmod(int(v[-1].argmax()), v.shape[-1])
        series = " ".join(f"{x:.2f}" for x in v[:, layer, head].tolist())
        _say(f"{key[6:]:<13} best head at {dyn.labels[-1]}: L{layer}H{head}; by checkpoint: "
             f"{series}")
    for row in dyn.table() if dyn.measure != "heads" else []:
        if len(row) > 2:
            _say("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()))
    _say(f"checkpoints: {', '.join(dyn.labels)}; output: {job.out.resolve()}/ "
         f"({len(job.files)} files)")
    return 0


def _sites(args) -> int:
    for name in commands.site_names(args.model, args.match):
        _say(name)
    return 0


def _probe(args) -> int:
    run_study(args.config, progress=not args.no_progress, log=_say)
    return 0


def _report(args) -> int:
    t0 = time.time()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    given = commands.report_inputs(args.prompts, args.traces)
    path = run_report(args.model, args.out, n_problems=args.n_problems, formats=formats,
                      max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                      **given)
    size = path.stat().st_size / 1e6
    figs = f", figures in {path.parent / 'figures'}" if formats else ""
    _say(f"report: {path.resolve()} ({size:.1f} MB{figs}) in {time.time() - t0:.0f} s")
    return 0


def _anchors(args) -> int:
    res = run_anchors(args.model, args.traces, args.out,
                      measures=[m.strip() for m in args.measures.split(",") if m.strip()],
                      n=args.n, temperature=args.temperature, comparator=args.comparator,
                      max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device,
                      progress=not args.no_progress)
    skipped = sum("skipped" in r for r in res.rows)
    _say(f"{len(res.rows)} traces in {res.path} ({res.written} scored this run, {skipped} "
         f"skipped with the reason) in {res.seconds:.1f} s")
    return 0


def _organism_train(args) -> int:
    kw = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size,
                            "ckpt_every": args.ckpt_every}.items() if v is not None}
    t0 = time.time()
    final = train(TrainConfig(seed=args.seed, **kw), args.out)
    _say(f"final weights: {final} ({time.time() - t0:.0f} s this run); "
         f"log: {Path(args.out) / 'log.jsonl'}")
    return 0


def _organism_ship(args) -> int:
    steps = [int(s) for s in args.checkpoints.split(",") if s.strip()]
    ship(Path(args.run), HERE, steps, final=args.final)
    _say(f"shipped final weights and checkpoints {steps} to {HERE}")
    return 0


def _organism_eval(args) -> int:
    specs = [s.strip() for s in args.model.split(",") if s.strip()]
    results = {}
    for spec in specs:
        model = load(spec, checkpoint=args.checkpoint) if spec in ORGANISMS else load(spec)
        t0 = time.time()
        res = evaluate(model, depths=[int(d) for d in args.depths.split(",")], n=args.n)
        results[spec] = as_json(res)
        if not args.json:
            _say(table(res))
            _say(f"({model.name}, {args.n} held-out problems per depth, "
                 f"{time.time() - t0:.0f} s)")
    if args.json:  # one model: its rows; several: {spec: rows}
        _say(json.dumps(results[specs[0]] if len(specs) == 1 else results, indent=1))
    return 0


ORGANISMS = ("organism", "organism-backtrack")  # names whose shipped checkpoints load


COMMANDS = {"demo": _demo, "think": _think, "capture": _capture, "sites": _sites, "probe": _probe,
            "report": _report, "dynamics": _dynamics, "anchors": _anchors,
            "organism train": _organism_train,
            "organism ship": _organism_ship, "organism eval": _organism_eval}


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.parser()
    args = parser.parse_args(argv)
    if args.cmd is None or (args.cmd == "organism" and args.ocmd is None):
        parser.print_help() if args.cmd is None else parser.parse_args([args.cmd, "--help"])
        return 2
    name = args.cmd + (f" {args.ocmd}" if args.cmd == "organism" else "")
    try:
        return COMMANDS[name](args)
    except ThinklensError as err:
        print(f"thinklens: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # one line, not a traceback: what is saved, how to go on
        given = sys.argv[1:] if argv is None else list(argv)
        target = getattr(args, commands.RESUMABLE.get(name, ""), None)
        print(f"thinklens: interrupted; {commands.interrupted(name, target, given)}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["main"]
