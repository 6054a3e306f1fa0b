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
    attention_statistics,
    block_rows,
    blockwise_sentence_means,
    sentence_index,
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


def _reference(model, trace) -> torch.Tensor:
    """[layer, head, S, S] from the eager bridge's full patterns, by the definition."""
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
    s = trace.sentences
    out = torch.zeros(model.config.n_layers, model.config.n_heads, len(s), len(s))
    for layer, p in pats.items():
        for a, sa in enumerate(s):
            for b, sb in enumerate(s):
                out[layer, :, a, b] = p[:, sa.start:sa.end, sb.start:sb.end].mean((1, 2))
    return out


def _check(model, traces, atol, **capture_kw):
    calls = []
    orig = impl_mod._sdpa_forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(impl_mod, "_sdpa_forward", lambda *a, **k: calls.append(1) or orig(*a, **k))
        cap = model.capture(traces, attention="sentence", **capture_kw)
    assert calls, "the sentence capture did not run SDPA"
    red = cap["sentence_attention"]
    worst = 0.0
    for i, t in enumerate(traces):
        got, ref = red.unpadded(i).float(), _reference(model, t)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=atol, rtol=0)
        worst = max(worst, float((got - ref).abs().max()) if got.numel() else 0.0)
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


def test_block_rows_fit_the_block_bytes():
    assert block_rows(12, 1024) == BLOCK_BYTES // (12 * 1024 * 4)
    assert block_rows(12, 10**9) == MIN_ROWS
