"""Answer-correctness probe and confidence-based early exit (Zhang et al. 2025, "Reasoning
models know when they're right").

1. **Chunk** the thinking (:func:`chunk_thinking`): by keywords, a new chunk at a blank
   line or at a sentence opening with "wait", "double-check", "alternatively", "verify"…
   (natural language); or one chunk per sentence (the organism, whose steps are sentences).
2. **Label** each chunk by its intermediate answer. Here the intermediate answer is the
   *forced* one: the thinking cut after the chunk, the close tag appended (``</think>``),
   and the model's greedy next token. A chunk is correct when that token is the true
   answer's first token. (Zhang et al. extract the answer the chunk states; the forced
   answer is what early exit would actually return, and it is defined for every chunk,
   including the organism's lookup steps that state no value.) A callable
   ``label(trace, chunk_span) -> bool`` replaces it, e.g. for multi-token answers.
3. **Features**: the residual stream after the last layer (``blocks.L.hook_resid_post``,
   before the final norm) at the chunk's last token.
4. **Probe**: logistic regression (or a 1-hidden-layer MLP) with a binary cross-entropy
   whose positive class is weighted ``n_negative / n_positive``, trained on chunks of the
   training traces (split by trace) with :func:`thinklens.probes.linear.fit_probe`.
5. **Early exit** (:func:`early_exit_curve`): for each threshold τ, every test trace stops
   after its first chunk whose predicted confidence is ≥ τ and answers the forced answer
   there; a trace that never reaches τ thinks to the end and keeps its own answer. Report
   the fraction of thinking tokens saved and the accuracy, against τ. Raising τ can only
   move each exit later, so tokens saved never increase with τ.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from thinklens.errors import ConfigError
from thinklens.hooks import forward as fwd
from thinklens.hooks.reprs import compact_repr
from thinklens.hooks.trace import Span, Trace
from thinklens.probes.data import ProbeData, split_traces
from thinklens.probes.lens import answer_ids, first_answer_token, layer_sites
from thinklens.probes.linear import fit_probe

KEYWORDS = ("wait", "but wait", "hmm", "alternatively", "double-check", "double check",
            "let me check", "let me verify", "verify", "check", "actually")
_KEYWORD = re.compile(r"^\W*(" + "|".join(re.escape(k) for k in KEYWORDS) + r")\b", re.I)
CHUNKINGS = ("keywords", "sentences")


@dataclass
class EarlyExitCurve:
    """Tokens saved and accuracy per confidence threshold (axis ``threshold``)."""

    __repr__ = compact_repr  # shapes, not whole tensors (hooks/reprs.py)

    thresholds: Float[Tensor, " threshold"]  # noqa: F722
    tokens_saved: Float[Tensor, " threshold"]  # noqa: F722
    accuracy: Float[Tensor, " threshold"]  # noqa: F722
    exit_rate: Float[Tensor, " threshold"]  # noqa: F722
    full_accuracy: float
    axes: tuple[str, ...] = ("threshold",)

    @property
    def accuracy_kept(self) -> Float[Tensor, " threshold"]:  # noqa: F722
        """Accuracy relative to thinking to the end (1.0 = no loss)."""
        return self.accuracy / max(self.full_accuracy, 1e-12)


@dataclass
class CorrectnessResult:
    """The fitted probe's test scores, per-chunk labels and confidences, and the curve.

    ``labels[i]`` and ``chunks[i]`` cover every trace; ``confidence[k]`` is the probe's
    output on the chunks of test trace ``test_traces[k]``.
    """

    __repr__ = compact_repr  # shapes, not whole tensors (hooks/reprs.py)

    curve: EarlyExitCurve
    test: dict[str, float]
    labels: list[Tensor]
    chunks: list[list[Span]]
    confidence: list[Tensor]
    test_traces: list[int]
    site: str
    meta: dict[str, Any] = field(default_factory=dict)


def chunk_thinking(trace: Trace, by: str = "keywords") -> list[Span]:
    """Token spans of the thinking's chunks.

    Example::

        chunk_thinking(trace, "sentences")   # [Span(24, 30), Span(30, 36), ...]: one per step
        chunk_thinking(trace, "keywords")    # a new chunk at "Wait, ..." or a blank line
    """
    if by not in CHUNKINGS:
        raise ConfigError(f"chunks={by!r}; valid: {', '.join(CHUNKINGS)}")
    groups: list[list] = []
    for k, s in enumerate(trace.sentences):
        gap = trace.text[trace.sentences[k - 1].char_end: s.char_start] if k else ""
        if by == "sentences" or not groups or "\n\n" in gap or _KEYWORD.match(s.text):
            groups.append([s])
        else:
            groups[-1].append(s)
    return [Span(g[0].start, g[-1].end) for g in groups]


def correctness_probe(model, traces, answers: Sequence | None = None, *,
                      chunks: str | None = None, label: str | Callable = "forced",
                      close: str = "</think>", layer: int = -1, hidden: int = 0,
                      pos_weight: float | str = "balanced", l2: float = 1.0,
                      thresholds: Tensor | Sequence[float] | None = None,
                      test_frac: float = 0.3, seed: int = 0,
                      batch_size: int = 16) -> CorrectnessResult:
    """Train the answer-correctness probe and measure confidence-based early exit.

    Example::

        res = correctness_probe(model, traces)        # organism: answers from the prompts
        res.test["auroc"], res.curve.tokens_saved[:3], res.curve.accuracy[:3]

    ``answers``: the true answer per trace (default: ``model.task.answer(trace)``, e.g. the
    organism's, read off its prompt).
    ``chunks``: "keywords" or "sentences" (default: sentences when the model has its own
    step segmenter, as the organism does, else keywords). ``hidden > 0``: an MLP.
    """
    traces = fwd.as_traces(model, traces)
    truth = answer_ids(model, traces, _default_answers(model, traces, answers))
    by = chunks or ("sentences" if model.segmenter is not None else "keywords")
    spans = [chunk_thinking(t, by) for t in traces]
    if sum(map(len, spans)) == 0:
        raise ConfigError("no thinking sentences to chunk in these traces")
    if label == "forced":
        close_ids = model.encode(close)
        prefixes = [t.token_ids[: c.end] + close_ids for t, cs in zip(traces, spans) for c in cs]
        forced = iter(_next_tokens(model, prefixes, batch_size))
        labels = [torch.tensor([next(forced) == a for _ in cs], dtype=torch.bool)
                  for a, cs in zip(truth, spans)]
    elif callable(label):
        labels = [torch.tensor([bool(label(t, c)) for c in cs], dtype=torch.bool)
                  for t, cs in zip(traces, spans)]
    else:
        raise ConfigError(f"label={label!r}; valid: 'forced' or a callable (trace, span) -> bool")
    (site,) = layer_sites(model, [layer])
    ends = [[c.end - 1 for c in cs] for cs in spans]
    feats = [torch.zeros(len(e), model.config.d_model) for e in ends]

    def keep(_site: str, x: Tensor, idx: list[int]) -> None:
        for j, i in enumerate(idx):
            feats[i] = x[j, ends[i]].float().cpu()

    fwd.read(model, traces, [site], keep, batch_size=batch_size)
    group = torch.cat([torch.full((len(e),), i, dtype=torch.long) for i, e in enumerate(ends)])
    y = torch.cat(labels).long()
    # split by trace over all traces (those with no chunk too): the rule of every analysis
    test_traces = split_traces(len(traces), test_frac, seed)[1].tolist()
    is_test = torch.isin(group, torch.tensor(test_traces))
    train, test = (~is_test).nonzero()[:, 0], is_test.nonzero()[:, 0]
    n_pos, n_neg = int(y[train].sum()), int((1 - y[train]).sum())
    if n_pos == 0 or n_neg == 0:
        raise ConfigError(f"training chunks are all {'correct' if n_neg == 0 else 'incorrect'} "
                          f"({n_pos} correct, {n_neg} incorrect); give more or harder traces")
    w = n_neg / n_pos if pos_weight == "balanced" else float(pos_weight)
    tokens = torch.cat([torch.tensor(e, dtype=torch.long) for e in ends])
    data = ProbeData(torch.cat(feats)[None], y, group, tokens, [site], [False, True])
    res = fit_probe(data, (train, test), kind="mlp" if hidden else "logistic", l2=l2,
                    hidden=hidden or 64, class_weight={True: w}, seed=seed)
    conf = res.predict_proba(data.X)[0, :, 1]
    confidence = [conf[group == i] for i in test_traces]
    final = [first_answer_token(t) == a for t, a in zip(traces, truth)]
    think = [traces[i].think_span for i in test_traces]
    curve = early_exit_curve(confidence, [labels[i] for i in test_traces],
                             [torch.tensor([c.end - s.start for c in spans[i]], dtype=torch.long)
                              for i, s in zip(test_traces, think)],
                             [len(s) for s in think], [final[i] for i in test_traces],
                             thresholds)
    return CorrectnessResult(curve=curve, test={k: float(v[0]) for k, v in res.test.items()},
                             labels=labels, chunks=spans, confidence=confidence,
                             test_traces=test_traces, site=site,
                             meta={"chunks": by, "label": label if isinstance(label, str) else
                                   "callable", "pos_weight": w, "positive_rate": float(y.float().mean())})


def early_exit_curve(confidence: Sequence[Tensor], correct: Sequence[Tensor],
                     used: Sequence[Tensor], think_len: Sequence[int],
                     final_correct: Sequence[bool],
                     thresholds: Tensor | Sequence[float] | None = None) -> EarlyExitCurve:
    """Accuracy and thinking tokens saved when each trace stops at its first confident chunk.

    Per trace: ``confidence[i]``, ``correct[i]`` (the chunk's intermediate answer is right)
    and ``used[i]`` (thinking tokens spent up to the chunk's end) are ``[chunk]``;
    ``think_len[i]`` and ``final_correct[i]`` describe thinking to the end.

    Example::

        c = early_exit_curve([torch.tensor([.2, .9])], [torch.tensor([False, True])],
                             [torch.tensor([6, 12])], [12], [True], [0.5, 0.95])
        c.tokens_saved, c.accuracy    # tensor([0., 0.]), tensor([1., 1.])
    """
    taus = torch.linspace(0, 1, 21) if thresholds is None else torch.as_tensor(thresholds).float()
    total = max(1, sum(think_len))
    saved, acc, rate = [], [], []
    for tau in taus.tolist():
        s = hits = exits = 0
        for conf, ok, u, n, fin in zip(confidence, correct, used, think_len, final_correct):
            over = (conf >= tau).nonzero()
            if len(over):
                k = int(over[0])
                s, hits, exits = s + n - int(u[k]), hits + bool(ok[k]), exits + 1
            else:
                hits += bool(fin)
        saved.append(s / total)
        acc.append(hits / max(1, len(confidence)))
        rate.append(exits / max(1, len(confidence)))
    full = sum(map(bool, final_correct)) / max(1, len(final_correct))
    return EarlyExitCurve(taus, torch.tensor(saved), torch.tensor(acc), torch.tensor(rate), full)


def _default_answers(model, traces: list[Trace], answers: Sequence | None) -> Sequence:
    if answers is not None:
        return answers
    if model.task is None:
        raise ConfigError(f"pass answers= (the true answer of each trace); {model.name!r} has "
                          "no task that can read the answers off its prompts")
    return [model.task.answer(t) for t in traces]


def _next_tokens(model, prefixes: list[list[int]], batch_size: int | None = 16) -> list[int]:
    """Greedy next token after each prefix, in input order: ``_next_tokens(model, [[5, 6]]) == [9]``.

    Only the last position of each prefix is unembedded (:func:`thinklens.hooks.forward.run`).
    """
    logits = fwd.run(model, prefixes, logits_at="last", batch_size=batch_size)
    return [int(x[0].argmax()) for x in logits]


__all__ = ["EarlyExitCurve", "CorrectnessResult", "chunk_thinking", "correctness_probe",
           "early_exit_curve"]
