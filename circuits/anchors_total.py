"""Total effect of suppressing a thinking sentence: the model rewrites what follows.

:func:`thinklens.circuits.suppression` (Bogdan et al. 2025, "Thought Anchors", arXiv
2506.19143) measures *direct* effects: sentence ``j``'s keys are hidden but every later
sentence stays as written, so a step whose value reaches the answer only through the
steps after it (``a = 7 .`` → ``b = 7 - 2 = 5 .`` → answer) shows none. In the terms of
causal mediation (Pearl 2001; Vig et al. 2020 for transformers) that is the direct
effect; :func:`suppression_total` measures the **total** effect of the same
intervention, with the text after ``j`` as the model writes it when it cannot see ``j``:

1. Baseline: one eager pass of the trace scores its answer (teacher-forced, as in
   :func:`~thinklens.circuits.suppression`'s step 4).
2. For each thinking sentence ``j``: the prefix ``trace.token_ids[:end_j]`` (cut by
   token position) is continued greedily by the ``hf`` engine with ``j``'s keys hidden
   from every query, in the prefix and at every generated token
   (``Request(hidden=...)``: zeros in the attention mask, positions unchanged; the same
   masking as a hook setting those score columns to the minimum). All sentences' rewrites
   go to the engine in one call (batched, SDPA, no hooks).
3. The continuation is read as a trace (its own thinking and answer, extracted as the
   trace's is). ``changed[j]`` = its answer differs from the trace's own answer.
4. Scored answer: the continuation's thinking, then the trace's own closing text (the
   tokens between its thinking and its answer, e.g. ``</think>``) and its answer,
   teacher-forced with ``j`` still masked; ``answer_delta[j]`` / ``answer_logodds_delta[j]``
   = that answer's log-probability / log-odds minus the baseline's, ``answer_kl[j]`` the
   KL of the answer distributions summed over the answer tokens. A continuation that never
   closes its thinking is closed there (``finished[j]`` False).

Cost: one greedy rewrite per suppressed sentence (at most ``max_new_tokens``, batched by
the engine) and one eager scoring pass per ``batch_size`` sentences.

Example::

    from thinklens.circuits import suppression_total

    tot = suppression_total(model, trace)
    tot.changed             # [sentence]: 1.0 where the rewritten thinking gives another answer
    tot.rewritten[2]        # what the model wrote after sentence 2 without seeing it
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from thinklens.circuits.anchors_attention import (
    answer_rows,
    answer_score,
    check_trace,
    masked_logits,
    sentence_list,
)
from thinklens.errors import ConfigError
from thinklens.hooks import forward as fwd
from thinklens.hooks.answers import default_extractor
from thinklens.hooks.engine import Request, Sampling
from thinklens.hooks.generate import generate_ids
from thinklens.hooks.trace import Trace, build_trace


@dataclass
class SuppressionTotal:
    """Total effect on the answer of hiding each thinking sentence (module docstring).

    Per sentence (NaN / None where not suppressed): ``changed`` (1.0 / 0.0), the answer
    score changes ``answer_delta`` (log-probability) and ``answer_logodds_delta``, the
    summed ``answer_kl``; ``answers`` the rewritten traces' answers, ``rewritten`` their
    completion text after the sentence, ``finished`` whether they closed their thinking.
    ``reference`` is the trace's own answer.
    """

    trace: Trace
    sentences: list[str]
    suppressed: list[int]
    reference: str
    changed: Float[Tensor, " sentence"]
    answer_delta: Float[Tensor, " sentence"]
    answer_logodds_delta: Float[Tensor, " sentence"]
    answer_kl: Float[Tensor, " sentence"]
    answers: list[str | None]
    rewritten: list[str | None]
    finished: list[bool | None]
    baseline_logprob: float
    baseline_logodds: float


def suppression_total(model: Any, trace: Trace, *, sentences: Sequence[int] | None = None,
                      max_new_tokens: int = 256,
                      answer: Callable[[Trace], str | None] | None = None,
                      batch_size: int = 16, progress: bool = False) -> SuppressionTotal:
    """Hide each thinking sentence's keys, let the model rewrite the rest, score the answer.

    ``sentences``: indices to suppress (default all); ``max_new_tokens``: the limit of
    each rewrite; ``answer``: the extractor (default the model's, as traces use);
    ``batch_size``: rewrites per decoding batch and scored sequences per pass;
    ``progress``: a progress bar over the generated tokens.
    """
    check_trace(trace, "suppression_total")
    which = sentence_list(trace, sentences)
    for name, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}={v!r}; give an integer >= 1")
    fwd.as_traces(model, [trace])
    extract = default_extractor(model) if answer is None else answer
    reference = extract(trace)
    if reference is None:
        raise ConfigError(f"suppression_total: the answer extractor found no answer in the "
                          f"trace (answer text {trace.answer_text[:60]!r}); give answer=... "
                          "that finds it")
    ids = list(trace.token_ids)
    te, (a0, a1) = trace.think_span.end, (trace.answer_span.start, trace.answer_span.end)
    closing, ans_ids = ids[te:a0], ids[a0:a1]
    sent_of = trace.sentence_of_token()
    base_rows, _ = answer_rows(trace)
    base = _score(model, [ids], [base_rows], [[]])[0]
    base_logp = base.log_softmax(-1)
    base_lp, base_lo = (float(answer_score(base, ans_ids, m)) for m in ("logprob", "logodds"))
    ends = [trace.sentences[j].end for j in which]
    hidden = [[k for k in range(end) if sent_of[k] == j] for j, end in zip(which, ends)]
    # step 2: every rewrite in one engine call; the hidden keys ride in the attention mask
    done = generate_ids(model, [Request(ids[:end], hidden=tuple(h))
                                for end, h in zip(ends, hidden)],
                        Sampling(max_new_tokens=max_new_tokens), engine="hf",
                        progress=progress, batch_size=batch_size)
    n = len(trace.sentences)
    changed, delta, odds, kl = (torch.full((n,), float("nan")) for _ in range(4))
    answers: list[str | None] = [None] * n
    rewritten: list[str | None] = [None] * n
    finished: list[bool | None] = [None] * n
    seqs, rows = [], []
    for j, end, [c] in zip(which, ends, done):
        new = build_trace(model.tokenizer, prompt=trace.prompt,
                          rendered_prompt=model.render_prompt(trace.prompt),
                          completion_ids=ids[trace.prompt_span.end:end] + list(c.ids),
                          model_name=model.name, segmenter=model.segmenter,
                          annotator=model.annotator,
                          thinking=trace.meta.get("thinking", "auto"))
        closed = new.think_span.end < len(new.token_ids) and len(new.answer_span) > 0
        stop = new.think_span.end if closed else len(new.token_ids)
        seqs.append(list(new.token_ids[:stop]) + closing + ans_ids)
        rows.append(list(range(stop + len(closing) - 1, stop + len(closing) + len(ans_ids) - 1)))
        got = extract(new) if closed else None
        answers[j], finished[j], changed[j] = got, closed, float(got != reference)
        rewritten[j] = model.tokenizer.decode(list(c.ids))
    # step 4: the trace's answer after each rewrite, still masked, batch_size per pass
    for a in range(0, len(which), batch_size):
        part = slice(a, a + batch_size)
        for j, logits in zip(which[part], _score(model, seqs[part], rows[part], hidden[part])):
            delta[j] = float(answer_score(logits, ans_ids, "logprob")) - base_lp
            odds[j] = float(answer_score(logits, ans_ids, "logodds")) - base_lo
            kl[j] = float((base_logp.exp() * (base_logp - logits.log_softmax(-1))).sum())
    return SuppressionTotal(trace, [s.text for s in trace.sentences], which, reference,
                            changed, delta, odds, kl, answers, rewritten, finished,
                            base_lp, base_lo)


def _score(model: Any, seqs: list[list[int]], rows: list[list[int]],
           hidden: list[list[int]]) -> list[Tensor]:
    """:func:`masked_logits` with row ``r``'s keys at positions ``hidden[r]`` masked."""
    mask = torch.zeros((len(seqs), max(map(len, seqs))), dtype=torch.bool)
    for r, h in enumerate(hidden):
        mask[r, h] = True
    return masked_logits(model, seqs, rows, mask)


__all__ = ["SuppressionTotal", "suppression_total"]
