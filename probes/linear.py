"""Linear (and one-hidden-layer) probes, fitted for every site at once.

Linear probes (Alain & Bengio 2016, "Understanding intermediate layers using linear
classifier probes") ask whether a label is a linear function of a layer's activations.
:func:`fit_probe` fits one per site, all sites in one batched computation (the core is
:mod:`thinklens.probes._fit`, shared with the sweep):

1. **Split** by trace (:func:`~thinklens.probes.data.group_split`) unless a split is given.
2. **Standardise** each site's features with the training rows' mean and standard
   deviation (ddof 0; constant features keep scale 1), as ``StandardScaler``.
3. **Fit** every site in one batched fit: ``kind="logistic"`` is scikit-learn's
   ``LogisticRegression(C=1 / l2)`` (multinomial, L2 on the weights, intercept free;
   batched L-BFGS), ``kind="ridge"`` is ``Ridge(alpha=l2)`` in closed form, ``kind="mlp"``
   one hidden ReLU layer trained with Adam on the same penalised loss.
4. **Class weights**: ``"balanced"`` gives class ``c`` weight ``n / (C * n_c)`` over the
   training rows, as scikit-learn; a dict maps labels to weights.
5. **Score** train and test rows with :func:`thinklens.probes.metrics.score`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from thinklens.errors import ConfigError
from thinklens.hooks.reprs import compact_repr

from . import metrics as _metrics
from ._fit import FittedParams, fit_params, probe_output, row_weights, standardize
from .data import ProbeData, group_split


@dataclass
class ProbeResult:
    """A probe per site: weights (on standardised features) and train/test metrics.

    ``W [site, d, logit]`` and ``b`` map standardised features ``(x - mean) / scale`` to
    logits (one ``logit`` column for two classes: the logit of class 1; regression: the
    prediction). For an MLP they are the output layer (``W [site, hidden, logit]``: its
    ``d_in`` is the hidden width) and ``hidden = (W1 [site, d, hidden], b1 [site, hidden])``. ``train`` and ``test`` map each
    metric name to its value per site.

    Example::

        res = fit_probe(data)                  # logistic, split by trace
        res.test["accuracy"]                   # tensor [site]
        res.best_site                          # 'blocks.3.hook_resid_post'
        res.predict_proba(data.X).shape        # (site, n, class)
    """

    __repr__ = compact_repr  # shapes, not whole tensors (hooks/reprs.py)

    sites: list[str]
    kind: str
    task: str
    classes: list[Any] | None
    W: Float[Tensor, "site d_in logit"]  # noqa: F722
    b: Float[Tensor, "site logit"]  # noqa: F722
    mean: Float[Tensor, "site d"]  # noqa: F722
    scale: Float[Tensor, "site d"]  # noqa: F722
    train: dict[str, Float[Tensor, " site"]]  # noqa: F722
    test: dict[str, Float[Tensor, " site"]]  # noqa: F722
    hidden: tuple[Float[Tensor, "site d hidden"],  # noqa: F722
                  Float[Tensor, "site hidden"]] | None = None  # noqa: F722
    n_iter: int = 0

    def _out(self, X: Tensor) -> Tensor:
        Xs = ((X.to(self.mean) - self.mean[:, None]) / self.scale[:, None]).to(self.W.dtype)
        hid = None if self.hidden is None else (self.hidden[0][:, None], self.hidden[1][:, None])
        params = FittedParams(self.W[:, None], self.b[:, None], hid)
        return probe_output(params.output(Xs)[:, 0], self.task)

    def predict_proba(self, X: Float[Tensor, "site n d"]  # noqa: F722
                      ) -> Float[Tensor, "site n class"]:  # noqa: F722
        """Class probabilities of raw (unstandardised) features ``X``."""
        if self.task != "classification":
            raise ConfigError("predict_proba needs a classification probe; use predict()")
        return self._out(X)

    def predict(self, X: Float[Tensor, "site n d"]  # noqa: F722
                ) -> Shaped[Tensor, "site n"]:  # noqa: F722
        """Class index (classification) or value (regression) per site and row."""
        out = self._out(X)
        return out.argmax(-1) if self.task == "classification" else out

    @property
    def best_site(self) -> str:
        """The site with the highest test accuracy (R² for regression)."""
        m = self.test["accuracy" if self.task == "classification" else "r2"]
        return self.sites[int(torch.nan_to_num(m, nan=-1e9).argmax())]


def fit_probe(data: ProbeData, split: tuple[Tensor, Tensor] | None = None, *,
              kind: str = "logistic", l2: float = 1.0, class_weight: Any = None,
              hidden: int = 64, max_iter: int = 200, tol: float = 1e-4,
              dtype: torch.dtype | None = None, seed: int = 0) -> ProbeResult:
    """Fit one probe per site of ``data`` (on ``data.X``'s device) and score it.

    ``split`` is ``(train_rows, test_rows)``; by default :func:`group_split` (by trace).
    ``l2`` is the L2 strength: ``C = 1 / l2`` for ``LogisticRegression``, ``alpha = l2``
    for ``Ridge``. ``max_iter`` bounds L-BFGS iterations (Adam steps for ``mlp``).

    Example::

        res = fit_probe(data, kind="logistic", l2=1.0, class_weight="balanced")
        res.test["accuracy"], res.test["auroc"]      # [site] each
    """
    train, test = split if split is not None else group_split(data, seed=seed)
    Xtr, Xte, mean, scale = standardize(data.X, train, test, dtype=dtype)
    y = data.y.to(data.X.device)
    weight = row_weights(data, data.y[train], class_weight).to(Xtr)
    p = fit_params(kind, Xtr, y[train][None], data.task, data.n_classes, weight[None], l2=l2,
                   max_iter=max_iter, tol=tol, hidden=hidden, seed=seed)
    scores = [_metrics.score(data.task, y[rows], probe_output(p.output(Xr)[:, 0], data.task),
                             data.n_classes) for rows, Xr in ((train, Xtr), (test, Xte))]
    hid = None if p.hidden is None else (p.hidden[0][:, 0], p.hidden[1][:, 0])
    return ProbeResult(list(data.sites), kind, data.task, data.classes, p.W[:, 0], p.b[:, 0],
                       mean[:, 0], scale[:, 0], scores[0], scores[1], hid, p.n_iter)


__all__ = ["ProbeResult", "fit_probe"]
