"""Attribution patching: first-order estimates of patching effects from one backward pass.

**AtP** (Nanda 2023, "Attribution patching"; Kramár et al. 2024, "AtP*"). Patching a
site ``a`` from the *base* run to the *source* run changes the metric by about
``(a_source - a_base) · ∂metric/∂a``, the gradient taken at the base run. With the same
convention as :func:`~thinklens.circuits.patch` (``direction="denoising"``: base =
corrupted run, source = clean run; ``"noising"``: the reverse), :func:`atp` returns the
estimated metric *after* each patch, ``base value + estimate``, with the axes and labels
``patch`` would give, so the two compare cell by cell:

1. Run the source once, recording every requested site (``_setup`` of the patching
   engine, which also resolves the metric and its clean/corrupted values).
2. Run the base once with gradients, recording the same sites; one backward pass of the
   metric gives ``∂metric/∂a`` at all of them.
3. Per cell, sum ``(a_source - a_base) * grad`` over the feature axis and over the axes
   ``patch`` would patch jointly (positions or heads not swept): the linear estimate of a
   joint patch is the sum of the single ones.

**EAP** (Syed et al. 2023, "Attribution patching outperforms automated circuit
discovery") scores each edge ``u -> v`` of the :class:`~thinklens.circuits.graph.Graph`
by ``(u_source - u_base) · ∂metric/∂(input of v)``. A receiver's input is the residual
stream of its layer, i.e. the sum of the outputs of the senders upstream (for a head,
``z_h @ W_O[h]`` with the model's weights), so one gradient per receiver, taken
*before* its norm (the standard choice), dotted with every sender's output difference,
gives every edge at once: ``scores = einsum("spd,prd->sr", Δu, grad)``, summed over
positions. The gradient per receiver comes from a run in which every receiver (each
head's q, k, v, each MLP, the logits) reads its own copy of the residual stream
(:mod:`thinklens.circuits._edges`). The scores out of a sender sum to its AtP score.

**EAP-IG** (Hanna et al. 2024, "Have faith in faithfulness", EAP-IG-inputs): the same,
with the gradient averaged over ``steps`` points on the straight line between the two
runs' input embeddings (``blocks.0.hook_resid_pre``; midpoints ``α = (j + ½) / steps``),
a Riemann sum of the integrated gradient. The points run as rows of one batch.

Both are linear approximations: exact for a metric linear in the site, poor where
attention saturates (AtP*'s corrections are not implemented). ``metric="kl"`` has zero
gradient at the clean run, so use ``"denoising"`` (the default) with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from thinklens.circuits import _edges
from thinklens.circuits.circuit import Circuit
from thinklens.circuits.graph import Graph
from thinklens.circuits.metrics import check_rows
from thinklens.circuits.pairs import Pair
from thinklens.circuits.patching import (
    PatchResult,
    _by,
    _indices,
    _kind,
    _setup,
    layout_of,
    rows_per_pass,
)
from thinklens.errors import ConfigError


@dataclass(repr=False)
class AttributionResult(PatchResult):
    """A :class:`PatchResult` whose values are estimates: ``base value + Δa · grad``.

    Example::

        r = atp(model, pair, "z", by=("layer", "head"))
        exact = patch(model, pair, "z", by=("layer", "head"))
        r.values.shape == exact.values.shape, r.method        # True, 'atp'
    """

    method: str = "atp"

    def __repr__(self) -> str:
        return f"AttributionResult[{self.method}]" + super().__repr__().removeprefix("PatchResult")


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
        m = check_rows(fn(logits), 1, name)
        grads = torch.autograd.grad(m.sum(), [acts[n] for n in names], allow_unused=True)
    return ({n: a.detach() for n, a in acts.items()},
            {n: torch.zeros_like(acts[n]) if g is None else g for n, g in zip(names, grads)})


def atp(model: Any, pair: Pair, sites: str | Sequence[str] = ("z", "mlp_out"), *,
        by: str | Sequence[str] = ("layer", "pos"), metric: Any = "logit_diff",
        direction: str = "denoising", layers: Any = None, positions: Any = None,
        heads: Any = None) -> AttributionResult | dict[str, AttributionResult]:
    """Attribution patching of every site kind in ``sites``: one forward, one backward.

    Example::

        r = atp(model, pair, "z", by=("layer", "pos", "head"))   # values [layer, pos, head]
        both = atp(model, pair, ["z", "mlp_out", "resid_pre"], by=("layer", "head"))
        both["mlp_out"].axes                                     # ('layer',): no heads
        torch.corrcoef(torch.stack([r.values.flatten(),
                                    patch(model, pair, "z", by=("layer", "pos", "head"))
                                    .values.flatten()]))

    Arguments as :func:`~thinklens.circuits.patch`; ``by`` applies to every site, and
    ``head`` is dropped for sites without heads. One site gives an
    :class:`AttributionResult`; a list gives a dict keyed by site.
    """
    single = isinstance(sites, str)
    site_list = [sites] if single else list(sites)
    if not site_list:
        raise ConfigError("give at least one site kind, e.g. sites=('z', 'mlp_out')")
    by_t = (by,) if isinstance(by, str) else tuple(by)
    cfg, n_tok = model.config, len(pair)
    specs = []
    for site in site_list:
        suffix, label, site_layers = _kind(model, site)
        layout = layout_of(suffix)
        axes = _by(tuple(a for a in by_t if layout != "pos" or a not in ("head", "kv_head")),
                   layout)
        lays = _indices(layers, cfg.n_layers, "layers") if layers is not None else site_layers
        n_h = cfg.n_kv_heads if layout == "kv" else cfg.n_heads
        hds = _indices(heads, n_h, "heads") if layout != "pos" else None
        specs.append((label, layout, axes, hds, {la: f"blocks.{la}.{suffix}" for la in lays}))
    pos = _indices(positions, n_tok, "positions")
    names = list(dict.fromkeys(n for *_, ns in specs for n in ns.values()))
    model.sites(names)
    ctx = _setup(model, pair, metric, direction, (), names)
    n = pair.answer_pos + 1  # later tokens cannot change the answer position's logits
    base, grads = _grad_run(model, ctx["base"][:, :n], names, ctx["fn"], ctx["name"])
    pos_labels = [f"{i}:{t}" for i, t in enumerate(pair.labels())]
    out = {}
    for label, layout, axes, hds, by_layer in specs:
        grid = []
        for site in by_layer.values():
            src = ctx["acts_src"][site].to(base[site])
            src = src[:, :, :n, :n] if layout == "pattern" else src[:, :n]
            eff = ((src - base[site]) * grads[site])[0].float().sum(-1)  # [pos(, head)]
            eff = eff.T if layout == "pattern" else eff                 # query-major
            full = eff.new_zeros((n_tok, *eff.shape[1:]))
            full[:n] = eff
            cell = full[pos] if hds is None else full[pos][:, hds]
            if "pos" not in axes:
                cell = cell.sum(0)
            if hds is not None and "head" not in axes:
                cell = cell.sum(-1)
            grid.append(cell)
        values = ctx["base_value"] + torch.stack(grid).detach().cpu()
        names_ax = tuple("kv_head" if a == "head" and layout == "kv" else a for a in axes)
        labels = {"layer": list(by_layer), "pos": [pos_labels[i] for i in pos],
                  "head": hds, "kv_head": hds}
        out[label] = AttributionResult(values, names_ax, {a: labels[a] for a in names_ax},
                                       ctx["name"], ctx["clean"], ctx["corrupt"], label,
                                       direction, "atp")
    return out[site_list[0]] if single else out


def eap(model: Any, pair: Pair, *, steps: int | None = None, metric: Any = "logit_diff",
        direction: str = "denoising", batch_size: int | None = None, budget: Any = None,
        progress: bool | None = None) -> Circuit:
    """Edge attribution patching (``steps=None``) or EAP-IG (``steps=k``) of every edge.

    Returns the full graph as a :class:`~thinklens.circuits.Circuit` holding every edge's
    score (``[sender, receiver]``, summed over positions); keep the top edges with
    :meth:`Circuit.top`.

    Example::

        full = eap(model, pair, steps=5)        # EAP-IG with 5 points
        full.scores.shape, full.n_edges         # (21, 53), 479  (organism)
        circuit = full.top(n=40)
        circuit.edge_list()[:2]                 # [('a1.h2', 'logits', 1.93), ...]
        circuit.faithfulness(model, pair)       # 0..1: share of the metric recovered
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ConfigError(f"steps={steps!r}; give None (plain EAP) or a positive int "
                          "(EAP-IG interpolation points, e.g. 5)")
    graph = Graph.of(model)
    weights = _edges.layer_weights(model)
    sites = model.sites(list(_edges.SENDER_SITES))
    ctx = _setup(model, pair, metric, direction, sites, sites)
    n = pair.answer_pos + 1
    u_base = _edges.sender_outputs(ctx["acts_base"], weights)[0, :, :n]
    u_src = _edges.sender_outputs(ctx["acts_src"], weights)[0, :, :n]
    if steps is None:
        alphas = torch.zeros(1)
    else:
        alphas = (torch.arange(steps) + 0.5) / steps
    step = rows_per_pass(model, n, batch_size, budget)
    grad_sum = None
    chunks = [alphas[i:i + step] for i in range(0, len(alphas), step)]
    for alpha in tqdm(chunks, disable=not (progress if progress is not None else len(chunks) > 4),
                      desc="EAP-IG" if steps else "EAP"):
        a = alpha.to(u_base)[:, None, None]
        inputs = None if steps is None else u_base[0] + a * (u_src[0] - u_base[0])
        ids = ctx["base"][:, :n].expand(len(alpha), -1)
        logits, recv = _edges.edge_run(model, graph, ids, inputs=inputs, grad=True)
        m = check_rows(ctx["fn"](logits), len(alpha), ctx["name"])
        grads = torch.autograd.grad(m.sum(), recv, allow_unused=True)
        g = _edges.receiver_grads(recv, grads).sum(0).detach()
        grad_sum = g if grad_sum is None else grad_sum + g
    grad = grad_sum / len(alphas)                                  # [pos, R, d]
    scores = torch.einsum("spd,prd->sr", (u_src - u_base).float(), grad.float())
    scores = (scores * graph.valid).cpu()
    method = "eap" if steps is None else f"eap-ig({steps})"
    return Circuit(graph, scores, graph.valid.clone(), ctx["name"], ctx["clean"],
                   ctx["corrupt"], direction, method, model.name)
