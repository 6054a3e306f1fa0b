"""Sentence importance over a traces file, one JSON line per trace: ``thinklens anchors``.

The batch form of :mod:`thinklens.circuits`' thought-anchor measures (Bogdan et al. 2025,
arXiv 2506.19143): for every trace of a traces file (``thinklens think`` writes them), one
score per thinking sentence from each chosen measure.

1. **Check before the model loads**: the traces file (:func:`read_traces`), the measure
   names (:data:`MEASURES`), ``n >= 1``, ``max_new_tokens >= 1``, the comparator; an
   existing ``out`` must hold the same settings on its first line (a torn last line, what
   a kill mid-write leaves, is cut off first).
2. **Per trace not yet in ``out``** (matched by trace id), in file order: each measure on
   the trace (every trace's tokenizer is checked against the model's first). A trace the
   measures cannot score (no thinking sentences, no answer the extractor finds, too big
   for the memory budget) gets a line saying why, so a rerun does not retry it.
3. **Written as it goes**: each trace's line is appended and fsynced before the next trace
   starts, so a kill or Ctrl-C loses at most the trace in flight, and a rerun scores only
   the traces missing.

Line format (JSON lines): first ``{"settings": {...}}``, then per trace ``{"id",
"sentences": [text, ...], "scores": {name: [one value per sentence, null where the
measure leaves a sentence out]}, "seconds"}`` or ``{"id", "skipped": reason}``. Score
names: ``forced``, ``forced_kl`` (:func:`~thinklens.circuits.forced_answer`);
``suppression`` (drop of the answer's log-odds), ``suppression_kl``, ``suppression_chain``
(:func:`~thinklens.circuits.suppression`); ``total`` (drop of the answer's log-odds),
``total_kl``, ``total_changed`` (:func:`~thinklens.circuits.suppression_total`);
``attribution`` (estimated drop), ``attribution_chain`` (its chain estimate)
(:func:`~thinklens.circuits.sentence_attribution`);
``resampling``, ``resampling_kl``, ``resampling_low``, ``resampling_high``,
``counterfactual``, ``counterfactual_kl`` (:func:`~thinklens.circuits.resampling`).

Example::

    res = run_anchors("organism-backtrack", "traces.jsonl", "anchors.jsonl",
                      measures=["forced", "suppression", "total"])
    res.rows[0]["scores"]["total_kl"]     # one value per thinking sentence
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from thinklens import circuits as C
from thinklens.errors import BudgetError, ConfigError, PositionError, did_you_mean
from thinklens.hooks import forward as fwd
from thinklens.hooks._fileio import append_jsonl, kill_point, read_jsonl
from thinklens.hooks.capture import trace_id
from thinklens.hooks.model import load
from thinklens.hooks.trace import Trace
from thinklens.jobs.traces import read_traces


def _forced(model: Any, t: Trace, s: dict) -> dict:
    fa = C.forced_answer(model, t)
    return {"forced": fa.importance, "forced_kl": fa.kl}


def _suppression(model: Any, t: Trace, s: dict) -> dict:
    sup = C.suppression(model, t)
    return {"suppression": -sup.answer_logodds_delta, "suppression_kl": sup.answer_kl,
            "suppression_chain": sup.chain}


def _total(model: Any, t: Trace, s: dict) -> dict:
    tot = C.suppression_total(model, t, max_new_tokens=s["max_new_tokens"])
    return {"total": -tot.answer_logodds_delta, "total_kl": tot.answer_kl,
            "total_changed": tot.changed}


def _attribution(model: Any, t: Trace, s: dict) -> dict:
    att = C.sentence_attribution(model, t, chain=True)
    return {"attribution": -att.estimate, "attribution_chain": att.chain}


def _resampling(model: Any, t: Trace, s: dict) -> dict:
    ri = C.resampling(model, t, n=s["n"], temperature=s["temperature"],
                      max_new_tokens=s["max_new_tokens"], comparator=s["comparator"],
                      seed=s["seed"], progress=False)
    return {"resampling": ri.resampling, "resampling_kl": ri.resampling_kl,
            "resampling_low": ri.resampling_interval[:, 0],
            "resampling_high": ri.resampling_interval[:, 1],
            "counterfactual": ri.counterfactual, "counterfactual_kl": ri.counterfactual_kl}


MEASURES: dict[str, Callable[[Any, Trace, dict], dict]] = {
    "forced": _forced, "suppression": _suppression, "total": _total,
    "attribution": _attribution, "resampling": _resampling}
DEFAULT_MEASURES = ("forced", "suppression", "total", "attribution")
COMPARATORS = ("exact", "embedding")


@dataclass
class AnchorsResult:
    """What :func:`run_anchors` did: the scores file, every trace's line, how many this run
    wrote, and its wall time."""

    path: Path
    rows: list[dict]
    written: int
    seconds: float


def check_anchors(traces: str | os.PathLike[str], out: str | os.PathLike[str], *,
                  measures: Sequence[str], n: int, temperature: float, max_new_tokens: int,
                  comparator: str, seed: int) -> tuple[list[Trace], dict, set[str]]:
    """Step 1 of the module docstring: the traces, the settings, and the ids ``out``
    already holds. Raises a ConfigError naming the bad value and the fix."""
    measures = list(measures)
    if not measures:
        raise ConfigError(f"no measures given; choose from {', '.join(MEASURES)}")
    for m in measures:
        if m not in MEASURES:
            raise ConfigError(f"unknown measure {m!r}{did_you_mean(m, MEASURES)}; valid: "
                              f"{', '.join(MEASURES)}")
    for name, v in (("n", n), ("max_new_tokens", max_new_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}={v!r}; give an integer >= 1")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)
            and temperature >= 0):
        raise ConfigError(f"temperature={temperature!r}; give a number >= 0")
    if comparator not in COMPARATORS:
        raise ConfigError(f"comparator={comparator!r}; valid: {', '.join(COMPARATORS)}")
    trs = read_traces(traces)
    settings = {"traces": str(Path(traces).resolve()), "measures": sorted(set(measures)),
                "n": n, "temperature": float(temperature), "max_new_tokens": max_new_tokens,
                "comparator": comparator, "seed": seed}
    out = Path(out)
    done: set[str] = set()
    if out.exists():
        rows = read_jsonl(out, repair=True)
        if rows and rows[0].get("settings") != settings:
            raise ConfigError(f"{out} holds scores made with other settings "
                              f"({rows[0].get('settings')}); give another --out, or the "
                              "same settings to resume it")
        done = {r["id"] for r in rows[1:]}
    elif not out.parent.is_dir():
        raise ConfigError(f"cannot write {str(out)!r}: no folder {str(out.parent)!r}")
    return trs, settings, done


def _clean(x: Any) -> list[float | None]:
    return [None if v != v else float(v) for v in x.tolist()]


def run_anchors(model: Any, traces: str | os.PathLike[str], out: str | os.PathLike[str], *,
                measures: Sequence[str] = DEFAULT_MEASURES, n: int = 50,
                temperature: float = 1.0, max_new_tokens: int = 256,
                comparator: str = "exact", seed: int = 0, device: str | None = None,
                progress: bool = True) -> AnchorsResult:
    """Score every trace of ``traces`` with ``measures`` into ``out`` (module docstring).

    ``model``: a loaded Model or a spec for :func:`thinklens.load` (loaded after the
    checks). ``n``, ``temperature``, ``comparator``, ``seed``: the resampling's rollouts;
    ``max_new_tokens``: each rollout's and each total-effect rewrite's limit.
    """
    t0 = time.perf_counter()
    trs, settings, done = check_anchors(traces, out, measures=measures, n=n,
                                        temperature=temperature,
                                        max_new_tokens=max_new_tokens,
                                        comparator=comparator, seed=seed)
    out = Path(out)
    if not out.exists():
        append_jsonl(out, [{"settings": settings}])
    todo = [t for t in trs if trace_id(t) not in done]
    if todo and isinstance(model, str):
        model = load(model, device=device)
    if todo:   # traces of another model's tokenizer fail here, before any is scored
        fwd.as_traces(model, todo)
    written = 0
    for t in tqdm(todo, desc="anchors", unit="trace", disable=not progress):
        a = time.perf_counter()
        row: dict[str, Any] = {"id": trace_id(t)}
        try:
            scores: dict[str, Any] = {}
            for m in settings["measures"]:
                scores |= {k: _clean(v) for k, v in MEASURES[m](model, t, settings).items()}
            row |= {"sentences": [s.text for s in t.sentences], "scores": scores}
        except (ConfigError, PositionError, BudgetError) as e:   # say why; do not retry
            row["skipped"] = str(e)
        row["seconds"] = round(time.perf_counter() - a, 4)
        append_jsonl(out, [row])
        written += 1
        kill_point("anchors.trace")
    rows = read_jsonl(out)[1:]
    return AnchorsResult(out, rows, written, time.perf_counter() - t0)


def read_anchors(path: str | os.PathLike[str]) -> tuple[dict, list[dict]]:
    """The settings and the per-trace lines of a scores file :func:`run_anchors` wrote."""
    rows = read_jsonl(path)
    if not rows or "settings" not in rows[0]:
        raise ConfigError(f"{path} is not a scores file of `thinklens anchors` (its first "
                          "line holds no settings)")
    return rows[0]["settings"], rows[1:]


__all__ = ["AnchorsResult", "COMPARATORS", "DEFAULT_MEASURES", "MEASURES", "check_anchors",
           "read_anchors", "run_anchors"]
