"""circuits.counterfactual_pair: a pair from a model's own trace, aligned token for token,
read where the model's own prediction changes (checked against a plain HF forward)."""

from __future__ import annotations

import pytest
import torch
from _typecheck import unchecked

from thinklens.circuits import counterfactual_pair, patch
from thinklens.circuits.pairs import _changes, own_answer_token
from thinklens.errors import ConfigError
from thinklens.hooks.answers import generic_answer
from thinklens.hooks.trace import Trace

PROMPT = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"
THINK = "a = 7 . b = 7 - 2 = 5 . c = 5 + 4 = 9 . </think> 9"


def _hf_next(model, ids):
    with torch.no_grad():
        return int(model.hf(torch.tensor([ids])).logits[0, -1].argmax())


def test_candidates_keep_the_length_and_change_numbers_before_names():
    got = _changes("Tom has 3 apples and 12 pears.")
    assert got[:3] == [("3", "4"), ("3", "2"), ("3", "5")]
    assert ("12", "13") in got and ("12", "9") not in got      # same digit count only
    names = [c for c in got if c[0] == "Tom"]
    assert names and all(len(new) == 3 and new != "Tom" for _, new in names)
    assert got.index(names[0]) > got.index(("12", "13"))


@pytest.mark.parametrize("strict", [False, True])
def test_pair_is_aligned_and_reads_the_models_own_predictions(qwen2, strict):
    trace = Trace.from_text(qwen2, PROMPT, THINK)
    try:
        pair = counterfactual_pair(qwen2, trace, answer_only=strict)
    except ConfigError as e:            # a random model: the answer may not move
        assert strict and "final answer" in str(e)
        return
    n = len(pair)
    assert pair.answer_pos == n - 1 and pair.clean_ids.tolist() == trace.token_ids[:n]
    # only the changed number differs: in the prompt and where the thinking copies it
    old, new = pair.why.split("'")[1], pair.why.split("'")[3]
    for p in pair.diff_positions:
        assert pair.clean_tokens[p].strip() == old and pair.corrupt_tokens[p].strip() == new
    assert any(p < trace.prompt_span.end for p in pair.diff_positions)
    # answer and wrong: the clean and corrupted runs' own next-token predictions there
    assert pair.answer == _hf_next(qwen2, pair.clean_ids.tolist())
    assert pair.wrong == _hf_next(qwen2, pair.corrupt_ids.tolist()) != pair.answer
    if strict or "final answer" in pair.why:
        assert n == own_answer_token(trace, generic_answer)       # cut before the answer
    r = patch(qwen2, pair, "resid_pre", by=("layer", "pos"), layers=[0], progress=False)
    first = min(pair.diff_positions)
    assert r.normalized()[0, first].item() == pytest.approx(1.0, abs=1e-4)   # all of it
    assert r.clean > r.corrupt


def test_refusals(qwen2):
    trace = Trace.from_text(qwen2, "c = b ; ? c", "c = b . </think> b")
    with pytest.raises(ConfigError, match="no number or name"):
        counterfactual_pair(qwen2, trace)
    with unchecked(), pytest.raises(ConfigError, match="needs a Trace"):
        counterfactual_pair(qwen2, PROMPT)
