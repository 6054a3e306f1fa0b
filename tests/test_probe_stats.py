"""Correlations of thinklens.probes.metrics against scipy.stats; the sweep's control under
class weights against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from thinklens.errors import ConfigError
from thinklens.probes.metrics import pearson, spearman

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
