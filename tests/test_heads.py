"""Head scores against TransformerLens's head detector, hand computation and the organism's truth."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.head_detector import detect_head

import thinklens
from thinklens.circuits import head_scores, icl_score, reference_traces
from thinklens.circuits.heads import repeated_random_tokens, token_targets
from thinklens.errors import ConfigError
from thinklens.zoo.organism import token_truth

TL_NAMES = {"previous": "previous_token_head", "duplicate": "duplicate_token_head",
            "induction": "induction_head"}


def _agree_with_detect_head(model, text: str) -> None:
    """detect_head ('mul') = our mass over *every* row: ours × scored rows / tokens."""
    ids = model.bridge.to_tokens(text)[0].tolist()      # its own tokenisation, BOS included
    ours = head_scores(model, list(TL_NAMES), inputs=[ids])
    for kind, name in TL_NAMES.items():
        ref = detect_head(model.bridge, text, name).float()
        assert ours.counts[kind] > 0
        torch.testing.assert_close(ours[kind] * ours.counts[kind] / len(ids), ref,
                                   atol=1e-5, rtol=0)


def test_agrees_with_detect_head_on_a_random_model(qwen2):
    _agree_with_detect_head(qwen2, "c = b + 4 ; a = 7 ; b = a - 2 ; c = b + 4 ; a = 7 ; ? c")


def test_agrees_with_detect_head_on_smollm_and_finds_induction_heads(smollm):
    _agree_with_detect_head(smollm, "The cat sat on the mat. The cat sat on the mat. The dog")
    s = head_scores(smollm, ["induction", "previous"], n=4, length=100)
    found = {(la, h) for la, h, _ in s.above("induction", 0.5)}
    # seen: L18H6 0.89, L17H3 0.76, L17H4 0.66, L18H7 0.59, L17H5 0.50 (4 x 100 tokens)
    assert {(18, 6), (17, 3)} <= found and len(found) <= 12
    assert s["induction"].median() < 0.05          # most heads are not induction heads
    assert s.above("previous", 0.6)                 # and previous-token heads exist


def test_targets_by_hand():
    ids = [1, 7, 8, 9, 7, 8, 9]
    assert token_targets(ids, "previous")[:2] == [(1, [0]), (2, [1])]
    assert token_targets(ids, "duplicate") == [(4, [1]), (5, [2]), (6, [3])]
    assert token_targets(ids, "induction") == [(4, [2]), (5, [3]), (6, [4])]
    seqs = repeated_random_tokens(thinklens.load("organism"), 2, 50, seed=1)
    n = (len(seqs[0]) - 1) // 2
    assert n == 33 and seqs[0][1:n + 1] == seqs[0][n + 1:] and len(set(seqs[0][1:n + 1])) == n


def test_task_scores_equal_the_hand_computed_ground_truth(organism):
    """The notebook-02 definition: attention from each '=' to where its step must read."""
    traces = reference_traces(organism, 12, seed=3)
    s = head_scores(organism, ["lookup", "operand_copy"], traces=traces)
    cap = organism.capture(traces, sites="blocks.*.attn.hook_pattern", progress=False)
    want = {k: torch.zeros(4, 4) for k in s.kinds}
    rows = dict.fromkeys(s.kinds, 0)
    for i, tr in enumerate(traces):
        stmt, start = [], 1
        for k in tr.prompt_span.range:
            if tr.tokens[k] == ";":
                stmt.append((start, k))
                start = k + 1
        pats = torch.stack([cap[f"blocks.{la}.attn.hook_pattern"].unpadded(i) for la in range(4)])
        truth = token_truth(tr)
        for k, t in enumerate(truth):
            if t is not None and t.role == "eq" and t.phase == "resolve":
                a, b = stmt[t.statement]
                want["lookup"] += pats[:, :, k, a:b].sum(-1)
                rows["lookup"] += 1
            elif t is not None and t.role == "eq" and truth[k - 1].role == "var":
                want["operand_copy"] += pats[:, :, k, t.source_pos]
                rows["operand_copy"] += 1
    for kind in s.kinds:
        assert s.counts[kind] == rows[kind] > 10
        torch.testing.assert_close(s[kind], want[kind] / rows[kind], atol=1e-5, rtol=0)
    assert s.top("lookup", 1)[0][:2] == (1, 0) and s.top("operand_copy", 1)[0][:2] == (1, 0)


def test_icl_score_by_hand(organism):
    traces = reference_traces(organism, 16)
    r = icl_score(organism, traces, early=10, late=40)
    long = [t for t in traces if len(t.token_ids) > 40]
    losses = []
    for t in long:
        ids = torch.tensor([t.token_ids])
        with torch.no_grad():
            logp = organism.bridge(ids).log_softmax(-1)[0]
        losses.append([-logp[9, ids[0, 10]], -logp[39, ids[0, 40]]])
    want = torch.tensor(losses).mean(0)
    assert r.n == len(long) > 0
    torch.testing.assert_close(torch.tensor([r.loss_early, r.loss_late]), want, atol=1e-4,
                               rtol=1e-4)
    assert r.score == pytest.approx(r.loss_late - r.loss_early)


def test_bad_input(organism, qwen2):
    with pytest.raises(ConfigError, match="Valid for 'organism'.*lookup"):
        head_scores(organism, ["lookups"])
    with pytest.raises(ConfigError, match="Valid for"):
        head_scores(qwen2, ["lookup"])                 # a model without a task
    with pytest.raises(ConfigError, match="no head score 'inductio'"):
        head_scores(organism, ["induction"], n=1, length=4)["inductio"]
    with pytest.raises(ConfigError, match="longer than late=500"):
        icl_score(organism, reference_traces(organism, 2))
    with pytest.raises(ConfigError, match="0 < early < late"):
        icl_score(organism, [[1, 2, 3]], early=5, late=2)


def test_backtracking_lookups_of_the_second_organism():
    """A 'wait' step copies the operand again; the step after it must read the correction."""
    from thinklens.errors import ModelLoadError

    try:
        model = thinklens.load("organism-backtrack")
    except ModelLoadError as e:
        pytest.skip(f"organism-backtrack's weights are not shipped yet ({e})")
    prompt = "k = h - 8 ; f = e + 9 ; e = 9 ; j = f + 7 ; h = 4 ; ? j"
    thinking = ("k = h - 8 . h = 4 . k = 4 - 8 = 9 . wait k = 4 - 8 = 6 . j = f + 7 . "
                "f = e + 9 . e = 9 . f = 9 + 9 = 1 . wait f = 9 + 9 = 8 . j = 8 + 7 = 5 .")
    tr = thinklens.Trace.from_text(model, prompt, thinking + " </think> 5 <eos>")
    got = model.task.attention_targets(tr)
    words = [t.strip() for t in tr.tokens]
    step = {q: " ".join(words[q - 2: q + 1]) for q, _ in got["operand_copy"]}
    assert [step[q] for q, _ in got["correction_copy"]] == ["wait k =", "wait f ="]
    # the operand's source and the mistaken step's operand, 8 tokens before the '='
    assert [(words[k[0]], k[1] - q) for q, k in got["correction_copy"]] == [("4", -8), ("9", -8)]
    assert [(words[q - 1], words[k[0]]) for q, k in got["corrected_copy"]] == [("j", "8")]
    assert words[got["corrected_copy"][0][1][0] - 7] == "wait"       # the corrected value
    assert len(got["operand_copy"]) == 5 and len(got["lookup"]) == 5
    s = head_scores(model, ["correction_copy", "corrected_copy"], traces=[tr])
    assert s.counts == {"correction_copy": 2, "corrected_copy": 1}
    assert bool(((s["corrected_copy"] >= 0) & (s["corrected_copy"] <= 1)).all())
    plain = head_scores(model, ["lookup"], traces=[thinklens.Trace.from_text(
        model, prompt, model.task.completion(prompt))])
    assert "corrected_copy" not in plain.kinds
