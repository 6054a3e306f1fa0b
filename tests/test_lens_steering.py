"""Logit lens, answer probe, correctness probe with early exit, steering vectors: on the organism."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _typecheck import unchecked

from thinklens.errors import ConfigError
from thinklens.hooks.activations import SiteActivations
from thinklens.hooks.trace import Sentence, Span, Trace
from thinklens.probes.correctness import chunk_thinking, correctness_probe, early_exit_curve
from thinklens.probes.lens import AnswerProbeResult, answer_probe, lens_logits, logit_lens
from thinklens.probes.steering import DoseResponse, dose_response, steer, steering_vector
from thinklens.zoo.evaluate import heldout_problems
from thinklens.zoo.organism import token_truth
from thinklens.zoo.task import TaskConfig

NO_DISTRACTORS = TaskConfig(max_distractors=0)  # one prompt length per depth: one batch each


def assert_close(actual, expected, atol):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def solved(organism):
    """96 greedy traces, depths 1-4, with their problems and whether each was solved."""
    problems = [p for d in (1, 2, 3, 4) for p in heldout_problems(d, 24, NO_DISTRACTORS)]
    traces = organism.think_batch([p.prompt for p in problems], max_new_tokens=72)
    ok = [t.answer_text.split()[:1] == [str(p.answer)] for p, t in zip(problems, traces)]
    return SimpleNamespace(problems=problems, traces=traces, ok=ok)


# ---- logit lens ------------------------------------------------------------------------

def test_lens_last_layer_is_the_models_output(organism, solved):
    traces = solved.traces[::12]
    lens = logit_lens(organism, traces, layers=[-1], positions="all", answer="7")
    seven = organism.encode("7")[0]
    for i, t in enumerate(traces):
        with torch.no_grad():
            logp = organism.hf(torch.tensor([t.token_ids])).logits[0].float().log_softmax(-1)
        n = int(lens.lengths[i])
        assert_close(lens.prob[i, 0, :n].log(), logp[:, seven], atol=1e-4)
        assert torch.equal(lens.rank[i, 0, :n], (logp > logp[:, seven:seven + 1]).sum(-1))
    assert organism.n_hooks() == 0  # the lens stops its passes early; nothing is left behind
    with torch.no_grad():
        ids = torch.tensor([traces[0].token_ids])
        assert_close(organism.bridge(ids), organism.hf(ids).logits, atol=1e-5)
    cap = organism.capture(traces[:1], sites="blocks.3.hook_resid_post", positions="all")
    with torch.no_grad():
        mine = lens_logits(organism, cap["blocks.3.hook_resid_post"].values[0]).log_softmax(-1)
        ref = organism.hf(torch.tensor([traces[0].token_ids])).logits[0].log_softmax(-1)
    assert_close(mine, ref, atol=1e-4)


def test_lens_on_a_qwen2_shape_matches_its_logits(qwen2):
    trace = Trace.from_text(qwen2, "b = a + 2 ; a = 7 ; ? b",
                            "b = a + 2 . a = 7 . b = 7 + 2 = 9 . </think> 9 <eos>")
    lens = logit_lens(qwen2, trace, layers=[0, -1])
    assert lens.layers == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    with torch.no_grad():
        logp = qwen2.hf(torch.tensor([trace.token_ids])).logits[0].float().log_softmax(-1)
    nine = lens.answer_ids[0]
    rows = trace.think_span.range
    assert lens.answer_tokens == ["9"]
    assert_close(lens.prob[0, -1].log(), logp[rows.start:rows.stop, nine], atol=1e-4)
    assert qwen2.n_hooks() == 0


def test_lens_shapes_and_padding(organism, solved):
    lens = logit_lens(organism, solved.traces[:6])
    n_layers = organism.config.n_layers + 1
    assert lens.axes == ("trace", "layer", "pos")
    assert lens.rank.shape[:2] == (6, n_layers) and lens.prob.shape == lens.rank.shape
    assert lens.layers[0] == "blocks.0.hook_resid_pre" and lens.layers[-1].endswith("3.hook_resid_post")
    for i, t in enumerate(solved.traces[:6]):
        n = int(lens.lengths[i])
        assert n == len(t.think_span) and lens.tokens[i] == t.tokens[t.think_span.start:t.think_span.end]
        assert (lens.rank[i, :, n:] == -1).all() and lens.prob[i, :, n:].isnan().all()
        assert ((lens.rank[i, :, :n] >= 0) & (lens.rank[i, :, :n] < organism.config.d_vocab)).all()


def test_lens_answer_is_top1_where_it_is_written(organism, solved):
    """At the '=' before the thinking's last result, the answer is next: the last layer ranks
    it first on solved problems, the embeddings do not."""
    lens = logit_lens(organism, solved.traces)
    top1 = torch.zeros(len(lens.layers))
    n = 0
    for i, t in enumerate(solved.traces):
        if not solved.ok[i]:
            continue
        last_eq = max(k for k in t.think_span.range if t.tokens[k] == "=")
        row = int((lens.positions[i] == last_eq).nonzero()[0, 0])
        top1 += (lens.rank[i, :, row] == 0).float()
        n += 1
    assert n >= 48
    top1 /= n
    assert top1[-1] >= 0.95, top1
    assert top1[0] <= 0.5, top1  # the embedding of '=' does not hold the answer


def test_lens_rejects_bad_input(organism, solved):
    with pytest.raises(ConfigError, match="layer"):
        logit_lens(organism, solved.traces[:1], layers=[7])
    with pytest.raises(ConfigError, match="one per trace"):
        logit_lens(organism, solved.traces[:2], answer=["1", "2", "3"])


def test_answer_probe_reads_the_answer_late_not_early(organism, solved):
    res = answer_probe(organism, solved.traces, n_bins=3, layers=[0, -1])
    assert res.axes == ("layer", "bin") and res.accuracy.shape == (2, 3)
    assert res.bins == ["0%", "50%", "100%"]
    assert res.control.shape == res.accuracy.shape and res.chance.shape == (3,)
    assert ((res.accuracy >= 0) & (res.accuracy <= 1)).all()
    # at 100% (the closing tag, which predicts the answer) the last layer reads it off;
    # at the first thinking token (the query variable) nothing is known yet
    assert res.accuracy[-1, -1] >= 0.8 * sum(solved.ok) / len(solved.ok), res.accuracy
    assert res.accuracy[-1, -1] >= res.control[-1, -1] + 0.4, (res.accuracy, res.control)
    assert res.accuracy[:, 0].max() <= res.chance[0] + 0.15, res.accuracy
    depth2 = answer_probe(organism, solved.traces[24:48], by="sentence", layers=[-1])
    assert depth2.bins == ["sentence 0", "sentence 1", "sentence 2"]  # 2 lookups, 1 computation
    assert (depth2.n_test == depth2.n_test[0]).all()


def test_selectivity_and_change_by_hand():
    res = AnswerProbeResult(accuracy=torch.tensor([[0.9, 0.5], [0.25, 1.0]]),
                            control=torch.tensor([[0.3, 0.5], [0.5, 0.75]]),
                            chance=torch.tensor([0.5, 0.5]), n_test=torch.tensor([4, 4]),
                            layers=["a", "b"], bins=["0%", "100%"])
    assert_close(res.selectivity, torch.tensor([[0.6, 0.0], [-0.25, 0.25]]), atol=1e-6)
    dr = DoseResponse(alphas=torch.tensor([0.0, 1.0, 2.0]),
                      frequency=torch.tensor([0.125, 0.5, 0.25]),
                      accuracy=torch.full((3,), float("nan")),
                      thinking_tokens=torch.zeros(3), metric_name="m")
    assert_close(dr.change, torch.tensor([0.0, 0.375, 0.125]), atol=1e-6)


# ---- correctness probe and early exit --------------------------------------------------

def _fake_trace(texts: list[str], gaps: list[str]):
    sents, text, pos = [], "", 0
    for k, (s, gap) in enumerate(zip(texts, gaps)):
        text += gap
        sents.append(Sentence(pos + k, pos + k + 1, len(text), len(text) + len(s), s, "x"))
        text += s
    return SimpleNamespace(sentences=sents, text=text)


def test_chunk_thinking_keywords_and_blank_lines():
    trace = _fake_trace(["Add 2 and 3.", "That is 5.", "Wait, check.", "Still 5.", "So 5.",
                         "Alternatively, count.", "Five."], ["", " ", " ", " ", "\n\n", " ", " "])
    with unchecked():  # a duck-typed stand-in for a Trace: only sentences and text are read
        assert chunk_thinking(trace, "keywords") == [Span(0, 2), Span(2, 4), Span(4, 5),
                                                     Span(5, 7)]
        assert len(chunk_thinking(trace, "sentences")) == 7
        with pytest.raises(ConfigError, match="valid"):
            chunk_thinking(trace, "paragraphs")


def test_early_exit_curve_by_hand():
    conf = [torch.tensor([0.2, 0.6, 0.9]), torch.tensor([0.7, 0.8])]
    ok = [torch.tensor([False, True, True]), torch.tensor([False, True])]
    used = [torch.tensor([4, 8, 12]), torch.tensor([5, 10])]
    c = early_exit_curve(conf, ok, used, [12, 10], [True, True], [0.0, 0.5, 0.75, 0.95])
    # tau 0: both exit after chunk 0, saving (12 - 4) + (10 - 5) of 22 tokens, both wrong;
    # tau .5: chunk 1 (right) and chunk 0 (wrong); tau .75: both at their last chunk
    assert_close(c.tokens_saved, torch.tensor([13 / 22, 9 / 22, 0.0, 0.0]), atol=1e-6)
    assert_close(c.accuracy, torch.tensor([0.0, 0.5, 1.0, 1.0]), atol=1e-6)
    assert_close(c.exit_rate, torch.tensor([1.0, 1.0, 1.0, 0.0]), atol=1e-6)
    assert c.full_accuracy == 1.0 and c.accuracy_kept[-1] == 1.0


def test_correctness_probe_and_early_exit_on_organism(organism, solved):
    taus = torch.linspace(0, 1.01, 11)
    res = correctness_probe(organism, solved.traces, thresholds=taus)
    c = res.curve
    assert c.thresholds.shape == c.tokens_saved.shape == c.accuracy.shape == (11,)
    assert (c.tokens_saved.diff() <= 1e-9).all() and (c.exit_rate.diff() <= 1e-9).all()
    assert c.exit_rate[0] == 1.0 and c.exit_rate[-1] == 0.0 and c.tokens_saved[-1] == 0.0
    assert c.accuracy[-1] == c.full_accuracy  # nobody exits: everyone keeps their own answer
    assert c.tokens_saved[0] > 0.3           # exit after the first step skips most thinking
    assert res.test["auroc"] > 0.65, res.test
    assert res.meta["chunks"] == "sentences"
    for t, chunks, lab, ok in zip(solved.traces, res.chunks, res.labels, solved.ok):
        assert len(chunks) == len(t.sentences) == len(lab)
        assert bool(lab[-1]) == ok  # forced answer after the last step is the model's answer
    assert [len(x) for x in res.confidence] == [len(res.chunks[i]) for i in res.test_traces]


# ---- steering ------------------------------------------------------------------------

def _seven_labels(trace):
    """'seven' at each '=' whose next token is a correct result 7, 'other' at other results'."""
    out = [None] * len(trace)
    for k, t in enumerate(token_truth(trace)):
        if t is not None and t.role == "result":
            out[k - 1] = "seven" if t.value == 7 else "other"
    return out


def test_steering_vector_matches_means_of_a_capture(organism, solved):
    traces = solved.traces[24:72]
    cap = organism.capture(traces, sites="blocks.1.hook_resid_post", positions="all")
    acts = cap["blocks.1.hook_resid_post"]
    rows, rest, venhoff, every = [], [], [], []
    for i, t in enumerate(traces):
        x = acts.unpadded(i)
        for s in t.sentences:
            if s.tag == "computation":
                rows.append(x[s.start:s.end])
                think = t.think_span   # Venhoff's window, clipped to the thinking
                venhoff.append(x[max(think.start, s.start - 1):min(think.end, s.start + 10)])
        comp = {k for s in t.sentences if s.tag == "computation" for k in s.span.range}
        rest.append(x[[k for k in t.think_span.range if k not in comp]])
        every.append(x[t.think_span.start:t.think_span.end])
    v = steering_vector(organism, traces, "computation", 1)
    assert v.site == "blocks.1.hook_resid_post" and v.layer == 1 and v.vector.shape == (128,)
    assert_close(v.vector, torch.cat(rows).mean(0) - torch.cat(rest).mean(0), atol=1e-4)
    assert_close(steering_vector(acts, traces, "computation").vector, v.vector, atol=1e-5)
    vh = steering_vector(organism, traces, "computation", 1, method="venhoff")
    base = torch.cat(every).mean(0)
    ref = torch.cat(venhoff).mean(0) - base
    assert_close(vh.vector, ref / ref.norm() * base.norm(), atol=1e-4)
    with pytest.raises(ConfigError, match="sentence tags found"):
        steering_vector(organism, traces, "backtracking", 1)


def test_venhoff_window_stays_inside_the_thinking(qwen2):
    """A label on the last thinking tokens: its window [start - 1, start + 10) would run into
    '</think>' and the answer; it stops at the thinking's end."""
    trace = Trace.from_text(qwen2, "b = a + 2 ; a = 7 ; ? b",
                            "b = a + 2 . a = 7 . b = 7 + 2 = 9 . </think> 9 <eos>")
    think = trace.think_span
    start = think.end - 3                         # the last three thinking tokens
    labels = ["x" if start <= k < think.end else None for k in range(len(trace))]
    x = torch.randn(len(trace), 64)
    acts = SiteActivations("blocks.1.hook_resid_post", x[None], ("trace", "pos", "d_model"),
                           torch.tensor([len(trace)]), torch.arange(len(trace))[None])
    v = steering_vector(acts, [trace], "x", method="venhoff", token_labels=lambda t: labels)
    assert (v.n_label, v.n_base) == (4, len(think))   # start - 1 .. think.end - 1, by hand
    base = x[think.start:think.end].mean(0)
    ref = x[start - 1:think.end].mean(0) - base
    assert_close(v.vector, ref / ref.norm() * base.norm(), atol=1e-5)


def test_steer_adds_alpha_v_and_always_removes_its_hook(organism, solved):
    ids = torch.tensor([solved.traces[0].token_ids])
    v = torch.randn(organism.config.d_model)
    seen = {}

    def spy(x, hook):
        seen["x"] = x.detach().clone()
        return x

    with torch.no_grad():
        with organism.hooks([("blocks.2.hook_resid_pre", spy)]):
            organism.bridge(ids)
        clean = seen["x"]
        with steer(organism, v, 1, alpha=3.0), organism.hooks([("blocks.2.hook_resid_pre", spy)]):
            assert organism.n_hooks() == 2
            organism.bridge(ids)
    assert_close(seen["x"] - clean, 3.0 * v.expand_as(clean), atol=1e-4)
    assert organism.n_hooks() == 0
    with pytest.raises(RuntimeError, match="boom"), steer(organism, v, 1, alpha=1.0):
        raise RuntimeError("boom")
    assert organism.n_hooks() == 0

    def fail(x, hook):
        raise ValueError("mid-pass")

    with pytest.raises(ValueError, match="mid-pass"), steer(organism, v, 1, 1.0):
        with organism.hooks([("blocks.2.hook_resid_post", fail)]):
            organism.bridge(ids)
    assert organism.n_hooks() == 0
    with pytest.raises(ConfigError, match="shape"), steer(organism, torch.zeros(3), 1):
        pass
    assert organism.n_hooks() == 0


def test_dose_response_steers_generation_toward_a_digit(organism, solved):
    """A vector toward 'the next result is 7' (organism ground truth, layer 2) makes real
    greedy generations write more 7s, monotonically in alpha, and costs accuracy."""
    v = steering_vector(organism, solved.traces, "seven", 2, token_labels=_seven_labels,
                        against="other")
    assert v.n_label >= 5
    problems = heldout_problems(3, 16, NO_DISTRACTORS, seed=777)  # one prompt length: one batch

    def sevens(trace):
        digits = [k for k in trace.tokens[trace.think_span.start:trace.think_span.end]
                  if k.isdigit()]
        return digits.count("7") / max(1, len(digits))

    alphas = [0.0, 0.5, 1.0, 2.0]
    dr = dose_response(organism, [p.prompt for p in problems], v, alphas=alphas, metric=sevens,
                       answers=[p.answer for p in problems], max_new_tokens=40)
    assert dr.axes == ("alpha",) and dr.frequency.shape == (4,) and dr.metric_name == "sevens"
    assert (dr.frequency.diff() >= -1e-9).all(), dr.frequency
    assert dr.frequency[-1] >= dr.frequency[0] + 0.4, dr.frequency
    assert dr.accuracy[0] >= 0.5 and dr.accuracy[-1] < dr.accuracy[0], dr.accuracy
    assert organism.n_hooks() == 0
