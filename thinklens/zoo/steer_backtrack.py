"""Steering the second organism's backtracking, and its dose-response.

A steering vector for one behaviour of a reasoning model (Venhoff et al. 2025,
"Understanding reasoning in thinking language models via steering vectors"), on the
organism whose backtracking is known (:mod:`thinklens.zoo.backtrack`):

1. Sample traces at temperature 1 on held-out problems; the organism's annotator tags
   each ``wait ...`` sentence ``backtrack``, and :func:`~thinklens.zoo.backtrack.wait_decisions`
   marks the decision points (the '.' closing a compute step: ``wait`` follows or not).
2. :func:`thinklens.probes.steering_vector` at ``blocks.L.hook_resid_post``
   (``method="diff_means"``). ``at="decision"`` (default): the mean over the decision
   points followed by ``wait`` minus the mean over those that go on (a contrast at the
   one position where the behaviour is chosen); ``at="sentence"``: the mean over the
   backtrack sentences' positions minus the mean over the other thinking positions.
3. :func:`thinklens.probes.dose_response` on other held-out problems at temperature 1,
   for every ``alpha``: the fraction of thinking sentences that are backtracks, and from
   the same traces (:func:`~thinklens.zoo.backtrack.behaviour_rates`) correction
   sentences per trace, the rate of ``wait`` after a mistake, of ``wait`` with no
   mistake before it, of mistakes, and the answer accuracy.

Measured on the shipped organism (64 held-out traces of depths 5-8 per alpha, the
vector from 64 others): at layer 3, alpha -2 / 0 / 1 / 2 give 0.17 / 0.83 / 2.27 / 3.34
``wait`` sentences per trace and 3 / 15 / 41 / 79 % of mistakes corrected (answer
accuracy 27 / 33 / 42 / 47 %); layers 1 and 2 move them much less (hence ``layer=3``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from thinklens.errors import ConfigError
from thinklens.probes.steering import DoseResponse, SteeringVector, dose_response, steering_vector
from thinklens.zoo.backtrack import BACKTRACK, BehaviourRates, behaviour_rates, wait_decisions


@dataclass
class BacktrackSteering:
    """The backtracking vector and its dose-response (every tensor on axis ``alpha``)."""

    vector: SteeringVector
    dose: DoseResponse
    corrections: Float[Tensor, " alpha"]     # noqa: F722  correction sentences per trace
    corrected: Float[Tensor, " alpha"]       # noqa: F722  mistakes followed by a correction
    spurious_wait: Float[Tensor, " alpha"]   # noqa: F722  corrections after no mistake, per trace
    mistake: Float[Tensor, " alpha"]         # noqa: F722  wrong values per compute step
    accuracy: Float[Tensor, " alpha"]        # noqa: F722  written answer = true answer
    rates: list[BehaviourRates] = field(repr=False, default_factory=list)
    axes: tuple[str, ...] = ("alpha",)


def backtrack_steering(model: Any, *, layer: int = 3, alphas: Sequence[float] = (-1, 0, 1, 2),
                       at: str = "decision", n_vector: int = 64, n_eval: int = 64,
                       depths: Sequence[int] = (5, 6, 7, 8), temperature: float = 1.0,
                       seed: int = 0) -> BacktrackSteering:
    """Steering vector for ``backtrack`` sentences and its dose-response (module docstring).

    Example::

        st = backtrack_steering(thinklens.load("organism-backtrack"), alphas=[0, 4, 8])
        st.corrections, st.spurious_wait    # [alpha]: 'wait' sentences per trace
    """
    if getattr(model.task, "name", None) != BACKTRACK.name:
        raise ConfigError(f"backtrack_steering needs the organism 'organism-backtrack'; "
                          f"this model's task is {getattr(model.task, 'name', None)!r}")
    if at not in ("decision", "sentence"):
        raise ConfigError(f"at={at!r}; valid: 'decision', 'sentence'")
    if n_vector < 1 or n_eval < 1 or not alphas:
        raise ConfigError(f"n_vector={n_vector}, n_eval={n_eval}, alphas={list(alphas)}: "
                          "give n_vector, n_eval >= 1 and at least one alpha")
    rows = BACKTRACK.problems(n_vector + n_eval, depths=depths, seed=seed)
    train, held = rows[:n_vector], rows[n_vector:]
    traces = model.think_batch([r["prompt"] for r in train], max_new_tokens=256,
                               temperature=temperature, seed=seed, progress=False)
    if at == "decision":
        vector = steering_vector(model, traces, "wait", layer=layer, token_labels=wait_decisions,
                                 against="go on")
    else:
        vector = steering_vector(model, traces, "backtrack", layer=layer)
    dose = dose_response(model, [r["prompt"] for r in held], vector, alphas=alphas,
                         metric="backtrack",
                         answers=[r["answer"] for r in held], max_new_tokens=256,
                         temperature=temperature, seed=seed + 1)
    rates = [behaviour_rates(run) for run in dose.traces]

    def col(name: str) -> Tensor:
        return torch.tensor([float(getattr(r, name)) for r in rates])

    return BacktrackSteering(vector, dose, col("corrections"), col("corrected"),
                             col("spurious_wait"), col("mistake"), col("correct"), rates)


__all__ = ["BacktrackSteering", "backtrack_steering"]
