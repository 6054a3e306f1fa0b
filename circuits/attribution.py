"""Attribution patching: first-order estimates of patching effects from one backward pass.

**AtP** (Nanda 2023, "Attribution patching"; Kramár et al. 2024, "AtP*"). Patching a
site ``a`` from the *base* run to the *source* run changes the metric by about
``(a_source - a_base) · ∂metric/∂a``, the gradient taken at the base run. With the same
convention as :func:`~thinklens.circuits.patch` (``direction="denoising"``: base =
corrupted run, source = clean run; ``"noising"``: the reverse), :func:`atp` returns the
estimated metric *after* each patch, ``base value + estimate``, as an
:class:`~thinklens.circuits.results.AttributionResult` with the axes and labels ``patch``
would give, so the two compare cell by cell:

1. Run the source once, recording the site's activations
   (:func:`thinklens.circuits._engine.run_pair`, which also resolves the metric and its
   clean/corrupted values).
2. Run the base once with gradients, recording the same activations; one backward pass
   of the metric gives ``∂metric/∂a`` at every layer.
3. Per cell, sum ``(a_source - a_base) * grad`` over the feature axis and over the axes
   ``patch`` would patch jointly (positions or heads not swept): the linear estimate of a
   joint patch is the sum of the single ones.

**EAP** (Syed et al. 2023, "Attribution patching outperforms automated circuit
discovery") scores each edge ``u -> v`` of the :class:`~thinklens.circuits.graph.Graph`
by ``(u_source - u_base) · ∂metric/∂(input of v)``, summed over positions and
``d_model``, the gradient taken at the base run. A receiver's input is the residual
stream of its layer, i.e. the sum of the outputs of the senders upstream (for a head,
``z_h @ W_O[h]`` with the model's weights), so one gradient per receiver, taken
*before* its norm (the standard choice), dotted with every sender's output difference,
gives every edge at once: ``scores = einsum("spd,prd->sr", Δu, grad)``. The gradient per
receiver comes from a run in which every receiver (each head's q, k, v, each MLP, the
logits) reads its own copy of the residual stream (:mod:`thinklens.circuits._edges`).
The scores out of a sender sum to its AtP score.

**EAP-IG** (Hanna et al. 2024, "Have faith in faithfulness", EAP-IG-inputs): the same
score with the gradient averaged over ``steps`` points on the straight line between the
two runs' inputs ``x`` (``blocks.0.hook_resid_pre``; the reference interpolates
``hook_embed``, the same line since both inputs share their positions), a Riemann sum of the integrated gradient. The points are those of the
reference implementation (github hannamw/EAP-IG, ``src/eap/attribute.py``,
``get_scores_eap_ig``, read at commit 795f560)::

    x_j = x_source + (j / steps) * (x_base - x_source),   j = 0 .. steps - 1
    score(u -> v) = (u_source - u_base) · (1 / steps) Σ_j ∂metric/∂(input of v) at x_j

The source endpoint (``j = 0``: the source run's own input) is included and the base
endpoint (plain EAP's point) is not. Each point's run is the base input's tokens with
``resid_pre 0`` replaced by ``x_j``; every other activation, and so the gradient, is that
run's. With ``direction="noising"`` (base = clean, source = corrupted) this is the
reference exactly: it runs the clean tokens from the corrupted input (included) toward
the clean one (excluded), and scores ``(corrupted - clean) · mean gradient``. With
``"denoising"`` (base = corrupted, source = clean) it is the mirror image: the clean
input included, the corrupted excluded, scores ``(clean - corrupted) · mean gradient``.
So ``steps=1`` takes the gradient at the source run, not at the base run as plain EAP
does. The points run as rows of one batch.

Both are linear approximations: exact for a metric linear in the site, poor where
attention saturates (AtP*'s corrections are not implemented). ``metric="kl"`` has zero
gradient at the clean run, so use ``"denoising"`` (the default) with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from thinklens.circuits import _edges, _engine
from thinklens.circuits.circuit import Circuit
from thinklens.circuits.graph import Graph
from thinklens.circuits.pairs import Pair
from thinklens.circuits.results import AttributionResult
from thinklens.errors import ConfigError


def _grad_run(model: Any, ids: Any, names: list[str], fn: Any, name: str) -> tuple[dict, dict]:
    """Activations at ``names`` of one run of ``ids [1, pos]`` and the metric's gradients."""
    acts: dict[str, torch.Tensor] = {}

    def need_grad(act, hook):  # gradients w.r.t. activations only, even with frozen weights
        return act if act.requires_grad else act.detach().requires_grad_(True)

    def keep(act, hook, site):
        acts[site] = act
        return act

    fwd = [("blocks.0.hook_resid_pre", need_grad)]
    fwd += [(n, lambda a, hook, n=n: keep(a, hook, n)) for n in names]
    with torch.enable_grad(), model.hooks(fwd):
        logits = model.bridge(ids.to(model.device))[:, -1]
        m = _engine.check_rows(fn(logits), 1, name)
        grads = torch.autograd.grad(m.sum(), [acts[n] for n in names], allow_unused=True)
    return ({n: a.detach() for n, a in acts.items()},
            {n: torch.zeros_like(acts[n]) if g is None else g for n, g in zip(names, grads)})


def atp(model: Any, pair: Pair, site: str = "resid_pre", *,
        by: str | Sequence[str] = ("layer", "pos"), metric: Any = "logit_diff",
        direction: str = "denoising", layers: Any = None, positions: Any = None,
        heads: Any = None) -> AttributionResult:
    """Attribution patching of one site kind: one forward and one backward pass.

    Example::

        r = atp(model, pair, "z", by=("layer", "pos", "head"))   # values [layer, pos, head]
        exact = patch(model, pair, "z", by=("layer", "pos", "head"))
        r.axes == exact.axes, r.values.shape == exact.values.shape   # True, True
        torch.corrcoef(torch.stack([r.values.flatten(), exact.values.flatten()]))

    Arguments as :func:`~thinklens.circuits.patch`, and like it one site kind per call;
    always returns an :class:`AttributionResult`.
    """
    if not isinstance(site, str):
        raise ConfigError(f"site={site!r}: atp takes one site kind, as patch does (e.g. "
                          "'z'); call it once per kind")
    sw = _engine.Sweep.of(model, pair, site, by, layers, positions, heads)
    names, n_tok = list(sw.names.values()), len(pair)
    ctx = _engine.run_pair(model, pair, metric, direction, (), names)
    n = pair.answer_pos + 1  # later tokens cannot change the answer position's logits
    base, grads = _grad_run(model, ctx.base[:, :n], names, ctx.fn, ctx.name)
    grid = []
    for name in names:
        src = ctx.acts_src[name].to(base[name])
        src = src[:, :, :n, :n] if sw.layout == "pattern" else src[:, :n]
        eff = ((src - base[name]) * grads[name])[0].float().sum(-1)  # [pos(, head)]
        eff = eff.T if sw.layout == "pattern" else eff               # query-major
        full = eff.new_zeros((n_tok, *eff.shape[1:]))
        full[:n] = eff
        cell = full[sw.pos] if sw.heads is None else full[sw.pos][:, sw.heads]
        if "pos" not in sw.axes:
            cell = cell.sum(0)
        if sw.heads is not None and "head" not in sw.axes:
            cell = cell.sum(-1)
        grid.append(cell)
    values = ctx.base_value + torch.stack(grid).detach().cpu()
    axes, labels = sw.result_axes(pair)
    return AttributionResult(values, axes, labels, ctx.name, ctx.clean, ctx.corrupt, sw.label,
                             direction, "atp")


def eap(model: Any, pair: Pair, *, steps: int | None = None, metric: Any = "logit_diff",
        direction: str = "denoising", batch_size: int | None = None, budget: Any = None,
        progress: bool | None = None) -> Circuit:
    """Edge attribution patching (``steps=None``) or EAP-IG (``steps=k``) of every edge.

    Returns the full graph as a :class:`~thinklens.circuits.Circuit` holding every edge's
    score (``[sender, receiver]``, summed over positions); keep the top edges with
    :meth:`Circuit.top`. Plain EAP takes the gradient at the base run (the corrupted run
    when denoising, the clean run when noising). EAP-IG averages it over the runs of the
    base tokens with inputs ``x_source + (j / k) (x_base - x_source)``, ``j = 0 .. k - 1``:
    the source run's input included, the base run's not, as the reference implementation
    does (module docstring). Score: ``(u_source - u_base) · mean gradient``.

    Example::

        full = eap(model, pair, steps=5)        # EAP-IG with 5 points
        full.scores.shape, full.n_edges         # (21, 53), 479  (organism)
        circuit = full.top(n=40)
        circuit.edge_list()[:2]                 # [('input', 'a0.h2.v', ...), ...]
        circuit.faithfulness(model, pair)       # 0..1: share of the metric recovered
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ConfigError(f"steps={steps!r}; give None (plain EAP) or a positive int "
                          "(EAP-IG interpolation points, e.g. 5)")
    graph = Graph.of(model)
    weights = _edges.layer_weights(model)
    sites = model.sites(list(_edges.SENDER_SITES))
    ctx = _engine.run_pair(model, pair, metric, direction, sites, sites)
    n = pair.answer_pos + 1
    u_base = _edges.sender_outputs(ctx.acts_base, weights)[0, :, :n]
    u_src = _edges.sender_outputs(ctx.acts_src, weights)[0, :, :n]
    # EAP-IG: fractions j / steps of the way from the source input to the base input
    fractions = None if steps is None else torch.arange(steps, dtype=torch.float64) / steps
    step = _engine.rows_per_pass(model, n, batch_size, budget)
    grad_sum = None
    points = torch.zeros(1) if fractions is None else fractions
    for frac in _engine.chunked(points, step, progress, "EAP-IG" if steps else "EAP"):
        inputs = None
        if fractions is not None:  # rows: x_source + frac * (x_base - x_source)
            x_b, x_s = u_base[0].double(), u_src[0].double()
            inputs = (x_s + frac.to(x_s)[:, None, None] * (x_b - x_s)).to(u_base.dtype)
        ids = ctx.base[:, :n].expand(len(frac), -1)
        logits, recv = _edges.edge_run(model, graph, ids, inputs=inputs, grad=True)
        m = _engine.check_rows(ctx.fn(logits), len(frac), ctx.name)
        grads = torch.autograd.grad(m.sum(), recv, allow_unused=True)
        g = _edges.receiver_grads(recv, grads).sum(0).detach()
        grad_sum = g if grad_sum is None else grad_sum + g
    grad = grad_sum / len(points)                                  # [pos, R, d]
    scores = torch.einsum("spd,prd->sr", (u_src - u_base).float(), grad.float())
    scores = (scores * graph.valid).cpu()
    method = "eap" if steps is None else f"eap-ig({steps})"
    return Circuit(graph, scores, graph.valid.clone(), ctx.name, ctx.clean, ctx.corrupt,
                   direction, method, model.name)


__all__ = ["atp", "eap", "AttributionResult"]
