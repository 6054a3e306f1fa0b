"""The shipped organism: loads like any model, thinks in chain steps, solves its task."""

from __future__ import annotations

import pytest
import torch

import thinklens
from thinklens.errors import ConfigError
from thinklens.zoo import organism as org
from thinklens.zoo.evaluate import evaluate, written_values
from thinklens.zoo.task import problem_from_prompt

PROMPT = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"


def test_think_gives_chain_steps_as_sentences(organism):
    trace = organism.think(PROMPT, max_new_tokens=64)
    assert trace.thinking_text.strip() == problem_from_prompt(PROMPT).thinking
    assert [s.text for s in trace.sentences] == [
        "c = b + 4 .", "b = a - 2 .", "a = 7 .", "b = 7 - 2 = 5 .", "c = 5 + 4 = 9 ."]
    assert trace.tags == ["lookup"] * 3 + ["computation"] * 2
    assert trace.answer_text.strip() == "9" and not trace.truncated


def test_ground_truth_per_token(organism):
    trace = organism.think(PROMPT, max_new_tokens=64)
    truth = org.token_truth(trace)
    results = [(trace.tokens[i], t) for i, t in enumerate(truth) if t and t.role == "result"]
    assert [(tok, t.var, t.value) for tok, t in results] == [("5", "b", 5), ("9", "c", 9)]
    for _, t in results:  # the operand each step read sits where the truth says
        assert trace.tokens[t.source_pos] in {"7", "5"}


def test_capture_on_organism(organism):
    trace = organism.think(PROMPT, max_new_tokens=64)
    cap = organism.capture(trace, sites="blocks.*.hook_resid_post", attention="sentence",
                           positions="sentence_ends")
    assert cap.stack("blocks.*.hook_resid_post").values.shape == (1, 4, 5, 128)
    assert cap["sentence_attention"].values.shape == (1, 4, 4, 5, 5)


def test_bridge_matches_hf_on_organism(organism):
    ids = torch.tensor([organism.encode(organism.render_prompt(PROMPT))])
    with torch.no_grad():
        torch.testing.assert_close(organism.bridge(ids), organism.hf(ids).logits, atol=1e-5, rtol=0)


def test_checkpoints_ship_and_load():
    steps = org.checkpoints()
    assert len(steps) >= 3 and steps == sorted(steps)
    early = thinklens.load("organism", checkpoint=steps[0])
    assert early.name == f"organism@{steps[0]}" and early.config.n_layers == 4
    with pytest.raises(ConfigError, match="valid steps"):
        thinklens.load("organism", checkpoint=123456)
    curve = org.training_curve()
    assert [r["step"] for r in curve] == sorted(r["step"] for r in curve)
    assert curve[-1]["loss"] < curve[0]["loss"]


def test_accuracy_small_sample(organism):
    # the full 1,000-per-depth table is in the README (thinklens organism eval)
    res = evaluate(organism, depths=(1, 2), n=100, progress=False)
    assert res[0].think_accuracy >= 0.95 and res[0].step_accuracy >= 0.95
    assert res[1].think_accuracy >= 0.9


def test_written_values_parser():
    assert written_values("c = b + 4 . a = 7 . c = 7 + 4 = 1 .") == [("a", 7), ("c", 1)]
    assert written_values("a = x . b") == [("a", None), ("?", None)]
