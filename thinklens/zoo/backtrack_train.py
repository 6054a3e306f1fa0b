"""The three training runs behind ``organism-backtrack``'s shipped weights.

1. Phase 1: 2,000 steps on :class:`~thinklens.zoo.backtrack_task.BacktrackConfig`
   (depths 1-8, mistakes with p = 0.12 per compute step).
2. Phase 2: 1,200 steps from phase 1's last weights, mistakes with p = 0.2 (so that
   noticing them is seen more often), lr 1e-3.
3. Phase 3: 1,000 steps from phase 2's last weights, lr 1e-3, adding early exits
   (``p_early=0.2``: thinking cut after a random sentence and closed, answered with what
   the prefix implies) and filler (``p_filler=0.05``: the thinking's tokens replaced by
   ``.``, answered with the true answer), so that a forced early answer is a best guess
   rather than a context never seen.

All are deterministic (one thread, batches seeded by step) and resumable::

    from thinklens.zoo.backtrack_train import train_backtrack
    final = train_backtrack("runs/backtrack")   # what train() returns for phase 3
"""

from __future__ import annotations

from pathlib import Path

from thinklens.zoo.backtrack_task import BacktrackConfig
from thinklens.zoo.train import TrainConfig, train


def training_phases(out: str | Path) -> list[tuple[TrainConfig, Path]]:
    """The three training runs of the shipped weights, as ``(config, folder)`` under ``out``."""
    out = Path(out)
    common = dict(kind="backtrack", context=384, micro_batch=16, ckpt_every=250,
                  eval_per_depth=128)
    one = TrainConfig(steps=2000, task=BacktrackConfig(max_depth=8), **common)
    two = TrainConfig(steps=1200, lr=1e-3, warmup=100, init_step=2000,
                      init_from=str(out / "phase1" / "step-002000"),
                      task=BacktrackConfig(max_depth=8, p_mistake=0.2),
                      **{**common, "ckpt_every": 200})
    three = TrainConfig(steps=1000, lr=1e-3, warmup=100, init_step=3200,
                        init_from=str(out / "phase2" / "step-003200"),
                        task=BacktrackConfig(max_depth=8, p_mistake=0.2, p_early=0.2,
                                             p_filler=0.05),
                        **{**common, "ckpt_every": 200})
    return [(one, out / "phase1"), (two, out / "phase2"), (three, out / "phase3")]


def train_backtrack(out: str | Path = "runs/backtrack", *, progress: bool = True) -> Path:
    """Train (or resume) the three phases; ship with
    ``thinklens.zoo.train.ship(out/phase3, thinklens.zoo.backtrack.HERE, [250, 500, 750, 1000, 1500, 2000])``."""
    final = None
    for cfg, folder in training_phases(out):
        final = train(cfg, folder, progress=progress)
    return final


__all__ = ["training_phases", "train_backtrack"]
