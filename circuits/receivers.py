"""Receiver heads: attention heads that point many later sentences at a few earlier ones.

Thought Anchors (Bogdan et al. 2025, arXiv 2506.19143), as the reference code
(github interp-reasoning/thought-anchors) computes it:

1. **Sentence attention** per trace: ``A[layer, head, i, j]`` = mean token-to-token weight
   from the tokens of thinking sentence ``i`` to those of ``j``
   (``model.capture(traces, attention="sentence")``, blockwise from q/k on SDPA).
2. **Vertical scores** (:func:`thinklens.hooks.blockwise.vertical_scores`): ``v_j`` = mean
   of column ``j`` over the rows ``i >= j + proximity``; the last ``proximity`` sentences
   have none (NaN) and are left out.
3. **Kurtosis**: per trace and head, the Fisher kurtosis of ``v`` over the scored sentences
   (``m4 / m2² − 3`` with biased moments, as ``scipy.stats.kurtosis(fisher=True)``);
   traces with fewer than ``min_sentences`` scored sentences are skipped. Averaged over
   the traces (NaN-aware).
4. **Receiver heads**: the ``k`` heads of highest mean kurtosis outside ``exclude_layers``.
   A sentence's **receiver score** is its ``v_j`` averaged over them.
5. **Reliability**: Pearson r, over the heads outside ``exclude_layers``, between the mean
   kurtosis of the odd-numbered and of the even-numbered traces (split half).

Defaults are the reference's: ``proximity=4``, ``k=20``, layer 0 excluded (its heads
attend by position and recency, not content). Models with few heads or short thinking
need others: the 4-layer, 4-head organisms have 16 heads (12 outside layer 0), so
``k=20`` is impossible, and ``proximity=4`` leaves too few scored sentences on short
traces; they use e.g. ``k=3, proximity=2`` (see ``notebooks/07_thought_anchors``).

Example::

    from thinklens.circuits import receiver_heads

    rh = receiver_heads(model, traces, k=3, proximity=2)
    rh.kurtosis.shape          # (layer, head)
    rh.top_heads               # [(3, 1), (2, 0), (3, 2)]
    rh.scores[0].shape         # (sentence,): trace 0's receiver score per sentence
    rh.split_half_r
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from thinklens.errors import ConfigError
from thinklens.hooks import forward as fwd
from thinklens.hooks.activations import ActivationReader
from thinklens.hooks.blockwise import vertical_scores
from thinklens.hooks.trace import Trace

SENTENCE_KEY = "sentence_attention"  # the capture key of attention="sentence"


@dataclass
class ReceiverHeads:
    """Receiver heads of a set of traces and every sentence's receiver score.

    ``kurtosis[layer, head]``: mean over traces of the kurtosis of the head's vertical
    scores (NaN in ``exclude_layers`` is not set: the grid shows them; they are only kept
    out of ``top_heads`` and the reliability); ``per_trace[t, layer, head]`` (NaN for
    skipped traces); ``vertical[t]`` ``[layer, head, sentence]``; ``scores[t]``
    ``[sentence]`` (NaN for the last ``proximity`` sentences).
    """

    kurtosis: Float[Tensor, "layer head"]
    per_trace: Float[Tensor, "trace layer head"]
    top_heads: list[tuple[int, int]]
    vertical: list[Tensor]  # per trace [layer, head, sentence] (ragged sentences)
    scores: list[Tensor]    # per trace [sentence]
    split_half_r: float
    proximity: int
    k: int
    exclude_layers: tuple[int, ...]
    used: list[int]

    @property
    def eligible(self) -> torch.Tensor:
        """Bool ``[layer, head]``: heads outside ``exclude_layers``."""
        keep = torch.ones_like(self.kurtosis, dtype=torch.bool)
        keep[list(self.exclude_layers)] = False
        return keep


def fisher_kurtosis(x: Float[Tensor, "*batch sentence"]) -> Float[Tensor, "*batch"]:
    """Fisher kurtosis along the last axis, biased moments (``scipy.stats.kurtosis``)."""
    d = x - x.mean(-1, keepdim=True)
    m2 = (d ** 2).mean(-1)
    m4 = (d ** 4).mean(-1)
    return torch.where(m2 > 0, m4 / m2.clamp(min=torch.finfo(x.dtype).tiny) ** 2 - 3.0,
                       torch.full_like(m2, float("nan")))


def _pearson(x: Tensor, y: Tensor) -> float:
    ok = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[ok].double(), y[ok].double()
    if len(x) < 3:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    den = (dx.square().sum() * dy.square().sum()).sqrt()
    return float((dx * dy).sum() / den) if den > 0 else float("nan")


def _check(model, k: int, proximity: int, exclude_layers: Sequence[int], min_sentences: int
           ) -> tuple[int, ...]:
    n_layers, n_heads = model.config.n_layers, model.config.n_heads
    excl = tuple(sorted({int(x) for x in exclude_layers}))
    bad = [x for x in excl if not 0 <= x < n_layers]
    if bad:
        raise ConfigError(f"exclude_layers has layer {bad[0]}; valid 0..{n_layers - 1}")
    if not isinstance(proximity, int) or proximity < 0:
        raise ConfigError(f"proximity={proximity!r}; need an integer >= 0")
    if not isinstance(min_sentences, int) or min_sentences < 2:
        raise ConfigError(f"min_sentences={min_sentences!r}; need an integer >= 2 "
                          "(kurtosis needs a spread of scores)")
    avail = (n_layers - len(excl)) * n_heads
    if not isinstance(k, int) or not 1 <= k <= avail:
        raise ConfigError(f"k={k!r} receiver heads; valid 1..{avail} ({n_layers} layers × "
                          f"{n_heads} heads, layers {list(excl)} excluded). A small model "
                          "needs a smaller k than the reference's 20")
    return excl


def receiver_heads(model, traces: Trace | Sequence[Trace] | ActivationReader, *, k: int = 20,
                   proximity: int = 4, exclude_layers: Sequence[int] = (0,),
                   min_sentences: int = 4, batch_size: int = 8) -> ReceiverHeads:
    """Rank heads by the kurtosis of their vertical scores; score sentences by the top ``k``.

    ``traces``: traces (their sentence attention is captured here) or a capture/store
    already holding ``"sentence_attention"``. ``min_sentences``: scored sentences
    (``len(sentences) - proximity``) a trace needs to count.
    """
    excl = _check(model, k, proximity, exclude_layers, min_sentences)
    if isinstance(traces, ActivationReader):
        if SENTENCE_KEY not in traces.keys:
            raise ConfigError(f"the capture has no {SENTENCE_KEY!r}; capture it with "
                              "model.capture(traces, attention='sentence')")
        cap = traces
    else:
        cap = model.capture(fwd.as_traces(model, traces), attention="sentence",
                            batch_size=batch_size)
    acts = cap[SENTENCE_KEY]
    n_layers, n_heads = model.config.n_layers, model.config.n_heads
    vertical, per_trace, used = [], [], []
    for t in range(acts.values.shape[0]):
        a = acts.unpadded(t).float()                                   # [L, H, S, S]
        v = vertical_scores(a, proximity)                              # [L, H, S]
        vertical.append(v)
        n = v.shape[-1] - proximity
        if n >= min_sentences:
            per_trace.append(fisher_kurtosis(v[..., :n]))
            used.append(t)
        else:
            per_trace.append(torch.full((n_layers, n_heads), float("nan")))
    if not used:
        longest = max((v.shape[-1] for v in vertical), default=0)
        raise ConfigError(f"no trace has {min_sentences} scored sentences with proximity="
                          f"{proximity} (need {min_sentences + proximity} thinking sentences; "
                          f"the longest has {longest}); lower proximity or min_sentences, "
                          "or give longer traces")
    kurt_t = torch.stack(per_trace)
    kurt = kurt_t.nanmean(0)
    keep = torch.ones((n_layers, n_heads), dtype=torch.bool)
    keep[list(excl)] = False
    ranked = kurt.where(keep & torch.isfinite(kurt), torch.tensor(float("-inf")))
    top = ranked.flatten().argsort(descending=True)[:k]
    top_heads = [(int(i) // n_heads, int(i) % n_heads) for i in top]
    li = torch.tensor([h[0] for h in top_heads])
    hi = torch.tensor([h[1] for h in top_heads])
    scores = [v[li, hi].mean(0) for v in vertical]
    odd, even = kurt_t[used[1::2]], kurt_t[used[0::2]]
    r = (_pearson(odd.nanmean(0)[keep], even.nanmean(0)[keep])
         if len(odd) and len(even) else float("nan"))
    return ReceiverHeads(kurt, kurt_t, top_heads, vertical, scores, r, proximity, k, excl, used)


__all__ = ["ReceiverHeads", "receiver_heads", "fisher_kurtosis"]
