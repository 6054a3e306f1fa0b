"""Total effect of suppression (``circuits.suppression_total``).

Reference: a fresh Hugging Face model (eager attention, fp32) decoding greedily by hand,
one full forward per token, with a 4D additive mask that hides sentence j's key columns
from every query (prefix and generated tokens); then the trace's closing text and answer
teacher-forced under the same mask. Generated ids must be equal, answer scores within
1e-4.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import thinklens
from thinklens import Trace, circuits
from thinklens.errors import ConfigError, PositionError
from thinklens.zoo.backtrack import backtrack_folder
from thinklens.zoo.organism import organism_folder

PROMPT = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"
COMPLETION = ("c = b + 4 . b = a - 2 . a = 7 . b = 7 - 2 = 5 . c = 5 + 4 = 9 . "
              "</think> 9 <eos>")
BACKTRACK = "h = g + 9 ; c = b + 4 ; g = 3 ; a = 7 ; b = a - 2 ; ? c"


@pytest.fixture(scope="module")
def backtrack():
    return thinklens.load("organism-backtrack")


def _mask(n: int, hidden: range) -> torch.Tensor:
    allow = torch.ones(n, n, dtype=torch.bool).tril()
    allow[:, hidden.start:hidden.stop] = False
    return torch.zeros(1, 1, n, n).masked_fill(~allow, torch.finfo(torch.float32).min)


def _hf_logp(hf, ids: list[int], hidden: range) -> torch.Tensor:
    with torch.no_grad():
        out = hf(torch.tensor([ids]), attention_mask=_mask(len(ids), hidden))
    return out.logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("which", ["organism", "backtrack"])
def test_total_effect_equals_hf_greedy_decoding_by_hand(which, organism, backtrack):
    model, folder = (organism, organism_folder()) if which == "organism" else \
        (backtrack, backtrack_folder())
    trace = Trace.from_text(model, PROMPT, COMPLETION) if which == "organism" else \
        model.think(BACKTRACK)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    limit = 48
    res = circuits.suppression_total(model, trace, max_new_tokens=limit)
    ids = list(trace.token_ids)
    te, a0 = trace.think_span.end, trace.answer_span.start
    close, eos = ids[te:a0], model.tokenizer.eos_token_id

    def greedy(end: int, hidden: range) -> list[int]:
        gen = ids[:end]
        while len(gen) < end + limit:
            gen.append(int(_hf_logp(hf, gen, hidden)[-1].argmax()))
            if gen[-1] == eos:
                break
        return gen

    def split(gen: list[int], end: int) -> tuple[list[int], list[int] | None]:
        """Thinking ids up to the closing text, and the answer ids (None: not closed)."""
        if close[0] not in gen[end:]:
            return gen, None
        stop = gen.index(close[0], end)
        ans = gen[stop + len(close):]
        return gen[:stop], ans[:-1] if ans and ans[-1] == eos else ans

    def score(think: list[int], ans: list[int], hidden: range) -> float:
        lp = _hf_logp(hf, think + close + ans, hidden)
        return float(sum(lp[len(think) + len(close) - 1 + k, t] for k, t in enumerate(ans)))

    n_changed = 0
    for j, s in enumerate(trace.sentences):
        hidden = range(s.start, s.end)
        masked, control = greedy(s.end, hidden), greedy(s.end, range(0))
        assert res.rewritten[j] == model.tokenizer.decode(masked[s.end:])
        assert res.control_rewritten[j] == model.tokenizer.decode(control[s.end:])
        m_think, m_ans = split(masked, s.end)
        c_think, c_ans = split(control, s.end)
        assert res.finished[j] == (m_ans is not None)
        scored = c_ans if c_ans is not None else ids[a0:trace.answer_span.end]
        c_lp = score(c_think, scored, range(0))
        assert float(res.control_logprob[j]) == pytest.approx(c_lp, abs=1e-4)
        assert float(res.answer_delta[j]) == pytest.approx(
            score(m_think, scored, hidden) - c_lp, abs=1e-4)
        text = [None if a is None else model.tokenizer.decode(a).strip() for a in (m_ans, c_ans)]
        assert (res.answers[j], res.controls[j]) == tuple(text)
        assert float(res.changed[j]) == float(text[0] != text[1])
        n_changed += text[0] != text[1]
        assert float(res.answer_kl[j]) >= 0.0
    assert n_changed > 0   # the control is not the masked rewrite: hiding something matters


def test_hiding_the_step_the_answer_copies_changes_the_answer_or_is_redone(backtrack):
    """Meaning: hiding the last compute step, the model either writes it again (the answer
    stays) or cannot (the answer changes) — never keeps the old answer without a step."""
    trace = backtrack.think(BACKTRACK)
    last = len(trace.sentences) - 1
    res = circuits.suppression_total(backtrack, trace, sentences=[last], max_new_tokens=48)
    text = res.rewritten[last]
    assert res.suppressed == [last]
    assert torch.isnan(res.changed[:last]).all()
    if float(res.changed[last]) == 0.0:
        assert "c =" in text.split("</think>")[0]   # c's step was written again
    assert res.reference == trace.answer_text.replace("<eos>", "").strip()


def test_hidden_keys_in_the_engine_equal_a_score_mask_hook(backtrack):
    """Request(hidden=...) (zeros in the plain tree's attention mask, batched, left-padded)
    decodes what a hook masking those score columns decodes on the bridged tree."""
    from thinklens.circuits.anchors_attention import key_mask_hooks
    from thinklens.hooks.engine import Request, Sampling
    from thinklens.hooks.generate import generate_ids

    trace = backtrack.think(BACKTRACK)
    ids, sampling = list(trace.token_ids), Sampling(max_new_tokens=24)
    reqs = [Request(ids[:s.end], hidden=tuple(range(s.start, s.end)))
            for s in trace.sentences]
    batched = generate_ids(backtrack, reqs, sampling, engine="hf", batch_size=4)
    for r, [got] in zip(reqs, batched):
        mask = torch.zeros((1, len(r.prompt_ids) + 30), dtype=torch.bool)
        mask[0, list(r.hidden)] = True
        with backtrack.hooks(key_mask_hooks(backtrack, mask)):
            [[want]] = generate_ids(backtrack, [Request(r.prompt_ids)], sampling, engine="hf")
        assert got.ids == want.ids
    with pytest.raises(ConfigError, match="hidden position 99 is outside its 3 prompt ids"):
        generate_ids(backtrack, [Request([1, 2, 3], hidden=(99,))], sampling, engine="hf")


def test_bad_input_is_refused_before_any_pass(organism):
    empty = Trace.from_text(organism, "a = 3 ; ? a", "</think> 3 <eos>")
    with pytest.raises(ConfigError, match="no thinking sentences"):
        circuits.suppression_total(organism, empty)
    trace = Trace.from_text(organism, PROMPT, COMPLETION)
    with pytest.raises(PositionError, match="sentence index 5 out of range.*valid 0..4"):
        circuits.suppression_total(organism, trace, sentences=[5])
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        circuits.suppression_total(organism, trace, max_new_tokens=0)
    with pytest.raises(ConfigError, match="batch_size=0"):
        circuits.suppression_total(organism, trace, batch_size=0)
    with pytest.raises(ConfigError, match="found no answer"):
        circuits.suppression_total(organism, trace, answer=lambda t: None)
