"""Linear (and one-hidden-layer) probes, fitted for every site at once.

Linear probes (Alain & Bengio 2016, "Understanding intermediate layers using linear
classifier probes") ask whether a label is a linear function of a layer's activations.
:func:`fit_probe` fits one per site, all sites in one batched computation:

1. **Standardise** each site's features with the mean and standard deviation (ddof 0) of
   the *training* rows; constant features keep scale 1 (as ``StandardScaler``).
2. **Fit**, on the stacked ``X [site, n, d]``:

   * ``kind="logistic"``: multinomial logistic regression with an L2 penalty, minimising
     ``sum_i w_i CE(x_i W + b, y_i) + (l2 / 2) ||W||^2`` (the intercept is not
     penalised): scikit-learn's ``LogisticRegression(C=1 / l2)``. Two classes use one
     logit column (the logit of class 1), as scikit-learn does. The solver is L-BFGS
     (Nocedal 1980) batched over sites: each site keeps its own curvature history, step
     size and convergence test, while every loss and gradient evaluation is two batched
     matrix products for all sites, on whatever device ``X`` is on. It stops a site when
     the largest gradient entry of the objective divided by ``sum_i w_i`` is below
     ``tol`` (scikit-learn's ``gtol``).
   * ``kind="ridge"``: ``min ||y - Xw - b||^2 + l2 ||w||^2`` in closed form,
     ``w = (X^T X + l2 I)^-1 X^T (y - mean y)`` (scikit-learn's ``Ridge(alpha=l2)``).
   * ``kind="mlp"``: one hidden ReLU layer of ``hidden`` units, full-batch Adam on the
     same penalised loss (cross-entropy, or squared error for regression).

3. **Class weights**: ``"balanced"`` gives class ``c`` weight ``n / (C * n_c)`` over
   the training rows, as scikit-learn; a dict maps labels to weights.
4. **Score** train and test rows with :func:`thinklens.probes.metrics.score`.

Several label sets (e.g. the real labels and a shuffled control) are fitted in the same
pass: their weights are extra columns of one matrix product.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from thinklens.errors import ConfigError

from . import metrics as _metrics
from .data import ProbeData, group_split

KINDS = ("logistic", "ridge", "mlp")


def standardize(X: Float[Tensor, "site n d"] | Sequence[Tensor], train: Tensor,  # noqa: F722
                test: Tensor, *, dtype: torch.dtype | None = None, device: Any = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(X_train, X_test, mean, scale)``: rows standardised with the training rows' mean
    and standard deviation (ddof 0; 1 where constant), one site at a time.

    ``X`` is ``[site, n, d]`` or a list of ``[n, d]`` (sites never stacked: no copy).
    ``X_train`` and ``X_test`` are ``[site, n, d]`` laid out as ``[site, d, n]`` in memory
    (what the logistic solver streams fastest); ``mean`` and ``scale`` are ``[site, 1, d]``.
    Computed in ``dtype`` (default float32, or float64 for float64 ``X``) on ``device``.
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
class _Params:
    """Fitted weights of ``B`` feature sets (sites) times ``R`` label sets."""

    W: Tensor                   # [B, R, d, K]
    b: Tensor                   # [B, R, K]
    hidden: tuple[Tensor, Tensor] | None = None   # W1 [B, R, d, h], b1 [B, R, h]
    n_iter: int = 0

    def output(self, X: Tensor) -> Tensor:
        """Logits ``[B, R, n, K]`` (or predictions in ``[..., 0]``) of ``X [B, n, d]``."""
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


def _as_output(z: Tensor, task: str) -> Tensor:
    if task == "regression":
        return z[..., 0]
    if z.shape[-1] == 1:
        return torch.cat([torch.zeros_like(z), z], -1).softmax(-1)
    return z.softmax(-1)


def _fit_logistic(X, Y, n_classes, weight, l2, max_iter, tol) -> _Params:
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
    return _Params(th[:, :, :d].contiguous(), th[:, :, d].contiguous(), n_iter=it)


def _fit_ridge(X, Y, l2) -> _Params:
    d = X.shape[2]
    Yf = Y.to(X.dtype)
    mean = Yf.mean(-1)                                                # [R]
    A = X.transpose(1, 2) @ X + l2 * torch.eye(d, dtype=X.dtype, device=X.device)
    W = torch.linalg.solve(A, X.transpose(1, 2) @ (Yf - mean[:, None]).T)   # [S, d, R]
    return _Params(W.transpose(1, 2)[..., None], mean.expand(X.shape[0], -1)[..., None].clone())


def _fit_mlp(X, Y, n_classes, weight, l2, *, hidden, steps, lr, seed, task) -> _Params:
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
        z = _Params(W2, b2, (W1, b1)).output(X)                        # [S, R, n, K]
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
    return _Params(W2.detach(), b2.detach(), (W1.detach(), b1.detach()), n_iter=steps)


def fit_params(kind: str, X: Tensor, Y: Tensor, task: str, n_classes: int, weight: Tensor, *,
               l2: float, max_iter: int, tol: float, hidden: int, seed: int) -> _Params:
    """Fit ``kind`` on standardised ``X [B, n, d]`` for each label set ``Y [R, n]``."""
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


def row_weights(data: ProbeData, y: Tensor, class_weight: Any) -> Tensor:
    """Per-row weight from ``class_weight`` (None, ``"balanced"`` or ``{label: weight}``)."""
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


@dataclass
class ProbeResult:
    """A probe per site: weights (on standardised features) and train/test metrics.

    ``W [site, d, k]`` and ``b`` map standardised features ``(x - mean) / scale`` to logits
    (``k = 1`` for two classes: the logit of class 1; regression: the prediction). For an
    MLP they are the output layer and ``hidden = (W1 [site, d, h], b1 [site, h])``.

    Example::

        res = fit_probe(data)                  # logistic, split by trace
        res.test["accuracy"]                   # tensor [site]
        res.best_site                          # 'blocks.3.hook_resid_post'
        res.predict_proba(data.X).shape        # (site, n, class)
    """

    sites: list[str]
    kind: str
    task: str
    classes: list[Any] | None
    W: Float[Tensor, "site d k"]  # noqa: F722
    b: Float[Tensor, "site k"]  # noqa: F722
    mean: Float[Tensor, "site d"]  # noqa: F722
    scale: Float[Tensor, "site d"]  # noqa: F722
    train: dict[str, Tensor]
    test: dict[str, Tensor]
    hidden: tuple[Tensor, Tensor] | None = None
    n_iter: int = 0

    def _out(self, X: Tensor) -> Tensor:
        Xs = ((X.to(self.mean) - self.mean[:, None]) / self.scale[:, None]).to(self.W.dtype)
        hid = None if self.hidden is None else (self.hidden[0][:, None], self.hidden[1][:, None])
        return _as_output(_Params(self.W[:, None], self.b[:, None], hid).output(Xs)[:, 0],
                          self.task)

    def predict_proba(self, X: Float[Tensor, "site n d"]  # noqa: F722
                      ) -> Float[Tensor, "site n C"]:  # noqa: F722
        """Class probabilities of raw (unstandardised) features ``X``."""
        if self.task != "classification":
            raise ConfigError("predict_proba needs a classification probe; use predict()")
        return self._out(X)

    def predict(self, X: Float[Tensor, "site n d"]) -> Tensor:  # noqa: F722
        """Class index (classification) or value (regression) per site and row."""
        out = self._out(X)
        return out.argmax(-1) if self.task == "classification" else out

    @property
    def best_site(self) -> str:
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
    scores = [_metrics.score(data.task, y[rows], _as_output(p.output(Xr)[:, 0], data.task),
                             data.n_classes) for rows, Xr in ((train, Xtr), (test, Xte))]
    hid = None if p.hidden is None else (p.hidden[0][:, 0], p.hidden[1][:, 0])
    return ProbeResult(list(data.sites), kind, data.task, data.classes, p.W[:, 0], p.b[:, 0],
                       mean[:, 0], scale[:, 0], scores[0], scores[1], hid, p.n_iter)
