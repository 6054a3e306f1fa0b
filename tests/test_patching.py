"""Patching: agreement with transformer_lens.patching, batching, GQA, path patching, pairs."""

from __future__ import annotations

import typing

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tlp

from thinklens.circuits.metrics import answer_prob, kl_to, logit_diff
from thinklens.circuits.pairs import make_pair
from thinklens.circuits.patching import PatchResult, patch
from thinklens.circuits.paths import path_patch
from thinklens.errors import ConfigError, SiteError
from thinklens.zoo import change_constant, change_thinking_value, lookup_step, swap_names

TIGHT = {"atol": 1e-5, "rtol": 0}  # tiny models: patched batch vs one pass per cell
SMOL = {"atol": 1e-4, "rtol": 0}   # SmolLM2, fp32: batched matmuls round differently
PROMPT = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"
IOI = ("When John and Mary went to the store, John gave a drink to",
       "When Mary and John went to the store, Mary gave a drink to")


VALUES = typing.get_type_hints(PatchResult)["values"]


def reference(model, pair, kind, setter, cells=None, axes=None):
    """transformer_lens.patching on the bridge: one forward pass per cell."""
    _, cache = model.bridge.run_with_cache(pair.clean_ids[None])
    a, w = pair.answer, pair.wrong

    def metric(logits):
        return logits[0, pair.answer_pos, a] - logits[0, pair.answer_pos, w]

    kw = {"index_df": cells} if cells is not None else {"index_axis_names": axes}
    return tlp.generic_activation_patch(model.bridge, pair.corrupt_ids[None], cache, metric,
                                        patch_setter=setter, activation_name=kind, **kw)


@pytest.fixture(scope="module")
def tiny_pair(qwen2):
    return make_pair(qwen2, "a = 7 ; b = a + 2 ; ? b", "a = 5 ; b = a + 2 ; ? b",
                     answer="9", wrong="7")


@pytest.fixture(scope="module")
def org_pair(organism):
    return change_constant(organism, PROMPT, "a", 3)


# ---- agreement with the reference ------------------------------------------------------

KINDS = [("resid_pre", "resid_pre", tlp.layer_pos_patch_setter, ("layer", "pos")),
         ("resid_mid", "resid_mid", tlp.layer_pos_patch_setter, ("layer", "pos")),
         ("resid_post", "resid_post", tlp.layer_pos_patch_setter, ("layer", "pos")),
         ("mlp_out", "mlp_out", tlp.layer_pos_patch_setter, ("layer", "pos")),
         ("z", "z", tlp.layer_pos_head_vector_patch_setter, ("layer", "pos", "head")),
         ("q", "q", tlp.layer_pos_head_vector_patch_setter, ("layer", "pos", "head")),
         ("v", "v", tlp.layer_pos_head_vector_patch_setter, ("layer", "pos", "head")),
         ("z", "z", tlp.layer_head_vector_patch_setter, ("layer", "head")),
         ("pattern", "pattern", tlp.layer_head_pos_pattern_patch_setter,
          ("layer", "head_index", "dest_pos"))]


@pytest.mark.parametrize("site,kind,setter,axes", KINDS, ids=[f"{k[0]}-{len(k[3])}" for k in KINDS])
def test_equals_transformer_lens_on_gqa_model(qwen2, tiny_pair, site, kind, setter, axes):
    ours = patch(qwen2, tiny_pair, site, by=[a.replace("head_index", "head")
                                             .replace("dest_pos", "pos") for a in axes])
    ref = reference(qwen2, tiny_pair, kind, setter, axes=axes)
    if site == "pattern":  # the reference orders (layer, head, dest_pos)
        ref = ref.permute(0, 2, 1)
    n_heads = 2 if site == "v" else 4
    want = {2: (3, n_heads) if "head" in axes else (3, len(tiny_pair)),
            3: (3, len(tiny_pair), n_heads)}[len(axes)]
    assert ours.values.shape == want
    torch.testing.assert_close(ours.values, ref, **TIGHT)
    # the annotation Float[Tensor, "*axes"]: float values, one axis per name in axes
    assert isinstance(ours.values, VALUES) and ours.values.ndim == len(ours.axes)


def test_kv_patching_of_gqa_model_equals_a_hand_made_patch(qwen2, tiny_pair):
    r = patch(qwen2, tiny_pair, "k", by=("layer", "pos", "head"))
    assert r.axes == ("layer", "pos", "kv_head") and r.values.shape == (3, len(tiny_pair), 2)
    _, clean = qwen2.bridge.run_with_cache(tiny_pair.clean_ids[None])
    m = logit_diff(tiny_pair.answer, tiny_pair.wrong)
    patterns = {}
    for layer, pos, kv in [(0, 2, 0), (1, 2, 1), (2, 4, 0)]:
        site = f"blocks.{layer}.attn.hook_k"

        def swap(act, hook, layer=layer, pos=pos, kv=kv, site=site):
            act = act.clone()
            act[:, pos, kv] = clean[site][:, pos, kv]
            return act

        def keep(act, hook, key=(layer, pos, kv)):
            patterns[key] = act.clone()
            return act

        with torch.no_grad(), qwen2.hooks([(site, swap), (f"blocks.{layer}.attn.hook_pattern",
                                                          keep)]):
            logits = qwen2.bridge(tiny_pair.corrupt_ids[None])
        torch.testing.assert_close(r.values[layer, pos, kv], m(logits[:, -1])[0], **TIGHT)
    # one KV head serves query heads 2kv and 2kv+1; the other group is untouched
    _, corrupt = qwen2.bridge.run_with_cache(tiny_pair.corrupt_ids[None])
    moved = (patterns[(1, 2, 1)] - corrupt["blocks.1.attn.hook_pattern"]).abs().amax((0, 2, 3))
    assert moved[2:].min() > 1e-4 and moved[:2].max() == 0


def test_batched_equals_one_at_a_time_and_subsets(organism, org_pair):
    full = patch(organism, org_pair, "z", by=("layer", "pos", "head"))  # 848 rows
    ones = patch(organism, org_pair, "z", by=("layer", "pos", "head"), batch_size=1,
                 layers=[1, 3], positions=[0, 9, 40, 52])
    torch.testing.assert_close(full.values[[1, 3]][:, [0, 9, 40, 52]], ones.values, **TIGHT)
    sub = patch(organism, org_pair, "z", by=("layer", "pos", "head"), layers=[1, 3],
                positions=[9, 34, -1], heads=[0, 2], batch_size=5)
    torch.testing.assert_close(sub.values, full.values[[1, 3]][:, [9, 34, 52]][..., [0, 2]],
                               **TIGHT)
    assert sub.labels["pos"] == ["9:7/3", "34:7/3", "52:</think>"]


def test_denoising_and_noising_everything_gives_the_other_run(organism, org_pair):
    for direction, want in [("denoising", "clean"), ("noising", "corrupt")]:
        r = patch(organism, org_pair, "resid_pre", by="layer", direction=direction)
        assert r.axes == ("layer",) and r.values.shape == (4,)
        torch.testing.assert_close(r.values[0].item(), getattr(r, want), **TIGHT)
        last = patch(organism, org_pair, "blocks.3.hook_resid_post", by="layer",
                     direction=direction)
        torch.testing.assert_close(last.values[0].item(), getattr(r, want), **TIGHT)
    assert r.clean > 0 > r.corrupt  # the organism tells the two answers apart
    assert abs(patch(organism, org_pair, "resid_pre", by="layer").normalized()[0] - 1) < 1e-5


def test_metrics(organism, org_pair):
    with torch.no_grad():
        logits = organism.bridge(torch.stack([org_pair.clean_ids, org_pair.corrupt_ids]))
    last = logits[:, -1]
    kl = patch(organism, org_pair, "resid_pre", by="layer", metric="kl", layers=[0])
    assert kl.clean == 0 and kl.values[0] < 1e-6 < kl.corrupt
    torch.testing.assert_close(kl.corrupt, kl_to(last[0])(last[1:]).item(), **TIGHT)
    prob = patch(organism, org_pair, "resid_pre", by="layer", metric="prob", layers=[0])
    torch.testing.assert_close(prob.clean, answer_prob(org_pair.answer)(last[:1]).item(), **TIGHT)
    norm = patch(organism, org_pair, "z", by=("layer", "head"), metric="normalized_logit_diff")
    raw = patch(organism, org_pair, "z", by=("layer", "head"))
    torch.testing.assert_close(norm.values, raw.normalized(), **TIGHT)
    assert (norm.clean, norm.corrupt) == (1.0, 0.0)
    custom = patch(organism, org_pair, "z", by=("layer", "head"),
                   metric=lambda lg: lg[:, org_pair.answer] - lg[:, org_pair.wrong])
    torch.testing.assert_close(custom.values, raw.values, **TIGHT)


# ---- path patching -----------------------------------------------------------------------

def _hand_path(model, pair, sender, receiver_layer, via_mlp):
    """Receiver layer's resid_pre when only the sender's change reaches it, built by hand."""
    layer, head = sender
    _, clean = model.bridge.run_with_cache(pair.clean_ids[None])
    _, corrupt = model.bridge.run_with_cache(pair.corrupt_ids[None])
    d = model.config.d_head
    w_o = model.hf.model.layers[layer].self_attn.o_proj.weight[:, head * d:(head + 1) * d]
    z = f"blocks.{layer}.attn.hook_z"
    delta = (corrupt[z][0, :, head] - clean[z][0, :, head]) @ w_o.T
    resid = clean[f"blocks.{receiver_layer}.hook_resid_pre"][0] + delta
    if via_mlp:  # sender and receiver in adjacent layers: only MLP `layer` lies between
        block = model.hf.model.layers[layer]
        mid = clean[f"blocks.{layer}.hook_resid_mid"][0]
        resid = resid + block.mlp(block.post_attention_layernorm(mid + delta)) - \
            clean[f"blocks.{layer}.hook_mlp_out"][0]
    return resid


def _run_with(model, pair, site, fn):
    with torch.no_grad(), model.hooks([(site, fn)]):
        logits = model.bridge(pair.clean_ids[None])
    return logit_diff(pair.answer, pair.wrong)(logits[:, -1])[0]


def test_path_patching_equals_a_hand_construction(organism, org_pair):
    m, pair = organism, org_pair
    with torch.no_grad():
        # MLPs frozen: only the direct path sender -> residual -> receiver
        resid = _hand_path(m, pair, (1, 1), 2, via_mlp=False)
        want = _run_with(m, pair, "blocks.2.hook_resid_pre", lambda a, hook: resid[None])
        got = path_patch(m, pair, [(1, 1)], ["blocks.2.hook_resid_pre"], freeze_mlps=True)
        assert got.axes == ("sender",) and got.values.shape == (1,)
        torch.testing.assert_close(got.values[0], want, **TIGHT)
        # into one query head of layer 2: q recomputed from the hand-built residual
        block = m.hf.model.layers[2]
        q = block.self_attn.q_proj(block.input_layernorm(resid)).reshape(len(pair), 4, -1)

        def put_q(act, hook):
            act = act.clone()
            act[0, :, 3] = q[:, 3]
            return act

        want_q = _run_with(m, pair, "blocks.2.attn.hook_q", put_q)
        got_q = path_patch(m, pair, [(1, 1)], [(2, 3, "q")], freeze_mlps=True)
        torch.testing.assert_close(got_q.values[0], want_q, **TIGHT)
        # MLPs live (Wang et al.'s setting): the path through MLP 0 counts too
        resid = _hand_path(m, pair, (0, 2), 1, via_mlp=True)
        want_mlp = _run_with(m, pair, "blocks.1.hook_resid_pre", lambda a, hook: resid[None])
        got = path_patch(m, pair, [(0, 2)], ["blocks.1.hook_resid_pre"])
        torch.testing.assert_close(got.values[0], want_mlp, **TIGHT)
    # the cases move the metric well beyond the tolerance (not a vacuous agreement)
    assert min(abs(w - got.clean) for w in (want, want_q, want_mlp)) > 1e-2


def test_path_patching_sweep_equals_single_calls(qwen2, tiny_pair):
    recv = [(2, 0, "q"), (2, 1, "k"), "blocks.2.hook_resid_post"]
    grid = path_patch(qwen2, tiny_pair, "heads", recv, batch_size=5)
    assert grid.axes == ("layer", "head") and grid.values.shape == (3, 4)
    for layer, head in [(0, 0), (1, 3)]:
        one = path_patch(qwen2, tiny_pair, [(layer, head)], recv)
        torch.testing.assert_close(grid.values[layer, head], one.values[0], **TIGHT)
    joint = path_patch(qwen2, tiny_pair, [[(0, 0), (1, 3)], "blocks.0.hook_mlp_out"], recv)
    assert joint.values.shape == (2,) and joint.labels["sender"][1] == "blocks.0.hook_mlp_out"
    # a sender in the receiver's own layer has no path into its query: the clean metric
    same = path_patch(qwen2, tiny_pair, [(2, 0), (2, 3)], [(2, 0, "q")])
    torch.testing.assert_close(same.values, torch.full((2,), same.clean), **TIGHT)


# ---- pairs ---------------------------------------------------------------------------------

def test_organism_pairs_are_aligned(organism):
    pair = change_constant(organism, PROMPT, "a", 3)
    toks = pair.corrupt_tokens
    assert [toks[i] for i in pair.diff_positions] == ["3", "3", "3", "1", "1", "5"]
    assert (pair.answer, pair.wrong) == tuple(organism.encode("9 5"))
    same = change_constant(organism, PROMPT, "a", 3, thinking="clean")
    assert same.diff_positions == [9]
    two = change_thinking_value(organism, PROMPT, "b", 1)
    assert [two.corrupt_tokens[i] for i in two.diff_positions] == ["1", "1", "5"]
    one = change_thinking_value(organism, PROMPT, "c", 1, propagate=False)
    assert len(one.diff_positions) == 1 and one.wrong == organism.encode("1")[0]
    assert one.clean_trace.think_span == one.corrupt_trace.think_span


def test_name_swaps_and_lookup_steps(organism):
    four = "c = b + 4 ; a = 7 ; b = a - 2 ; g = 3 ; ? c"
    swap = swap_names(organism, four, "a", "g")
    assert swap.diff_positions == [7, 17]                       # only the two names
    assert swap.corrupt_trace.prompt == "c = b + 4 ; g = 7 ; b = a - 2 ; a = 3 ; ? c"
    assert (swap.answer, swap.wrong) == tuple(organism.encode("9 5"))  # a = 3 -> b = 1 -> c = 5
    own = swap_names(organism, four, "a", "g", thinking="own")
    assert len(own.diff_positions) > 2
    step = lookup_step(organism, swap, "a")
    assert step.clean_tokens[step.answer_pos - 1:step.answer_pos + 1] == ["a", "="]
    assert swap.clean_tokens[step.answer_pos + 1] == "7" and len(step) == step.answer_pos + 1
    assert (step.answer, step.wrong) == tuple(organism.encode("7 3"))
    const = lookup_step(organism, change_constant(organism, PROMPT, "a", 3, thinking="clean"),
                        "a")
    assert const.diff_positions == [9] and const.answer_pos == 33
    with pytest.raises(ConfigError, match=r"two different variables.*valid: \['c', 'a', 'b', 'g'\]"):
        swap_names(organism, four, "a", "x")
    with pytest.raises(ConfigError, match="no valid problem"):
        swap_names(organism, four, "a", "b")                    # b = a - 2 would read itself
    with pytest.raises(ConfigError, match=r"looks up no 'x'; it looks up \['c', 'b', 'a'\]"):
        lookup_step(organism, swap, "x")
    with pytest.raises(ConfigError, match="does not change this step"):
        lookup_step(organism, change_constant(organism, PROMPT, "a", 3, thinking="clean"), "b")


def test_errors(organism, org_pair):
    with pytest.raises(ConfigError, match=r"different lengths \(6 vs 7 .*position 2: clean '7' "
                                          r"vs corrupted '1'"):
        make_pair(organism, "a = 7 ; ? a", "a = 17 ; ? a")
    with pytest.raises(ConfigError, match=r"answer '12' is 2 tokens"):
        make_pair(organism, "a = 7 ; ? a", "a = 5 ; ? a", answer="12")
    with pytest.raises(ConfigError, match=r"returned shape \(\) .* one float per row"):
        patch(organism, org_pair, metric=lambda lg: lg[:, 3].mean())
    with pytest.raises(SiteError, match=r"unknown site 'blocks.3.hook_resid'.*Did you mean"):
        patch(organism, org_pair, "blocks.3.hook_resid")
    with pytest.raises(ConfigError, match=r"unknown site kind 'resid_pr'.*'resid_pre'"):
        patch(organism, org_pair, "resid_pr")
    with pytest.raises(ConfigError, match=r"by=\('layer', 'head'\)"):
        patch(organism, org_pair, "resid_pre", by=("layer", "head"))
    with pytest.raises(ConfigError, match="leaves the answer"):
        change_constant(organism, "c = b + 4 ; a = 7 ; b = a - 2 ; d = 1 ; ? c", "d", 2)
    with pytest.raises(ConfigError, match=r"bad receiver \(1, 0\)"):
        path_patch(organism, org_pair, [(0, 0)], [(1, 0)])
    same = PatchResult(torch.zeros(2), ("layer",), {"layer": [0, 1]}, "logit_diff", 1.0, 1.0,
                       "resid_pre", "denoising")
    with pytest.raises(ConfigError, match=r"cannot normalise: metric 'logit_diff' is 1 on both"):
        same.normalized()
    assert not isinstance(torch.zeros(2, dtype=torch.long), VALUES)
    assert organism.n_hooks() == 0


# ---- SmolLM2: the reference on a real model ---------------------------------------------------

@pytest.fixture(scope="module")
def ioi(smollm):
    return make_pair(smollm, *IOI, answer=" Mary", wrong=" John")


@pytest.mark.smollm
def test_smollm_resid_pre_sweep_equals_transformer_lens(smollm, ioi):
    r = patch(smollm, ioi, "resid_pre")  # every layer x position: 420 patched runs
    assert isinstance(r, PatchResult) and r.values.shape == (30, 14)
    assert r.clean > 0 > r.corrupt
    cells = pd.DataFrame([(layer, p) for layer in (0, 14, 29) for p in (1, 3, 9, 13)],
                         columns=["layer", "pos"])
    ref = reference(smollm, ioi, "resid_pre", tlp.layer_pos_patch_setter, cells)
    torch.testing.assert_close(r.values[cells.layer.tolist(), cells.pos.tolist()], ref, **SMOL)


@pytest.mark.smollm
@pytest.mark.parametrize("site,setter", [("attn_out", tlp.layer_pos_patch_setter),
                                         ("mlp_out", tlp.layer_pos_patch_setter),
                                         ("z", tlp.layer_pos_head_vector_patch_setter)])
def test_smollm_sites_equal_transformer_lens(smollm, ioi, site, setter):
    layers, pos = [3, 20], [9, 13]
    by = ("layer", "pos", "head") if site == "z" else ("layer", "pos")
    r = patch(smollm, ioi, site, by=by, layers=layers, positions=pos,
              heads=[0, 8] if site == "z" else None)
    rows = [(layer, p, h) for layer in layers for p in pos for h in (0, 8)] if site == "z" else \
        [(layer, p) for layer in layers for p in pos]
    cells = pd.DataFrame(rows, columns=["layer", "pos", "head"][:len(by)])
    ref = reference(smollm, ioi, site, setter, cells)
    torch.testing.assert_close(r.values.flatten(), ref, **SMOL)
