"""Circuits: edge-level ablation (full = clean run, empty = corrupted run, one edge = a
hand-made edge patch, mean ablation by hand), JSON, figures, and the organism's lookup
circuit with its heads' attention."""

from __future__ import annotations

import json

import pytest
import torch
from _typecheck import unchecked
from test_attribution import EDGES, _hand_edge, lookup_pair

import thinklens
from thinklens.circuits import Circuit, _edges, atp, eap, faithfulness_curve, make_pair
from thinklens.circuits.metrics import logit_diff
from thinklens.errors import ConfigError
from thinklens.plots import plot_circuit, plot_faithfulness
from thinklens.zoo import change_constant

PROMPT = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"
TIGHT = {"atol": 1e-4, "rtol": 1e-5}


@pytest.fixture(scope="module")
def look_pair(organism):
    return lookup_pair(organism, PROMPT, 3)


@pytest.fixture(scope="module")
def scored(organism, look_pair):
    return eap(organism, look_pair, steps=5)


def test_all_edges_is_the_clean_run_and_none_the_corrupted_run(organism, qwen2, look_pair,
                                                              scored):
    curve = faithfulness_curve(organism, look_pair, scored, sizes=[scored.n_edges, 0])
    torch.testing.assert_close(curve.faithfulness, torch.tensor([1.0, 0.0]), **TIGHT)
    torch.testing.assert_close(curve.values, torch.tensor([scored.clean, scored.corrupt]),
                               **TIGHT)
    torch.testing.assert_close(curve.empty, scored.corrupt, **TIGHT)
    # grouped-query attention, biases in q/k/v: the same holds
    pair = make_pair(qwen2, "a = 7 ; b = a + 2 ; ? b", "a = 5 ; b = a + 2 ; ? b",
                     answer="9", wrong="7")
    full = eap(qwen2, pair)
    assert full.graph.receivers[4:8] == ["a0.h0.k", "a0.h1.k", "a0.h0.v", "a0.h1.v"]
    assert full.scores.shape == (16, 28) and full.n_edges == 190
    q = faithfulness_curve(qwen2, pair, full, sizes=[190, 0])
    torch.testing.assert_close(q.values, torch.tensor([full.clean, full.corrupt]), **TIGHT)


def test_all_edges_is_the_clean_run_on_qwen3(qwen3_dir):
    """Qwen3 normalises each head's q and k (q_norm, k_norm) after the projection. The edge
    run rebuilds the projection from the receiver's own residual copy and the norms still
    apply after it, so every edge kept gives the clean run's logits, none the corrupted
    run's, and EAP's node effects are AtP's."""
    model = thinklens.load(str(qwen3_dir))
    assert hasattr(model.bridge.blocks[0].attn, "q_norm")
    pair = make_pair(model, "a = 7 ; b = a + 2 ; ? b", "a = 5 ; b = a + 2 ; ? b",
                     answer="9", wrong="7")
    full = eap(model, pair)
    graph, n = full.graph, pair.answer_pos + 1
    _, corrupt = model.bridge.run_with_cache(pair.corrupt_ids[None])
    ablated = _edges.sender_outputs(dict(corrupt), _edges.layer_weights(model))[0, :, :n]
    keep = torch.stack([graph.valid, torch.zeros_like(graph.valid)])
    logits, _ = _edges.edge_run(model, graph, pair.clean_ids[None, :n].expand(2, -1),
                                keep=keep, ablated=ablated)
    with torch.no_grad():
        want = torch.stack([model.bridge(ids[None])[0, pair.answer_pos]
                            for ids in (pair.clean_ids, pair.corrupt_ids)])
    torch.testing.assert_close(logits, want, **TIGHT)
    assert (want[0] - want[1]).abs().max() > 1e-2  # the two runs differ: the check can fail
    q = faithfulness_curve(model, pair, full, sizes=[full.n_edges, 0])
    torch.testing.assert_close(q.values, torch.tensor([full.clean, full.corrupt]), **TIGHT)
    torch.testing.assert_close(full.node_effects("z").values,
                               atp(model, pair, "z", by=("layer", "head")).values,
                               atol=1e-4, rtol=1e-4)


def test_removing_one_edge_equals_a_hand_made_edge_patch(organism, look_pair, scored):
    """Noising one edge u -> v: v alone reads u's corrupted output, the rest is clean."""
    moved = []
    for sender, receiver, name in EDGES:
        s, r = scored.graph.parse_edge(name)
        edges = scored.graph.valid.clone()
        edges[s, r] = False
        one_out = Circuit(scored.graph, scored.scores, edges, scored.metric, scored.clean,
                          scored.corrupt)
        got = faithfulness_curve(organism, look_pair, one_out, sizes=[one_out.n_edges])
        want = _hand_edge(organism, look_pair, (sender, receiver), 1.0, look_pair.clean_ids,
                          delta_sign=-1.0)
        torch.testing.assert_close(got.values[0].item(), want.item(), **TIGHT)
        moved.append(abs(want.item() - scored.clean))
    assert max(moved) > 1  # the agreement is not the trivial one of edges that do nothing


@pytest.mark.parametrize("lengths", [(34, 34, 34), (34, 12, 20)])
def test_mean_ablation_of_everything_equals_a_hand_made_mean_run(organism, look_pair, scored,
                                                                  lengths):
    """With every edge ablated to the mean, the logits read the sum of the senders' mean
    outputs (the organism has no biases): built here from the Hugging Face modules, one
    input at a time. Inputs all as long as the pair: a mean per position; one shorter
    (12 < answer position): one mean over every position of every input. The library
    runs them as one padded batch."""
    others = [change_constant(organism, PROMPT, "a", k, thinking="clean").corrupt_ids[:n]
              for k, n in zip((1, 2, 5), lengths)]
    hf, d, n_heads = organism.hf.model, organism.config.d_head, organism.config.n_heads
    outs = []
    for ids in others:
        _, cache = organism.bridge.run_with_cache(ids[None])
        out = cache["blocks.0.hook_resid_pre"][0].clone()
        for layer in range(organism.config.n_layers):
            z = cache[f"blocks.{layer}.attn.hook_z"][0]
            w_o = hf.layers[layer].self_attn.o_proj.weight.view(-1, n_heads, d)
            out += sum(z[:, h] @ w_o[:, h].T for h in range(n_heads))
            out += cache[f"blocks.{layer}.hook_mlp_out"][0]
        outs.append(out)
    if min(lengths) > look_pair.answer_pos:
        total = torch.stack([o[:34] for o in outs]).mean(0)[look_pair.answer_pos]
    else:
        total = torch.cat(outs).mean(0)
    with torch.no_grad():
        logits = organism.hf.lm_head(hf.norm(total))[None]
    want = logit_diff(look_pair.answer, look_pair.wrong)(logits)[0].item()
    curve = faithfulness_curve(organism, look_pair, scored, sizes=[0, 11, scored.n_edges],
                               ablation="mean", mean_over=others)
    torch.testing.assert_close(curve.empty, want, **TIGHT)
    torch.testing.assert_close(curve.faithfulness[[0, 2]], torch.tensor([0.0, 1.0]), **TIGHT)
    assert curve.ablation == "mean"
    if lengths == (34, 34, 34):
        assert curve.faithfulness[1] > 0.5  # the 11 lookup edges also carry a mean-ablated run


def test_top_and_threshold(scored):
    c = scored.top(n=11)
    assert c.n_edges == 11 and scored.n_edges == 479
    kept = sorted(abs(s) for *_, s in c.edge_list())
    dropped = (scored.scores.abs() * (scored.edges & ~c.edges)).max().item()
    assert kept[0] >= dropped
    by_threshold = scored.top(threshold=kept[0])
    assert torch.equal(by_threshold.edges, c.edges)
    assert c.edge_list()[0][:2] == ("input", "a0.h2.v")
    assert scored.top(n=0).nodes == [] and c.nodes[0] == "input" and c.nodes[-1] == "logits"
    signed = scored.top(n=3, absolute=False)
    assert min(s for *_, s in signed.edge_list()) > 0


def test_json_round_trip_and_bad_files(tmp_path, scored):
    c = scored.top(n=20)
    path = c.to_json(tmp_path / "c.json")
    back = Circuit.from_json(path)
    assert torch.equal(back.edges, c.edges) and torch.equal(back.scores, c.scores)
    assert (back.metric, back.clean, back.corrupt, back.direction, back.method, back.model,
            back.graph) == (c.metric, c.clean, c.corrupt, c.direction, c.method, c.model,
                            c.graph)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file
    doc = json.loads(path.read_text())

    def bad(change, match):
        d = json.loads(json.dumps(doc))
        change(d)
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(d))
        with pytest.raises(ConfigError, match=match):
            Circuit.from_json(p)

    bad(lambda d: d.update(format="other"), "not a thinklens circuit")
    bad(lambda d: d.update(version=7), "format version 7")
    bad(lambda d: d["edges"].append(dict(d["edges"][0])), "listed twice")
    bad(lambda d: d["edges"][0].update(edge="a9.h0->logits"), r"edge 'a9.h0->logits' is not")
    bad(lambda d: d["edges"][0].update(edge="m2->a1.h0.q"), "writes after")
    bad(lambda d: d["edges"][0].update(score="big"), r"edge #0 is")
    bad(lambda d: d.update(graph={"n_layers": 0}), "expected positive integers")
    bad(lambda d: d.update(clean="x"), "field 'clean'")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not a JSON circuit file"):
        Circuit.from_json(tmp_path / "junk.json")
    with pytest.raises(ConfigError, match="no circuit file"):
        Circuit.from_json(tmp_path / "missing.json")


def test_circuit_errors(organism, qwen2, look_pair, scored):
    with pytest.raises(ConfigError, match="give one of n="):
        scored.top()
    with pytest.raises(ConfigError, match=r"n=480; give an int in 0..479"):
        scored.top(n=480)
    with pytest.raises(ConfigError, match="ablation='zero'; valid: corrupt, mean"):
        scored.faithfulness(organism, look_pair, ablation="zero")
    with pytest.raises(ConfigError, match="needs mean_over"):
        scored.faithfulness(organism, look_pair, ablation="mean")
    with pytest.raises(ConfigError, match=r"does not match model"):
        pair = make_pair(qwen2, "a = 7 ; ? a", "a = 5 ; ? a", answer="7", wrong="5")
        scored.faithfulness(qwen2, pair)
    with pytest.raises(ConfigError, match=r"sizes \[-1\]"):
        faithfulness_curve(organism, look_pair, scored, sizes=[-1])
    with unchecked(), pytest.raises(ConfigError, match="must both be"):  # __post_init__'s check
        Circuit(scored.graph, torch.zeros(3, 3), scored.edges, "logit_diff", 1.0, 0.0)
    assert organism.n_hooks() == 0


def test_figures(organism, look_pair, scored):
    c = scored.top(n=11)
    fig = plot_circuit(c)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert len(lines) == 11
    widest = max(lines, key=lambda t: t.line.width)
    assert widest.line.dash == "dot"  # input -> a0.h2.v, the strongest edge, is a value edge
    hover = next(t for t in fig.data if t.mode == "markers" and t.marker.showscale)
    assert hover.marker.cmin == -hover.marker.cmax and "input → a0.h2.v" in hover.text[-1]
    curve = faithfulness_curve(organism, look_pair, scored, sizes=[0, 5, 11, 479])
    fig = plot_faithfulness(curve)
    assert list(fig.data[0].y) == pytest.approx(curve.faithfulness.tolist())
    assert fig.layout.xaxis.type == "log"


# ---- the organism's lookup circuit ------------------------------------------------------

@pytest.mark.parametrize("prompt,new,statement", [
    (PROMPT, 3, (7, 10)),                    # 'a = 7 ;' at positions 7..10
    ("d = 5 ; e = d + 1 ; ? e", 2, (1, 4)),  # 'd = 5 ;' at positions 1..4
])
def test_lookup_circuit(organism, prompt, new, statement):
    """At the thinking's 'a =' the model writes a's constant, read from the prompt
    statement 'a = 7 ;'. EAP-IG finds a circuit of <= 10% of the edges with >= 80% of the
    logit difference (real edge ablation to the corrupted run); its heads: a0.h2 copies
    the constant onto the statement's ';' (previous-token attention), a1.h1 attends from
    the thinking's 'a =' to that ';' and moves the value to the answer position."""
    pair = lookup_pair(organism, prompt, new)
    scored = eap(organism, pair, steps=5)
    total = scored.n_edges
    curve = faithfulness_curve(organism, pair, scored, sizes=[5, 8, 11, 15, total // 10])
    assert curve.faithfulness[-1] >= 0.8, curve.faithfulness
    smallest = curve.smallest(0.8)
    assert smallest is not None and smallest <= 0.1 * total   # measured: 11 edges (2.3%)
    circuit = scored.top(n=smallest)
    heads = [n for n in circuit.nodes if n.startswith("a")]
    assert {"a0.h2", "a1.h1"} <= set(heads), heads
    first, end = statement  # the constant sits at end - 1, the ';' at end
    _, cache = organism.bridge.run_with_cache(pair.clean_ids[None])
    reader = cache["blocks.1.attn.hook_pattern"][0, 1, pair.answer_pos]
    assert reader[first:end + 1].sum() > 0.8 and reader.argmax() == end
    mover = cache["blocks.0.attn.hook_pattern"][0, 2, end]
    assert mover[end - 1] > 0.9


def test_finding_the_statement_goes_through_the_lookup_heads_key(organism):
    """Swap which statement defines 'a' (prompt names swapped, values in place): the same
    lookup step now needs the *key* side. EAP-IG's circuit: a0.h3 moves the statement's
    variable name onto its ';', which is what a1.h1's key matches at the thinking's 'a ='."""
    from thinklens.zoo import lookup_step, swap_names

    pair = lookup_step(organism, swap_names(organism, "c = b + 4 ; a = 7 ; b = a - 2 ; g = 3 ; ? c",
                                            "a", "g"), "a")
    look = pair.answer_pos
    assert pair.diff_positions == [7, 17]  # the two variable names, nothing else
    scored = eap(organism, pair, steps=5)
    curve = faithfulness_curve(organism, pair, scored, sizes=[8, 11, 15, scored.n_edges // 10])
    smallest = curve.smallest(0.8)
    assert smallest is not None and smallest <= 0.1 * scored.n_edges   # measured: 11 (0.87)
    edges = {(a, b) for a, b, _ in scored.top(n=smallest).edge_list()}
    assert {("input", "a0.h3.v"), ("a0.h3", "a1.h1.k")} <= edges, edges
    _, cache = organism.bridge.run_with_cache(pair.clean_ids[None])
    namer = cache["blocks.0.attn.hook_pattern"][0, 3, 10]    # from the ';' closing 'a = 7'
    assert namer.argmax() == 7 and namer[7] > 0.9            # to the name (measured 0.999)
    reader = cache["blocks.1.attn.hook_pattern"][0, 1, look]
    assert reader.argmax() == 10 and reader[7:11].sum() > 0.8
