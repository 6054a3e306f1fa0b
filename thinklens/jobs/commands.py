"""The small jobs behind ``thinklens demo``, ``thinklens capture`` and ``thinklens sites``.

Each returns data (a dataclass or a list) and prints nothing; :mod:`thinklens.cli` parses
the arguments, calls one of these and prints the result.

- :func:`demo` — think on :data:`DEMO_PROMPTS`, capture every layer's residual stream and
  per-head sentence×sentence attention into ``OUT/store`` (resumable, through
  :func:`thinklens.jobs.journal.run_capture`), write each trace to ``OUT/traces/`` and a
  summary to ``OUT/summary.json``.
- :func:`capture` — a JSONL prompts file into a store, resumable.
- :func:`site_names` — a model's site (hook) names matching a glob.
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinklens.hooks._fileio import atomic_write_json
from thinklens.hooks.model import load
from thinklens.hooks.store import Store

from .journal import read_prompts, run_capture

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


def capture(prompts: str | os.PathLike[str], out: str | os.PathLike[str], *,
            model: str = "organism", device: str | None = None, sites: Sequence[str] = (),
            progress: bool = True, **kw: Any) -> CaptureResult:
    """Generate a trace for each prompt of a JSONL file and capture it into the store ``out``.

    ``kw`` goes to :func:`thinklens.jobs.journal.run_capture` (positions, attention,
    max_new_tokens, temperature, seed, batch_size, dtype, budget, chunk). The prompts file
    is checked before the model is loaded.
    """
    records = [(pid, p) for pid, p, _ in read_prompts(prompts)]
    m = load(model, device=device)
    t0 = time.time()
    store = run_capture(m, records, Path(out), sites=list(sites), progress=progress, **kw)
    return CaptureResult(store, time.time() - t0)


def site_names(model: str = "organism", match: str = "*") -> list[str]:
    """The site names of ``model`` that match the glob ``match``, in the model's order."""
    return [n for n in load(model).site_names if fnmatch.fnmatchcase(n, match)]


__all__ = ["DemoResult", "CaptureResult", "demo", "capture", "site_names"]
