"""Sentence attribution: every sentence's suppression effect on the answer, estimated.

:func:`thinklens.circuits.suppression` (Thought Anchors, Bogdan et al. 2025, arXiv
2506.19143) hides one sentence's keys per pass. :func:`sentence_attribution` estimates all
of those answer effects at once, by attribution patching (Nanda 2023; Kramár et al. 2024,
"AtP*", arXiv 2403.00745) applied to the key mask:

1. **The path.** Every thinking sentence gets a weight ``m_j`` on the attention to its
   keys. In every head and layer each query row's weights on the keys of ``j`` are
   multiplied by ``m_j`` and the weight taken from them, ``(1 − m_j) P_j`` (``P_j`` = the
   row's total weight on ``j``), goes to the row's other keys in proportion to their
   weights. That is the straight line between the plain pattern (``m = 1``) and the
   suppressed one (``m_j = 0`` is exactly suppression: the other keys get ``p_k / (1 −
   P_j)``), taken in pattern space, through a hook on ``blocks.L.attn.hook_pattern``.
   Why not ``log m`` added to the scores (the rational path between the same two end
   points): its derivative at ``m = 1`` is ``P_j (1 − P_j)`` per row, which vanishes where
   a head puts almost all its weight on one sentence — the heads that matter most; the
   linear path keeps the full difference ``p_supp − p`` (AtP on the pattern).
2. **First order** (``mode="linear"``: one forward, one backward): ``g_j = ∂ score /
   ∂u_j`` at ``u = 1 − m = 0``; the estimate of suppressing ``j`` (``u_j: 0 → 1``) is
   ``Δ̂_j = g_j``.
3. **Exact where the answer reads** (``mode="mixed"``, the default). The first-order
   estimate fails most where it matters most: the answer's own queries often copy from
   one sentence with almost all their weight, and hiding it moves the answer far along a
   curved path (on organism-backtrack the step the answer copies: exact −10.9 log-odds,
   estimate +0.3). AtP* computes such attention effects exactly instead of linearly; here
   the split is by query position. With ``e`` = the first row after the thinking that
   predicts the closing text or the answer (``min(end of thinking, first answer row)``):

   - rows ``< e`` (the thinking's own queries): the path of step 1 and its gradient, as
     in step 2, with rows ``≥ e`` left as they are: ``Δ̂_j^think``;
   - rows ``≥ e`` (closing text and answer): exact — the prefix ``[:e]`` runs once on the
     plain Hugging Face tree and keeps its KV cache, then ``S + 1`` copies of the few
     tokens after it go in as tree-masked blocks of one sequence (as in
     :func:`~thinklens.circuits.forced_answer`), copy ``j`` unable to see the keys of
     sentence ``j``, copy ``S`` seeing everything: ``Δ_j^answer`` = score(copy ``j``) −
     score(copy ``S``). Nothing before ``e`` changes when only rows ``≥ e`` are masked, so
     the cache is exact. (Hooks on the model, or a model spread over devices: the same
     masks on ``S + 1`` full copies through the bridge.)
   - ``Δ̂_j = Δ̂_j^think + Δ_j^answer``: exact when ``j`` acts on the answer only through
     the answer's own attention; first order in what it changes in the thinking's
     residual streams (with the thinking's tokens as written).
4. **The score** is the answer's log-odds by default: a confident answer (``p ≈ 1``) has a
   log-probability whose gradient is about 0 whatever the sentence, so its first-order
   estimate says nothing; the log-odds is linear in the answer's logit margin. (The KL's
   gradient is 0 at the baseline: it has no first-order estimate.)

5. **Chain estimate** (``chain=True``). Direct effects miss a step whose value reaches the
   answer only through the steps that read it (``a = 7 .`` → ``b = 7 - 2 = 5 .`` →
   answer). :class:`~thinklens.circuits.SuppressionResult`'s ``chain`` finds them with
   ``S`` full suppressed passes; here the same graph is built from *local* exact
   interventions on the one cached pass of step 3: for every pair ``j < i``, sentence
   ``j``'s keys hidden from the queries that predict sentence ``i``'s tokens only (rows
   ``start_i − 1 .. end_i − 2``; a block of those tokens over the cached prefix
   ``[:start_i − 1]``). ``local_drop[i, j]`` = the largest drop of the probability of a
   token ``i`` wrote (``p_base − p_local``, floored at 0), ``answer_local_drop[j]`` the same
   for the answer's tokens (step 3's blocks), and ``chain[j]`` the widest path from ``j`` to
   the answer, ``max(answer_local_drop[j], max_i min(local_drop[i, j], chain[i]))``. It
   leaves out what hiding ``j`` changes in earlier rows' residual streams, which the
   full pass includes.

Memory: the backward pass runs through :mod:`thinklens.hooks.weighted_attention` (the
same path, blockwise, no ``[T, T]`` tensor kept; ``attention="blockwise"``, the default
where the architecture allows it) or through the bridge's eager attention with
:func:`interp_hooks` on ``hook_pattern`` (``attention="eager"``, which keeps every layer's
``heads × T²`` scores and probabilities: for SmolLM2-135M about 24 GB at 2k tokens).

Cost: one forward and one backward pass, plus for ``"mixed"`` one pass of
the prefix and one of ``(S + 1) ×`` the tokens after the thinking; ``chain=True`` adds
blocks of ``Σ_i i × len(sentence i)`` tokens to that cached pass (against ``S`` full passes
for ``suppression``'s chain).

Example::

    from thinklens.circuits import sentence_attribution

    att = sentence_attribution(model, trace)
    att.estimate          # [sentence]: estimated Δ log-odds(answer) of suppressing each
    att.answer_part       # [sentence]: its exact part, through the answer's own queries
    att = sentence_attribution(model, trace, chain=True)
    att.chain             # [sentence]: widest path to the answer through local drops
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from thinklens.circuits.anchors import TreeBlock, tree_logprobs
from thinklens.circuits.anchors_attention import (
    answer_rows,
    answer_score,
    check_metric,
    check_trace,
    score_sites,
    sentence_bounds,
    suppression_peak,
    widest_path,
)
from thinklens.errors import ConfigError
from thinklens.hooks import attention_impl
from thinklens.hooks import budget as budget_mod
from thinklens.hooks import forward as fwd
from thinklens.hooks.blockwise import sentence_index
from thinklens.hooks.budget import attribution_peak
from thinklens.hooks.generate import engine_for
from thinklens.hooks.trace import Trace
from thinklens.hooks.weighted_attention import weighted_attention

MODES = ("mixed", "linear")
ATTENTION = ("blockwise", "eager")


@dataclass
class SentenceAttribution:
    """Estimated suppression effect of each sentence on the answer's score.

    ``estimate[j]`` estimates ``SuppressionResult.delta(metric)[j]``; it is
    ``thinking_part + answer_part`` (module steps 2–3): ``thinking_part[j]`` the first-order
    effect through the thinking's own queries (all queries for ``mode="linear"``),
    ``answer_part[j]`` the exact effect through the queries from ``answer_row`` on (zeros
    for ``"linear"``). ``baseline`` is the answer's unsuppressed score. With
    ``chain=True`` (step 5): ``local_drop[i, j]`` (NaN for ``i <= j``),
    ``answer_local_drop[j]`` and ``chain[j]`` in [0, 1]; all NaN otherwise.
    """

    trace: Trace
    sentences: list[str]
    estimate: Float[Tensor, " sentence"]
    metric: str
    baseline: float
    mode: str
    thinking_part: Float[Tensor, " sentence"]
    answer_part: Float[Tensor, " sentence"]
    answer_row: int
    local_drop: Float[Tensor, "query_sentence key_sentence"]
    answer_local_drop: Float[Tensor, " sentence"]
    chain: Float[Tensor, " sentence"]


def interp_hooks(model, u: Tensor, sent: Tensor, below: int | None = None) -> list[fwd.Hook]:
    """Hooks replacing each pattern ``p`` by ``p + Σ_j u_j (p_supp_j − p)`` (``u = 1 − m``)
    in the query rows before ``below`` (all rows when None).

    Per query row, ``P_j`` = the row's weight on sentence ``j``'s keys; the suppressed
    row is ``p_k / (1 − P_j)`` off ``j`` and 0 on it, so the factor on key ``k`` is
    ``1 + Σ_j u_j P_j / (1 − P_j) − u_{s(k)} / (1 − P_{s(k)})``. ``P`` is detached: the terms
    it enters are multiplied by ``u``, which is 0 where the gradient is taken.
    """
    n = u.shape[0]

    def fn(p, hook):
        s = sent[: p.shape[-1]]
        w = p.detach().float()
        big = torch.zeros((*w.shape[:-1], n + 1), device=w.device).index_add_(-1, s, w)[..., :n]
        inv = 1.0 / (1.0 - big).clamp(min=1e-6)                                # [b, h, q, S]
        spread = (u * big * inv).sum(-1, keepdim=True)
        u_key = torch.cat([u, u.new_zeros(1)])[s]                             # [k]
        inv_key = torch.cat([inv, inv.new_zeros((*inv.shape[:-1], 1))], -1)[..., s]
        factor = 1.0 + spread - u_key * inv_key
        if below is not None:
            rows = torch.arange(p.shape[-2], device=p.device)[:, None] < below
            factor = torch.where(rows, factor, torch.ones_like(factor))
        return p * factor.to(p.dtype)
    return [(f"blocks.{layer}.attn.hook_pattern", fn) for layer in range(model.config.n_layers)]


def weighted_observer(u: Tensor, sent: Tensor, below: int | None = None):
    """An :func:`~thinklens.hooks.attention_impl.observe` callback (``output=True``) computing
    every layer's attention on :func:`interp_hooks`' path by
    :func:`~thinklens.hooks.weighted_attention.weighted_attention` (no ``[T, T]`` kept)."""
    def fn(layer, q, k, mask, scale, v):
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # grouped-query K/V: one copy per query head, as repeat_kv orders them
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return weighted_attention(q, k, v, u, sent[: k.shape[-2]], scale=scale, mask=mask,
                                  below=below)
    return fn


def attention_for(model, attention: str | None) -> str:
    """``"blockwise"`` where every attention component takes an observer and no hooks are
    attached to the model (its hooks on patterns would not fire), else ``"eager"``."""
    if attention is not None and attention not in ATTENTION:
        raise ConfigError(f"attention={attention!r}; valid: {', '.join(ATTENTION)} or None "
                          "(blockwise where the architecture allows it)")
    can = attention_impl.observable(model) and model.n_hooks() == 0
    if attention == "blockwise" and not can:
        raise ConfigError("attention='blockwise' needs the standard attention path (Llama, "
                          "Qwen2/3, Mistral shapes) and no hooks attached to the model; use "
                          "attention='eager'")
    return attention or ("blockwise" if can else "eager")


def _local(model, ids: list[int], blocks: list[TreeBlock]) -> list[Tensor]:
    """:func:`tree_logprobs` of ``blocks`` over the whole of ``ids`` cached; with hooks on
    the model or a model spread over devices, the same masks on full copies through the
    bridge (each block's hidden keys masked for its rows only)."""
    plain = engine_for(model, "hf").plain if model.n_hooks() == 0 else None
    if plain is not None and len({p.device for p in plain.parameters()}) == 1:
        top = max(b.cut + len(b.tokens) for b in blocks)
        return tree_logprobs(plain, model, ids[:top], blocks, block_tokens=512)
    out: list[Tensor] = []
    for a in range(0, len(blocks), 16):
        chunk = blocks[a:a + 16]
        n = max(b.cut + len(b.tokens) for b in chunk)
        mask = torch.zeros((len(chunk), n, n), dtype=torch.bool)
        for r, b in enumerate(chunk):
            if b.hidden is not None:
                mask[r, b.cut:b.cut + len(b.tokens), b.hidden[0]:b.hidden[1]] = True

        def fn(x, hook, mask=mask):
            m = mask[:, None, : x.shape[-2], : x.shape[-1]].to(x.device)
            return x.masked_fill(m, torch.finfo(x.dtype).min)
        seqs = [ids[:b.cut + len(b.tokens)] for b in chunk]
        rows = [[b.cut + r for r in b.reads] for b in chunk]
        res = fwd.forward(model, fwd.pad(model, seqs, list(range(len(chunk)))),
                          [(s, fn) for s in score_sites(model)], logits_at=rows,
                          attention="eager")
        for b, lp in zip(chunk, res):
            lp = lp.float().log_softmax(-1)
            out.append((lp if b.targets is None else
                        lp.gather(1, torch.tensor(b.targets, device=lp.device)[:, None])[:, 0]
                        ).cpu())
    return out


def _exact_parts(model, trace: Trace, e: int, metric: str, chain: bool
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 3 and 5: ``answer_part [S]``, ``local_drop [S, S]``, ``answer_local_drop [S]``
    from one cached pass (``local_drop`` all NaN unless ``chain``)."""
    ids = list(trace.token_ids)
    rows, ans_ids = answer_rows(trace)
    sents = trace.sentences
    n = len(sents)
    spans: list[tuple[int, int] | None] = [(s.start, s.end) for s in sents] + [None]
    late = ids[e:trace.answer_span.end - 1]
    blocks = [TreeBlock(e, late, [r - e for r in rows], span) for span in spans]
    pairs = [(i, j) for i in range(1, n) for j in [*range(i), None]] if chain else []
    for i, j in pairs:
        c = sents[i].start - 1
        blocks.append(TreeBlock(c, ids[c:sents[i].end - 1], list(range(sents[i].end - c - 1)),
                                spans[j] if j is not None else None, ids[c + 1:sents[i].end]))
    lp = _local(model, ids, blocks)
    scores = torch.stack([answer_score(x, ans_ids, metric) for x in lp[:n + 1]])
    idx = torch.arange(len(ans_ids))
    p_ans = torch.stack([x[idx, ans_ids].exp() for x in lp[:n + 1]])     # [S + 1, n_ans]
    answer_drop = (p_ans[-1] - p_ans[:-1]).clamp(min=0).amax(-1)
    drop = torch.full((n, n), float("nan"))
    got = dict(zip(pairs, lp[n + 1:]))
    for i, j in pairs:
        if j is not None:
            drop[i, j] = float((got[(i, None)].exp() - got[(i, j)].exp()).clamp(min=0).max())
    return (scores[:-1] - scores[-1]).float(), drop, answer_drop.float()


def sentence_attribution(model, trace: Trace, *, metric: str = "logodds",
                         mode: str = "mixed", chain: bool = False,
                         attention: str | None = None, checkpoint: bool | None = None,
                         budget: int | float | str | None = None) -> SentenceAttribution:
    """Estimate every sentence's suppression effect on the answer (module docstring).

    ``metric``: the answer's score whose change is estimated, ``"logodds"`` (default) or
    ``"logprob"``. ``mode``: ``"mixed"`` (default; exact through the answer's own queries,
    first order through the thinking's) or ``"linear"`` (first order everywhere: one
    forward, one backward). ``chain=True`` adds step 5's local drops and chain estimate.
    ``attention``: ``"blockwise"`` (no ``[T, T]`` kept for the backward pass) or
    ``"eager"`` (the bridge's patterns, hooked); None = blockwise where the architecture
    allows it and no hooks are attached (the same numbers up to float rounding).
    ``checkpoint``: recompute each block in the backward pass instead of keeping its
    activations (:func:`~thinklens.hooks.forward.recompute_blocks`: 1.0-1.5x the time
    measured, memory of about two blocks instead of all); None = only when the
    trace would not fit the budget otherwise.
    ``budget``: memory allowed (bytes, ``"8GB"``; default 60 % of available memory): a
    trace whose forward + backward pass would not fit is refused before any pass, naming
    the settings that need less (blockwise attention; exact
    :func:`~thinklens.circuits.suppression`, no backward pass).

    Example::

        att = sentence_attribution(model, trace)
        att.estimate.shape         # (S,): estimated Δ log-odds(answer) of suppressing each
    """
    check_trace(trace, "sentence_attribution")
    check_metric(metric)
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}; valid: {', '.join(MODES)}")
    if not isinstance(chain, bool):
        raise ConfigError(f"chain={chain!r}; give True or False")
    impl = attention_for(model, attention)
    fwd.as_traces(model, [trace])
    n_sent, n_tok = len(trace.sentences), len(trace.token_ids)
    if checkpoint is not None and not isinstance(checkpoint, bool):
        raise ConfigError(f"checkpoint={checkpoint!r}; give True, False or None (only when "
                          "needed)")
    limit = budget_mod.parse_budget(budget, model.device)

    def need(attention: str, recompute: bool) -> int:
        return attribution_peak(model.config, n_tok, attention, checkpoint=recompute)
    if checkpoint is None:
        checkpoint = need(impl, False) > limit
    ways = [("exact suppression(model, trace, matrix=False, batch_size=1) instead",
             suppression_peak(model, trace, 1, False))]
    if impl == "eager" and attention_impl.observable(model):
        ways.append(("attention='blockwise' (with no hooks attached to the model)",
                     need("blockwise", checkpoint)))
    if not checkpoint:
        ways.append(("checkpoint=True (each block recomputed in the backward pass)",
                     need(impl, True)))
    budget_mod.check_need(
        f"sentence_attribution of a {n_tok}-token trace ({impl} attention"
        f"{', blocks recomputed' if checkpoint else ''})", need(impl, checkpoint), limit, ways)
    sent = sentence_index(sentence_bounds(trace), n_tok).to(model.device)
    ans_rows, ans_ids = answer_rows(trace)
    e = min(trace.sentences[-1].end, ans_rows[0])
    u = torch.zeros(n_sent, device=model.device, requires_grad=True)
    batch = fwd.pad(model, [list(trace.token_ids)], [0])
    below = e if mode == "mixed" else None
    got: dict[str, Tensor] = {}

    def backward(out) -> None:  # inside the pass: recomputed blocks need its hooks
        got["score"] = answer_score(out[0], ans_ids, metric)
        (got["grad"],) = torch.autograd.grad(got["score"], u)
    with fwd.recompute_blocks(model) if checkpoint else nullcontext():
        if impl == "blockwise":
            with attention_impl.observe(model, weighted_observer(u, sent, below), output=True):
                fwd.forward(model, batch, logits_at=[ans_rows], grad=True, attention="sdpa",
                            within=backward)
        else:
            fwd.forward(model, batch, interp_hooks(model, u, sent, below=below),
                        logits_at=[ans_rows], grad=True, attention="eager", within=backward)
    score = got["score"]
    think = got["grad"].detach().float().cpu()
    nan = torch.full((n_sent,), float("nan"))
    ans, drop, ans_drop = torch.zeros(n_sent), torch.full((n_sent, n_sent), float("nan")), nan
    if mode == "mixed" or chain:
        part, drop, ans_drop = _exact_parts(model, trace, e, metric, chain)
        ans = part if mode == "mixed" else ans
    path = widest_path(drop.nan_to_num(0.0), ans_drop) if chain else nan.clone()
    return SentenceAttribution(trace, [s.text for s in trace.sentences], think + ans, metric,
                               float(score.detach()), mode, think, ans, e, drop,
                               ans_drop if chain else nan.clone(), path)


__all__ = ["SentenceAttribution", "sentence_attribution", "interp_hooks", "weighted_observer",
           "attention_for", "MODES", "ATTENTION"]
