"""Total effect of suppressing a thinking sentence: the model rewrites what follows.

:func:`thinklens.circuits.suppression` (Bogdan et al. 2025, "Thought Anchors", arXiv
2506.19143) measures *direct* effects: sentence ``j``'s keys are hidden but every later
sentence stays as written, so a step whose value reaches the answer only through the
steps after it (``a = 7 .`` → ``b = 7 - 2 = 5 .`` → answer) shows none. In the terms of
causal mediation (Pearl 2001; Vig et al. 2020 for transformers) that is the direct
effect; :func:`suppression_total` measures the **total** effect of the same
intervention, with the text after ``j`` as the model writes it when it cannot see ``j``:

1. For each thinking sentence ``j``: the prefix ``trace.token_ids[:end_j]`` (cut by
   token position) is continued greedily by the ``hf`` engine twice — with ``j``'s keys
   hidden from every query, in the prefix and at every generated token
   (``Request(hidden=...)``: zeros in the attention mask, positions unchanged; the same
   masking as a hook setting those score columns to the minimum), and as it is (the
   **control**). All rewrites go to the engine in one call (batched, SDPA, no hooks).
2. Each continuation is read as a trace (its own thinking and answer, extracted as the
   trace's is). ``changed[j]`` = the masked rewrite's answer differs from the control's.
   The control, not the trace's own answer, is the reference: a trace sampled at
   temperature 1 may keep a mistake after ``j`` that a greedy rewrite does not make, and
   that difference is the decoding's, not the mask's (the same control as the added-
   mistake test's greedy regeneration of the unedited prefix).
3. Scored answer: the control's answer (the trace's own where the control never closes
   its thinking), teacher-forced after each continuation's thinking and the trace's
   closing text (the tokens between its thinking and its answer, e.g. ``</think>``), with
   ``j`` still masked after the masked rewrite. ``answer_delta[j]`` /
   ``answer_logodds_delta[j]`` = its log-probability / log-odds after the masked rewrite
   minus after the control; ``answer_kl[j]`` = KL(control ‖ masked) of the answer
   distributions, summed over the answer tokens. A continuation that never closes its
   thinking is closed there (``finished[j]`` False).

Cost: two greedy rewrites per suppressed sentence (at most ``max_new_tokens`` each,
batched by the engine) and one eager scoring pass per ``batch_size`` scored sequences.

Example::

    from thinklens.circuits import suppression_total

    tot = suppression_total(model, trace)
    tot.changed             # [sentence]: 1.0 where hiding it leads to another answer
    tot.rewritten[2]        # what the model wrote after sentence 2 without seeing it
    tot.controls[2]         # ... and the answer it reaches from there seeing everything
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from thinklens.circuits.anchors_attention import (
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
    summed ``answer_kl``; ``answers`` the masked rewrites' answers, ``rewritten`` their
    completion text after the sentence, ``finished`` whether they closed their thinking;
    ``controls`` / ``control_rewritten`` / ``control_logprob`` / ``control_logodds``: the
    unmasked rewrites' answers, text, and scores of the scored answer. ``reference`` is
    the trace's own answer.
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
    controls: list[str | None]
    control_rewritten: list[str | None]
    control_logprob: Float[Tensor, " sentence"]
    control_logodds: Float[Tensor, " sentence"]


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
    closing, own_answer = ids[te:a0], ids[a0:a1]
    sent_of = trace.sentence_of_token()
    ends = [trace.sentences[j].end for j in which]
    hidden = [[k for k in range(end) if sent_of[k] == j] for j, end in zip(which, ends)]
    # step 1: masked and control rewrites of every sentence in one engine call
    reqs = [r for end, h in zip(ends, hidden)
            for r in (Request(ids[:end], hidden=tuple(h)), Request(ids[:end]))]
    done = generate_ids(model, reqs, Sampling(max_new_tokens=max_new_tokens), engine="hf",
                        progress=progress, batch_size=batch_size)
    n = len(trace.sentences)
    changed, delta, odds, kl, c_lp, c_lo = (torch.full((n,), float("nan")) for _ in range(6))
    answers, rewritten, finished, controls, c_text = ([None] * n for _ in range(5))
    seqs, rows, masks, scored_ids = [], [], [], []
    for q, (j, end) in enumerate(zip(which, ends)):
        (masked,), (control,) = done[2 * q], done[2 * q + 1]
        read = [_read(model, trace, ids[trace.prompt_span.end:end] + list(c.ids), extract)
                for c in (masked, control)]
        (m_stop, m_ans, m_ids), (c_stop, c_ans, c_ids) = read
        answers[j], finished[j], controls[j] = m_ans, m_ids is not None, c_ans
        rewritten[j] = model.tokenizer.decode(list(masked.ids))
        c_text[j] = model.tokenizer.decode(list(control.ids))
        changed[j] = float(m_ans != c_ans)
        scored = c_ids if c_ids is not None else own_answer
        scored_ids.append(scored)
        for stop, h in ((m_stop, hidden[q]), (c_stop, [])):
            seqs.append(stop + closing + scored)
            rows.append(list(range(len(stop) + len(closing) - 1,
                                   len(stop) + len(closing) + len(scored) - 1)))
            masks.append(h)
    # step 3: the control's answer after both rewrites, batch_size sequences per pass
    logits = [x for a in range(0, len(seqs), batch_size)
              for x in _score(model, seqs[a:a + batch_size], rows[a:a + batch_size],
                              masks[a:a + batch_size])]
    for q, j in enumerate(which):
        m_logits, c_logits = logits[2 * q], logits[2 * q + 1]
        scored = scored_ids[q]
        lp = [float(answer_score(x, scored, "logprob")) for x in (m_logits, c_logits)]
        lo = [float(answer_score(x, scored, "logodds")) for x in (m_logits, c_logits)]
        c_lp[j], c_lo[j] = lp[1], lo[1]
        delta[j], odds[j] = lp[0] - lp[1], lo[0] - lo[1]
        c_logp = c_logits.log_softmax(-1)
        kl[j] = float((c_logp.exp() * (c_logp - m_logits.log_softmax(-1))).sum())
    return SuppressionTotal(trace, [s.text for s in trace.sentences], which, reference,
                            changed, delta, odds, kl, answers, rewritten, finished,
                            controls, c_text, c_lp, c_lo)


def _read(model: Any, trace: Trace, completion: list[int],
          extract: Callable[[Trace], str | None]) -> tuple[list[int], str | None,
                                                           list[int] | None]:
    """A rewrite read as a trace: its ids up to its thinking's end (all of them when it
    never closes its thinking), its extracted answer, and its answer's ids (None: not
    closed)."""
    new = build_trace(model.tokenizer, prompt=trace.prompt,
                      rendered_prompt=model.render_prompt(trace.prompt),
                      completion_ids=completion, model_name=model.name,
                      segmenter=model.segmenter, annotator=model.annotator,
                      thinking=trace.meta.get("thinking", "auto"))
    closed = new.think_span.end < len(new.token_ids) and len(new.answer_span) > 0
    if not closed:
        return list(new.token_ids), None, None
    a = new.answer_span
    return list(new.token_ids[:new.think_span.end]), extract(new), list(new.token_ids[a.start:a.end])


def _score(model: Any, seqs: list[list[int]], rows: list[list[int]],
           hidden: list[list[int]]) -> list[Tensor]:
    """:func:`masked_logits` with row ``r``'s keys at positions ``hidden[r]`` masked."""
    mask = torch.zeros((len(seqs), max(map(len, seqs))), dtype=torch.bool)
    for r, h in enumerate(hidden):
        mask[r, h] = True
    return masked_logits(model, seqs, rows, mask)


__all__ = ["SuppressionTotal", "suppression_total"]
