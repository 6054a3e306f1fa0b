"""The batched fitting core shared by :func:`~thinklens.probes.linear.fit_probe` and
:func:`~thinklens.probes.sweeps.sweep`: many feature sets (sites) times many label sets
(the real labels and a shuffled control) in one computation.

1. **Standardise** (:func:`standardize`) each site's features with the mean and standard
   deviation (ddof 0) of the *training* rows; constant features keep scale 1 (as
   ``StandardScaler``).
2. **Weight rows** (:func:`row_weights`): ``class_weight="balanced"`` gives class ``c``
   weight ``n / (C * n_c)`` over the rows of *that* label set (scikit-learn's rule); a
   dict maps labels to weights. Each label set has its own weight row.
3. **Fit** (:func:`fit_params`), on the stacked ``X [site, n, d]`` and labels
   ``Y [label_set, n]``:

   * ``kind="logistic"``: multinomial logistic regression with an L2 penalty, minimising
     ``sum_i w_i CE(x_i W + b, y_i) + (l2 / 2) ||W||^2`` (the intercept is not
     penalised): scikit-learn's ``LogisticRegression(C=1 / l2)``. Two classes use one
     logit column (the logit of class 1), as scikit-learn does. The solver is L-BFGS
     (Nocedal 1980) batched over problems: each keeps its own curvature history, step
     size and convergence test, while every loss and gradient evaluation is two batched
     matrix products for all sites, on whatever device ``X`` is on (the label sets of a
     site are extra columns of the same product). A problem stops when the largest
     gradient entry of the objective divided by ``sum_i w_i`` is below ``tol``
     (scikit-learn's ``gtol``).
   * ``kind="ridge"``: ``min ||y - Xw - b||^2 + l2 ||w||^2`` in closed form,
     ``w = (X^T X + l2 I)^-1 X^T (y - mean y)`` (scikit-learn's ``Ridge(alpha=l2)``).
   * ``kind="mlp"``: one hidden ReLU layer of ``hidden`` units, full-batch Adam on the
     same penalised loss (cross-entropy, or squared error for regression).

4. **Read out** (:func:`probe_output`): logits to class probabilities (regression: the
   prediction), ready for :func:`thinklens.probes.metrics.score`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Shaped
from torch import Tensor

from thinklens.errors import ConfigError

from .data import ProbeData

KINDS = ("logistic", "ridge", "mlp")  # the probe kinds fit_params fits


def standardize(X: Float[Tensor, "site n d"] | Sequence[Tensor], train: Tensor,  # noqa: F722
                test: Tensor, *, dtype: torch.dtype | None = None, device: Any = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(X_train, X_test, mean, scale)``: rows standardised with the training rows' mean
    and standard deviation (ddof 0; 1 where constant), one site at a time.

    ``X`` is ``[site, n, d]`` or a list of ``[n, d]`` (sites never stacked: no copy).
    ``X_train`` and ``X_test`` are ``[site, n, d]`` laid out as ``[site, d, n]`` in memory
    (what the logistic solver streams fastest); ``mean`` and ``scale`` are ``[site, 1, d]``.
    Computed in ``dtype`` (default float32, or float64 for float64 ``X``) on ``device``.

    Example::

        Xtr, Xte, mean, scale = standardize(data.X, train, test)
        Xtr.shape, mean.shape            # (site, n_train, d), (site, 1, d)
    """
    dtype = dtype or (torch.float64 if X[0].dtype == torch.float64 else torch.float32)
    device = torch.device(device) if device is not None else X[0].device
    S, d = len(X), X[0].shape[-1]
    outs = [torch.empty(S, d, len(r), dtype=dtype, device=device) for r in (train, test)]
    mean = torch.empty(S, 1, d, dtype=dtype, device=device)
    scale = torch.empty_like(mean)
    eps = 1e3 * torch.finfo(dtype).eps
    for k, x in enumerate(X):  # index_select copies (and is ~3x faster than x[rows] on CPU)
        sub = torch.index_select(x, 0, train.to(x.device)).to(device, dtype)
        mean[k] = sub.mean(0, keepdim=True)
        sub -= mean[k]
        sd = (sub * sub).mean(0, keepdim=True).sqrt_()
        scale[k] = torch.where(sd <= eps * mean[k].abs().clamp(min=1), torch.ones_like(sd), sd)
        outs[0][k] = sub.div_(scale[k]).T
        te = torch.index_select(x, 0, test.to(x.device)).to(device, dtype)
        outs[1][k] = te.sub_(mean[k]).div_(scale[k]).T
    return outs[0].transpose(1, 2), outs[1].transpose(1, 2), mean, scale


def _lbfgs(fg, theta: Tensor, *, max_iter: int, tol: float, group: int = 1,
           history: int = 10) -> tuple[Tensor, int, Tensor]:
    """Minimise independent problems ``theta [problem, m]`` with per-problem L-BFGS.

    Problems come in consecutive groups of ``group`` that share features (one site's label
    sets); ``fg(theta_rows, groups) -> (f, g)`` evaluates the problems of the given groups
    only. Once at most half the evaluated groups are still active, only those are
    evaluated (so a few slow sites do not make every site pay). Returns
    ``(theta, iterations, still_active [problem])``.
    """
    P = theta.shape[0]
    ev = torch.arange(P // group, device=theta.device)

    def rows(gr: Tensor) -> Tensor:
        return (gr[:, None] * group + torch.arange(group, device=gr.device)).reshape(-1)

    f, g = fg(theta, ev)
    eps = torch.finfo(theta.dtype).eps
    active = g.abs().amax(1) > tol
    pairs: list[tuple[Tensor, Tensor, Tensor]] = []
    gamma = 1 / g.norm(dim=1).clamp(min=1.0)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - it is returned
        if not active.any():
            break
        live = active.view(-1, group).any(1).nonzero().squeeze(1)
        if 2 * len(live) <= len(ev):
            ev = live
        idx = rows(ev)
        q, alphas = g.clone(), []
        for s, y, rho in reversed(pairs):
            a = rho * (s * q).sum(1)
            q -= a[:, None] * y
            alphas.append(a)
        r = gamma[:, None] * q
        for (s, y, rho), a in zip(pairs, reversed(alphas)):
            r += s * (a - rho * (y * r).sum(1))[:, None]
        d = -r * active[:, None]
        gd = (g * d).sum(1)
        bad = gd >= 0  # not a descent direction: restart from the gradient
        d = torch.where(bad[:, None], -g * active[:, None] * gamma[:, None], d)
        gd = (g * d).sum(1)
        t = torch.ones_like(f)
        pending = active.clone()
        new_theta, new_f, new_g = theta.clone(), f.clone(), g.clone()
        for _ in range(40):  # backtracking (Armijo); convex, so s.y > 0 follows
            trial = theta[idx] + t[idx, None] * d[idx]
            ft, gt = fg(trial, ev)
            ok = pending[idx] & (ft <= f[idx] + 1e-4 * t[idx] * gd[idx])
            hit = idx[ok]
            new_theta[hit], new_f[hit], new_g[hit] = trial[ok], ft[ok], gt[ok]
            pending[hit] = False
            if not pending.any():
                break
            t = torch.where(pending, t / 2, t)
        stuck = pending  # no decrease found at working precision: as converged as it gets
        s, y = new_theta - theta, new_g - g
        sy = (s * y).sum(1)
        good = sy > eps * (y * y).sum(1).clamp(min=eps)
        rho = torch.where(good, 1 / torch.where(good, sy, torch.ones_like(sy)), 0 * sy)
        gamma = torch.where(good, sy / (y * y).sum(1).clamp(min=eps), gamma)
        pairs = (pairs + [(s, y, rho)])[-history:]
        small_step = (f - new_f) <= 10 * eps * torch.maximum(f.abs(), new_f.abs()).clamp(min=1)
        theta, f, g = new_theta, new_f, new_g
        active &= ~stuck & ~(small_step & ~bad) & (g.abs().amax(1) > tol)
    return theta, it, active


@dataclass
class FittedParams:
    """Fitted weights of every (site, label set) probe, on standardised features.

    ``logit`` is the output axis: one column per class, one for two classes (the logit of
    class 1) and one for regression (the prediction). An MLP's output layer is ``W, b``
    and its hidden layer ``hidden = (W1, b1)``; ``d_in`` is ``W``'s input width: ``d`` for
    a linear probe, ``hidden`` for an MLP.
    """

    W: Float[Tensor, "site label_set d_in logit"]  # noqa: F722
    b: Float[Tensor, "site label_set logit"]  # noqa: F722
    hidden: tuple[Float[Tensor, "site label_set d hidden"],  # noqa: F722
                  Float[Tensor, "site label_set hidden"]] | None = None  # noqa: F722
    n_iter: int = 0

    def output(self, X: Float[Tensor, "site n d"]  # noqa: F722
               ) -> Float[Tensor, "site label_set n logit"]:  # noqa: F722
        """Logits (or predictions in ``[..., 0]``) of standardised ``X``."""
        if self.hidden is not None:
            X = torch.relu(_apply(X, self.hidden[0]) + self.hidden[1][:, :, None])
        return _apply(X, self.W) + self.b[:, :, None]


def _apply(X: Tensor, W: Tensor) -> Tensor:
    """``X [B, n, d]`` or ``[B, R, n, d]`` times ``W [B, R, d, K]`` -> ``[B, R, n, K]``."""
    if X.ndim == 4:
        return X @ W
    B, R, d, K = W.shape
    Z = torch.bmm(X, W.permute(0, 2, 1, 3).reshape(B, d, R * K))   # R label sets, one product
    return Z.view(B, -1, R, K).permute(0, 2, 1, 3)


def probe_output(z: Float[Tensor, "... n logit"], task: str  # noqa: F722
                 ) -> Float[Tensor, "... n class"] | Float[Tensor, "... n"]:  # noqa: F722
    """What :func:`~thinklens.probes.metrics.score` reads: class probabilities (a single
    logit column is the logit of class 1 against class 0) or, for regression, predictions.

    Example::

        probe_output(params.output(X_test), "classification").shape   # (site, set, n, C)
    """
    if task == "regression":
        return z[..., 0]
    if z.shape[-1] == 1:
        return torch.cat([torch.zeros_like(z), z], -1).softmax(-1)
    return z.softmax(-1)


def _fit_logistic(X, Y, n_classes, weight, l2, max_iter, tol) -> FittedParams:
    S, n, d = X.shape
    R, K = Y.shape[0], 1 if n_classes == 2 else n_classes
    # features as [S, d, n]: both products of an evaluation then stream X contiguously
    # (on CPU about 1.6x faster than X @ W and X^T @ G on [S, n, d])
    XT = X.transpose(1, 2).contiguous()  # no copy after standardize()
    wn = weight / weight.sum(-1, keepdim=True)                       # [R, n]
    lam = (l2 / weight.sum(-1)).repeat(S)                            # [S*R], site-major
    T = Y.to(X.dtype)[:, None] if K == 1 else F.one_hot(Y, K).to(X.dtype).transpose(1, 2)
    # a class with no training row would pull its intercept to -inf forever: leave it out
    # of the softmax (scikit-learn never sees it) and give it probability 0 at the end
    absent = (torch.bincount(Y.reshape(-1), minlength=K) == 0) if K > 1 else None

    cache: dict[str, Tensor] = {}

    def fg(theta, sites):
        if cache.get("sites") is None or not torch.equal(cache["sites"], sites):
            full = len(sites) == S
            cache.update(sites=sites, XT=XT if full else XT[sites], lam=lam.view(S, R)[sites])
        XTs, lam_s, s_ = cache["XT"], cache["lam"], len(sites)
        th = theta.view(s_, R, d + 1, K)
        W, b = th[:, :, :d], th[:, :, d]
        Z = torch.bmm(W.transpose(2, 3).reshape(s_, R * K, d), XTs).view(s_, R, K, n)
        Z = Z + b[..., None]                                          # [s, R, K, n]
        if K == 1:
            loss = F.softplus(Z[:, :, 0]) - T[:, 0] * Z[:, :, 0]
            G = torch.sigmoid(Z) - T
        else:  # by hand: torch's softmax is slow along a short axis on CPU
            if absent.any():
                Z = Z.masked_fill(absent[:, None], -1e30)
            m = Z.amax(2, keepdim=True)
            E = (Z - m).exp_()
            tot = E.sum(2, keepdim=True)
            loss = (m + tot.log())[:, :, 0] - Z.gather(2, Y.expand(s_, R, n)[:, :, None])[:, :, 0]
            G = E.div_(tot).sub_(T)
        G = G.mul_(wn[:, None])                                       # wn as [R, 1, n]
        f = (loss * wn).sum(-1) + 0.5 * lam_s * W.square().sum((2, 3))
        gW = torch.bmm(XTs, G.view(s_, R * K, n).transpose(1, 2))    # [s, d, R*K]
        gW = gW.view(s_, d, R, K).permute(0, 2, 1, 3) + lam_s[..., None, None] * W
        return f.reshape(-1), torch.cat([gW, G.sum(3)[:, :, None]], 2).reshape(s_ * R, -1)

    theta0 = torch.zeros(S * R, (d + 1) * K, dtype=X.dtype, device=X.device)
    theta, it, active = _lbfgs(fg, theta0, max_iter=max_iter, tol=tol, group=R)
    if active.any():
        warnings.warn(f"L-BFGS stopped at max_iter={max_iter} before the gradient fell below "
                      f"tol={tol} for {int(active.sum())} of {S * R} probes; raise max_iter "
                      "or l2, or loosen tol", RuntimeWarning, stacklevel=3)
    th = theta.view(S, R, d + 1, K).clone()
    if absent is not None:
        th[:, :, d, absent] = -1e4  # exp(-1e4) = 0 in float32 and float64
    return FittedParams(th[:, :, :d].contiguous(), th[:, :, d].contiguous(), n_iter=it)


def _fit_ridge(X, Y, l2) -> FittedParams:
    d = X.shape[2]
    Yf = Y.to(X.dtype)
    mean = Yf.mean(-1)                                                # [R]
    A = X.transpose(1, 2) @ X + l2 * torch.eye(d, dtype=X.dtype, device=X.device)
    W = torch.linalg.solve(A, X.transpose(1, 2) @ (Yf - mean[:, None]).T)   # [S, d, R]
    return FittedParams(W.transpose(1, 2)[..., None], mean.expand(X.shape[0], -1)[..., None].clone())


def _fit_mlp(X, Y, n_classes, weight, l2, *, hidden, steps, lr, seed, task) -> FittedParams:
    S, n, d = X.shape
    R = Y.shape[0]
    K = 1 if task == "regression" or n_classes == 2 else n_classes
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def init(*shape: int) -> Tensor:  # fan-in scaled normal, drawn on the CPU: seedable
        return (torch.randn(*shape, generator=gen) / shape[-2] ** 0.5).to(X).requires_grad_()

    W1 = init(S, R, d, hidden)
    b1 = torch.zeros(S, R, hidden, dtype=X.dtype, device=X.device, requires_grad=True)
    W2 = init(S, R, hidden, K)
    b2 = torch.zeros(S, R, K, dtype=X.dtype, device=X.device, requires_grad=True)
    wn = weight / weight.sum(-1, keepdim=True)
    opt = torch.optim.Adam([W1, b1, W2, b2], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        z = FittedParams(W2, b2, (W1, b1)).output(X)                        # [S, R, n, K]
        if task == "regression":
            loss = (z[..., 0] - Y.to(X.dtype)).square()
        elif K == 1:
            target = Y.to(X.dtype).expand_as(z[..., 0])
            loss = F.binary_cross_entropy_with_logits(z[..., 0], target, reduction="none")
        else:
            loss = -z.log_softmax(-1).gather(-1, Y.expand(S, R, n)[..., None])[..., 0]
        pen = W1.square().sum((2, 3)) + W2.square().sum((2, 3))
        total = (loss * wn).sum(-1) + 0.5 * l2 * pen / weight.sum(-1)
        total.sum().backward()
        opt.step()
    return FittedParams(W2.detach(), b2.detach(), (W1.detach(), b1.detach()), n_iter=steps)


def fit_params(kind: str, X: Tensor, Y: Tensor, task: str, n_classes: int, weight: Tensor, *,
               l2: float, max_iter: int, tol: float, hidden: int, seed: int) -> FittedParams:
    """Fit ``kind`` on standardised ``X [site, n, d]`` for each label set ``Y [label_set, n]``.

    ``weight [label_set, n]`` is each label set's row weights (:func:`row_weights`);
    ``l2``, ``max_iter`` and ``tol`` as in :func:`~thinklens.probes.linear.fit_probe`.

    Example::

        Xtr, Xte, _, _ = standardize(data.X, train, test)
        Y = torch.stack([y_train, y_train[perm]])                 # real and shuffled labels
        w = torch.stack([row_weights(data, labels, "balanced") for labels in Y])
        p = fit_params("logistic", Xtr, Y, "classification", data.n_classes, w.to(Xtr),
                       l2=1.0, max_iter=200, tol=1e-4, hidden=64, seed=0)
        p.W.shape                                                 # (site, 2, d, C)
    """
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r}; valid: {', '.join(KINDS)}")
    if kind == "logistic" and task == "regression":
        raise ConfigError("kind='logistic' needs class labels; use kind='ridge' (or 'mlp') "
                          "for regression targets")
    if kind == "ridge" and task == "classification":
        raise ConfigError("kind='ridge' fits regression targets; use kind='logistic' (or "
                          "'mlp') for classes, or task='regression' in probe_data")
    if not (l2 > 0 or (kind == "mlp" and l2 == 0)):
        raise ConfigError(f"l2={l2!r}; needs a positive penalty (C = 1 / l2 in scikit-learn)")
    if not (isinstance(max_iter, int) and max_iter >= 1 and tol > 0):
        raise ConfigError(f"max_iter={max_iter!r}, tol={tol!r}; need an int >= 1 and tol > 0")
    if kind == "ridge":
        return _fit_ridge(X, Y, l2)
    if kind == "logistic":
        return _fit_logistic(X, Y, n_classes, weight, l2, max_iter, tol)
    return _fit_mlp(X, Y, n_classes, weight, l2, hidden=hidden, steps=max_iter, lr=1e-2,
                    seed=seed, task=task)


def row_weights(data: ProbeData, y: Shaped[Tensor, " n"], class_weight: Any  # noqa: F722
                ) -> Float[Tensor, " n"]:  # noqa: F722
    """Row weights ``[n]`` of labels ``y`` (class indices of ``data.classes``) from
    ``class_weight``: None (all 1), ``"balanced"`` (``n / (C * n_c)``, counted over ``y``
    itself) or ``{label: weight}`` (missing labels weigh 1). Regression rows weigh 1.

    Example::

        row_weights(data, torch.tensor([0, 0, 0, 1]), "balanced")   # [0.667, 0.667, 0.667, 2.]
    """
    if class_weight is None or data.task == "regression":
        return torch.ones(y.shape, dtype=torch.float64)
    counts = torch.bincount(y, minlength=data.n_classes).to(torch.float64)
    if class_weight == "balanced":
        cw = len(y) / (data.n_classes * counts.clamp(min=1))
    elif isinstance(class_weight, dict):
        unknown = [k for k in class_weight if k not in (data.classes or [])]
        if unknown:
            raise ConfigError(f"class_weight names labels {unknown} not among the classes "
                              f"{data.classes}")
        cw = torch.tensor([float(class_weight.get(c, 1.0)) for c in data.classes or []],
                          dtype=torch.float64)
    else:
        raise ConfigError(f"class_weight={class_weight!r}; valid: None, 'balanced', or a dict "
                          "{label: weight}")
    return cw[y]


__all__ = ["KINDS", "FittedParams", "fit_params", "probe_output", "row_weights", "standardize"]
