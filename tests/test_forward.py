"""The forward runner: padded batches equal one-by-one runs, early stop, order, logits at rows."""

from __future__ import annotations

import pytest
import torch

from thinklens.errors import ConfigError
from thinklens.hooks import budget
from thinklens.hooks import forward as fwd

SEQS = [[3, 7, 9, 11, 4, 5, 6], [3, 8], [3, 7, 7, 2, 9], [3, 10, 12, 14, 16, 18, 20, 22, 1], [5]]
SITES = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]


def _collect(model, seqs, sites, **kw):
    got: dict[str, list] = {s: [None] * len(seqs) for s in sites}

    def hooks(batch):
        def read(site):
            def f(x, hook):
                for j, i in enumerate(batch.rows):
                    n = int(batch.lengths[j])
                    got[site][i] = (x[j, :, :n, :n] if x.ndim == 4 else x[j, :n]).clone()
                return x
            return f
        return [(s, read(s)) for s in sites]

    fwd.run(model, seqs, hooks, **kw)
    return got


def test_padded_batch_equals_one_by_one(qwen2):
    batched = _collect(qwen2, SEQS, SITES, batch_size=5)
    for i, s in enumerate(SEQS):
        with torch.no_grad():
            hs = qwen2.hf(torch.tensor([s]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(batched["blocks.0.hook_resid_pre"][i], hs[0][0],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(batched["blocks.1.hook_resid_post"][i], hs[2][0],
                                   atol=1e-5, rtol=0)
        single = _collect(qwen2, [s], SITES, batch_size=1)
        for site in SITES:
            torch.testing.assert_close(batched[site][i], single[site][0], atol=1e-5, rtol=0)


def test_early_stop_same_values_and_later_layers_skipped(qwen2):
    full = _collect(qwen2, SEQS, SITES, batch_size=2, stop_early=False)
    calls = []
    handle = qwen2.hf.model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        early = _collect(qwen2, SEQS, SITES, batch_size=2, stop_early=True)
        assert calls == []                      # block 2 never ran
        _collect(qwen2, SEQS, SITES, batch_size=2, stop_early=False)
        assert len(calls) == 3                  # it does without the early stop (3 batches)
    finally:
        handle.remove()
    for site in SITES:
        for a, b in zip(early[site], full[site]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert qwen2.n_hooks() == 0


def test_order_maps_back_and_logits_at_rows(qwen2):
    assert fwd.plan(qwen2, [len(s) for s in SEQS], batch_size=2) == [[4, 1], [2, 0], [3]]
    assert fwd.plan(qwen2, [3, 1, 2], batch_size=2, sort=False) == [[0, 1], [2]]
    last = fwd.run(qwen2, SEQS, logits_at="last", batch_size=2)
    chosen = fwd.run(qwen2, SEQS, logits_at=[[0, -1], [1], [], [2, 4, 4], [0]], batch_size=3)
    for i, s in enumerate(SEQS):
        with torch.no_grad():
            ref = qwen2.hf(torch.tensor([s])).logits[0]       # one by one, no padding
        torch.testing.assert_close(last[i], ref[-1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(chosen[0], ref_rows(qwen2, SEQS[0], [0, -1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(chosen[3], ref_rows(qwen2, SEQS[3], [2, 4, 4]), atol=1e-5, rtol=0)
    assert chosen[2].shape == (0, qwen2.config.d_vocab)
    with pytest.raises(ConfigError, match="outside input 1"):
        fwd.run(qwen2, SEQS, logits_at=[[0], [5], [0], [0], [0]])
    with pytest.raises(ConfigError, match="one per input"):
        fwd.run(qwen2, SEQS, logits_at=[[0]])


def test_logits_at_use_the_final_norms_weight(qwen2):
    """A random init leaves the final RMSNorm's weight at ones; set it, so reading the
    norm's output before its weight (ln_final.hook_normalized) would be caught."""
    norm = qwen2.hf.model.norm.weight
    saved = norm.detach().clone()
    try:
        with torch.no_grad():
            norm.copy_(torch.rand_like(norm) * 2)
        got = fwd.run(qwen2, SEQS, logits_at="last", batch_size=3)
        for i, s in enumerate(SEQS):
            torch.testing.assert_close(got[i], ref_rows(qwen2, s, [-1]), atol=1e-5, rtol=0)
    finally:
        with torch.no_grad():
            norm.copy_(saved)


def ref_rows(model, seq, rows):
    with torch.no_grad():
        return model.hf(torch.tensor([seq])).logits[0, rows]


def test_batches_fit_the_budget(qwen2):
    lengths = [10, 40, 20, 30, 50, 60]
    peak = budget.forward_peak(qwen2.config, 2, 40, 4)   # two sequences of <= 40 tokens fit
    plan = fwd.plan(qwen2, lengths, batch_size=None, budget=peak)
    assert sorted(i for b in plan for i in b) == list(range(6))
    for rows in plan:
        n = max(lengths[i] for i in rows)
        assert len(rows) == 1 or budget.forward_peak(qwen2.config, len(rows), n, 4) <= peak
    assert plan[0] == [0, 2] and [5] in plan          # too big alone still runs, alone
    with pytest.raises(ConfigError, match="batch_size=0"):
        fwd.plan(qwen2, lengths, batch_size=0)
    with pytest.raises(ConfigError, match="no tokens"):
        fwd.run(qwen2, [[]], logits_at="last")
