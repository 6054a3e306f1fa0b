"""Correlations of thinklens.probes.metrics against scipy.stats; the sweep's control under
class weights against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from thinklens.errors import ConfigError
from thinklens.probes import metrics as M
from thinklens.probes.data import ProbeData, group_split
from thinklens.probes.linear import fit_probe
from thinklens.probes.metrics import pearson, spearman
from thinklens.probes.sweeps import sweep

# ---- correlations ------------------------------------------------------------------------


def test_pearson_and_spearman_match_scipy_on_continuous_data():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 200):
        x = rng.normal(size=n)
        y = 0.5 * x + rng.normal(size=n)
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    # tensors of any shape are flattened; a hand-computed value
    assert spearman(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1, 3, 2, 4])) == \
        pytest.approx(0.8, abs=1e-12)
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(
        (-1 * -4 / 3 + 0 + 1 * 5 / 3) / math.sqrt(2 * (16 / 9 + 1 / 9 + 25 / 9)), abs=1e-12)


def test_spearman_average_ranks_for_ties_match_scipy():
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.integers(0, 4, size=40).astype(float)   # many ties on both sides
        y = x + rng.integers(0, 3, size=40)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    # ordinal ranks (argsort of argsort) would give 1.0 here; average ranks do not
    x, y = [1, 1, 2, 3], [1, 2, 3, 4]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert spearman(x, y) < 0.95


def test_correlations_drop_non_finite_pairs_like_scipy_on_the_kept_pairs():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=30), rng.normal(size=30)
    x[[0, 5, 7]] = np.nan
    y[[5, 9]] = np.inf
    y[12] = -np.inf
    keep = np.isfinite(x) & np.isfinite(y)
    assert keep.sum() == 25
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x[keep], y[keep])[0], abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x[keep], y[keep])[0], abs=1e-12)
    assert spearman(torch.from_numpy(x), torch.from_numpy(y)) == \
        pytest.approx(stats.spearmanr(x[keep], y[keep])[0], abs=1e-12)


def test_correlations_are_nan_when_undefined():
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(pearson([0.1, 0.1, 0.1], [1, 2, 3]))  # constant, not rounding noise
    assert math.isnan(spearman([5, 5, 5], [1, 2, 3]))
    assert math.isnan(pearson([1.0, float("nan")], [1.0, 2.0]))  # one finite pair
    assert math.isnan(spearman([], []))
    with pytest.raises(ConfigError, match="3 and 4 values"):
        spearman([1, 2, 3], [1, 2, 3, 4])


# ---- the sweep's shuffled-label control under class weights ------------------------------

def imbalanced(n_traces=150, per_trace=6, d=8, seed=0) -> ProbeData:
    """Three classes of 70 / 20 / 10 %, features informative about the class."""
    g = torch.Generator().manual_seed(seed)
    n = n_traces * per_trace
    y = torch.bucketize(torch.rand(n, generator=g), torch.tensor([0.7, 0.9]))
    mu = torch.randn(3, d, generator=g)
    X = (mu[y] * 0.6 + torch.randn(n, d, generator=g) + 2.0).double()[None]
    return ProbeData(X, y, torch.arange(n) // per_trace, torch.zeros(n, dtype=torch.long),
                     ["site0"])


def sklearn_balanced(X, y, train, test, C):
    sc = StandardScaler().fit(X[train].numpy())
    m = LogisticRegression(C=C, class_weight="balanced", tol=1e-10, max_iter=5000)
    m.fit(sc.transform(X[train].numpy()), y[train].numpy())
    return torch.from_numpy(m.predict_proba(sc.transform(X[test].numpy())))


def test_sweep_control_under_balanced_weights_matches_sklearn_on_shuffled_labels():
    data = imbalanced()
    seed, l2 = 0, 0.5
    res = sweep(data, class_weight="balanced", l2=l2, n_boot=2, seed=seed, tol=1e-9,
                max_iter=2000)
    train, test = group_split(data, 0.25, seed)
    # the control's labels: the training labels permuted with seed + 1 (sweep's docstring)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))
    shuffled = data.y.clone()
    shuffled[train] = data.y[train][perm]
    y_te = data.y[test]
    for name, labels, got in (("probe", data.y, res.metrics), ("control", shuffled, res.control)):
        proba = sklearn_balanced(data.X[0], labels, train, test, C=1 / l2)
        acc = float((proba.argmax(-1) == y_te).double().mean())
        assert abs(float(got["accuracy"][0, 0]) - acc) <= 0.01, (name, acc)
        # AUROC and ECE are continuous in the probabilities: they pin them to ~1e-3
        auc = roc_auc_score(y_te.numpy(), proba.numpy(), multi_class="ovr")
        assert abs(float(got["auroc"][0, 0]) - auc) < 1e-3, (name, auc)
        assert abs(float(got["ece"][0, 0]) - float(M.ece(y_te, proba))) < 1e-3, name
        bal = balanced_accuracy_score(y_te.numpy(), proba.argmax(-1).numpy())
        assert abs(float(got["balanced_accuracy"][0, 0]) - bal) <= 0.01, name
    # the same control through fit_probe: probabilities within 1e-3 of scikit-learn's
    ctrl = ProbeData(data.X, shuffled, data.groups, data.positions, data.sites)
    fitted = fit_probe(ctrl, (train, test), l2=l2, class_weight="balanced", tol=1e-9,
                       max_iter=2000)
    ref = sklearn_balanced(data.X[0], shuffled, train, test, C=1 / l2)
    torch.testing.assert_close(fitted.predict_proba(data.X[:, test])[0], ref, atol=1e-3, rtol=0)
