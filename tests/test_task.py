"""The organism's task: hand-written problems and their ground truth, distractors included."""

from __future__ import annotations

import random

import pytest

from thinklens.errors import ConfigError
from thinklens.zoo.task import Statement, TaskConfig, generate, problem_from_prompt

PROMPT = "g = 3 ; c = b + 4 ; a = 7 ; b = a - 2 ; h = c * 2 ; ? c"


def test_hand_example_text():
    p = problem_from_prompt(PROMPT)
    assert p.chain == ["a", "b", "c"] and p.depth == 3 and p.answer == 9
    assert p.values == {"g": 3, "c": 9, "a": 7, "b": 5, "h": 8}  # h = 9 * 2 mod 10
    assert p.thinking == "c = b + 4 . b = a - 2 . a = 7 . b = 7 - 2 = 5 . c = 5 + 4 = 9 ."
    assert p.completion == p.thinking + " </think> 9 <eos>"
    assert p.step_values() == [("a", 7), ("b", 5), ("c", 9)]


def test_hand_example_token_truth():
    p = problem_from_prompt(PROMPT)
    toks, truth = p.thinking_tokens(), p.token_truth()
    assert len(toks) == len(truth) == 5 + 1 + 5 + 1 + 3 + 1 + 7 + 1 + 7 + 1
    # resolve step 1 copies statement 1 ("c = b + 4"); every token names c, value 9
    assert [(t.var, t.value, t.statement, t.phase) for t in truth[:5]] == [("c", 9, 1, "resolve")] * 5
    assert [t.role for t in truth[:6]] == ["var", "eq", "src", "op", "const", "end"]
    # resolve step 2: b, defined by statement 3; step 3: a (statement 2), a constant
    assert {(t.var, t.statement) for t in truth[6:11]} == {("b", 3)}
    assert {(t.var, t.statement, t.value) for t in truth[12:15]} == {("a", 2, 7)}
    a_value_pos = 14
    assert toks[a_value_pos] == "7"
    # compute b = 7 - 2 = 5 reads a's value at thinking position 14
    b_step = slice(16, 23)
    assert toks[b_step] == ["b", "=", "7", "-", "2", "=", "5"]
    assert {(t.var, t.value, t.statement, t.source_pos) for t in truth[b_step]} == {("b", 5, 3, 14)}
    assert truth[22].role == "result"
    # compute c = 5 + 4 = 9 reads b's result at position 22
    assert toks[24:31] == ["c", "=", "5", "+", "4", "=", "9"]
    assert {t.source_pos for t in truth[24:31]} == {22}
    # distractors g and h never appear in the thinking
    assert not {"g", "h"} & {t.var for t in truth}


def test_depth_one_and_direct():
    p = problem_from_prompt("b = 4 ; e = b + 1 ; ? b")
    assert p.thinking == "b = 4 ." and p.answer == 4 and p.depth == 1
    d = problem_from_prompt("b = 4 ; e = b + 1 ; ? b", direct=True)
    assert d.thinking == "" and d.completion == "</think> 4 <eos>" and d.token_truth() == []


def test_generated_problems_are_consistent():
    rng = random.Random(0)
    cfg = TaskConfig(max_depth=5, max_distractors=4, n_vars=12, ops=("+", "-", "*"))
    for _ in range(300):
        p = generate(rng, cfg)
        q = problem_from_prompt(p.prompt)
        assert (q.chain, q.values, q.thinking) == (p.chain, p.values, p.thinking)
        on_chain = set(p.chain)
        # distractors are never on the asked chain: nothing on the chain reads them,
        # and they never read a chain variable
        for s in p.statements:
            if s.var in on_chain and s.src is not None:
                assert s.src in on_chain
            if s.var not in on_chain:
                assert s.src is None or s.src not in on_chain
        assert len({s.var for s in p.statements}) == len(p.statements)
        truth = p.token_truth()
        toks = p.thinking_tokens()
        for t, tok in zip(truth, toks):
            if t.role == "result":
                assert tok == str(t.value)
            if t.source_pos >= 0:
                assert toks[t.source_pos] == str(p.values[p.statements[t.statement].src])


def test_statement_tokens():
    assert Statement("b", "a", "-", 2).tokens() == ["b", "=", "a", "-", "2"]
    assert Statement("a", None, None, 7).tokens() == ["a", "=", "7"]


@pytest.mark.parametrize("kw, match", [
    ({"min_depth": 3, "max_depth": 2}, "depth range"),
    ({"n_vars": 30}, "n_vars=30"),
    ({"max_depth": 8, "max_distractors": 6, "n_vars": 12}, "exceeds n_vars"),
    ({"ops": ("/",)}, "unknown ops"),
])
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        TaskConfig(**kw)


def test_prompt_errors():
    with pytest.raises(ConfigError, match="no query"):
        problem_from_prompt("a = 1 ;")
    with pytest.raises(ConfigError, match="'z' is not defined"):
        problem_from_prompt("a = 1 ; ? z")
    with pytest.raises(ConfigError, match="cannot parse"):
        problem_from_prompt("a == 1 ; ? a")
