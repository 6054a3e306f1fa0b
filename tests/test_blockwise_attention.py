"""Blockwise sentence attention (from rotated q/k, SDPA pass) equals the full-pattern means.

Reference: each trace alone through the eager bridge, every layer's ``hook_pattern`` kept,
and ``A[h, i, j]`` = the mean of ``pattern[h, tokens of sentence i, tokens of sentence j]``
taken directly. Tolerances: fp32 ``atol=1e-5`` (means of probabilities, values in
[0, 1]); bf16 ``atol=1e-3``: the eager bf16 pattern is rounded to bf16 (relative step
2**-8, up to 4e-3 on a single weight near 1, much less on a mean over a sentence's
tokens) while the blockwise softmax runs in float32 from the same bf16 q/k (measured
worst on the test Qwen2, 4.2e-5).
"""

from __future__ import annotations

import importlib

import pytest
import torch

import thinklens
from thinklens import Trace
from thinklens.hooks.blockwise import (
    BLOCK_BYTES,
    MIN_ROWS,
    STATISTICS,
    attention_statistics,
    block_rows,
    blockwise_sentence_means,
    sentence_index,
    vertical_scores,
)
from thinklens.hooks.capture import sentence_means

capture_mod = importlib.import_module("thinklens.hooks.capture")
impl_mod = importlib.import_module("thinklens.hooks.attention_impl")

PROMPTS = [  # ragged sentences; prompt and answer tokens lie outside every sentence
    ("c = b + 4 ; a = 7 ; b = a - 2 ; ? c",
     "c = b + 4 ; b = a - 2 . a = 7 ; b = 7 - 2 = 5 . c = 5 + 4 = 9 ; c = 9 . </think> 9 <eos>"),
    ("a = 3 ; ? a", "a = 3 ; a = 3 . </think> 3 <eos>"),
    ("d = c * 2 ; c = 1 ; ? d",
     "d = c * 2 ; c = 1 . d = 1 * 2 = 2 ; d = 2 . d = 2 ; d = 2 ; d = 2 . </think> 2 <eos>"),
    ("e = 5 ; ? e", "e = 5 ; e = 5 ; e = 5 ; e = 5 . e = 5"),  # cut off
]


def _reference(model, trace, what="sentence") -> torch.Tensor:
    """From the eager bridge's full patterns, by the definitions: ``sentence`` [layer,
    head, S, S] (mean over the two sentences' tokens), ``vertical`` [layer, head, S] (mean
    of column j over rows i >= j + 4, NaN where there is none), ``columns`` [layer, head,
    T] (each key token's sum over every query row)."""
    pats: dict[int, torch.Tensor] = {}
    def keep(layer):
        def fn(x, hook):
            pats[layer] = x[0].detach().float()
            return x
        return fn
    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep(layer))
             for layer in range(model.config.n_layers)]
    with torch.no_grad(), model.hooks(hooks):
        model.bridge(torch.tensor([trace.token_ids], device=model.device))
    if what == "columns":
        return torch.stack([pats[layer].sum(1) for layer in range(model.config.n_layers)])
    s = trace.sentences
    out = torch.zeros(model.config.n_layers, model.config.n_heads, len(s), len(s))
    for layer, p in pats.items():
        for a, sa in enumerate(s):
            for b, sb in enumerate(s):
                out[layer, :, a, b] = p[:, sa.start:sa.end, sb.start:sb.end].mean((1, 2))
    if what == "sentence":
        return out
    vert = torch.full(out.shape[:3], float("nan"))
    for j in range(len(s)):
        later = list(range(j + 4, len(s)))
        if later:
            vert[:, :, j] = out[:, :, later, j].mean(-1)
    return vert


def _check(model, traces, atol, attention="sentence", rtol=0.0, sdpa=True, **capture_kw):
    calls = []
    orig = impl_mod._sdpa_forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(impl_mod, "_sdpa_forward", lambda *a, **k: calls.append(1) or orig(*a, **k))
        cap = model.capture(traces, attention=attention, **capture_kw)
    assert bool(calls) == sdpa, "the capture did not run the expected attention"
    asked = [attention] if isinstance(attention, str) else attention
    worst = 0.0
    for what in (w for w in asked if isinstance(w, str)):
        red = cap[STATISTICS[what]]
        for i, t in enumerate(traces):
            got, ref = red.unpadded(i).float(), _reference(model, t, what)
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, equal_nan=True)
            diff = (got - ref).abs().nan_to_num(0.0)
            worst = max(worst, float(diff.max()) if got.numel() else 0.0)
    return worst


def test_traces_are_ragged_and_leave_tokens_outside(qwen2):
    traces = [Trace.from_text(qwen2, p, c) for p, c in PROMPTS]
    assert len({len(t) for t in traces}) == len(traces)            # padding in a batch
    assert len({s.end - s.start for s in traces[0].sentences}) > 1  # ragged sentences
    for t in traces:
        inside = (sentence_index(torch.tensor([[s.start, s.end] for s in t.sentences]),
                                 len(t)) < len(t.sentences))
        assert not inside.all()                                     # tokens outside


def test_capture_equals_full_pattern_means_fp32(model):
    """One padded batch of four traces of different lengths, default block size."""
    traces = [Trace.from_text(model, p, c) for p, c in PROMPTS]
    _check(model, traces, atol=1e-5, batch_size=4)


def test_vertical_scores_and_column_sums_equal_their_definitions(model):
    """attention=["vertical", "columns"] (no S x S kept) on one padded batch of four
    ragged traces, against the full-pattern definitions; column sums add up to T
    probabilities: 1e-5 absolute + 1e-5 relative."""
    traces = [Trace.from_text(model, p, c) for p, c in PROMPTS]
    _check(model, traces, atol=1e-5, rtol=1e-5, attention=["vertical", "columns"],
           batch_size=4)
    cap = model.capture(traces[:1], attention="vertical")
    assert cap.keys == ["vertical_scores"]                       # the S x S is not kept
    assert cap["vertical_scores"].values.shape[1:3] == (model.config.n_layers,
                                                        model.config.n_heads)


def test_eager_route_gives_the_same_statistics(qwen2):
    """A chosen head forces eager attention: the statistics then come from the patterns."""
    traces = [Trace.from_text(qwen2, p, c) for p, c in PROMPTS]
    _check(qwen2, traces, atol=1e-5, rtol=1e-5, sdpa=False, batch_size=4,
           attention=["sentence", "vertical", "columns", (1, 0)])


def test_kept_dtype_follows_dtype(qwen2):
    """dtype='bfloat16' keeps the statistics in bf16: the float32 result rounded."""
    traces = [Trace.from_text(qwen2, p, c) for p, c in PROMPTS[:2]]
    full = qwen2.capture(traces, attention=["sentence", "vertical"])
    half = qwen2.capture(traces, attention=["sentence", "vertical"], dtype="bfloat16")
    for key in ("sentence_attention", "vertical_scores"):
        assert full[key].values.dtype == torch.float32
        assert half[key].values.dtype == torch.bfloat16
        torch.testing.assert_close(half[key].values, full[key].values.to(torch.bfloat16),
                                   atol=0, rtol=0, equal_nan=True)


def test_tiny_blocks_exercise_the_block_loop(model, monkeypatch):
    """3 query rows per block (lengths are not multiples of 3: a short last block)."""
    traces = [Trace.from_text(model, p, c) for p, c in PROMPTS]
    seen = []

    def tiny(*a, **k):
        seen.append(a[0].shape[2])
        return attention_statistics(*a, **k, rows_per_block=3)
    monkeypatch.setattr(capture_mod, "attention_statistics", tiny)
    _check(model, traces, atol=1e-5, batch_size=2)
    assert seen and all(t > 3 for t in seen)


def test_bf16_within_documented_tolerance(qwen2_dir):
    bf16 = thinklens.load(str(qwen2_dir), dtype="bfloat16")
    traces = [Trace.from_text(bf16, p, c) for p, c in PROMPTS]
    worst = _check(bf16, traces, atol=1e-3, batch_size=4)
    assert worst > 0  # bf16 really differs from the float32 softmax (the test can fail)
    # column sums add up to T bf16-rounded probabilities: 1e-3 relative
    _check(bf16, traces, atol=1e-3, rtol=1e-3, attention=["vertical", "columns"],
           batch_size=4)


def _explicit(q, k, mask, scale):
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q @ kk.transpose(-1, -2)).float() * scale
    if mask is None:
        causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
        s = s.masked_fill(~causal, float("-inf"))
    else:
        s = s.masked_fill(~mask, torch.finfo(torch.float32).min)
    return torch.softmax(s, -1)


@pytest.mark.parametrize("rows", [1, 3, 5, None])
def test_function_equals_full_softmax_gqa_padding(rows):
    """Random q/k, 6 heads on 2 KV heads, a right-padded row, a boolean SDPA-style mask."""
    torch.manual_seed(0)
    b, h, kv, t, d = 2, 6, 2, 11, 8
    q, k = torch.randn(b, h, t, d), torch.randn(b, kv, t, d)
    lengths = torch.tensor([11, 7])
    valid = torch.arange(t)[None, :] < lengths[:, None]
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    bounds = torch.tensor([[[1, 4], [4, 5], [7, 11]], [[0, 3], [5, 7], [0, 0]]])
    got = blockwise_sentence_means(q, k, bounds, mask, scale=0.3, rows_per_block=rows)
    ref = sentence_means(_explicit(q, k, mask, 0.3), bounds)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    unpadded = blockwise_sentence_means(q[:1], k[:1], bounds[:1], None, scale=0.3,
                                        rows_per_block=rows)  # None: causal
    torch.testing.assert_close(unpadded, ref[:1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows", [1, 4, None])
@pytest.mark.parametrize("causal", [True, False])
def test_output_and_statistics_equal_the_full_softmax(rows, causal):
    """attention_statistics with v: the output is softmax·v, vertical scores and column
    sums (real query rows only) are those of the explicit pattern; a non-causal mask
    (rows see later keys) switches a block to every key."""
    torch.manual_seed(1)
    b, h, kv, t, d = 2, 6, 2, 11, 8
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    lengths = torch.tensor([11, 7])
    valid = torch.arange(t)[None, :] < lengths[:, None]
    shape = torch.ones(t, t, dtype=torch.bool)
    mask = (shape.tril() if causal else shape)[None, None] & valid[:, None, None, :]
    bounds = torch.tensor([[[0, 2], [2, 3], [4, 6], [6, 8], [8, 9], [9, 11]],
                           [[1, 3], [3, 4], [4, 5], [5, 6], [6, 7], [0, 0]]])
    got = attention_statistics(q, k, bounds, mask, v=v, scale=0.3, lengths=lengths,
                               vertical=True, columns=True, rows_per_block=rows, proximity=2)
    p = _explicit(q, k, mask, 0.3)
    ref_out = p @ v.repeat_interleave(h // kv, dim=1)
    for j, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(got.output[j, :, :n], ref_out[j, :, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(got.columns[j, :, :n], p[j, :, :n, :n].sum(1), atol=1e-5,
                                   rtol=0)
    means = sentence_means(p, bounds)
    torch.testing.assert_close(got.sentence, means, atol=1e-6, rtol=0)
    for j, s in enumerate([6, 5]):
        torch.testing.assert_close(got.vertical[j, :, :s],
                                   vertical_scores(means[j, :, :s, :s], 2), atol=1e-6,
                                   rtol=0, equal_nan=True)


def test_block_rows_fit_the_block_bytes():
    assert block_rows(12, 1024) == BLOCK_BYTES // (12 * 1024 * 4)
    assert block_rows(12, 10**9) == MIN_ROWS
