"""Patching metrics: functions of the answer position's logits, one scalar per batch row.

A metric takes ``logits: Float[Tensor, "batch d_vocab"]`` (the next-token logits at the
pair's answer position) and returns ``Float[Tensor, "batch"]``. The patching engine runs
many patched copies of one input as one batch, so a metric that averages over the batch
(returns a scalar) would mix independent runs; the engine refuses it
(:func:`thinklens.circuits._engine.check_rows`).

1. Logit difference ``logit[answer] - logit[wrong]`` (Wang et al. 2022, IOI).
2. Normalised: ``(m - m_corrupt) / (m_clean - m_corrupt)``: 0 = the corrupted run's value,
   1 = the clean run's (Heimersheim & Nanda 2024, "How to use and interpret activation
   patching").
3. Probability of the answer token; KL divergence ``KL(clean || patched)`` of the
   next-token distribution (0 = the clean run's distribution).
4. Any callable with the signature above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor

from thinklens.errors import ConfigError

MetricFn = Callable[[Float[Tensor, "batch d_vocab"]], Float[Tensor, "batch"]]  # noqa: F821


@dataclass(frozen=True)
class Metric:
    """A named metric: ``Metric("logit_diff", fn)(logits)`` -> ``[batch]``."""

    name: str
    fn: MetricFn

    def __call__(self, logits: Tensor) -> Tensor:
        return self.fn(logits)


def logit_diff(answer: int, wrong: int) -> Metric:
    """``logits[:, answer] - logits[:, wrong]``; e.g. ``logit_diff(5099, 2322)(logits)`` -> ``[batch]``."""
    return Metric("logit_diff", lambda lg: lg[:, answer] - lg[:, wrong])


def answer_prob(answer: int) -> Metric:
    """Softmax probability of ``answer``, computed in float32."""
    return Metric("prob", lambda lg: lg.float().softmax(-1)[:, answer])


def kl_to(reference: Float[Tensor, "d_vocab"]) -> Metric:  # noqa: F821
    """``KL(reference || patched)`` of the next-token distributions, per row."""
    ref = reference.detach().float().log_softmax(-1)

    def fn(lg: Tensor) -> Tensor:
        logp = lg.float().log_softmax(-1)
        return (ref.exp() * (ref - logp)).sum(-1)

    return Metric("kl", fn)


def normalize(values: Any, clean: float, corrupt: float, *, what: str = "the metric") -> Any:
    """``(values - corrupt) / (clean - corrupt)``: 0 = the corrupted run's value, 1 = the
    clean run's. The one normalisation of thinklens: :meth:`PatchResult.normalized`, the
    ``normalized_*`` metrics, a circuit's faithfulness (``clean`` = every edge kept,
    ``corrupt`` = none) and the figures all call it. Tensors, arrays and floats alike.

    Example: ``normalize(torch.tensor([2.0, 3.0]), clean=3.0, corrupt=1.0)`` -> ``[0.5, 1.0]``.
    """
    if clean == corrupt:
        raise ConfigError(f"cannot normalise: {what} is {clean:.4g} on both the clean and "
                          "the corrupted run, so there is no difference to recover; pick a "
                          "pair whose answers differ, or an unnormalised metric")
    return (values - corrupt) / (clean - corrupt)


def normalized(metric: MetricFn, clean: float, corrupt: float) -> Metric:
    """:func:`normalize` of another metric: ``(m - corrupt) / (clean - corrupt)``."""
    name = getattr(metric, "name", getattr(metric, "__name__", "metric"))
    normalize(0.0, clean, corrupt, what=f"metric {name!r}")  # refuse now, not at each call
    return Metric(f"normalized_{name}", lambda lg: normalize(metric(lg), clean, corrupt))


__all__ = ["Metric", "logit_diff", "answer_prob", "kl_to", "normalize", "normalized"]
