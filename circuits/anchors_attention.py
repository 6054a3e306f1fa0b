"""Attention suppression of thinking sentences, exact and first-order (Thought Anchors).

**Suppression** (Bogdan et al. 2025, "Thought Anchors", arXiv 2506.19143):

1. One baseline pass of the whole trace (prompt, thinking, answer) on the bridge's eager
   attention, with the same hook as below masking nothing.
2. For each thinking sentence ``j``, a pass in which every head of every layer cannot
   attend to the keys of ``j``: a hook on ``blocks.L.attn.hook_attn_scores`` (the
   pre-softmax scores, after the causal mask) sets the scores of those key columns to
   the dtype's minimum, for every query. Several sentences run as rows of one batch:
   row ``r`` holds a copy of the trace and its own key mask (``[batch, key_pos]``
   broadcast over heads and queries), so one pass suppresses ``batch_size`` sentences.
   No architecture's code is changed; the hook is scoped to the pass.
3. The sentence×sentence matrix: ``M[i, j]`` = mean over the tokens ``t`` of sentence ``i``
   of ``log KL(p_base(·|<t) ‖ p_supp_j(·|<t))`` (the teacher-forced distributions that
   predict sentence ``i``'s tokens; KL floored at ``1e-12`` before the log). Cells with
   ``i < j`` cannot change (causal) and are NaN.
4. The answer effect of sentence ``j``: the KL of the answer distributions summed over
   the answer tokens (teacher-forced: the distribution that predicts each token of the
   trace's answer span), and the change of the answer's score,
   ``Δ_j = score_supp_j − score_base`` (negative = the answer needed ``j``), for two
   scores: the answer's log-probability (``answer_delta``) and its log-odds
   ``log p − log(1 − p)`` (``answer_logodds_delta``; summed over answer tokens).
5. **Chain effect** (thinklens's addition). Steps 2–4 are direct effects: the later
   sentences stay as written, so a step whose value only reaches the answer through the
   steps after it (``a = 7 .`` → ``b = 7 - 2 = 5 .`` → answer) shows no answer effect, though
   editing it and regenerating would change the answer. From the same passes:
   ``token_drop[i, j]`` = the largest drop, over the tokens sentence ``i > j`` wrote, of
   their probability when ``j`` is suppressed (``p_base − p_supp``, floored at 0): would
   ``i`` be written differently?; ``answer_drop[j]`` the same for the answer's tokens.
   ``chain[j]`` is the widest path from ``j`` to the answer in that graph (a path is as
   wide as its narrowest edge; ``chain[j] = max(answer_drop[j], max_i min(token_drop[i, j],
   chain[i]))``, from the last sentence back), in [0, 1]. It assumes that a change of
   what ``i`` writes acts on the answer as suppressing ``i`` does. The exact total effect
   (the rest rewritten by the model under the mask) is
   :func:`thinklens.circuits.suppression_total`.

**Sentence attribution**, the first-order estimate of step 4's answer effects, is
:mod:`thinklens.circuits.anchors_attribution`.

Example::

    from thinklens.circuits import suppression, sentence_attribution

    sup = suppression(model, trace)          # sup.matrix [query_sentence, key_sentence]
    sup.answer_logodds_delta                 # [sentence]: Δ log-odds(answer) per sentence
    att = sentence_attribution(model, trace)
    att.estimate                             # [sentence]: its estimate
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from thinklens.circuits.anchors import thinking_sentences
from thinklens.errors import ConfigError, PositionError
from thinklens.hooks import budget as budget_mod
from thinklens.hooks import forward as fwd
from thinklens.hooks.blockwise import sentence_index
from thinklens.hooks.trace import Trace

KL_FLOOR = 1e-12


@dataclass
class SuppressionResult:
    """Exact attention suppression of each thinking sentence of one trace.

    ``matrix[i, j]``: mean log-KL over sentence ``i``'s tokens when ``j``'s keys are
    masked (NaN for ``i < j`` and for sentences not suppressed); ``answer_kl[j]`` the KL
    of the answer distribution; ``answer_delta[j]`` / ``answer_logodds_delta[j]`` the
    change of the answer's log-probability / log-odds (``baseline_logprob`` and
    ``baseline_logodds`` are the unsuppressed values). ``token_drop[i, j]`` (``i > j``):
    the largest drop of the probability of a token sentence ``i`` wrote;
    ``answer_drop[j]`` the same for the answer's tokens; ``chain[j]`` the widest path
    from ``j`` to the answer through those drops (step 5; NaN unless every sentence was
    suppressed with ``matrix=True``).
    """

    trace: Trace
    sentences: list[str]
    matrix: Float[Tensor, "query_sentence key_sentence"]
    answer_kl: Float[Tensor, " sentence"]
    answer_delta: Float[Tensor, " sentence"]
    answer_logodds_delta: Float[Tensor, " sentence"]
    baseline_logprob: float
    baseline_logodds: float
    suppressed: list[int]
    token_drop: Float[Tensor, "query_sentence key_sentence"]
    answer_drop: Float[Tensor, " sentence"]
    chain: Float[Tensor, " sentence"]

    def delta(self, metric: str = "logodds") -> Float[Tensor, " sentence"]:
        """``answer_logodds_delta`` (``"logodds"``) or ``answer_delta`` (``"logprob"``)."""
        return self.answer_delta if check_metric(metric) == "logprob" else self.answer_logodds_delta


def check_trace(trace: Trace, what: str) -> None:
    """Refuse a trace with no thinking sentences or no answer tokens (before any pass)."""
    thinking_sentences(trace, what)
    if len(trace.answer_span) == 0 or trace.answer_span.start == 0:
        raise ConfigError(f"{what}: the trace has no answer tokens to score (answer span "
                          f"{trace.answer_span}); give a finished trace with an answer")


def sentence_list(trace: Trace, sentences: Sequence[int] | None) -> list[int]:
    n = len(trace.sentences)
    if sentences is None:
        return list(range(n))
    out = [int(j) for j in sentences]
    bad = [j for j in out if not 0 <= j < n]
    if bad:
        raise PositionError(f"sentence index {bad[0]} out of range: the trace has {n} "
                            f"thinking sentences (valid 0..{n - 1})")
    return out


def sentence_bounds(trace: Trace) -> Int[Tensor, "sentence 2"]:
    return torch.tensor([[s.start, s.end] for s in trace.sentences], dtype=torch.long)


def answer_rows(trace: Trace) -> tuple[list[int], list[int]]:
    """Logit positions predicting each answer token, and those tokens' ids."""
    a = trace.answer_span
    return list(range(a.start - 1, a.end - 1)), list(trace.token_ids[a.start:a.end])


def score_sites(model) -> list[str]:
    return [f"blocks.{layer}.attn.hook_attn_scores" for layer in range(model.config.n_layers)]


def key_mask_hooks(model, key_mask: Tensor) -> list[fwd.Hook]:
    """Hooks setting the scores of ``key_mask [batch, key_pos]`` columns to the minimum."""
    def fn(x, hook):
        m = key_mask[:, None, None, : x.shape[-1]].to(x.device)
        return x.masked_fill(m, torch.finfo(x.dtype).min)
    return [(s, fn) for s in score_sites(model)]


def masked_logits(model, seqs: Sequence[Sequence[int]], rows: Sequence[Sequence[int]],
                  key_mask: Tensor) -> list[Tensor]:
    """Per sequence, float32 CPU logits ``[len(rows[r]), d_vocab]`` of one eager pass of the
    right-padded batch with row ``r``'s keys ``key_mask [batch, >= max length]`` masked."""
    batch = fwd.pad(model, seqs, list(range(len(seqs))))
    out = fwd.forward(model, batch, key_mask_hooks(model, key_mask), logits_at=rows,
                      attention="eager")
    return [x.detach().float().cpu() for x in out]


METRICS = ("logodds", "logprob")


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(f"metric={metric!r}; valid: {', '.join(METRICS)}")
    return metric


def answer_score(logits: Tensor, answer: Sequence[int], metric: str = "logprob") -> Tensor:
    """Summed log-probability (or log-odds) of ``answer`` (rows of ``logits`` predict its tokens)."""
    logp = logits.float().log_softmax(-1)
    idx = torch.as_tensor(answer, device=logits.device)
    rows = torch.arange(len(answer), device=logits.device)
    lp = logp[rows, idx]
    if metric == "logodds":
        rest = logp.scatter(1, idx[:, None], float("-inf")).logsumexp(-1)
        lp = lp - rest
    return lp.sum()


def suppression_peak(model, trace: Trace, batch_size: int, matrix: bool) -> int:
    """Bytes one batch of :func:`suppression` needs: an eager no-grad pass of ``batch_size``
    copies (:func:`thinklens.hooks.budget.forward_peak`), the score hook's masked copy
    (measured, tests/test_budget.py: half a ``batch × heads × T²`` more) and the float32
    logits it keeps (every thinking row with the matrix, else the answer's; the batch's
    and the baseline's log-probabilities and probabilities)."""
    n, c = len(trace.token_ids), model.config
    rows = n if matrix else len(trace.answer_span)
    kept = (batch_size + 3) * rows * c.d_vocab * 4
    masked = 0.5 * batch_size * c.n_heads * n * n * model.dtype.itemsize
    return int(budget_mod.forward_peak(c, batch_size, n, model.dtype.itemsize, "eager")
               + masked + kept)


def suppression(model, trace: Trace, *, sentences: Sequence[int] | None = None,
                batch_size: int = 8, matrix: bool = True,
                budget: int | float | str | None = None) -> SuppressionResult:
    """Mask the keys of each thinking sentence in every head and layer; score the effects.

    ``sentences``: indices to suppress (default all); ``batch_size``: suppressed copies
    per forward pass; ``matrix=False`` skips the sentence×sentence matrix (the answer
    effects need only the answer rows' logits). ``budget``: memory allowed (bytes,
    ``"8GB"``; default 60 % of available memory); a trace whose pass would need more is
    refused before any pass, with the settings that need less.

    Example::

        sup = suppression(model, trace)
        sup.matrix.shape, sup.answer_delta.shape    # (S, S), (S,)
    """
    check_trace(trace, "suppression")
    which = sentence_list(trace, sentences)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}; must be a positive integer")
    fwd.as_traces(model, [trace])
    batch_size = min(batch_size, len(which))
    ways = []  # the settings that lower the peak
    if batch_size > 1:
        ways.append(("batch_size=1", suppression_peak(model, trace, 1, matrix)))
    if matrix:
        ways.append(("matrix=False", suppression_peak(model, trace, batch_size, False)))
    budget_mod.check_need(f"suppression of a {len(trace.token_ids)}-token trace",
                          suppression_peak(model, trace, batch_size, matrix),
                          budget_mod.parse_budget(budget, model.device), ways)
    n_sent, n_tok = len(trace.sentences), len(trace.token_ids)
    bounds = sentence_bounds(trace)
    sent = sentence_index(bounds, n_tok)
    ans_rows, ans_ids = answer_rows(trace)
    # the distributions that predict each written sentence token k (read at row k - 1)
    tokens = [k for k in range(n_tok) if int(sent[k]) < n_sent] if matrix else []
    rows = [k - 1 for k in tokens] + ans_rows
    seqs = [list(trace.token_ids)]

    def run(masked: list[int]) -> list[Tensor]:
        key_mask = torch.zeros((max(1, len(masked)), n_tok), dtype=torch.bool)
        for r, j in enumerate(masked):
            key_mask[r] = sent == j
        return masked_logits(model, seqs * key_mask.shape[0], [rows] * key_mask.shape[0],
                             key_mask)

    n_think = len(tokens)
    written = torch.as_tensor([trace.token_ids[k] for k in tokens] + ans_ids, dtype=torch.long)
    base_logp = run([])[0].log_softmax(-1)
    base_p = base_logp.exp()[torch.arange(len(rows)), written]
    base_ans = float(answer_score(base_logp[n_think:], ans_ids))
    base_odds = float(answer_score(base_logp[n_think:], ans_ids, "logodds"))
    mat, drop_mat = (torch.full((n_sent, n_sent), float("nan")) for _ in range(2))
    kl_ans, delta, odds, ans_drop = (torch.full((n_sent,), float("nan")) for _ in range(4))
    tok_sent = sent[torch.as_tensor(tokens, dtype=torch.long)]
    counts = torch.zeros(n_sent).index_add_(0, tok_sent, torch.ones(n_think)).clamp(min=1)
    for a in range(0, len(which), batch_size):
        chunk = which[a:a + batch_size]
        for j, out in zip(chunk, run(chunk)):
            logp = out.log_softmax(-1)
            kl = (base_logp.exp() * (base_logp - logp)).sum(-1).clamp(min=0)   # [rows]
            drop = (base_p - logp.exp()[torch.arange(len(rows)), written]).clamp(min=0)
            kl_ans[j] = float(kl[n_think:].sum())
            delta[j] = float(answer_score(logp[n_think:], ans_ids)) - base_ans
            odds[j] = float(answer_score(logp[n_think:], ans_ids, "logodds")) - base_odds
            ans_drop[j] = float(drop[n_think:].max())
            if n_think:
                logkl = kl[:n_think].clamp(min=KL_FLOOR).log()
                col = torch.zeros(n_sent).index_add_(0, tok_sent, logkl) / counts
                col[:j] = float("nan")
                mat[:, j] = col
                top = torch.zeros(n_sent).scatter_reduce_(0, tok_sent, drop[:n_think], "amax")
                top[: j + 1] = float("nan")
                drop_mat[:, j] = top
    chain = widest_path(drop_mat, ans_drop) if matrix and len(which) == n_sent else \
        torch.full((n_sent,), float("nan"))
    return SuppressionResult(trace, [s.text for s in trace.sentences], mat, kl_ans, delta,
                             odds, base_ans, base_odds, which, drop_mat, ans_drop, chain)


def widest_path(edge: Tensor, to_answer: Tensor) -> Tensor:
    """Per sentence, the widest path to the answer: ``c[j] = max(to_answer[j],
    max_{i > j} min(edge[i, j], c[i]))``, computed from the last sentence back."""
    n = to_answer.shape[0]
    c = torch.zeros(n)
    for j in range(n - 1, -1, -1):
        via = [min(float(edge[i, j]), float(c[i])) for i in range(j + 1, n)]
        c[j] = max([float(to_answer[j]), *via])
    return c


__all__ = ["SuppressionResult", "suppression", "check_trace", "check_metric", "score_sites",
           "KL_FLOOR", "METRICS", "key_mask_hooks", "answer_score", "answer_rows",
           "sentence_bounds", "sentence_list", "masked_logits", "widest_path",
           "suppression_peak"]
