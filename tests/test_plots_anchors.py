"""Thought-anchor figures show the results' numbers: importance columns, the suppression
matrix, the receiver-head kurtosis grid with ranks, the early-answering curve."""

from __future__ import annotations

import numpy as np
import pytest

from thinklens import Trace, circuits
from thinklens.errors import ConfigError
from thinklens.plots import (
    plot_early_answering,
    plot_receiver_kurtosis,
    plot_sentence_importance,
    plot_suppression_matrix,
)

PROMPT = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"
COMPLETION = ("c = b + 4 . b = a - 2 . a = 7 . b = 7 - 2 = 5 . c = 5 + 4 = 9 . "
              "</think> 9 <eos>")


@pytest.fixture(scope="module")
def results(organism):
    trace = Trace.from_text(organism, PROMPT, COMPLETION)
    return trace, circuits.suppression(organism, trace), \
        circuits.sentence_attribution(organism, trace)


def test_importance_columns_hold_each_measure_scaled_by_its_max(results):
    trace, sup, att = results
    recv = np.arange(5.0)
    fig = plot_sentence_importance(trace, {"suppression": sup, "attribution": att,
                                           "receiver": recv})
    z = np.array(fig.data[0].z, dtype=float)
    assert list(fig.data[0].x) == ["suppression", "attribution", "receiver"]
    want = -sup.answer_logodds_delta.numpy()
    np.testing.assert_allclose(z[:, 0], want / np.abs(want).max(), rtol=1e-6)
    np.testing.assert_allclose(z[:, 2], recv / 4)
    assert fig.data[0].text[4][0] == f"{want[4]:.3g}"
    with pytest.raises(ConfigError, match="measure 'bad': need one score per sentence"):
        plot_sentence_importance(trace, {"bad": [1.0, 2.0]})


def test_suppression_matrix_shows_the_matrix(results):
    _, sup, _ = results
    fig = plot_suppression_matrix(sup)
    z = np.array([[np.nan if v is None else v for v in row] for row in fig.data[0].z])
    np.testing.assert_allclose(z, sup.matrix.numpy(), equal_nan=True)
    assert np.isnan(z[0, 1]) and np.isfinite(z[1, 0])


def test_kurtosis_grid_ranks_top_heads_and_greys_excluded_layers(organism):
    traces = organism.think_batch([p["prompt"] for p in organism.task.problems(
        4, depths=(4,), seed=2)])
    rh = circuits.receiver_heads(organism, traces, k=3, proximity=1, min_sentences=3)
    fig = plot_receiver_kurtosis(rh)
    text = fig.data[0].text
    for rank, (layer, head) in enumerate(rh.top_heads, 1):
        assert text[layer][head] == f"#{rank}"
        assert fig.data[0].z[layer][head] == pytest.approx(float(rh.kurtosis[layer, head]))
    assert text[0] == ["excluded"] * organism.config.n_heads
    assert all(v is None for v in fig.data[0].z[0])
    assert "split-half r" in fig.layout.title.subtitle.text


def test_early_answering_from_plain_accuracies_and_mean():
    fig = plot_early_answering([0.1, 0.1, 0.5, 1.0])
    assert list(fig.data[0].y) == [0.1, 0.1, 0.5, 1.0]
    np.testing.assert_allclose(fig.data[0].x, [0, 1 / 3, 2 / 3, 1])
    aoc = 1 - np.trapezoid([0.1, 0.1, 0.5, 1.0], [0, 1 / 3, 2 / 3, 1])
    assert f"{aoc:.3f}" in fig.layout.title.subtitle.text
    with pytest.raises(ConfigError, match="at least 2"):
        plot_early_answering([0.5])
