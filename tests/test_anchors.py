"""Forced-answer importance: the one tree-masked pass against one bridge forward per cut
point, candidate scoring against next-token probabilities, the organism's known answers,
SmolLM2 end to end, and the errors."""

from __future__ import annotations

import math

import pytest
import torch

from thinklens.circuits import forced_answer
from thinklens.errors import ConfigError
from thinklens.hooks import forward as fwd
from thinklens.hooks.trace import Trace

PROMPT = "l = i + 2 ; c = 8 ; i = g - 3 ; g = c + 5 ; a = 3 ; ? l"  # depth 4, answer 2
COMPLETION = ("l = i + 2 . i = g - 3 . g = c + 5 . c = 8 . g = 8 + 5 = 3 . i = 3 - 3 = 0 . "
              "l = 0 + 2 = 2 . </think> 2 <eos>")


@pytest.fixture(scope="module")
def organism_trace(organism):
    return Trace.from_text(organism, PROMPT, COMPLETION)


def _by_hand(model, trace, close, tokens):
    """p(tokens | prefix + close) for every cut, one bridge forward per cut (no sharing)."""
    cuts = [trace.sentences[0].start] + [s.end for s in trace.sentences]
    seqs = [trace.token_ids[:c] + close + tokens for c in cuts]
    at = [list(range(c + len(close) - 1, c + len(close) + len(tokens) - 1)) for c in cuts]
    out = fwd.run(model, seqs, logits_at=at)
    return torch.stack([x.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None]).sum().exp()
                        for x in out])


def test_one_pass_equals_a_forward_per_cut_point(model, organism_trace):
    """On Qwen2 (GQA), Qwen3 (QK norm) and the organism (Llama): the tree-masked pass over
    the cached prefix gives the probabilities of a separate bridge forward per cut."""
    tr = organism_trace if model.name == "organism" else Trace.from_text(model, PROMPT,
                                                                         COMPLETION)
    one = forced_answer(model, tr)
    sep = forced_answer(model, tr, shared_prefix=False)
    assert one.mode == "next_token" and len(one.cuts) == len(tr.sentences) + 1
    torch.testing.assert_close(one.probs, sep.probs, atol=2e-5, rtol=0)
    torch.testing.assert_close(one.accuracy, _by_hand(model, tr, model.encode("\n</think>\n\n"),
                                                      model.encode("2")), atol=2e-5, rtol=0)
    # multi-token candidates (answer then eos), teacher-forced, several blocks per group
    two = forced_answer(model, tr, candidates=["3", "0"], suffix=" <eos>", block_tokens=5)
    torch.testing.assert_close(two.probs, forced_answer(model, tr, candidates=["3", "0"],
                               suffix=" <eos>", shared_prefix=False).probs, atol=2e-5, rtol=0)
    torch.testing.assert_close(two.accuracy, _by_hand(model, tr, model.encode("</think>"),
                                                      model.encode("2 <eos>")),
                               atol=2e-5, rtol=0)


def test_importance_and_kl_are_the_curve_s_steps(organism, organism_trace):
    fa = forced_answer(organism, organism_trace)
    torch.testing.assert_close(fa.importance, fa.accuracy[1:] - fa.accuracy[:-1])
    # kl[i] = KL(P_{i+1} || P_i) over the whole vocabulary, against torch's kl_div
    close = organism.encode("</think>")
    logp = torch.stack([x[0].log_softmax(-1) for x in fwd.run(
        organism, [organism_trace.token_ids[:c] + close for c in fa.cuts], logits_at="last")])
    want = torch.nn.functional.kl_div(logp[:-1], logp[1:], log_target=True,
                                      reduction="none").sum(-1)
    torch.testing.assert_close(fa.kl, want, atol=1e-5, rtol=1e-4)
    assert fa.probs.sum(-1).sub(1).abs().max() < 1e-5 and fa.answers[-1] is None


def test_candidates_equal_next_token_probabilities_for_one_token_answers(organism,
                                                                        organism_trace):
    digits = [str(d) for d in range(10)]
    nxt = forced_answer(organism, organism_trace)
    cand = forced_answer(organism, organism_trace, candidates=digits)
    assert cand.mode == "candidates" and cand.answers[:10] == ["2"] + [d for d in digits
                                                                       if d != "2"]
    torch.testing.assert_close(cand.accuracy, nxt.accuracy, atol=1e-6, rtol=0)
    for j, lab in enumerate(nxt.answers[:-1]):
        torch.testing.assert_close(cand.probs[:, cand.answers.index(lab)], nxt.probs[:, j],
                                   atol=1e-6, rtol=0)


def test_the_organism_answer_is_readable_only_once_the_chain_is_computed(organism,
                                                                         organism_trace):
    """Depth 4: with no thinking the organism is near chance (direct accuracy ~10 % at
    depth 3-4); after the last compute step it writes the answer 2."""
    fa = forced_answer(organism, organism_trace)
    assert fa.top[-1] == "2" and fa.accuracy[-1] > 0.99
    assert fa.accuracy[0] < 0.5
    assert fa.importance[-1] == fa.importance.max()  # the step that writes 2


@pytest.mark.smollm
def test_smollm2_end_to_end_gives_finite_scores(smollm):
    tr = Trace.from_text(smollm, "What is 2 + 3?", "Let me think. 2 + 3 = 5. So the answer "
                         "is 5.\n\\boxed{5}", thinking="answer")
    fa = forced_answer(smollm, tr)
    assert fa.mode == "candidates" and fa.prefix.endswith("\\boxed{") and fa.suffix == "}"
    assert fa.reference == "5" and len(fa.importance) == len(tr.sentences) == 3
    assert torch.isfinite(fa.importance).all() and torch.isfinite(fa.kl).all()
    torch.testing.assert_close(fa.probs, forced_answer(smollm, tr, shared_prefix=False).probs,
                               atol=1e-4, rtol=0)


def test_bad_input_is_refused_with_the_fix(organism, organism_trace):
    empty = Trace.from_text(organism, "a = 7 ; ? a", "</think> 7 <eos>")
    with pytest.raises(ConfigError, match="no thinking sentences"):
        forced_answer(organism, empty)
    with pytest.raises(ConfigError, match="found no answer"):
        _no_task_answer(organism, organism_trace)
    with pytest.raises(ConfigError, match="block_tokens"):
        forced_answer(organism, organism_trace, block_tokens=0)
    with pytest.raises(ConfigError, match="candidates"):
        forced_answer(organism, organism_trace, candidates=[""])


def _no_task_answer(organism, trace):
    """The organism has a task (true answers); without it the extractor is asked."""
    task = organism.task
    try:
        organism.task = None
        forced_answer(organism, trace, answer=lambda t: None)
    finally:
        organism.task = task


def test_no_nan_where_the_answer_is_certain(organism, organism_trace):
    fa = forced_answer(organism, organism_trace, candidates=["2"])
    assert all(math.isfinite(v) for v in fa.kl.tolist())


@pytest.mark.smollm
def test_smollm2_every_sentence_measure_runs_and_draws(smollm):
    """Issue 12's end-to-end bar on a real model: every measure returns finite scores (NaN
    only where its definition leaves a sentence out) and every figure draws."""
    from thinklens import circuits
    from thinklens.plots import (
        plot_early_answering,
        plot_receiver_kurtosis,
        plot_sentence_importance,
        plot_suppression_matrix,
    )

    texts = ["Let me think. 2 + 3 = 5. Then 5 + 1 = 6. So the answer is 6.\n\\boxed{6}",
             "First, 4 + 4 = 8. Next, 8 - 1 = 7. Check: 7 is right. So it is 7.\n\\boxed{7}"]
    prompts = ["What is 2 + 3 + 1?", "What is 4 + 4 - 1?"]
    trs = [Trace.from_text(smollm, p, c, thinking="answer") for p, c in zip(prompts, texts)]
    tr = trs[0]
    sup = circuits.suppression(smollm, tr)
    tot = circuits.suppression_total(smollm, tr, max_new_tokens=12)
    att = circuits.sentence_attribution(smollm, tr, chain=True)
    ri = circuits.resampling(smollm, tr, n=2, temperature=1.0, max_new_tokens=12,
                             progress=False)
    rh = circuits.receiver_heads(smollm, trs, k=4, proximity=1, min_sentences=3)
    early = circuits.early_answering(smollm, tr)
    fill = circuits.filler_tokens(smollm, tr, max_new_tokens=6)
    edit = circuits.added_mistake(smollm, tr, 1, max_new_tokens=12)
    para = circuits.paraphrase(smollm, tr, lambda s: s.replace("Then", "Next,"),
                               max_new_tokens=12)
    for x in (sup.answer_logodds_delta, sup.answer_kl, sup.chain, tot.answer_kl,
              tot.answer_delta, att.estimate, att.chain, ri.resampling, rh.kurtosis[1:].flatten()):
        assert torch.isfinite(x).all(), x
    assert all(a is not None for a in tot.controls) and tot.changed.isfinite().all()
    assert math.isfinite(early.aoc) and fill.original == "6"
    assert fill.length == len(tr.think_span)   # the thinking's token length
    assert edit.regenerated.answers and para.regenerated.answers
    figs = [plot_sentence_importance(tr, {"suppression": sup, "total": tot.answer_kl,
                                          "attribution": att, "resampling": ri}),
            plot_suppression_matrix(sup), plot_receiver_kurtosis(rh),
            plot_early_answering(early)]
    assert all(len(f.data) > 0 for f in figs)
