"""Training dynamics: one per-model measurement run over a list of checkpoints.

Abilities appear abruptly in training, and the reorganisation shows inside the model
(induction heads form in a phase change, Olsson et al. 2022, "In-context learning and
induction heads"). :func:`run_dynamics` measures the same thing at every checkpoint:

1. **Checkpoints** (:func:`checkpoints`): a bundled model's shipped ones and its final
   weights (``"organism"``), a folder of training checkpoints (subfolders ``step-N`` /
   ``checkpoint-N``, or ``checkpoints/step-N`` beside ``final/``), or a hub model's
   revisions (``checkpoints("EleutherAI/pythia-70m", revisions=["step1000", ...])``).
   Each has a label and a training step; the training curve beside them (``curve.json``,
   a run's ``log.jsonl``) is kept for the figures.
2. **A measure** (:class:`Measure`): a name, its settings and ``fn(model) -> dict`` of
   JSON values. Ready ones: :func:`heads_measure` (every head's scores,
   :func:`thinklens.circuits.head_scores`), :func:`icl_measure` (loss at a late token −
   at an early one), :func:`probe_measure` (a probe sweep over layers),
   :func:`faithfulness_measure` (a circuit's faithfulness on a pair each checkpoint builds).
3. **One model at a time**: load, measure, append the row to the journal, free the model
   before the next loads (peak memory of one model, ``benchmarks/bench_dynamics.py``).
4. **Resumable**: with ``out=`` each finished checkpoint is one fsynced JSONL line
   (:func:`thinklens.hooks._fileio.append_jsonl`); a rerun skips the checkpoints already
   there, refuses a journal written with other settings, and drops a torn last line.
5. **Result** (:class:`Dynamics`): a table by checkpoint (``rows``), stacked values
   (``values("heads.lookup")`` → ``[checkpoint, layer, head]``) and the per-interval
   rises that place a phase change (:meth:`Dynamics.rises`).

Example::

    dyn = run_dynamics("organism", heads_measure(), out="runs/heads.jsonl")
    dyn.steps                                   # [250, 750, 1000, 1500, 2500]
    dyn.series("heads.lookup", (1, 0))          # the lookup head's score by checkpoint
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from thinklens import probes
from thinklens.circuits import head_scores, icl_score, reference_traces
from thinklens.errors import ConfigError
from thinklens.figures import export
from thinklens.hooks._fileio import append_jsonl, atomic_path, atomic_write_json, read_jsonl
from thinklens.hooks.model import load
from thinklens.hooks.task import model_folder, registered_models
from thinklens.hooks.trace import Trace
from thinklens.plots.dynamics import plot_checkpoint_heads, plot_dynamics

_STEP = re.compile(r"^(?:step|checkpoint|ckpt)[-_]?(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: ``label`` (unique), training ``step`` and how to load it."""

    label: str
    step: int | None
    spec: str
    checkpoint: int | None = None   # a bundled model's shipped checkpoint
    revision: str | None = None     # a hub revision

    def load(self, **kw: Any):
        return load(self.spec, checkpoint=self.checkpoint, revision=self.revision, **kw)


def _curve(folder: Path) -> list[dict]:
    if (folder / "curve.json").exists():
        return json.loads((folder / "curve.json").read_text())
    if (folder / "log.jsonl").exists():
        return read_jsonl(folder / "log.jsonl")
    return []


def _steps_in(folder: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir()
             and (m := _STEP.match(p.name)) and (p / "config.json").exists()]
    return sorted(found)


def checkpoints(source: str | os.PathLike[str], *, revisions: Sequence[str] | None = None,
                final: bool = True) -> tuple[list[Checkpoint], list[dict]]:
    """``(checkpoints in training order, training curve rows or [])`` of ``source``.

    ``source``: a bundled model's name, a folder of checkpoints, or (with ``revisions``)
    a hub name. ``final``: add a bundled model's final weights (step: the curve's last).
    """
    src = str(source)
    if revisions is not None:
        revs = list(revisions)
        if not revs:
            raise ConfigError(f"revisions=[] for {src!r}; name at least one (e.g. 'step1000')")
        steps = [int(m.group(1)) if (m := re.search(r"(\d+)\D*$", r)) else None for r in revs]
        return [Checkpoint(r, s, src, revision=r) for r, s in zip(revs, steps)], []
    if src in registered_models():
        root = model_folder(src).parent
        curve = _curve(root)
        shipped = _steps_in(root / "checkpoints") if (root / "checkpoints").is_dir() else []
        out = [Checkpoint(p.name, s, src, checkpoint=s) for s, p in shipped]
        if final:
            out.append(Checkpoint("final", curve[-1]["step"] if curve else None, src))
        return out, curve
    folder = Path(src).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"checkpoints source {src!r} is neither a bundled model "
                          f"({', '.join(registered_models())}), a folder, nor a hub name with "
                          "revisions=[...]")
    base = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    out = [Checkpoint(p.name, s, str(p)) for s, p in _steps_in(base)]
    if final and (folder / "final" / "config.json").exists():
        curve = _curve(folder)
        out.append(Checkpoint("final", curve[-1]["step"] if curve else None,
                              str(folder / "final")))
    if not out:
        raise ConfigError(f"no checkpoints in {src!r}: expected subfolders step-N (or "
                          "checkpoint-N) holding config.json, or checkpoints/step-N")
    return out, _curve(folder)


@dataclass(frozen=True)
class Measure:
    """A per-model measurement: ``fn(model)`` returns a dict of JSON values."""

    name: str
    fn: Callable[[Any], dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)


def heads_measure(kinds: Sequence[str] | None = None, *,
                  texts: Sequence[tuple[str, str]] | None = None, **kw: Any) -> Measure:
    """Every head's scores (:func:`thinklens.circuits.head_scores`); keys ``heads.KIND``
    (``[layer, head]`` lists) and ``rows.KIND`` (query rows scored).

    ``texts``: ``(prompt, completion)`` pairs teacher-forced at every checkpoint instead of
    the task's correct completions, e.g. thinking with ``wait`` steps, whose backtracking
    lookups (``correction_copy``, ``corrected_copy``) the second organism's truth scores.
    """
    pairs = [(str(a), str(b)) for a, b in texts] if texts is not None else None

    def fn(model: Any) -> dict[str, Any]:
        traces = [Trace.from_text(model, a, b) for a, b in pairs] if pairs else None
        s = head_scores(model, kinds, traces=traces, **kw)
        return {**{f"heads.{k}": v.tolist() for k, v in s.scores.items()},
                **{f"rows.{k}": s.counts[k] for k in s.kinds}}
    digest = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16] if pairs else None
    return Measure("heads", fn, {"kinds": list(kinds) if kinds else None, "texts": digest, **kw})


def icl_measure(early: int = 50, late: int = 500, *, inputs: Sequence[Any] | None = None,
                n: int = 64, seed: int = 0) -> Measure:
    """The in-context-learning score (:func:`thinklens.circuits.icl_score`) on ``inputs``
    (token-id lists), else on ``n`` teacher-forced task problems; keys ``icl``,
    ``loss_early``, ``loss_late``, ``n``."""
    def fn(model: Any) -> dict[str, Any]:
        xs = inputs if inputs is not None else reference_traces(model, n, seed)
        r = icl_score(model, xs, early=early, late=late)
        return {"icl": r.score, "loss_early": r.loss_early, "loss_late": r.loss_late, "n": r.n}
    return Measure("icl", fn, {"early": early, "late": late, "n": n, "seed": seed,
                               "inputs": "given" if inputs is not None else "task"})


def probe_measure(labels: str, sites: str = "blocks.*.hook_resid_post", *, n: int = 48,
                  seed: int = 0, n_boot: int = 50) -> Measure:
    """A probe sweep (:func:`thinklens.probes.sweep`) for the task's label set ``labels``
    on ``n`` teacher-forced task problems; keys ``probe.accuracy`` / ``probe.selectivity``
    (one per site, or ``probe.r2`` for regression) and ``sites``."""
    def fn(model: Any) -> dict[str, Any]:
        if model.task is None or labels not in model.task.label_sets:
            have = sorted(model.task.label_sets) if model.task else []
            raise ConfigError(f"{model.name!r} has no label set {labels!r}; its task has: "
                              f"{', '.join(have) or 'none'}")
        trs = reference_traces(model, n, seed)
        cap = model.capture(trs, sites=sites, progress=False)
        ls = model.task.label_sets[labels]
        res = probes.sweep(cap, sites, ls.make(trs, None), level=ls.level, n_boot=n_boot,
                           seed=seed)
        main = res.main_metric
        return {f"probe.{main}": res.metrics[main][0].tolist(),
                "probe.selectivity": res.selectivity[0].tolist(), "sites": list(res.sites)}
    return Measure("probe", fn, {"labels": labels, "sites": sites, "n": n, "seed": seed,
                                 "n_boot": n_boot})


def faithfulness_measure(circuit: Any, pair: Callable[[Any], Any] | None = None) -> Measure:
    """The faithfulness of one circuit's edges (found on any checkpoint) at every
    checkpoint, on the pair ``pair(model)`` builds there (default: the task's study
    pair); key ``faithfulness``."""
    def fn(model: Any) -> dict[str, Any]:
        p = pair(model) if pair is not None else \
            model.task.study_pair(model, model.task.example_prompts)
        return {"faithfulness": circuit.faithfulness(model, p), "edges": circuit.n_edges}
    return Measure("faithfulness", fn, {"edges": int(circuit.n_edges)})


@dataclass
class Dynamics:
    """A measure's rows by checkpoint, in training order (``rows[i]`` for ``labels[i]``)."""

    measure: str
    labels: list[str]
    steps: list[int | None]
    rows: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)

    def values(self, key: str) -> Tensor:
        """``key``'s values stacked along a leading checkpoint axis, e.g. ``[checkpoint, layer, head]``."""
        missing = [lab for lab, r in zip(self.labels, self.rows) if key not in r]
        if missing:
            have = sorted({k for r in self.rows for k in r})
            raise ConfigError(f"no {key!r} in the rows of {missing}; keys: {', '.join(have)}")
        return torch.tensor([r[key] for r in self.rows], dtype=torch.float32)

    def series(self, key: str, index: Sequence[int] = ()) -> list[float]:
        """One number per checkpoint: ``values(key)[:, *index]`` (e.g. a head ``(1, 0)``)."""
        v = self.values(key)
        return v[(slice(None), *index)].tolist()

    def rises(self, key: str, index: Sequence[int] = ()) -> list[tuple[str, str, float]]:
        """``(from label, to label, change)`` of the series over each checkpoint interval."""
        s = self.series(key, index)
        return [(a, b, y - x) for a, b, x, y in zip(self.labels, self.labels[1:], s, s[1:])]

    def table(self) -> list[dict[str, Any]]:
        """Rows with ``checkpoint`` and ``step`` and every scalar value (lists left out)."""
        return [{"checkpoint": lab, "step": st,
                 **{k: v for k, v in r.items() if isinstance(v, int | float)}}
                for lab, st, r in zip(self.labels, self.steps, self.rows)]


def _key(measure: Measure) -> str:
    return json.dumps({"measure": measure.name, "settings": measure.settings},
                      sort_keys=True, default=str)


def run_dynamics(source: str | os.PathLike[str] | Sequence[Checkpoint], measure: Measure, *,
                 out: str | os.PathLike[str] | None = None,
                 revisions: Sequence[str] | None = None, device: str | None = None,
                 dtype: Any = None, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> Dynamics:
    """Run ``measure`` on every checkpoint of ``source``, one model at a time.

    ``source``: what :func:`checkpoints` takes, or a list of :class:`Checkpoint`.
    ``out``: a JSONL journal; rerunning resumes it (see the module docstring).
    """
    if not isinstance(measure, Measure):
        raise ConfigError(f"measure={measure!r}; give a Measure (heads_measure(), "
                          "icl_measure(), probe_measure(labels), faithfulness_measure(c))")
    if isinstance(source, str | os.PathLike):
        ckpts, curve = checkpoints(source, revisions=revisions)
    else:
        ckpts, curve = list(source), []
    if len({c.label for c in ckpts}) != len(ckpts) or not ckpts:
        raise ConfigError(f"checkpoint labels {[c.label for c in ckpts]} must be unique and "
                          "at least one")
    key, done = _key(measure), {}
    if out is not None:
        out = Path(out)
        if out.exists():
            for row in read_jsonl(out, repair=True):
                if row.get("key") != key:
                    raise ConfigError(f"{str(out)!r} holds rows of another measure or settings "
                                      f"({row.get('key')}); this run is {key}: give a new out=")
                done[row["label"]] = row["values"]
    bar = tqdm(ckpts, desc=f"dynamics ({measure.name})", unit="ckpt", disable=not progress)
    for c in bar:
        bar.set_postfix_str(c.label)
        if c.label in done:
            continue
        model = c.load(device=device, dtype=dtype)
        try:
            values = measure.fn(model)
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        done[c.label] = values
        if out is not None:
            append_jsonl(out, [{"key": key, "label": c.label, "step": c.step,
                                "values": values}])
        if log is not None:
            log(f"{c.label}: measured")
    bar.close()
    return Dynamics(measure.name, [c.label for c in ckpts], [c.step for c in ckpts],
                    [done[c.label] for c in ckpts], dict(measure.settings), curve)


def parse_measure(spec: str) -> Measure:
    """``heads`` / ``heads:KIND,KIND`` / ``icl`` / ``icl:EARLY,LATE`` / ``probe:LABELS``."""
    name, _, arg = spec.partition(":")
    if name == "heads":
        return heads_measure([k for k in arg.split(",") if k] or None)
    if name == "icl":
        try:
            early, late = (int(x) for x in arg.split(",")) if arg else (50, 500)
        except ValueError:
            raise ConfigError(f"--measure {spec!r}; give icl:EARLY,LATE, e.g. icl:10,50") from None
        return icl_measure(early, late)
    if name == "probe" and arg:
        return probe_measure(arg)
    raise ConfigError(f"--measure {spec!r}; valid: heads, heads:KIND[,KIND], icl, "
                      "icl:EARLY,LATE, probe:LABELS (e.g. probe:organism.value)")


@dataclass
class DynamicsJob:
    """What :func:`dynamics_job` wrote: the result and the files (relative to ``out``)."""

    dynamics: Dynamics
    out: Path
    files: list[str]


def dynamics_job(source: str = "organism", out: str | os.PathLike[str] = "thinklens-dynamics",
                 *, measure: str = "heads", revisions: Sequence[str] | None = None,
                 heads: Sequence[tuple[int, int]] | None = None,
                 formats: Sequence[str] = ("html", "svg"), device: str | None = None,
                 progress: bool = True, log: Callable[[str], None] | None = None) -> DynamicsJob:
    """``thinklens dynamics``: run the measure ``measure`` (see :func:`parse_measure`) over
    ``source``'s checkpoints into ``out/journal.jsonl`` (resumable), then write
    ``out/dynamics.json`` (the table) and ``out/figures/`` (per head kind: the small
    multiples and the score of ``heads`` against the training step)."""
    m = parse_measure(measure)
    bad = [f for f in formats if f not in ("html", "svg", "pdf", "png")]
    if bad:
        raise ConfigError(f"formats {bad}; valid: html, svg, pdf, png")
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    dyn = run_dynamics(source, m, out=out / "journal.jsonl", revisions=revisions,
                       device=device, progress=progress, log=log)
    atomic_write_json(out / "dynamics.json", {
        "measure": dyn.measure, "settings": dyn.settings, "labels": dyn.labels,
        "steps": dyn.steps, "rows": dyn.rows, "curve": dyn.curve})
    figs: dict[str, Any] = {}
    keys = [k for k in dyn.rows[-1] if k.startswith("heads.")] if m.name == "heads" else \
        [k for k, v in dyn.rows[-1].items() if isinstance(v, float)]
    for key in keys:
        if key.startswith("heads."):
            figs[f"checkpoint-{key[6:]}"] = plot_checkpoint_heads(dyn, key[6:])
        if all(s is not None for s in dyn.steps):
            figs[f"dynamics-{key.replace('heads.', '')}"] = plot_dynamics(
                dyn, key, list(heads) if heads and key.startswith("heads.") else None)
    files = ["dynamics.json", "journal.jsonl"]
    for stem, fig in figs.items():
        for fmt in formats:
            path = out / "figures" / f"{stem}.{fmt}"
            if fmt == "html":
                with atomic_path(path) as tmp:
                    fig.write_html(tmp, include_plotlyjs=True, full_html=True)
            else:
                export(fig, path)
            files.append(str(path.relative_to(out)))
    return DynamicsJob(dyn, out, files)


__all__ = ["Checkpoint", "checkpoints", "Measure", "heads_measure", "icl_measure",
           "probe_measure", "faithfulness_measure", "Dynamics", "run_dynamics",
           "parse_measure", "DynamicsJob", "dynamics_job"]
