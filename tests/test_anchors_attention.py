"""Receiver heads, attention suppression and sentence attribution (Thought Anchors).

References: suppression against a fresh Hugging Face model (eager attention) run with a
hand-built 4D additive mask that hides sentence j's key columns (fp32, 1e-4 on log-probs);
receiver heads against full eager patterns reduced by loops and ``scipy.stats.kurtosis``
/ ``scipy.stats.pearsonr``; sentence attribution against a central finite difference of
its documented path, whose end point (m = 0) must equal exact suppression.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from transformers import AutoModelForCausalLM

from thinklens import Trace, circuits
from thinklens.circuits import anchors_attention as sup_mod
from thinklens.circuits import anchors_attribution as att_mod
from thinklens.errors import ConfigError, PositionError
from thinklens.hooks import forward as fwd
from thinklens.hooks.blockwise import sentence_index
from thinklens.zoo.organism import organism_folder

PROMPT = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"
COMPLETION = ("c = b + 4 . b = a - 2 . a = 7 . b = 7 - 2 = 5 . c = 5 + 4 = 9 . "
              "</think> 9 <eos>")


@pytest.fixture(params=["qwen2", "qwen3", "organism"])
def model_and_folder(request):
    m = request.getfixturevalue(request.param)
    folder = organism_folder() if request.param == "organism" else \
        request.getfixturevalue(f"{request.param}_dir")
    return m, folder


def _hf_logprobs(hf, trace, hidden: tuple[int, int] | None, rows_from: int = 0,
                 rows_to: int | None = None) -> torch.Tensor:
    """Next-token log-probs [pos, vocab] of an HF forward with keys ``hidden`` masked from
    the query rows ``rows_from .. rows_to - 1`` (all rows by default)."""
    n = len(trace.token_ids)
    allow = torch.ones(n, n, dtype=torch.bool).tril()
    if hidden is not None:
        allow[rows_from:rows_to, hidden[0]:hidden[1]] = False
    mask = torch.zeros(1, 1, n, n).masked_fill(~allow, torch.finfo(torch.float32).min)
    with torch.no_grad():
        return hf(torch.tensor([trace.token_ids]), attention_mask=mask).logits[0].log_softmax(-1)


def test_suppression_matches_hf_with_a_custom_4d_mask(model_and_folder):
    model, folder = model_and_folder
    trace = Trace.from_text(model, PROMPT, COMPLETION)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    res = circuits.suppression(model, trace, batch_size=2)  # 5 sentences: 3 passes
    base = _hf_logprobs(hf, trace, None)
    a = trace.answer_span.start
    ans = trace.token_ids[a]
    n = len(trace.sentences)
    assert res.matrix.shape == (n, n) and res.answer_delta.shape == (n,)
    assert res.baseline_logprob == pytest.approx(float(base[a - 1, ans]), abs=1e-4)
    ids = torch.tensor(trace.token_ids[1:] + [0])              # token predicted at each row
    p_of = lambda lp: lp.exp()[torch.arange(len(ids)), ids]    # noqa: E731
    drops = torch.full((n, n), float("nan"))
    ans_drop = torch.zeros(n)
    for j, s in enumerate(trace.sentences):
        lp = _hf_logprobs(hf, trace, (s.start, s.end))
        kl = (base.exp() * (base - lp)).sum(-1).clamp(min=0)
        d = (p_of(base) - p_of(lp)).clamp(min=0)
        ans_drop[j] = d[a - 1]
        for i in range(j + 1, n):
            drops[i, j] = d[trace.sentences[i].start - 1:trace.sentences[i].end - 1].max()
        assert float(res.answer_delta[j]) == pytest.approx(float(lp[a - 1, ans] - base[a - 1, ans]),
                                                           abs=1e-4)
        assert float(res.answer_kl[j]) == pytest.approx(float(kl[a - 1]), abs=1e-4)
        for i, si in enumerate(trace.sentences):
            cell = float(res.matrix[i, j])
            if i < j:
                assert np.isnan(cell)
                continue
            ref = float(kl[si.start - 1:si.end - 1].clamp(min=sup_mod.KL_FLOOR).log().mean())
            if ref > -9:  # KL > ~1e-4: float noise is far below the value
                assert cell == pytest.approx(ref, abs=1e-2)
    torch.testing.assert_close(res.token_drop, drops, atol=1e-4, rtol=0, equal_nan=True)
    torch.testing.assert_close(res.answer_drop, ans_drop, atol=1e-4, rtol=0)
    # chain: the widest of all increasing paths j -> i1 -> ... -> answer, by enumeration
    for j in range(n):
        best = 0.0
        later = list(range(j + 1, n))
        for mask in range(2 ** len(later)):
            path = [j] + [x for b, x in enumerate(later) if mask >> b & 1]
            width = min([float(drops[q, p]) for p, q in zip(path, path[1:])]
                        + [float(ans_drop[path[-1]])])
            best = max(best, width)
        assert float(res.chain[j]) == pytest.approx(best, abs=1e-4)


def test_suppression_batches_equal_one_by_one(organism):
    trace = organism.think(PROMPT)
    one = circuits.suppression(organism, trace, batch_size=1)
    many = circuits.suppression(organism, trace, batch_size=8, sentences=[4, 1, 0])
    for j in (0, 1, 4):
        assert float(many.answer_logodds_delta[j]) == pytest.approx(
            float(one.answer_logodds_delta[j]), abs=1e-4)
        torch.testing.assert_close(many.matrix[:, j], one.matrix[:, j], atol=1e-3, rtol=0,
                                   equal_nan=True)
    assert torch.isnan(many.answer_delta[[2, 3]]).all()   # not suppressed
    # the organism's answer is copied from the last step's result
    assert int(one.answer_logodds_delta.argmin()) == len(trace.sentences) - 1


def _path_score(model, trace, u: torch.Tensor, below: int | None = None) -> float:
    sent = sentence_index(sup_mod.sentence_bounds(trace), len(trace.token_ids))
    rows, ids = sup_mod.answer_rows(trace)
    batch = fwd.pad(model, [trace.token_ids], [0])
    out = fwd.forward(model, batch, att_mod.interp_hooks(model, u, sent, below),
                      logits_at=[rows], attention="eager")
    return float(sup_mod.answer_score(out[0].float(), ids, "logodds"))


def _slopes(model, trace, below, eps=1e-2) -> list[float]:
    n = len(trace.sentences)
    out = []
    for j in range(n):
        e = torch.zeros(n)
        e[j] = 1.0
        out.append((_path_score(model, trace, eps * e, below)
                    - _path_score(model, trace, -eps * e, below)) / (2 * eps))
    return out


def test_attribution_is_the_slope_of_a_path_ending_at_suppression(model):
    organism = model  # each architecture: GQA (Qwen2), QK-norm (Qwen3), Llama (organism)
    trace = Trace.from_text(organism, PROMPT, COMPLETION)
    att = circuits.sentence_attribution(organism, trace, mode="linear")
    exact = circuits.suppression(organism, trace, matrix=False)
    n = len(trace.sentences)
    base = _path_score(organism, trace, torch.zeros(n))
    assert att.baseline == pytest.approx(base, abs=1e-4)
    assert exact.baseline_logodds == pytest.approx(base, abs=1e-4)
    assert torch.equal(att.estimate, att.thinking_part) and not att.answer_part.any()
    for j, slope in enumerate(_slopes(organism, trace, None)):
        e = torch.zeros(n)
        e[j] = 1.0
        end = _path_score(organism, trace, e) - base            # m_j = 0: suppression
        assert end == pytest.approx(float(exact.answer_logodds_delta[j]), abs=2e-3)
        assert float(att.estimate[j]) == pytest.approx(slope, rel=5e-2, abs=5e-3)


def test_mixed_attribution_is_exact_after_the_thinking_and_a_slope_before(model_and_folder):
    model, folder = model_and_folder
    trace = Trace.from_text(model, PROMPT, COMPLETION)
    att = circuits.sentence_attribution(model, trace)          # mode="mixed"
    e = att.answer_row
    rows, ids = sup_mod.answer_rows(trace)
    assert e == min(trace.sentences[-1].end, rows[0]) and att.mode == "mixed"
    # the exact part: a fresh HF model whose rows >= e cannot see sentence j (4-D mask)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                              attn_implementation="eager").eval()

    def score(lp):
        return float(sup_mod.answer_score(lp[rows], ids, "logodds"))
    base = score(_hf_logprobs(hf, trace, None))
    for j, s in enumerate(trace.sentences):
        ref = score(_hf_logprobs(hf, trace, (s.start, s.end), rows_from=e)) - base
        assert float(att.answer_part[j]) == pytest.approx(ref, abs=2e-3)
    # the thinking part: the slope of the path applied to the rows before e only
    for j, slope in enumerate(_slopes(model, trace, e)):
        assert float(att.thinking_part[j]) == pytest.approx(slope, rel=5e-2, abs=5e-3)
    torch.testing.assert_close(att.estimate, att.thinking_part + att.answer_part)
    # the organism's answer copies the last step: nearly all of its effect is exact
    if folder == organism_folder():
        exact = circuits.suppression(model, trace, matrix=False).answer_logodds_delta
        assert float(att.estimate[-1]) == pytest.approx(float(exact[-1]), rel=0.2)
    # with hooks on the model the bridge computes the same exact part
    with model.hooks([("blocks.0.hook_resid_pre", lambda x, hook: x)]):
        hooked = circuits.sentence_attribution(model, trace)
    torch.testing.assert_close(hooked.answer_part, att.answer_part, atol=2e-3, rtol=0)


def test_attribution_chain_is_built_from_local_masks(model_and_folder):
    """local_drop[i, j]: sentence j hidden from the rows predicting sentence i's tokens only
    (a fresh HF model with a 4-D mask); chain: the widest path over those drops."""
    model, folder = model_and_folder
    trace = Trace.from_text(model, PROMPT, COMPLETION)
    att = circuits.sentence_attribution(model, trace, chain=True)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    ids = torch.tensor(trace.token_ids)
    s, n = trace.sentences, len(trace.sentences)
    base = _hf_logprobs(hf, trace, None).exp()
    rows, ans = sup_mod.answer_rows(trace)
    for j in range(n):
        for i in range(j + 1, n):
            lo, hi = s[i].start - 1, s[i].end - 1
            p = _hf_logprobs(hf, trace, (s[j].start, s[j].end), lo, hi).exp()
            r = torch.arange(lo, hi)
            ref = float((base[r, ids[r + 1]] - p[r, ids[r + 1]]).clamp(min=0).max())
            assert float(att.local_drop[i, j]) == pytest.approx(ref, abs=2e-3)
        p = _hf_logprobs(hf, trace, (s[j].start, s[j].end), att.answer_row).exp()
        r = torch.tensor(rows)
        ref = float((base[r, ids[r + 1]] - p[r, ids[r + 1]]).clamp(min=0).max())
        assert float(att.answer_local_drop[j]) == pytest.approx(ref, abs=2e-3)
    assert torch.isnan(att.local_drop[torch.ones(n, n, dtype=torch.bool).triu()]).all()
    c = [0.0] * n
    for j in reversed(range(n)):
        c[j] = max([float(att.answer_local_drop[j])] + [
            min(float(att.local_drop[i, j]), c[i]) for i in range(j + 1, n)])
    torch.testing.assert_close(att.chain, torch.tensor(c))
    if folder == organism_folder():  # a plain chain: every step reaches the answer
        assert float(att.chain.min()) > 0.9
        torch.testing.assert_close(att.chain, circuits.suppression(model, trace).chain,
                                   atol=0.05, rtol=0)
    plain = circuits.sentence_attribution(model, trace)
    assert torch.isnan(plain.chain).all() and torch.isnan(plain.local_drop).all()


def _reference_vertical(model, trace, proximity) -> torch.Tensor:
    """[layer, head, S] vertical scores from the eager bridge's full patterns, by loops."""
    pats = {}

    def keep(layer):
        def fn(x, hook):
            pats[layer] = x[0].detach().double()
            return x
        return fn
    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep(layer))
             for layer in range(model.config.n_layers)]
    with torch.no_grad(), model.hooks(hooks):
        model.bridge(torch.tensor([trace.token_ids]))
    s = trace.sentences
    n = len(s)
    out = torch.full((model.config.n_layers, model.config.n_heads, n), float("nan"),
                     dtype=torch.float64)
    for layer, p in pats.items():
        for j in range(n):
            rows = [p[:, s[i].start:s[i].end, s[j].start:s[j].end].mean((1, 2))
                    for i in range(j + proximity, n)]
            if rows:
                out[layer, :, j] = torch.stack(rows).mean(0)
    return out


def test_receiver_heads_against_loops_and_scipy(organism):
    probs = organism.task.problems(6, depths=(3, 4), seed=5)
    traces = organism.think_batch([p["prompt"] for p in probs])
    prox, k = 1, 3
    rh = circuits.receiver_heads(organism, traces, k=k, proximity=prox, min_sentences=3)
    n_l, n_h = organism.config.n_layers, organism.config.n_heads
    ref = np.full((len(traces), n_l, n_h), np.nan)
    for t, tr in enumerate(traces):
        v = _reference_vertical(organism, tr, prox)
        torch.testing.assert_close(rh.vertical[t].double(), v, atol=1e-5, rtol=0,
                                   equal_nan=True)
        n = len(tr.sentences) - prox
        ref[t] = scipy.stats.kurtosis(v[..., :n].numpy(), axis=-1, fisher=True, bias=True)
    np.testing.assert_allclose(rh.per_trace.numpy(), ref, atol=1e-3)
    mean = np.nanmean(ref, 0)
    np.testing.assert_allclose(rh.kurtosis.numpy(), mean, atol=1e-3)
    ranked = sorted(((mean[li, hi], (li, hi)) for li in range(1, n_l) for hi in range(n_h)),
                    reverse=True)
    assert rh.top_heads == [h for _, h in ranked[:k]]
    keep = np.ones((n_l, n_h), bool)
    keep[0] = False
    r = scipy.stats.pearsonr(np.nanmean(ref[1::2], 0)[keep], np.nanmean(ref[0::2], 0)[keep])[0]
    assert rh.split_half_r == pytest.approx(r, abs=1e-3)
    li, hi = zip(*rh.top_heads)
    for t in range(len(traces)):
        torch.testing.assert_close(rh.scores[t], rh.vertical[t][list(li), list(hi)].mean(0),
                                   equal_nan=True)


def test_fisher_kurtosis_equals_scipy():
    x = torch.randn(3, 5, 11, dtype=torch.float64) ** 3
    np.testing.assert_allclose(circuits.fisher_kurtosis(x).numpy(),
                               scipy.stats.kurtosis(x.numpy(), axis=-1, fisher=True), rtol=1e-10)


def test_bad_input_is_refused_before_any_pass(organism):
    empty = Trace.from_text(organism, "a = 3 ; ? a", "</think> 3 <eos>")
    for fn in (circuits.suppression, circuits.sentence_attribution):
        with pytest.raises(ConfigError, match="no thinking sentences"):
            fn(organism, empty)
    trace = Trace.from_text(organism, PROMPT, COMPLETION)
    with pytest.raises(PositionError, match="sentence index 9 out of range.*valid 0..4"):
        circuits.suppression(organism, trace, sentences=[0, 9])
    with pytest.raises(ConfigError, match="metric='kl'"):
        circuits.sentence_attribution(organism, trace, metric="kl")
    with pytest.raises(ConfigError, match="mode='exact'; valid: mixed, linear"):
        circuits.sentence_attribution(organism, trace, mode="exact")
    with pytest.raises(ConfigError, match="k=20 receiver heads; valid 1..12"):
        circuits.receiver_heads(organism, [trace])
    with pytest.raises(ConfigError, match="exclude_layers has layer 7"):
        circuits.receiver_heads(organism, [trace], k=2, exclude_layers=[7])
    with pytest.raises(ConfigError, match="no trace has 4 scored sentences"):
        circuits.receiver_heads(organism, [trace], k=2, proximity=4)


def test_receiver_head_of_the_second_organism_marks_the_phase_boundary():
    """Meaning, on organism-backtrack: the top receiver head (L1H2) receives at the chain's
    root lookup, the sentence where resolving turns into computing (RESULTS (n))."""
    import thinklens

    bt = thinklens.load("organism-backtrack")
    rows = bt.task.problems(24, depths=[5, 6, 7, 8], seed=3)
    traces = [t for t in bt.think_batch([r["prompt"] for r in rows], temperature=1.0, seed=0,
                                        progress=False)
              if len(t.sentences) >= 8 and not t.truncated]
    rh = circuits.receiver_heads(bt, traces, k=3, proximity=2, min_sentences=6)
    assert rh.top_heads[0] == (1, 2) and rh.split_half_r > 0.8
    hits = 0
    for i, v in zip(rh.used, rh.vertical):
        truth = bt.task.sentence_truth(traces[i])
        s = torch.nan_to_num(v[1, 2], nan=-1.0)
        top = truth[int(s.argmax())]
        hits += top.kind == "lookup" and top.written is not None and top.chain == "main"
    assert hits >= 0.9 * len(rh.used), (hits, len(rh.used))
