"""Steering vectors for reasoning behaviours (Venhoff et al. 2025, "Understanding reasoning
in thinking language models via steering vectors").

1. **Label positions.** A behaviour label marks spans of the thinking: the sentences with
   that tag (e.g. ``backtracking``; the organism's ``lookup`` / ``computation``), or runs
   of tokens that a per-token labelling (``token_labels(trace) -> [label per token]``,
   e.g. from the organism's ground truth) marks with it.
2. **Average the residual stream** at ``blocks.L.hook_resid_post`` (one scoped hook pass,
   sums only, nothing else kept):

   * ``method="diff_means"``: mean over the label's positions minus the mean over the
     other thinking positions.
   * ``method="venhoff"``: mean over positions ``[start - 1, start + 10)`` of each of
     the label's spans, clipped to the thinking (never the prompt, the closing tag or
     the answer; windows pooled, each span's window counted once), minus the mean over
     the whole thinking, rescaled to the norm of that overall mean.

3. **Steer** (:func:`steer`): add ``alpha * v`` to ``blocks.L.hook_resid_post`` at every
   position, while generating, inside a ``with`` block (hooks removed on exit, also
   after an exception). A fixed ``alpha`` means a different push on every model (the
   residual's mean norm grows with width and depth: 5 to 27 over the organism's 4 layers,
   110 to 480 over SmolLM2-135M's layers 5 to 25), so ``strength`` gives the added vector's norm as a fraction of the
   mean residual norm at the site over the positions the vector was averaged on
   (``SteeringVector.resid_norm``): ``alpha = strength * resid_norm / |v|``. How to
   choose it: sweep ``strengths`` with :func:`dose_response` from 0 and keep the largest
   that still moves the behaviour while the text stays fluent. Seen on SmolLM2-135M
   (layer 15, a ``computation`` diff-means vector): strengths 0.05-0.2 change the
   completion and keep it fluent, 0.5 breaks it ("... in a00 is 17 ..."), 1.0 writes
   only "0000..."; the old example's ``alpha = 4`` was strength 0.95 there. So the
   default sweep is ``(0, 0.05, 0.1, 0.2)``.
4. **Dose-response** (:func:`dose_response`): generate for every ``alpha`` and measure the
   fraction of thinking sentences carrying the tag (or any per-trace metric), the answer
   accuracy and the thinking length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from thinklens.errors import ConfigError
from thinklens.hooks import forward as fwd
from thinklens.hooks.activations import SiteActivations
from thinklens.hooks.reprs import compact_repr
from thinklens.hooks.sites import layer_of
from thinklens.hooks.trace import Trace
from thinklens.probes.lens import first_answer_token

METHODS = ("diff_means", "venhoff")
WINDOW = (-1, 10)  # Venhoff et al.: [start - 1, start + 10) of each span


@dataclass
class SteeringVector:
    """A direction in the residual stream at ``site``; ``vector`` is ``[d_model]``."""

    __repr__ = compact_repr  # shapes, not whole tensors (hooks/reprs.py)

    vector: Float[Tensor, " d_model"]  # noqa: F722
    site: str
    label: Any
    method: str
    n_label: int  # positions averaged for the label
    n_base: int   # positions averaged for the baseline
    resid_norm: float = float("nan")  # mean L2 norm of the residual at those positions

    def alpha_for(self, strength: float) -> float:
        """The ``alpha`` at which ``alpha * vector`` has norm ``strength * resid_norm``."""
        if not self.resid_norm == self.resid_norm:  # nan: made without the norms
            raise ConfigError("this steering vector has no resid_norm; rebuild it with "
                              "steering_vector(...) or give alpha=")
        return float(strength) * self.resid_norm / max(float(self.vector.norm()), 1e-12)

    @property
    def layer(self) -> int:
        return int(layer_of(self.site))


@dataclass
class DoseResponse:
    """Behaviour per steering strength (axis ``alpha``); ``nan`` where not measured."""

    __repr__ = compact_repr  # shapes, not whole tensors (hooks/reprs.py)

    alphas: Float[Tensor, " alpha"]  # noqa: F722
    frequency: Float[Tensor, " alpha"]  # noqa: F722
    accuracy: Float[Tensor, " alpha"]  # noqa: F722
    thinking_tokens: Float[Tensor, " alpha"]  # noqa: F722
    metric_name: str
    traces: list[list[Trace]] = field(repr=False, default_factory=list)
    axes: tuple[str, ...] = ("alpha",)

    @property
    def change(self) -> Float[Tensor, " alpha"]:  # noqa: F722
        """Behaviour frequency minus its value at the first alpha (usually 0: unsteered)."""
        return self.frequency - self.frequency[0]


def steering_vector(source, traces, label: Any, layer: int | None = None, *,
                    method: str = "diff_means", against: Any = None,
                    token_labels: Callable[[Trace], Sequence[Any]] | None = None,
                    batch_size: int = 8) -> SteeringVector:
    """Direction from the rest of the thinking toward the positions carrying ``label``.

    Example::

        v = steering_vector(model, traces, "computation", layer=1)
        v.vector.shape, v.site        # (128,), 'blocks.1.hook_resid_post'
        v = steering_vector(cap["blocks.1.hook_resid_post"], cap.traces, "computation")

    ``source``: a model (one hook pass over ``traces``) or :class:`SiteActivations`
    captured at a ``hook_resid_post`` site (rows not captured are left out).
    ``token_labels``: per-token labels instead of the sentences' tags. ``against``: a
    label whose positions replace the rest of the thinking as the baseline (diff_means).
    """
    if method not in METHODS:
        raise ConfigError(f"method={method!r}; valid: {', '.join(METHODS)}")
    if against is not None and method == "venhoff":
        raise ConfigError("against= needs method='diff_means'; Venhoff's baseline is the "
                          "whole thinking")
    traces = [traces] if isinstance(traces, Trace) else list(traces)
    if isinstance(source, SiteActivations):
        site = source.key
        if layer_of(site) is None or not site.endswith("hook_resid_post"):
            raise ConfigError(f"activations of {site!r}; capture a 'blocks.N.hook_resid_post' site")
        if source.values.shape[0] != len(traces) or source.positions is None:
            raise ConfigError(f"{source.values.shape[0]} traces of activations (with positions) "
                              f"for {len(traces)} traces; pass the capture's own traces")
    else:
        traces = fwd.as_traces(source, traces)
        if layer is None or not -source.config.n_layers <= layer < source.config.n_layers:
            raise ConfigError(f"layer={layer!r}; give a block index 0..{source.config.n_layers - 1}")
        site = f"blocks.{layer % source.config.n_layers}.hook_resid_post"
    sets = [_position_sets(t, label, method, token_labels, against) for t in traces]
    if not any(len(a) for a, _ in sets):
        found = sorted({s.tag for t in traces for s in t.sentences}, key=str)
        raise ConfigError(f"no position carries label {label!r}; sentence tags found: {found}")
    sums: list[Tensor | None] = [None, None]
    counts = [0, 0]
    norms = [0.0]  # sum of the rows' L2 norms, for resid_norm

    def add(rows: Tensor, which: int) -> None:
        sums[which] = rows.sum(0) if sums[which] is None else sums[which] + rows.sum(0)
        counts[which] += len(rows)
        norms[0] += float(rows.norm(dim=-1).sum())

    if isinstance(source, SiteActivations):
        for i, (pos, base) in enumerate(sets):
            row_of = {int(p): r for r, p in enumerate(source.positions[i].tolist()) if p >= 0}
            for which, want in enumerate((pos, base)):
                add(source.values[i, [row_of[p] for p in want if p in row_of]].double(), which)
    else:
        def keep(_site: str, x: Tensor, idx: list[int]) -> None:
            for j, i in enumerate(idx):
                for which, want in enumerate(sets[i]):
                    add(x[j, want].double().cpu(), which)

        fwd.read(source, traces, [site], keep, batch_size=batch_size)
    if not counts[0] or not counts[1]:
        raise ConfigError(f"label {label!r}: {counts[0]} labelled and {counts[1]} baseline "
                          "positions; both are needed")
    mean_label, mean_base = sums[0] / counts[0], sums[1] / counts[1]
    v = mean_label - mean_base
    if method == "venhoff":
        v = v / v.norm().clamp_min(1e-12) * mean_base.norm()
    return SteeringVector(v.float(), site, label, method, counts[0], counts[1],
                          norms[0] / (counts[0] + counts[1]))


def _spans(trace: Trace, label: Any, token_labels: Callable | None) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` in the thinking that carry ``label``."""
    think = trace.think_span
    if token_labels is None:
        return [(s.start, s.end) for s in trace.sentences if s.tag == label]
    per_token = list(token_labels(trace))
    if len(per_token) != len(trace):
        raise ConfigError(f"token_labels gave {len(per_token)} labels for a trace of "
                          f"{len(trace)} tokens; give one per token")
    hit = [k in think and per_token[k] == label for k in range(len(trace))]
    starts = [k for k in think.range if hit[k] and not (k > think.start and hit[k - 1])]
    return [(a, next((k for k in range(a, think.end) if not hit[k]), think.end)) for a in starts]


def _position_sets(trace: Trace, label: Any, method: str, token_labels: Callable | None,
                   against: Any = None) -> tuple[list[int], list[int]]:
    """(label positions, baseline positions) of one trace, as token indices."""
    think, spans = trace.think_span, _spans(trace, label, token_labels)
    if method == "venhoff":
        # each span's window counts once, so a position in two windows counts twice; the
        # window is clipped to the thinking: never the prompt, `</think>` or the answer
        pos = [k for a, _ in spans
               for k in range(max(think.start, a + WINDOW[0]), min(think.end, a + WINDOW[1]))]
        return pos, list(think.range)
    inside = sorted({k for a, b in spans for k in range(a, b)})
    if against is not None:
        return inside, sorted({k for a, b in _spans(trace, against, token_labels)
                               for k in range(a, b)})
    return inside, [k for k in think.range if k not in set(inside)]


@contextlib.contextmanager
def steer(model, vector: SteeringVector | Tensor, layer: int | None = None,
          alpha: float = 1.0, *, strength: float | None = None) -> Iterator[Any]:
    """Add ``alpha * vector`` to ``blocks.{layer}.hook_resid_post`` at every position.

    Example::

        with steer(model, v, strength=0.1):        # |added| = 0.1 x the residual's mean norm
            trace = model.think(prompt)
        with steer(model, v, alpha=1.0):           # or an absolute scale; steer(model, t, 1, 1.0)
            trace = model.think(prompt)
        model.n_hooks()                            # 0: removed on exit, even after an error

    ``strength`` (a :class:`SteeringVector` only) scales the added vector to that fraction
    of the mean residual norm at the site (``vector.resid_norm``), so one value means the
    same push on every model; see the module docstring, step 3, for how to choose it.
    """
    if strength is not None:
        if not isinstance(vector, SteeringVector):
            raise ConfigError("strength= needs a SteeringVector (it knows the residual norm "
                              "at its site); give alpha= when steering with a bare tensor")
        alpha = vector.alpha_for(strength)
    if isinstance(vector, SteeringVector):
        site = vector.site if layer is None else f"blocks.{layer}.hook_resid_post"
        vector = vector.vector
    elif layer is None:
        raise ConfigError("give layer= when steering with a bare tensor")
    else:
        site = f"blocks.{layer}.hook_resid_post"
    if vector.shape != (model.config.d_model,):
        raise ConfigError(f"steering vector of shape {tuple(vector.shape)}; the model needs "
                          f"({model.config.d_model},)")
    v = (float(alpha) * vector).to(model.device, model.dtype)

    def add(x: Tensor, hook) -> Tensor:
        return x + v

    with model.hooks([(site, add)]):
        yield model


STRENGTHS = (0.0, 0.05, 0.1, 0.2)  # default dose_response sweep: fractions of resid_norm


def dose_response(model, prompts: Sequence[str], vector: SteeringVector | Tensor,
                  layer: int | None = None, alphas: Sequence[float] | None = None, *,
                  strengths: Sequence[float] | None = None,
                  metric: str | Callable[[Trace], float] | None = None,
                  answers: Sequence | None = None, max_new_tokens: int = 128,
                  temperature: float = 0.0, seed: int = 0) -> DoseResponse:
    """Generate under ``steer`` for every ``alpha``; measure behaviour and accuracy.

    Example::

        dr = dose_response(model, prompts, v, answers=answers)   # strengths 0 .. 0.2
        dr.frequency, dr.accuracy     # [alpha] each: fraction of sentences tagged v.label
        dr = dose_response(model, prompts, v, alphas=[0, 1, 2])   # absolute scales

    ``strengths`` (default :data:`STRENGTHS` when no ``alphas`` are given; a
    :class:`SteeringVector` only): fractions of the residual's mean norm, turned into
    ``alphas`` with :meth:`SteeringVector.alpha_for` (``dr.alphas`` holds those).

    ``metric``: a tag (default: the vector's label), whose pooled frequency over all
    thinking sentences is reported, or ``metric(trace) -> float``, averaged over traces.
    ``answers``: true answers (compared with the first answer token) for the accuracy.
    """
    if metric is None:
        if not isinstance(vector, SteeringVector):
            raise ConfigError("give metric= (a tag or a callable) when steering with a tensor")
        metric = vector.label
    if answers is not None and len(answers) != len(prompts):
        raise ConfigError(f"{len(answers)} answers for {len(prompts)} prompts; give one each")
    if alphas is not None and strengths is not None:
        raise ConfigError("give alphas= (absolute) or strengths= (fractions of the residual "
                          "norm), not both")
    if alphas is None:
        if not isinstance(vector, SteeringVector):
            raise ConfigError("give alphas= when steering with a bare tensor (strengths= "
                              "need a SteeringVector, which knows the residual norm)")
        alphas = [vector.alpha_for(s) for s in (strengths if strengths is not None
                                                else STRENGTHS)]
    freq, acc, length, runs = [], [], [], []
    for alpha in alphas:
        with steer(model, vector, layer, alpha):
            traces = model.think_batch(list(prompts), max_new_tokens=max_new_tokens,
                                       temperature=temperature, seed=seed, progress=False)
        runs.append(traces)
        if callable(metric):
            freq.append(sum(float(metric(t)) for t in traces) / max(1, len(traces)))
        else:
            tags = [s.tag for t in traces for s in t.sentences]
            freq.append(tags.count(metric) / len(tags) if tags else float("nan"))
        if answers is not None:
            truth = [model.encode(str(a))[:1] for a in answers]
            acc.append(sum([first_answer_token(t)] == a for t, a in zip(traces, truth))
                       / max(1, len(traces)))
        else:
            acc.append(float("nan"))
        length.append(sum(len(t.think_span) for t in traces) / max(1, len(traces)))
    return DoseResponse(torch.tensor([float(a) for a in alphas]), torch.tensor(freq),
                        torch.tensor(acc), torch.tensor(length),
                        metric if isinstance(metric, str) else getattr(metric, "__name__", "metric"),
                        runs)


__all__ = ["SteeringVector", "DoseResponse", "steering_vector", "steer", "dose_response",
           "STRENGTHS"]
