"""Capture: exact values, padding, attention reductions, budget, errors, hook hygiene."""

from __future__ import annotations

import importlib

import pytest
import torch

from thinklens import Trace
from thinklens.errors import (
    BudgetError,
    ConfigError,
    PositionError,
    SiteError,
    TokenizerMismatchError,
)
from thinklens.hooks.capture import sentence_means

capture_mod = importlib.import_module("thinklens.hooks.capture")
budget_mod = importlib.import_module("thinklens.hooks.budget")

PROMPTS = [
    ("c = b + 4 ; a = 7 ; b = a - 2 ; ? c",
     "c = b + 4 ; b = a - 2 . a = 7 ; b = 7 - 2 = 5 . c = 5 + 4 = 9 ; c = 9 . </think> 9 <eos>"),
    ("a = 3 ; ? a", "a = 3 ; a = 3 ; a = 3 . </think> 3 <eos>"),
    ("d = c * 2 ; c = 1 ; ? d",
     "d = c * 2 ; c = 1 . d = 1 * 2 = 2 ; d = 2 . d = 2 ; d = 2 ; d = 2 . </think> 2 <eos>"),
    ("e = 5 ; ? e", "e = 5 ; e = 5 ; e = 5 ; e = 5 ; e = 5 ; e = 5 . e = 5 ; e = 5 ; e"),  # cut off
]


@pytest.fixture(scope="module")
def traces(qwen2):
    return [Trace.from_text(qwen2, p, c) for p, c in PROMPTS]


def test_traces_have_several_sentences(traces):
    assert [len(t.sentences) for t in traces] == [3, 1, 3, 2]
    assert traces[-1].truncated and not traces[0].truncated


def test_resid_equals_hf_hidden_states(qwen2, traces):
    cap = qwen2.capture(traces, sites=["blocks.*.hook_resid_post", "blocks.0.hook_resid_pre"])
    acts = cap["blocks.1.hook_resid_post"]
    assert acts.axes == ("trace", "pos", "d_model")
    assert acts.values.shape == (4, max(len(t) for t in traces), 64)
    assert acts.lengths.tolist() == [len(t) for t in traces]
    for i, t in enumerate(traces):
        with torch.no_grad():
            hs = qwen2.hf(torch.tensor([t.token_ids]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(cap["blocks.0.hook_resid_pre"].unpadded(i), hs[0][0],
                                   atol=1e-6, rtol=0)
        for layer in range(2):  # HF's last hidden state is after the final norm
            torch.testing.assert_close(cap[f"blocks.{layer}.hook_resid_post"].unpadded(i),
                                       hs[layer + 1][0], atol=1e-5, rtol=0)
    stacked = cap.stack("blocks.*.hook_resid_post")
    assert stacked.axes == ("trace", "layer", "pos", "d_model")
    assert stacked.values.shape[:3] == (4, 3, acts.values.shape[1])


def test_padded_batch_equals_one_by_one(qwen2, traces):
    sites = ["blocks.*.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.2.attn.hook_k"]
    batched = qwen2.capture(traces, sites=sites, attention="sentence", batch_size=4)
    for i, t in enumerate(traces):
        single = qwen2.capture(t, sites=sites, attention="sentence", batch_size=1)
        for key in batched.keys:
            a, b = batched[key].values[i], single[key].values[0]
            assert a.shape[0] >= b.shape[0]
            inside = tuple(slice(0, n) for n in b.shape)
            outside = a.clone()
            outside[inside] = 0
            assert not outside.any()  # padding is exactly zero
            a = a[inside]
            # same numbers up to float reordering in batched matmuls
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=key)


def test_pattern_rows_sum_to_one(qwen2, traces):
    cap = qwen2.capture(traces, sites="blocks.*.attn.hook_pattern")
    pat = cap["blocks.2.attn.hook_pattern"]
    assert pat.axes == ("trace", "head", "query_pos", "key_pos")   # TransformerLens's layout
    assert pat.lengths.tolist() == [len(t) for t in traces]      # query rows per trace
    assert pat.labels["head"] == [0, 1, 2, 3]
    for i, t in enumerate(traces):
        rows = pat.unpadded(i)  # [head, query, key]
        assert rows.shape == (4, len(t), len(t))
        torch.testing.assert_close(rows.sum(-1), torch.ones(4, len(t)), atol=1e-5, rtol=0)
        assert rows.triu(diagonal=1).abs().max() == 0            # causal: no key after the query
        assert (rows.diagonal(dim1=1, dim2=2) > 0).all()


def test_streamed_sentence_attention_equals_full_pattern_reduction(qwen2, traces):
    cap = qwen2.capture(traces, sites="blocks.*.attn.hook_pattern", attention="sentence")
    red = cap["sentence_attention"]
    assert red.axes == ("trace", "layer", "head", "query_sentence", "key_sentence")
    for i, t in enumerate(traces):
        n = len(t.sentences)
        for layer in range(3):
            full = cap[f"blocks.{layer}.attn.hook_pattern"].unpadded(i)   # [head, q, k]
            expect = torch.zeros(4, n, n)
            for a, sa in enumerate(t.sentences):
                for b, sb in enumerate(t.sentences):  # the definition, by brute force
                    expect[:, a, b] = full[:, sa.start:sa.end, sb.start:sb.end].mean((1, 2))
            torch.testing.assert_close(red.values[i, layer, :, :n, :n], expect,
                                       atol=1e-6, rtol=0)


def test_lengths_count_the_ragged_axis(qwen2, traces):
    """lengths is the per-trace length (sentences; query rows), not the first axis's size."""
    red = qwen2.capture(traces, attention="sentence")["sentence_attention"]
    assert red.lengths.tolist() == [len(t.sentences) for t in traces] == [3, 1, 3, 2]
    assert red.mask.shape == (4, 3) and red.mask.sum().item() == 9
    for i, t in enumerate(traces):
        assert red.unpadded(i).shape == (3, 4, len(t.sentences), len(t.sentences))
    cap = qwen2.capture(traces, attention=[(1, 0), (1, 2)], positions="sentence_ends")
    pat = cap["blocks.1.attn.hook_pattern"]
    assert pat.lengths.tolist() == [len(t.sentences) for t in traces]   # not 2 (the heads)
    assert pat.positions[1].tolist() == [traces[1].sentences[0].end - 1, -1, -1]
    rows, tr, pos = pat.flat()                     # one row per (trace, chosen query)
    assert rows.shape == (9, 2, max(len(t) for t in traces))
    assert tr.tolist() == [0, 0, 0, 1, 2, 2, 2, 3, 3]
    assert pos.tolist() == [s.end - 1 for t in traces for s in t.sentences]


def test_sentence_means_hand_computed():
    p = torch.tensor([[[[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0],
                        [0.1, 0.2, 0.3, 0.4]]]])
    bounds = torch.tensor([[[0, 2], [2, 4]]])
    out = sentence_means(p, bounds)[0, 0]
    # sentence 0 = tokens 0-1, sentence 1 = tokens 2-3
    expect = torch.tensor([[(1 + 0 + 0.5 + 0.5) / 4, 0.0],
                           [(0.2 + 0.3 + 0.1 + 0.2) / 4, (0.5 + 0 + 0.3 + 0.4) / 4]])
    torch.testing.assert_close(out, expect)


def test_chosen_heads_full_patterns(qwen2, traces):
    cap = qwen2.capture(traces[:2], attention=[(1, 3), (1, 0), (2, 2)])
    assert cap.meta["heads"] == {"blocks.1.attn.hook_pattern": [0, 3],
                                 "blocks.2.attn.hook_pattern": [2]}
    ref = qwen2.capture(traces[:2], sites="blocks.1.attn.hook_pattern")
    got = cap["blocks.1.attn.hook_pattern"]
    full = ref["blocks.1.attn.hook_pattern"]
    assert got.axes == full.axes == ("trace", "head", "query_pos", "key_pos")   # one layout
    assert got.labels["head"] == [0, 3]
    n = len(traces[0])
    torch.testing.assert_close(got.values[0][:, :n, :n], full.values[0][[0, 3], :n, :n])


def test_pattern_site_and_chosen_heads_agree_at_chosen_positions(qwen2, traces):
    site = qwen2.capture(traces, sites="blocks.1.attn.hook_pattern", positions="thinking")
    heads = qwen2.capture(traces, attention=[(1, 1)], positions="thinking")
    a, b = site["blocks.1.attn.hook_pattern"], heads["blocks.1.attn.hook_pattern"]
    assert a.axes == b.axes and torch.equal(a.positions, b.positions)
    torch.testing.assert_close(a.values[:, [1]], b.values, atol=0, rtol=0)
    full = qwen2.capture(traces, sites="blocks.1.attn.hook_pattern")["blocks.1.attn.hook_pattern"]
    for i, t in enumerate(traces):
        rows = t.think_span.range
        torch.testing.assert_close(a.unpadded(i), full.unpadded(i)[:, rows.start:rows.stop])


def test_positions_select_rows(qwen2, traces):
    full = qwen2.capture(traces, sites="blocks.1.hook_resid_post")
    for sel in ["thinking", "sentence_ends", "last", [0, -1]]:
        cap = qwen2.capture(traces, sites="blocks.1.hook_resid_post", positions=sel)
        acts = cap["blocks.1.hook_resid_post"]
        for i in range(len(traces)):
            pos = acts.positions[i, : acts.lengths[i]]
            torch.testing.assert_close(acts.unpadded(i), full["blocks.1.hook_resid_post"]
                                       .unpadded(i)[pos])
    ends = qwen2.capture(traces[0], sites="blocks.1.hook_resid_post", positions="sentence_ends")
    assert ends["blocks.1.hook_resid_post"].positions[0].tolist() == [
        s.end - 1 for s in traces[0].sentences]


def test_out_dtype(qwen2, traces):
    cap = qwen2.capture(traces[:1], sites="blocks.0.hook_resid_post", dtype="bfloat16")
    assert cap["blocks.0.hook_resid_post"].values.dtype == torch.bfloat16


def test_bad_input_errors(qwen2, qwen2_dir, traces, tmp_path):
    with pytest.raises(SiteError, match="did you mean|Did you mean"):
        qwen2.capture(traces, sites="blocks.1.hook_resid")
    with pytest.raises(PositionError, match="99"):
        qwen2.capture(traces, sites="blocks.1.hook_resid_post", positions=[99])
    with pytest.raises(PositionError, match="middle.*Valid selectors"):
        qwen2.capture(traces, sites="blocks.1.hook_resid_post", positions="middle")
    with pytest.raises(ConfigError, match="nothing to capture"):
        qwen2.capture(traces)
    with pytest.raises(ConfigError, match=r"\(1, 9\) out of range"):
        qwen2.capture(traces, attention=[(1, 9)])
    with pytest.raises(ConfigError, match="batch_size"):
        qwen2.capture(traces, sites="blocks.1.hook_resid_post", batch_size=0)
    other = Trace.from_dict({**traces[0].to_dict(), "tokenizer_id": "0123456789abcdef"})
    with pytest.raises(TokenizerMismatchError, match="0123456789abcdef"):
        qwen2.capture(other, sites="blocks.1.hook_resid_post")


def test_over_budget_refused_before_running(qwen2, traces, monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(capture_mod, "_batch_hooks", lambda *a, **k: ran.append(1))
    # store= is offered only where it lowers the estimate (here one batch holds every trace)
    with pytest.raises(BudgetError, match=r"needs about .* budget is 1\.0 KB.*batch_size=1"):
        qwen2.capture(traces, sites="blocks.*.hook_resid_post", budget=1000)
    with pytest.raises(BudgetError, match="budget"):
        qwen2.capture(traces, sites="blocks.*.hook_resid_post", budget="1KB",
                      store=tmp_path / "s")
    with pytest.raises(ConfigError, match="'lots'"):
        qwen2.capture(traces, sites="blocks.*.hook_resid_post", budget="lots")
    assert not ran


def test_streaming_to_store_fits_where_memory_does_not(qwen2, traces, tmp_path):
    est = budget_mod.estimate(qwen2, traces, ["blocks.0.hook_resid_post"],
                              {"blocks.0.hook_resid_post": (64,)},
                              [torch.arange(len(t)) for t in traces], False, {},
                              torch.float32, 1)
    budget = (est.in_memory() + est.streaming()) // 2
    with pytest.raises(BudgetError):
        qwen2.capture(traces, sites="blocks.0.hook_resid_post", batch_size=1, budget=budget)
    st = qwen2.capture(traces, sites="blocks.0.hook_resid_post", batch_size=1, budget=budget,
                       store=tmp_path / "acts")
    mem = qwen2.capture(traces, sites="blocks.0.hook_resid_post")
    assert len(st) == 4
    # batch_size=1 runs SDPA unmasked, batch 8 with a padding mask: float reordering only
    torch.testing.assert_close(st["blocks.0.hook_resid_post"].values,
                               mem["blocks.0.hook_resid_post"].values, atol=1e-6, rtol=0)
    assert st.traces[0].token_ids == traces[0].token_ids


def test_capture_to_store_resumes_without_recompute(qwen2, traces, tmp_path, monkeypatch):
    qwen2.capture(traces[:2], sites="blocks.0.hook_resid_post", store=tmp_path / "acts")
    calls = []
    real = capture_mod._batch_hooks
    monkeypatch.setattr(capture_mod, "_batch_hooks",
                        lambda m, tr, *a: calls.append(len(tr)) or real(m, tr, *a))
    st = qwen2.capture(traces, sites="blocks.0.hook_resid_post", store=tmp_path / "acts")
    assert sum(calls) == 2 and len(st) == 4


def test_no_hooks_left_after_exception(qwen2, traces, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom inside the forward pass")
    monkeypatch.setattr(capture_mod, "sentence_means", boom)  # eager route
    monkeypatch.setattr(capture_mod, "attention_statistics", boom)  # SDPA route (blockwise)
    assert qwen2.n_hooks() == 0
    with pytest.raises(RuntimeError, match="boom"):
        qwen2.capture(traces, sites="blocks.*.hook_resid_post", attention="sentence")
    assert qwen2.n_hooks() == 0
    with pytest.raises(RuntimeError, match="boom"), qwen2.hooks(
            [("blocks.0.hook_resid_post", lambda x, hook: x)]):
        assert qwen2.n_hooks() == 1
        boom()
    assert qwen2.n_hooks() == 0


def test_bf16_capture_agrees_with_fp32(qwen2, qwen2_dir, traces):
    """Two bf16 paths. Casting at capture (dtype="bfloat16") is the fp32 capture rounded to
    bf16, exactly. A bf16-loaded model computes in bf16: its residuals agree with fp32 to
    bf16 precision, |diff| <= 2**-6 * max|x| per layer (about 4 roundings of the 2**-8
    relative step through attention and MLP), over every layer and position."""
    import thinklens

    sites = ["blocks.*.hook_resid_post"]
    ref = qwen2.capture(traces, sites=sites)
    cast = qwen2.capture(traces, sites=sites, dtype="bfloat16")
    bf16 = thinklens.load(str(qwen2_dir), dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    low = bf16.capture(traces, sites=sites, dtype="float32")
    for layer in range(3):
        key = f"blocks.{layer}.hook_resid_post"
        want = ref[key].values
        assert torch.equal(cast[key].values, want.to(torch.bfloat16))
        got = low[key].values
        assert got.dtype == torch.float32 and torch.equal(low[key].lengths, ref[key].lengths)
        err = (got - want).abs().max() / want.abs().max()
        assert 0 < err <= 2 ** -6, (key, float(err))   # bf16, not fp32, and within bf16
