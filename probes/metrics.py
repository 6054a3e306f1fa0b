"""Probe metrics, batched and weighted, so one call scores every site and every resample.

Every metric takes the true labels ``y [n]`` (shared), predictions with any leading axes
(``[..., n]``, or ``[..., n, class]`` for probabilities) and optional row weights
``[..., n]`` that broadcast against them, and returns one value per leading index.
Weights are what makes the bootstrap cheap:

1. A group bootstrap (Efron & Tibshirani 1993, resampling whole traces, since rows of one
   trace are not independent) draws ``G`` traces with replacement ``B`` times; the draw is
   a count per trace, ``counts [B, G]``.
2. A resample's metric is the metric with row weights ``counts[:, group_of_row]``, so
   ``B`` resamples cost one weighted call with a ``[B, n]`` weight, no copied rows
   (:func:`bootstrap_weights`).
3. The 95 % interval is the 2.5th and 97.5th percentile over resamples.

AUROC is the Mann-Whitney statistic: sort the scores once, sum for each positive the
weight of negatives below it (ties count half); multi-class AUROC is the macro mean of
one-vs-rest AUROCs (as ``sklearn.metrics.roc_auc_score(multi_class="ovr")``). ECE is the
top-label expected calibration error of Guo et al. 2017 ("On calibration of modern
neural networks"; Naeini et al. 2015): bins ``(k/B, (k+1)/B]`` of the confidence,
``sum_k (n_k / n) * |accuracy_k - confidence_k|``.

Correlations between two sets of scores (e.g. attribution estimates against exact
patching effects) are :func:`pearson` (Pearson 1895) and :func:`spearman` (Spearman 1904):

1. keep the pairs where both values are finite (NaN and inf drop out pairwise);
2. Spearman only: replace each side by its 1-based ranks, tied values sharing the average
   of the ranks they span (``scipy.stats.rankdata(method="average")``);
3. Pearson's r of what is left: ``sum dx dy / sqrt(sum dx^2 sum dy^2)`` with ``dx = x - mean
   x``; NaN when fewer than 2 pairs are left or either side is constant (as ``scipy.stats``).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor

from thinklens.errors import ConfigError

# shapes: "..." is any leading axes (sites, label sets, resamples), broadcast together
_Labels = Shaped[Tensor, " n"]            # int64 class indices, or float targets for r2
_Pred = Shaped[Tensor, "... n"]           # predicted class index, or predicted value
_Proba = Float[Tensor, "... n class"]     # class probabilities
_Weight = Float[Tensor, "... n"]          # row weights (bootstrap counts)


def _w(ref: Tensor, weight: Tensor | None) -> Tensor:
    return torch.ones_like(ref, dtype=torch.float64) if weight is None else weight.to(torch.float64)


def accuracy(y: _Labels, pred: _Pred, weight: _Weight | None = None) -> Tensor:
    """Weighted fraction of ``pred == y``; e.g. ``accuracy(y, pred[site, n])`` is ``[site]``."""
    correct = (pred == y).to(torch.float64)
    w = _w(correct, weight)
    return (correct * w).sum(-1) / w.sum(-1)


def balanced_accuracy(y: _Labels, pred: _Pred, n_classes: int,
                      weight: _Weight | None = None) -> Tensor:
    """Mean over classes present in ``y`` of the recall (``balanced_accuracy_score``)."""
    onehot = torch.nn.functional.one_hot(y, n_classes).to(torch.float64)  # [n, C]
    correct = (pred == y).to(torch.float64)
    w = _w(correct, weight)
    w, correct = torch.broadcast_tensors(w, correct)
    support = w @ onehot                                                  # [..., C]
    recall = ((w * correct) @ onehot) / support.clamp(min=1e-300)
    present = support > 0
    return (recall * present).sum(-1) / present.sum(-1)


def _auroc_binary(pos: Tensor, scores: Tensor, weight: Tensor) -> Tensor:
    """Mann-Whitney AUROC along the last axis; ``pos`` bool, all three broadcastable.

    Scores are sorted before they are broadcast against the weights, so ``B`` bootstrap
    weightings of the same scores cost one sort.
    """
    pos, scores = torch.broadcast_tensors(pos, scores)
    s, order = scores.sort(-1)
    p = pos.gather(-1, order)
    shape = torch.broadcast_tensors(s, weight)[0].shape  # broadcast_shapes imports sympy
    w = weight.expand(shape).gather(-1, order.expand(shape))
    w_neg = w.masked_fill(p, 0.0)
    w_pos = w - w_neg
    tie = s[..., 1:] == s[..., :-1]
    if bool(tie.any()):  # tie groups: equal scores share an id; a tied negative counts half
        gid = torch.cat([torch.zeros_like(s[..., :1], dtype=torch.long),
                         (~tie).long().cumsum(-1)], -1).expand(shape)
        neg = torch.zeros_like(w).scatter_add_(-1, gid, w_neg)
        credit = (neg.cumsum(-1) - 0.5 * neg).gather(-1, gid)
    else:
        credit = w_neg.cumsum(-1) - w_neg
    n_pos, n_neg = w_pos.sum(-1), w_neg.sum(-1)
    auc = (w_pos * credit).sum(-1) / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full_like(auc, float("nan")))


def auroc(y: _Labels, scores: _Pred | _Proba, weight: _Weight | None = None) -> Tensor:
    """Area under the ROC curve: binary (``scores [..., n]`` of class 1, or ``[..., n, 2]``)
    or one-vs-rest macro over classes (``scores [..., n, C]``), NaN where undefined.

    Example::

        auroc(y, proba[:, :, 1])   # [site], as roc_auc_score(y, proba[s, :, 1])
    """
    if scores.ndim >= 2 and scores.shape[-1] == 2 and scores.shape[-2] == y.shape[-1]:
        scores = scores[..., 1]
    # float32 weights (bootstrap counts) stay float32: half the traffic of B resamples
    keep = weight is not None and weight.dtype in (torch.float32, torch.float64)
    if scores.shape[-1] == y.shape[-1]:
        return _auroc_binary(y.bool(), scores, weight if keep else _w(scores, weight))
    n_classes = scores.shape[-1]
    pos = y[None, :] == torch.arange(n_classes, device=y.device)[:, None]   # [C, n]
    s = scores.transpose(-1, -2)                                           # [..., C, n]
    w = weight.unsqueeze(-2) if keep else _w(s[..., :1, :], None if weight is None
                                              else weight.unsqueeze(-2))
    return _auroc_binary(pos, s, w).nanmean(-1)                            # macro over C


def r2(y: _Labels, pred: _Pred, weight: _Weight | None = None) -> Tensor:
    """Coefficient of determination, ``1 - SS_res / SS_tot`` (``r2_score``)."""
    y64, p = y.to(torch.float64), pred.to(torch.float64)
    w = _w(p, weight)
    mean = (w * y64).sum(-1, keepdim=True) / w.sum(-1, keepdim=True)
    ss_res = (w * (y64 - p) ** 2).sum(-1)
    ss_tot = (w * (y64 - mean) ** 2).sum(-1)
    return 1 - ss_res / ss_tot


def mse(y: _Labels, pred: _Pred, weight: _Weight | None = None) -> Tensor:
    """Weighted mean squared error."""
    p = pred.to(torch.float64)
    w = _w(p, weight)
    return (w * (y.to(torch.float64) - p) ** 2).sum(-1) / w.sum(-1)


def ece(y: _Labels, proba: _Proba, n_bins: int = 10, weight: _Weight | None = None) -> Tensor:
    """Top-label expected calibration error with ``n_bins`` equal-width bins (Guo et al. 2017)."""
    if n_bins < 1:
        raise ConfigError(f"n_bins={n_bins}; need a positive number of bins (10 is usual)")
    conf, pred = proba.to(torch.float64).max(-1)
    correct = (pred == y).to(torch.float64)
    w = _w(conf, weight)
    w, conf, correct = torch.broadcast_tensors(w, conf, correct)
    k = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    zeros = torch.zeros((*conf.shape[:-1], n_bins), dtype=torch.float64, device=conf.device)
    n_k = zeros.scatter_add(-1, k, w)
    gap = zeros.scatter_add(-1, k, w * (correct - conf))
    return gap.abs().sum(-1) / n_k.sum(-1)


CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "auroc", "ece")
REGRESSION_METRICS = ("r2", "mse")


def score(task: str, y: Tensor, out: Tensor, n_classes: int | None = None,
          weight: Tensor | None = None) -> dict[str, Tensor]:
    """Every metric of ``task`` at once: the names of :data:`CLASSIFICATION_METRICS` or
    :data:`REGRESSION_METRICS`.

    ``out`` is probabilities ``[..., n, C]`` for classification, predictions ``[..., n]``
    for regression; each value has the leading shape of ``out`` (and of ``weight``).
    """
    if task == "regression":
        return {"r2": r2(y, out, weight), "mse": mse(y, out, weight)}
    pred = out.argmax(-1)
    return {"accuracy": accuracy(y, pred, weight),
            "balanced_accuracy": balanced_accuracy(y, pred, n_classes or out.shape[-1], weight),
            "auroc": auroc(y, out, weight),
            "ece": ece(y, out, 10, weight)}


def bootstrap_weights(groups: Int[Tensor, " n"], n_boot: int = 200,  # noqa: F722
                      seed: int = 0) -> Float[Tensor, "boot n"]:  # noqa: F722
    """Row weights of ``n_boot`` resamples of whole groups (traces), with replacement.

    Example::

        w = bootstrap_weights(groups_test, 200)          # [200, n_test]
        accs = accuracy(y_test, pred[site, None, :], w)   # [site, 200]
    """
    if n_boot < 1:
        raise ConfigError(f"n_boot={n_boot}; need at least 1 resample (200 is usual)")
    uniq, inv = torch.unique(groups, return_inverse=True)
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randint(len(uniq), (n_boot, len(uniq)), generator=gen)
    ones = torch.ones(draw.shape)
    counts = torch.zeros(n_boot, len(uniq)).scatter_add_(1, draw, ones)   # float32 counts
    return counts[:, inv.cpu()].to(groups.device)


def percentile_ci(samples: Tensor, level: float = 0.95) -> Tensor:
    """``[..., 2]`` percentile interval over the last axis (NaN resamples ignored)."""
    a = (1 - level) / 2
    q = torch.tensor([a, 1 - a], dtype=samples.dtype, device=samples.device)
    return torch.nanquantile(samples, q, dim=-1).movedim(0, -1)


def _finite_pairs(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    """Both sides flattened to float64 on the CPU, keeping the pairs where both are finite."""
    x, y = (v.detach().to("cpu", torch.float64).reshape(-1) if isinstance(v, Tensor)
            else torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in (x, y))
    if x.shape != y.shape:
        raise ConfigError(f"x and y have {x.numel()} and {y.numel()} values; need one y per x")
    keep = torch.isfinite(x) & torch.isfinite(y)
    return x[keep], y[keep]


def _ranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1-d tensor, ties sharing their average rank (``rankdata``)."""
    xs, order = x.sort(stable=True)
    _, group, counts = torch.unique_consecutive(xs, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)           # last 1-based rank of each tie group
    average = ends - (counts - 1) / 2                   # mean of ranks end-count+1 .. end
    ranks = torch.empty_like(x)
    ranks[order] = average[group]
    return ranks


def _pearson(x: Tensor, y: Tensor) -> float:
    if len(x) < 2 or bool(x.min() == x.max()) or bool(y.min() == y.max()):
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / ((dx * dx).sum() * (dy * dy).sum()).sqrt())


def pearson(x: Any, y: Any) -> float:
    """Pearson's r over the pairs where both values are finite; NaN when either side is
    constant or fewer than 2 pairs are left. ``x`` and ``y``: tensors, arrays or lists of
    one shape (flattened).

    Example::

        pearson([1, 2, 3, 4], [2, 4, 6, 9])          # 0.9944
        pearson([1, 2, float("nan")], [1, 2, 5])     # 1.0: the NaN pair is dropped
    """
    return _pearson(*_finite_pairs(x, y))


def spearman(x: Any, y: Any) -> float:
    """Spearman's rho over the pairs where both values are finite: Pearson's r of the ranks,
    tied values sharing their average rank (``scipy.stats.spearmanr``).

    Example::

        spearman([1, 2, 3, 4], [1, 3, 2, 4])          # 0.8
        spearman(atp.values, exact.values)            # any shapes with one value per cell
    """
    x, y = _finite_pairs(x, y)
    return _pearson(_ranks(x), _ranks(y))


__all__ = ["CLASSIFICATION_METRICS", "REGRESSION_METRICS", "accuracy", "auroc",
           "balanced_accuracy", "bootstrap_weights", "ece", "mse", "pearson", "percentile_ci",
           "r2", "score", "spearman"]
