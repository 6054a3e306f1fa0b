"""The report's thought-anchors section: which thinking sentences the answer depends on.

Measures of Bogdan et al. 2025 ("Thought Anchors", arXiv 2506.19143), none of which
needs ground truth (:mod:`thinklens.circuits`):

1. Pick the trace with the most thinking sentences that also wrote a final answer (at
   most :data:`MAX_SENTENCES` sentences are scored, the first ones).
2. Forced answer (:func:`~thinklens.circuits.forced_answer`): the thinking closed after
   each sentence, the probability of the model's own answer read there.
3. Attention suppression (:func:`~thinklens.circuits.suppression`): each sentence's keys
   masked in every head; the change of the answer's log-odds, and the sentence ×
   sentence matrix of effects; :func:`~thinklens.circuits.sentence_attribution`, its
   estimate from one cached pass (exact through the answer's queries, first order through
   the thinking's); :func:`~thinklens.circuits.suppression_total`, the total
   effect of the same mask (the rest rewritten greedily without the sentence, its answer
   compared with an unmasked rewrite's by KL; each rewrite at most as long as the
   trace's rest, :data:`MAX_REWRITE` tokens).
4. Receiver heads (:func:`~thinklens.circuits.receiver_heads`) over every trace with
   enough sentences: heads whose attention to sentences is concentrated (kurtosis of
   vertical scores), and each sentence's receiver score.
5. With ``resample=True``: resampling importance (:func:`~thinklens.circuits.resampling`,
   rollouts from each cut; costly).

A measure the data cannot support (too few sentences, no answer), or that would not fit
the memory budget on a long trace, is left out with the reason in the section's note,
rather than drawn from noise or run out of memory.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from thinklens import circuits as C
from thinklens.errors import BudgetError, ConfigError
from thinklens.hooks.answers import default_extractor
from thinklens.plots import (
    plot_receiver_kurtosis,
    plot_sentence_importance,
    plot_suppression_matrix,
)
from thinklens.report.page import Section, Table

MIN_SENTENCES = 3      # a trace with fewer has nothing to rank
MAX_SENTENCES = 24     # sentences scored at most (suppression runs one pass per sentence)
MAX_REWRITE = 256      # tokens per rewrite of the total effect, at most
_PROXIMITY = 2         # receiver heads: sentences this close to the end are not scored


def _pick(model: Any, trs: list) -> int | None:
    extract = default_extractor(model)
    ok = [k for k, t in enumerate(trs) if len(t.sentences) >= MIN_SENTENCES and extract(t)
          and len(t.answer_span) and not t.truncated]   # suppression scores answer tokens
    return max(ok, key=lambda k: (len(trs[k].sentences), -k)) if ok else None


def anchors(model: Any, trs: list, *, cap: Any = None, resample: bool = False,
            total: bool = True, progress: bool = False) -> Section:
    """The thought-anchors :class:`Section` of the report (module docstring).

    ``total=False`` leaves out the total effect (two greedy rewrites per sentence: on a
    135M model, 2 quiet CPU cores and 24 sentences, the section takes 17.9 s instead of 6.4 s).

    ``cap``: a capture of ``[t for t in trs if t.sentences]`` holding
    ``"sentence_attention"`` (for the receiver heads; captured here when not given)."""
    s = Section(
        "Thought anchors",
        "Which sentences of the thinking the answer depends on (Bogdan et al. 2025). Forced "
        "answer: the thinking is closed after each sentence and the probability of the "
        "model's own final answer is read there; a sentence's importance is the rise it "
        "brings. Suppression: the sentence's keys are masked in every attention head and the "
        "change of the answer's log-odds is measured (attribution: its estimate from one "
        "cached pass, exact through the answer's own queries and first order through the "
        "thinking's; chain: from the same passes, the widest path to the answer through the "
        "drops of what later sentences wrote, for a step the answer reads only through the "
        "steps after it; total effect: the model rewrites the rest of the thinking without seeing "
        "the sentence, and the KL of its answer from that of an unmasked rewrite is "
        "measured). Receiver heads: heads whose attention concentrates on a few sentences "
        "(high kurtosis of the vertical scores); a sentence's receiver score is the "
        "attention those heads pay it from later sentences.")
    k = _pick(model, trs)
    if k is None:
        s.note = (f"Too little data: no finished trace has {MIN_SENTENCES} or more thinking "
                  "sentences and a final answer, so no sentence can be ranked.")
        return s
    trace = trs[k]
    if len(trace.sentences) > MAX_SENTENCES:
        trace = replace(trace, sentences=trace.sentences[:MAX_SENTENCES])
    measures: dict[str, Any] = {}
    notes: list[str] = []

    def attempt(name: str, fn: Any) -> Any:
        try:
            return fn()
        except (ConfigError, BudgetError) as e:   # too little data, or too long a trace
            notes.append(f"{name} left out: {e}")
            return None

    fa = attempt("forced answer", lambda: C.forced_answer(model, trace))
    if fa is not None:
        measures["forced answer"] = fa
    sup = attempt("suppression", lambda: C.suppression(model, trace))
    if sup is not None:
        measures["suppression"] = sup
        measures["chain"] = sup.chain   # the same passes: through the later sentences
    budget = min(MAX_REWRITE, len(trace.token_ids) - trace.sentences[0].end + 8)
    tot = attempt("total effect", lambda: C.suppression_total(
        model, trace, max_new_tokens=budget)) if total else None
    if tot is not None:
        measures["total effect"] = tot.answer_kl
    att = attempt("attribution", lambda: C.sentence_attribution(model, trace))
    if att is not None:
        measures["attribution"] = att
    has = [j for j, t in enumerate(trs) if t.sentences]
    eligible = [j for j in has if len(trs[j].sentences) >= MIN_SENTENCES + _PROXIMITY]
    rh = None
    if len(eligible) >= 2:
        n_heads = model.config.n_heads * max(1, model.config.n_layers - 1)
        source = cap if cap is not None else [trs[j] for j in has]
        rh = attempt("receiver heads", lambda: C.receiver_heads(
            model, source, k=min(8, n_heads), proximity=_PROXIMITY,
            min_sentences=MIN_SENTENCES,
            exclude_layers=(0,) if model.config.n_layers > 1 else ()))
        if rh is not None and trace is trs[k]:
            measures["receiver"] = rh.scores[has.index(k)]
    else:
        notes.append(f"receiver heads left out: {len(eligible)} traces have "
                     f"{MIN_SENTENCES + _PROXIMITY} or more sentences; kurtosis over traces "
                     "needs at least 2")
    if resample:
        ri = attempt("resampling", lambda: C.resampling(model, trace, n=20, max_new_tokens=96,
                                                        comparator="exact", progress=progress))
        if ri is not None:
            measures["resampling"] = ri
    if measures:
        s.figure("anchors-importance", plot_sentence_importance(trace, measures),
                 f"Trace {k}: each measure per thinking sentence, scaled by its largest value.")
    if sup is not None:
        s.figure("anchors-suppression", plot_suppression_matrix(sup),
                 f"Trace {k}: effect on sentence i (row) of masking sentence j's keys (column).")
    if rh is not None:
        s.figure("anchors-receiver-heads", plot_receiver_kurtosis(rh),
                 f"Kurtosis of every head's vertical scores over {len(rh.used)} traces; "
                 f"split-half r = {rh.split_half_r:.2f}.")
    if fa is not None:
        nan = float("nan")
        rows = [[i, sent.text[:80], float(fa.importance[i]),
                 float(-sup.answer_logodds_delta[i]) if sup is not None else nan,
                 float(tot.answer_kl[i]) if tot is not None else nan]
                for i, sent in enumerate(trace.sentences)]
        s.table = Table(["sentence", "text", "forced-answer importance",
                         "suppression (log-odds drop)", "total effect (KL)"], rows, mono=(1,))
    if not resample:
        notes.append("Resampling importance is off (it generates rollouts from every "
                     "sentence; pass resample=True).")
    if not total:
        notes.append("The total effect of suppression is off (it rewrites the thinking "
                     "twice per sentence; pass total=True).")
    s.note = " ".join(notes) or None
    return s


__all__ = ["anchors", "MIN_SENTENCES", "MAX_SENTENCES", "MAX_REWRITE"]
