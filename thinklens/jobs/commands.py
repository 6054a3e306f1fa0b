"""The small jobs behind ``thinklens demo``, ``think``, ``capture`` and ``sites``.

Each returns data (a dataclass or a list) and prints nothing; :mod:`thinklens.cli` parses
the arguments, calls one of these and prints the result.

- :func:`demo` — think on :data:`DEMO_PROMPTS`, capture every layer's residual stream and
  per-head sentence×sentence attention into ``OUT/store`` (resumable, through
  :func:`thinklens.jobs.journal.run_capture`), write each trace to ``OUT/traces/`` and a
  summary to ``OUT/summary.json``.
- :func:`think` — a JSONL prompts file into a JSONL traces file, resumable (through
  :func:`thinklens.jobs.traces.run_think`).
- :func:`capture` — a JSONL prompts file (generate, then capture) or a traces file
  (capture only, no generation) into a store, resumable.
- :func:`site_names` — a model's site (hook) names matching a glob.
- :func:`report_inputs` — ``thinklens report``'s prompts or traces file, read and checked.
- :func:`saved` — what an interrupted command left, for the one line the CLI prints.

Files are checked before the model is loaded: a bad line is refused with its number.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinklens.errors import ConfigError, ThinklensError
from thinklens.hooks._fileio import atomic_write_json
from thinklens.hooks.dtypes import parse_dtype
from thinklens.hooks.model import load
from thinklens.hooks.store import Store

from .checks import check_capture_args, check_store
from .journal import PENDING, read_jsonl, read_prompts, run_capture
from .traces import ThinkResult, check_think_args, plan_think, read_traces, run_think

_CAPTURE_ARGS = ("positions", "attention", "dtype", "budget", "batch_size", "chunk")
DEMO_PROMPTS = [
    "c = b + 4 ; a = 7 ; b = a - 2 ; ? c",
    "e = 5 ; d = e + 3 ; g = 1 ; ? d",
    "h = f - 1 ; f = k + 6 ; k = 2 ; j = 9 ; ? h",
    "b = 4 ; ? b",
    "l = i + 2 ; c = 8 ; i = g - 3 ; g = c + 5 ; a = 3 ; ? l",
    "d = a - 3 ; a = 6 ; f = 0 ; ? d",
]


@dataclass
class DemoResult:
    """What :func:`demo` made: the store, the model's name and ``OUT/summary.json``'s content."""

    store: Store
    model_name: str
    out: Path
    summary: dict[str, Any]


@dataclass
class CaptureResult:
    """What :func:`capture` made: the store and how long this run took."""

    store: Store
    seconds: float


def demo(model: str = "organism", out: str | os.PathLike[str] = "thinklens-demo", *,
         log: Callable[[str], None] | None = None) -> DemoResult:
    """Think on the demo prompts and capture them into ``out``; see the module docstring.

    Example::

        res = demo(out="thinklens-demo")
        res.summary["resid_shape"]      # [6, 4, T, 128]: (trace, layer, pos, d_model)
    """
    t0 = time.time()
    out = Path(out)
    m = load(model)
    if log is not None:
        log(f"loaded {m}")
    records = [(f"demo-{i}", p) for i, p in enumerate(DEMO_PROMPTS)]
    store = run_capture(m, records, out / "store", sites=["blocks.*.hook_resid_post"],
                        attention="sentence", max_new_tokens=96)
    traces_dir = out / "traces"
    traces_dir.mkdir(parents=True, exist_ok=True)
    for tr in store.traces:
        tr.to_json(traces_dir / f"{tr.meta['id']}.json")
    acts = store.stack("blocks.*.hook_resid_post")
    att = store["sentence_attention"]
    summary = {"model": m.name, "traces": len(store), "keys": store.keys,
               "resid_shape": list(acts.values.shape), "resid_axes": list(acts.axes),
               "sentence_attention_shape": list(att.values.shape),
               "sentence_attention_axes": list(att.axes),
               "seconds": round(time.time() - t0, 1)}
    atomic_write_json(out / "summary.json", summary)
    return DemoResult(store, m.name, out, summary)


def think(prompts: str | os.PathLike[str], out: str | os.PathLike[str], *,
          model: str = "organism", device: str | None = None, engine: str = "hf",
          samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
          max_new_tokens: int = 256, seed: int = 0, thinking: str = "auto",
          progress: bool = True, **kw: Any) -> ThinkResult:
    """Generate ``samples`` traces per prompt of a JSONL file into the traces file ``out``.

    Example::

        res = think("prompts.jsonl", "traces.jsonl", samples=4, temperature=0.7)
        res.written, len(res.traces)    # traces written this run, traces in the file

    ``kw`` goes to :func:`thinklens.jobs.traces.run_think` (batch_size, chunk, log). The
    prompts file, the settings and an existing ``out`` are checked before the model loads.
    """
    records = [(pid, p) for pid, p, _ in read_prompts(prompts)]
    run = check_think_args(samples=samples, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, seed=seed, engine=engine,
                           thinking=thinking)
    plan_think(records, Path(out), run)  # a bad or mismatched traces file fails here
    m = load(model, device=device)
    return run_think(m, records, out, samples=samples, temperature=temperature, top_p=top_p,
                     max_new_tokens=max_new_tokens, seed=seed, engine=engine,
                     thinking=thinking, progress=progress, **kw)


def capture(prompts: str | os.PathLike[str] | None, out: str | os.PathLike[str], *,
            model: str = "organism", device: str | None = None, sites: Sequence[str] = (),
            progress: bool = True, traces: str | os.PathLike[str] | None = None,
            **kw: Any) -> CaptureResult:
    """Capture a JSONL prompts file (generating a trace for each) or a traces file into
    the store ``out``.

    With ``prompts``, ``kw`` goes to :func:`thinklens.jobs.journal.run_capture`
    (positions, attention, max_new_tokens, temperature, seed, batch_size, dtype, budget,
    chunk). With ``traces`` (a file ``thinklens think`` wrote), nothing is generated and
    no generation engine starts: the traces are captured as they are, exactly as
    ``model.capture(read_traces(traces), store=out, ...)`` would (``kw``: positions,
    attention, batch_size, dtype, budget); traces already in the store are skipped. The
    input file is checked before the model is loaded.
    """
    if (prompts is None) == (traces is None):
        raise ConfigError("give exactly one of prompts= (generate, then capture) or traces= "
                          "(capture traces made before, e.g. by `thinklens think`)")
    # every argument and the store's settings before the model loads (jobs.checks)
    check_capture_args(**{k: v for k, v in kw.items() if k in _CAPTURE_ARGS})
    check_store(out, positions=kw.get("positions", "all"))
    if traces is not None:
        given = read_traces(traces)
        m = load(model, device=device)
        t0 = time.time()
        keys = m.sites(sites) if sites else []
        check_store(out, positions=kw.get("positions", "all"), keys=keys,
                    attention=kw.get("attention"), dtype=parse_dtype(kw.get("dtype")) or m.dtype)
        Path(out).mkdir(parents=True, exist_ok=True)
        store = m.capture(given, sites=keys, store=Path(out), progress=progress, **kw)
        return CaptureResult(store, time.time() - t0)
    records = [(pid, p) for pid, p, _ in read_prompts(prompts)]
    check_think_args(samples=1, temperature=kw.get("temperature", 0.0), top_p=1.0,
                     max_new_tokens=kw.get("max_new_tokens", 256), seed=kw.get("seed", 0) or 0,
                     engine="hf", thinking=kw.get("thinking", "auto"))
    m = load(model, device=device)
    t0 = time.time()
    store = run_capture(m, records, Path(out), sites=list(sites), progress=progress, **kw)
    return CaptureResult(store, time.time() - t0)


def report_inputs(prompts: str | os.PathLike[str] | None,
                  traces: str | os.PathLike[str] | None) -> dict[str, Any]:
    """``thinklens report``'s input: ``{"prompts": [row, ...]}`` (the prompts file's rows,
    ``answer`` keys kept), ``{"traces": [...]}`` (the traces file's, studied as they are)
    or ``{}`` (the defaults). Files are read and checked here, before a model loads."""
    if prompts is not None and traces is not None:
        raise ConfigError("give a prompts file or a traces file, not both")
    if prompts is not None:
        return {"prompts": [row for _, _, row in read_prompts(prompts)]}
    if traces is not None:
        return {"traces": read_traces(traces)}
    return {}


def saved(command: str, target: str | os.PathLike[str] | None) -> str:
    """What an interrupted ``command`` left at ``target`` (its --out, or a probe's config),
    in a few words, e.g. ``'12 traces stored in acts/ (3 more generated, not yet stored)'``."""
    if target is None:
        return "nothing is saved before this command finishes"
    path = Path(target)
    if command == "probe":
        from .config import load_config
        path = Path(load_config(path)["out"])
        done = len(list((path / "results").glob("*.json")))
        return f"{_stored(path / 'store')}, {done} probe result(s) in {path / 'results'}"
    if command in ("think", "anchors"):
        n = sum(1 for line in path.read_text().splitlines() if line.strip()) \
            if path.is_file() else 0
        if command == "anchors":   # its first line holds the settings
            return f"{max(n - 1, 0)} traces scored in {path}"
        return f"{n} traces in {path}"
    if command == "demo":
        path = path / "store"
    if command == "organism train":
        return f"checkpoints in {path}"
    if command == "dynamics":
        n = sum(1 for line in (path / "journal.jsonl").read_text().splitlines()
                if line.strip()) if (path / "journal.jsonl").is_file() else 0
        return f"{n} checkpoint(s) measured in {path / 'journal.jsonl'}"
    return _stored(path)


def _stored(path: Path) -> str:
    ids = set(Store.open(path, verify="none").trace_ids) \
        if (path / "manifest.json").is_file() else set()
    pending = path / PENDING
    journaled = {row["meta"]["id"] for row in read_jsonl(pending)} if pending.is_file() \
        else set()
    extra = len(journaled - ids)
    more = f" ({extra} more generated, not yet stored)" if extra else ""
    return f"{len(ids)} traces stored in {path}{more}"


def site_names(model: str = "organism", match: str = "*") -> list[str]:
    """The site names of ``model`` that match the glob ``match``, in the model's order."""
    return [n for n in load(model).site_names if fnmatch.fnmatchcase(n, match)]


RESUMABLE = {"capture": "out", "think": "out", "demo": "out", "probe": "config",
             "organism train": "out", "dynamics": "out", "anchors": "out"}


def interrupted(name: str, target: str | os.PathLike[str] | None, argv: list[str]) -> str:
    """What an interrupted command saved at ``target`` (its ``RESUMABLE`` argument) and the
    command line that resumes it (or reruns it)."""
    again = shlex.join(["thinklens", *argv])
    if name not in RESUMABLE:
        return f"{name} saves nothing before it finishes; rerun: {again}"
    try:
        what = saved(name, target)
    except (ThinklensError, OSError, ValueError) as err:
        what = f"could not read what was saved ({err})"
    return f"{what}; resume with: {again}"


__all__ = ["DemoResult", "CaptureResult", "demo", "think", "capture", "site_names",
           "report_inputs", "saved", "RESUMABLE", "interrupted"]
