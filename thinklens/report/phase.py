"""The report's "phase change" section: head scores across the model's training checkpoints.

1. Find the model's checkpoints (:func:`thinklens.jobs.dynamics.checkpoints`: a bundled
   model's shipped ones and its final weights, or a folder's ``step-N``); a model with
   fewer than two gets a note instead.
2. Score every head at every checkpoint, one model at a time
   (:func:`~thinklens.jobs.dynamics.run_dynamics` with ``heads_measure``): the task's
   ground-truth kinds when it has them (the organism's ``lookup`` and ``operand_copy``,
   on the same teacher-forced problems at every checkpoint) and the token kinds.
3. Draw the task's first kind (else induction) as small multiples per checkpoint, and its best head (at the last
   checkpoint) against the training step under the training curve; the table gives each
   interval's rise of that head's score beside the rise of the held-out accuracy
   (mean over depths, and depth 2) from the training curve (Olsson et al. 2022).
"""

from __future__ import annotations

from typing import Any

from thinklens.circuits.heads import TOKEN_KINDS
from thinklens.errors import ConfigError
from thinklens.jobs.dynamics import checkpoints, heads_measure, run_dynamics
from thinklens.plots.dynamics import plot_checkpoint_heads, plot_dynamics
from thinklens.report.page import Section, Table

TITLE = "Phase change: heads across training checkpoints"


def _accuracy(curve: list[dict], step: int | None, depth: str | None) -> float | None:
    row = next((r for r in curve if r.get("step") == step), None)
    if row is None or "acc_think" not in row:
        return None
    acc = row["acc_think"]
    return acc.get(depth) if depth is not None else sum(acc.values()) / len(acc)


def phase_change(model: Any, *, n_task: int = 16, dynamics: Any = None) -> Section:
    """The section (see the module docstring); a note for a model without checkpoints.
    ``dynamics``: head scores already run over the checkpoints (else computed here)."""
    try:
        ckpts, curve = checkpoints(model.name)
    except ConfigError:
        ckpts, curve = [], []
    if len(ckpts) < 2:
        return Section(TITLE, "Head scores at every training checkpoint of the model.",
                       note=f"Skipped: {model.name!r} ships no training checkpoints (give a "
                            "bundled model, or run `thinklens dynamics --model FOLDER` on a "
                            "folder of step-N checkpoints).")
    dyn = dynamics or run_dynamics(ckpts, heads_measure(None, n_task=n_task, n=4),
                                   progress=False)
    dyn.curve = curve
    kinds = [k[6:] for k in dyn.rows[-1] if k.startswith("heads.")]
    kind = next((k for k in kinds if k not in TOKEN_KINDS), "induction")
    last = dyn.values(f"heads.{kind}")[-1]
    head = divmod(int(last.argmax()), last.shape[1])
    rises = dyn.rises(f"heads.{kind}", head)
    best = max(rises, key=lambda r: r[2])
    s = Section(
        TITLE,
        f"Every head's {kind} score (attention from each query to where that kind of head "
        f"must look, averaged over the scored queries) at each of {len(ckpts)} training "
        f"checkpoints, one model loaded at a time. Head L{head[0]}H{head[1]} (the best at "
        f"{dyn.labels[-1]}) rises most between {best[0]} and {best[1]} (+{best[2]:.2f}); "
        "the table sets each interval's rise beside the held-out accuracy's.")
    s.figure(f"phase-{kind}-by-checkpoint", plot_checkpoint_heads(dyn, kind),
             f"{kind} score of every head (layer × head), one panel per checkpoint.")
    if curve and all(st is not None for st in dyn.steps):
        s.figure(f"phase-{kind}-by-step", plot_dynamics(dyn, f"heads.{kind}", [head]),
                 f"L{head[0]}H{head[1]}'s {kind} score against the training step, under the "
                 "loss and the held-out accuracy; the shaded interval is its largest rise.")
    steps = dict(zip(dyn.labels, dyn.steps))
    rows = []
    for a, b, rise in rises:
        acc = [(_accuracy(curve, steps[b], d), _accuracy(curve, steps[a], d)) for d in (None, "2")]
        rows.append([f"{a} → {b}", rise, *[x - y if x is not None and y is not None else "—"
                                           for x, y in acc]])
    s.table = Table(["interval", f"L{head[0]}H{head[1]} {kind} rise", "accuracy rise (mean)",
                     "accuracy rise (depth 2)"], rows, mono=(0,))
    return s


__all__ = ["phase_change"]
