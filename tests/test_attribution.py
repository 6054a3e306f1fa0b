"""Attribution patching: AtP and EAP are derivatives of exact patches; EAP-IG integrates
them; all three rank heads and MLPs of the organism like exact patching does."""

from __future__ import annotations

import pytest
import torch
from _typecheck import unchecked

from thinklens.circuits import (
    AttributionResult,
    atp,
    eap,
    make_pair,
    patch,
)
from thinklens.circuits.metrics import logit_diff
from thinklens.errors import ConfigError, SiteError
from thinklens.zoo import change_constant

PROMPT = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"
EPS = 1e-2
FD = {"atol": 2e-3, "rtol": 2e-2}  # central differences in float32 with step 1e-2


def lookup_pair(model, prompt, new):
    """The resolve step writing the root's constant: predict '7' after thinking 'a ='."""
    from thinklens.zoo import lookup_step
    from thinklens.zoo.task import problem_from_prompt

    root = problem_from_prompt(prompt).chain[0]
    pair = change_constant(model, prompt, root, new, thinking="clean")  # only the prompt differs
    return lookup_step(model, pair, root)


@pytest.fixture(scope="module")
def org_pair(organism):
    return change_constant(organism, PROMPT, "a", 3)


@pytest.fixture(scope="module")
def look_pair(organism):
    return lookup_pair(organism, PROMPT, 3)


def spearman(a, b):
    ra, rb = (x.flatten().argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _metric_with(model, pair, ids, fwd):
    with torch.no_grad(), model.hooks(fwd):
        logits = model.bridge(ids[None])[:, pair.answer_pos]
    return logit_diff(pair.answer, pair.wrong)(logits)[0]


def _central_difference(model, pair, site, cell, direction="denoising"):
    """d/dε of m(base with site[cell] := base + ε (source - base)); base = the corrupted
    run when denoising, the clean run when noising."""
    base, src = ((pair.corrupt_ids, pair.clean_ids) if direction == "denoising"
                 else (pair.clean_ids, pair.corrupt_ids))
    _, at_src = model.bridge.run_with_cache(src[None])
    _, at_base = model.bridge.run_with_cache(base[None])
    delta = at_src[site] - at_base[site]
    out = []
    for eps in (EPS, -EPS):
        def nudge(act, hook, eps=eps):
            act = act.clone()
            act[(0, *cell)] += eps * delta[(0, *cell)]
            return act
        out.append(_metric_with(model, pair, base, [(site, nudge)]))
    return (out[0] - out[1]) / (2 * EPS)


@pytest.mark.parametrize("kind,cells", [
    ("resid_pre", [(2, 9), (1, 34), (3, 50)]),
    ("z", [(1, 38, 2), (2, 52, 0), (0, 9, 3)]),
    ("mlp_out", [(0, 9), (2, 46)]),
])
def test_atp_is_the_derivative_of_exact_patching(organism, org_pair, kind, cells):
    by = ("layer", "pos", "head") if kind == "z" else ("layer", "pos")
    r = atp(organism, org_pair, kind, by=by)
    exact = patch(organism, org_pair, kind, by=by)
    assert isinstance(r, AttributionResult) and r.axes == exact.axes
    assert r.values.shape == exact.values.shape and r.labels == exact.labels
    assert (r.clean, r.corrupt, r.metric, r.direction) == (exact.clean, exact.corrupt,
                                                           exact.metric, exact.direction)
    site = {"z": "attn.hook_z", "resid_pre": "hook_resid_pre", "mlp_out": "hook_mlp_out"}[kind]
    for layer, *rest in cells:
        slope = _central_difference(organism, org_pair, f"blocks.{layer}.{site}",
                                    (rest[0], slice(None)) if kind != "z" else (*rest, slice(None)))
        torch.testing.assert_close((r.values[(layer, *rest)] - r.corrupt).item(), slope.item(), **FD)
    # identical tokens before the first difference: nothing to patch, estimate = base
    first = org_pair.diff_positions[0]
    assert first == 9
    torch.testing.assert_close(r.values[:, :first], torch.full_like(r.values[:, :first], r.corrupt),
                               atol=1e-6, rtol=0)
    assert (r.values[:, first:] - r.corrupt).abs().max() > 0.1  # and something after it


@pytest.mark.parametrize("kind,cells", [
    ("resid_pre", [(1, 50), (0, 46), (2, 9)]),
    ("z", [(1, 52, 1), (0, 50, 2), (0, 9, 3)]),
])
def test_atp_noising_is_the_derivative_of_exact_patching(organism, org_pair, kind, cells):
    """Noising: the base is the clean run and the estimate its gradient there."""
    by = ("layer", "pos", "head") if kind == "z" else ("layer", "pos")
    r = atp(organism, org_pair, kind, by=by, direction="noising")
    exact = patch(organism, org_pair, kind, by=by, direction="noising")
    assert r.axes == exact.axes and r.values.shape == exact.values.shape
    site = {"z": "attn.hook_z", "resid_pre": "hook_resid_pre"}[kind]
    slopes = []
    for layer, *rest in cells:
        slope = _central_difference(organism, org_pair, f"blocks.{layer}.{site}",
                                    (rest[0], slice(None)) if kind != "z" else (*rest, slice(None)),
                                    direction="noising")
        torch.testing.assert_close((r.values[(layer, *rest)] - r.clean).item(), slope.item(), **FD)
        slopes.append(abs(slope.item()))
    assert max(slopes) > 0.1  # the agreement is not the trivial one of zero gradients


def test_atp_on_gqa_keys_is_the_derivative(qwen2):
    pair = make_pair(qwen2, "a = 7 ; b = a + 2 ; ? b", "a = 5 ; b = a + 2 ; ? b",
                     answer="9", wrong="7")
    r = atp(qwen2, pair, "k", by=("layer", "pos", "head"))
    assert isinstance(r, AttributionResult)
    assert r.axes == ("layer", "pos", "kv_head") and r.values.shape == (3, 12, 2)
    assert atp(qwen2, pair, "pattern", by=("layer", "pos", "head")).values.shape == (3, 12, 4)
    for layer, pos, kv in [(1, 2, 1), (2, 5, 0)]:
        slope = _central_difference(qwen2, pair, f"blocks.{layer}.attn.hook_k",
                                    (pos, kv, slice(None)))
        torch.testing.assert_close((r.values[layer, pos, kv] - r.corrupt).item(),
                                   slope.item(), **FD)


def _node_values(res_z, res_mlp):
    return torch.cat([res_z.values.flatten(), res_mlp.values])


@pytest.mark.parametrize("which", ["answer", "lookup"])
def test_attribution_ranks_nodes_like_exact_patching(organism, org_pair, look_pair, which):
    pair = org_pair if which == "answer" else look_pair
    exact = _node_values(patch(organism, pair, "z", by=("layer", "head")),
                         patch(organism, pair, "mlp_out", by="layer"))
    a_z, a_mlp = atp(organism, pair, "z", by=("layer", "head")), atp(organism, pair, "mlp_out", by="layer")
    plain, ig = eap(organism, pair), eap(organism, pair, steps=8)
    est = {"atp": _node_values(a_z, a_mlp),
           "eap": _node_values(plain.node_effects("z"), plain.node_effects("mlp_out")),
           "eap-ig": _node_values(ig.node_effects("z"), ig.node_effects("mlp_out"))}
    # a sender's out-edge scores sum to its node gradient: EAP's node effect is AtP's
    torch.testing.assert_close(est["eap"], est["atp"], atol=1e-4, rtol=1e-5)
    rho = {k: spearman(v, exact) for k, v in est.items()}
    err = {k: float((v - exact).abs().mean()) for k, v in est.items()}
    assert min(rho.values()) >= 0.8, rho   # measured: atp/eap 0.99, 0.98; eap-ig 0.84, 0.85
    assert err["eap-ig"] < 0.7 * err["eap"], err  # measured: 1.28 vs 2.30; 0.72 vs 2.11


def test_eap_ig_input_scores_integrate_to_the_metric_difference(organism, look_pair):
    """Integrated gradients on the inputs are complete: the input's out-edge scores sum
    (steps -> inf) to m(clean) - m(corrupt); one-point EAP is far from it."""
    ig = eap(organism, look_pair, steps=32)
    total = ig.clean - ig.corrupt
    torch.testing.assert_close(ig.scores[0].sum().item(), total, atol=0.02 * abs(total), rtol=0)
    plain = eap(organism, look_pair)
    assert abs(plain.scores[0].sum().item() - total) > 0.2 * abs(total)
    noising = eap(organism, look_pair, steps=32, direction="noising")
    torch.testing.assert_close(noising.scores[0].sum().item(), -total,
                               atol=0.02 * abs(total), rtol=0)


def _raw(module):
    """The plain torch module inside a bridge wrapper (calling the wrapper inside a hook
    would fire the hook point it feeds)."""
    return getattr(module, "original_component", None) or module


def _sender_output(model, cache, sender):
    """``[pos, d_model]``: what a sender writes into the residual stream in a cached run."""
    s_kind, s_layer, s_head = sender
    if s_kind == "head":
        d = model.config.d_head
        w_o = model.hf.model.layers[s_layer].self_attn.o_proj.weight[:, s_head * d:(s_head + 1) * d]
        return cache[f"blocks.{s_layer}.attn.hook_z"][0, :, s_head] @ w_o.T
    return cache[{"input": "blocks.0.hook_resid_pre",
                  "mlp": f"blocks.{s_layer}.hook_mlp_out"}[s_kind]][0]


def _receiver_hooks(model, receiver, delta):
    """Forward hooks under which only ``receiver`` reads its residual stream plus
    ``delta [pos, d_model]``; built from the Hugging Face modules directly."""
    r_kind, r_layer, r_head = receiver
    hf, d = model.hf.model, model.config.d_head
    layer = hf.layers[r_layer] if r_kind != "logits" else None
    seen = {}

    def keep(act, hook):
        seen["x"] = act
        return act

    if r_kind == "logits":
        return [(f"blocks.{model.config.n_layers - 1}.hook_resid_post",
                 lambda act, hook: act + delta)]
    if r_kind == "mlp":
        return [(f"blocks.{r_layer}.hook_resid_mid", keep),
                (f"blocks.{r_layer}.mlp.hook_in",
                 lambda act, hook: _raw(layer.post_attention_layernorm)(seen["x"] + delta))]
    proj = _raw(getattr(layer.self_attn, f"{r_kind}_proj"))

    def put(act, hook):
        act = act.clone()
        x = _raw(layer.input_layernorm)(seen["x"] + delta)
        act[:, :, r_head] = proj(x).view(*x.shape[:2], -1, d)[:, :, r_head]
        return act
    return [(f"blocks.{r_layer}.hook_resid_pre", keep),
            (f"blocks.{r_layer}.attn.hook_{r_kind}", put)]


def _hand_edge(model, pair, edge, eps, base_ids, delta_sign=1.0):
    """Metric when only receiver ``edge[1]`` reads ``eps`` x sender's (clean - corrupt)
    output in the run of ``base_ids``; built from the Hugging Face modules directly."""
    sender, receiver = edge
    _, clean = model.bridge.run_with_cache(pair.clean_ids[None])
    _, corrupt = model.bridge.run_with_cache(pair.corrupt_ids[None])
    delta = delta_sign * eps * (_sender_output(model, clean, sender)
                                - _sender_output(model, corrupt, sender))
    return _metric_with(model, pair, base_ids, _receiver_hooks(model, receiver, delta))


def _hand_eap_ig(model, pair, edge, steps, direction):
    """EAP-IG of one edge by hand, as the reference computes it: for j = 0 .. steps - 1 run
    the base tokens with resid_pre 0 := x_src + (j / steps)(x_base - x_src), take the
    gradient of the metric w.r.t. a zero perturbation of the receiver's input, average
    the gradients, and dot with the sender's (source - base) output."""
    sender, receiver = edge
    base, src = ((pair.corrupt_ids, pair.clean_ids) if direction == "denoising"
                 else (pair.clean_ids, pair.corrupt_ids))
    _, at_base = model.bridge.run_with_cache(base[None])
    _, at_src = model.bridge.run_with_cache(src[None])
    x_b, x_s = at_base["blocks.0.hook_resid_pre"], at_src["blocks.0.hook_resid_pre"]
    grads = []
    for j in range(steps):
        x = x_s + (j / steps) * (x_b - x_s)
        delta = torch.zeros(x.shape[1:], requires_grad=True)
        fwd = [("blocks.0.hook_resid_pre", lambda act, hook, x=x: x)]
        fwd += _receiver_hooks(model, receiver, delta)
        with torch.enable_grad(), model.hooks(fwd):
            logits = model.bridge(base[None])[:, pair.answer_pos]
            m = logit_diff(pair.answer, pair.wrong)(logits)[0]
            grads.append(torch.autograd.grad(m, delta)[0])
    du = _sender_output(model, at_src, sender) - _sender_output(model, at_base, sender)
    return (du * torch.stack(grads).mean(0)).sum()


EDGES = [(("head", 0, 2), ("v", 1, 1), "a0.h2->a1.h1.v"),
         (("head", 1, 1), ("logits", 0, 0), "a1.h1->logits"),
         (("mlp", 0, 0), ("mlp", 2, 0), "m0->m2"),
         (("input", 0, 0), ("q", 2, 3), "input->a2.h3.q")]


def test_eap_edge_scores_are_derivatives_of_single_edge_patches(organism, look_pair):
    scores = eap(organism, look_pair)
    g = scores.graph
    for sender, receiver, name in EDGES:
        s, r = g.parse_edge(name)
        up = _hand_edge(organism, look_pair, (sender, receiver), EPS, look_pair.corrupt_ids)
        down = _hand_edge(organism, look_pair, (sender, receiver), -EPS, look_pair.corrupt_ids)
        torch.testing.assert_close(scores.scores[s, r].item(), ((up - down) / (2 * EPS)).item(),
                                   **FD)
    assert abs(scores.scores[g.parse_edge("a0.h2->a1.h1.v")]) > 1  # a real edge, not a zero


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_eap_ig_uses_the_reference_points(organism, look_pair, direction):
    """Two-point EAP-IG against the hand computation at the reference's points j / 2,
    j = 0, 1 from the source input (the midpoints 1/4, 3/4 give other numbers)."""
    ig = eap(organism, look_pair, steps=2, direction=direction)
    g = ig.graph
    for sender, receiver, name in EDGES:
        want = _hand_eap_ig(organism, look_pair, (sender, receiver), 2, direction)
        torch.testing.assert_close(ig.scores[g.parse_edge(name)].item(), want.item(),
                                   atol=1e-4, rtol=1e-4)
    # the two directions use different points (source endpoint in, base endpoint out)
    other = eap(organism, look_pair, steps=2,
                direction="noising" if direction == "denoising" else "denoising")
    assert (ig.scores + other.scores).abs().max() > 0.1


def test_errors_at_the_attribution_entry_points(organism, org_pair):
    # what a user without the run-time type checker gets: thinklens's own errors
    with unchecked():
        with pytest.raises(ConfigError, match="pair must be a Pair"):
            atp(organism, ("a = 7 ; ? a", "a = 5 ; ? a"))
        with pytest.raises(ConfigError, match="pair must be a Pair"):
            eap(organism, "a = 7 ; ? a")
        with pytest.raises(ConfigError, match=r"atp takes one site kind, as patch does"):
            atp(organism, org_pair, ["z", "mlp_out"])
        with pytest.raises(ConfigError, match=r"unknown site kind 'resid_pr'.*'resid_pre'"):
            atp(organism, org_pair, "resid_pr")
        with pytest.raises(SiteError, match=r"unknown site 'blocks.9.attn.hook_z'"):
            atp(organism, org_pair, "blocks.9.attn.hook_z")
        with pytest.raises(ConfigError, match=r"returned shape \(\) .* one float per row"):
            atp(organism, org_pair, metric=lambda lg: lg[:, 3].mean())
        with pytest.raises(ConfigError, match=r"returned shape \(\) .* one float per row"):
            eap(organism, org_pair, steps=2, metric=lambda lg: lg[:, 3].mean())
        with pytest.raises(ConfigError, match=r"steps=0; give None \(plain EAP\)"):
            eap(organism, org_pair, steps=0)
        with pytest.raises(ConfigError, match=r"different lengths \(6 vs 7"):
            atp(organism, make_pair(organism, "a = 7 ; ? a", "a = 17 ; ? a"))
        with pytest.raises(ConfigError, match=r"answer '12' is 2 tokens"):
            eap(organism, make_pair(organism, "a = 7 ; ? a", "a = 5 ; ? a", answer="12"))
        with pytest.raises(ConfigError, match="unknown metric 'logitdiff'"):
            eap(organism, org_pair, metric="logitdiff")
        assert organism.n_hooks() == 0
