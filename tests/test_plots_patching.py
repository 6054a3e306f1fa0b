"""Patching figures on real patch results of the organism: values, ticks, colours, errors."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from types import SimpleNamespace

import numpy as np
import plotly.io as pio
import pytest
import torch
from scipy import stats

from thinklens import figures, theme
from thinklens.circuits import make_pair, patch, path_patch
from thinklens.errors import ConfigError, ThinklensError
from thinklens.plots import plot_attribution_scatter, plot_head_grid, plot_patching
from thinklens.zoo import change_constant

PROMPT = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"
EXACT = {"atol": 1e-6, "rtol": 0}  # figures carry float64 copies of float32 values
POSITIONS = [0, 9, 34, 50, 51, 52]


@pytest.fixture(scope="module")
def pair(organism):
    return change_constant(organism, PROMPT, "a", 3)


@pytest.fixture(scope="module")
def by_pos(organism, pair):
    return patch(organism, pair, "resid_pre", by=("layer", "pos"))


@pytest.fixture(scope="module")
def by_head(organism, pair):
    return patch(organism, pair, "z", by=("layer", "head"))


@pytest.fixture(scope="module")
def per_head(organism, pair):
    return patch(organism, pair, "z", by=("layer", "pos", "head"), positions=POSITIONS)


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), **EXACT)


# ---- heatmaps and bars -----------------------------------------------------------------------

def test_layer_pos_heatmap_values_ticks_colours(pair, by_pos):
    fig = plot_patching(by_pos, normalized=False)
    (hm,) = fig.data
    _close(hm.z, by_pos.values)                          # rows = layers, columns = positions
    labels = [f"{i}:{t}" for i, t in enumerate(pair.labels())]
    assert by_pos.labels["pos"] == labels
    assert list(fig.layout.xaxis.ticktext) == [theme.escape(s) for s in labels]
    assert list(fig.layout.xaxis.tickvals) == list(range(len(pair)))
    assert fig.layout.xaxis.ticktext[9] == "9:7/3" and fig.layout.xaxis.ticktext[-1] == "52:&lt;/think&gt;"
    assert list(fig.layout.yaxis.ticktext) == ["0", "1", "2", "3"]
    m = by_pos.values.abs().max().item()
    ca = fig.layout.coloraxis
    assert ca.cmid == 0 and ca.cmax == pytest.approx(m, abs=1e-6) and ca.cmin == -ca.cmax
    assert ca.colorscale[0][1] == theme.DIVERGING[0][1].replace(" ", "")
    # hover: layer, token, the metric and the normalised value of each cell
    assert all(w in hm.hovertemplate for w in ("layer", "token", "logit_diff", "normalised"))
    cell = hm.customdata[2][52]
    assert cell[0] == "2" and cell[1] == "52:&lt;/think&gt;"
    assert cell[2] == pytest.approx(by_pos.values[2, 52].item(), abs=1e-6)
    assert cell[3] == pytest.approx(by_pos.normalized()[2, 52].item(), abs=1e-6)
    # default colour: normalised (0 = corrupted run, 1 = clean run), still centred at 0
    norm = plot_patching(by_pos)
    _close(norm.data[0].z, by_pos.normalized())
    assert norm.layout.coloraxis.cmid == 0 and norm.layout.coloraxis.cmin == -norm.layout.coloraxis.cmax
    assert "denoising" in norm.layout.title.text and "resid_pre" in norm.layout.title.text


def test_layer_head_heatmap_and_layer_bars(organism, pair, by_head):
    fig = plot_patching(by_head, normalized=False, title="<heads>")
    _close(fig.data[0].z, by_head.values)
    assert list(fig.layout.xaxis.ticktext) == ["0", "1", "2", "3"]
    assert "head" in fig.data[0].hovertemplate and fig.layout.title.text == "&lt;heads&gt;"
    assert fig.data[0].texttemplate                      # 16 cells: values written in
    _close(plot_head_grid(by_head, normalized=False).data[0].z, fig.data[0].z)
    by_layer = patch(organism, pair, "resid_pre", by="layer")
    bars = plot_patching(by_layer, normalized=False)
    _close(bars.data[0].y, by_layer.values)
    _close(plot_patching(by_layer).data[0].y, by_layer.normalized())
    levels = sorted(s.y0 for s in bars.layout.shapes)     # clean and corrupted runs' levels
    assert levels == pytest.approx(sorted([by_layer.clean, by_layer.corrupt]), abs=1e-6)
    senders = path_patch(organism, pair, [(1, 1), [(0, 2), (1, 1)]], ["blocks.3.hook_resid_post"])
    fig = plot_patching(senders, normalized=False)
    _close(fig.data[0].y, senders.values)
    assert list(fig.layout.xaxis.ticktext) == ["(1, 1)", "[(0, 2), (1, 1)]"]


def test_head_grid_one_panel_per_head_on_one_colour_axis(per_head, qwen2):
    fig = plot_head_grid(per_head, normalized=False)
    assert per_head.values.shape == (4, len(POSITIONS), 4)
    assert [a.text for a in fig.layout.annotations] == ["H0", "H1", "H2", "H3"]
    assert len(fig.data) == 4
    for h, hm in enumerate(fig.data):
        _close(hm.z, per_head.values[:, :, h])
        assert hm.coloraxis == "coloraxis"
        assert f"head {h}" in hm.hovertemplate
    m = per_head.values.abs().max().item()
    assert fig.layout.coloraxis.cmax == pytest.approx(m, abs=1e-6)
    assert fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax
    assert list(fig.layout.xaxis.ticktext) == [theme.escape(s) for s in per_head.labels["pos"]]
    # plot_patching dispatches 3-axis results to the grid
    _close(plot_patching(per_head, normalized=False).data[3].z, per_head.values[:, :, 3])
    # grouped-query attention: one panel per KV head
    tiny = make_pair(qwen2, "a = 7 ; b = a + 2 ; ? b", "a = 5 ; b = a + 2 ; ? b",
                     answer="9", wrong="7")
    kv = patch(qwen2, tiny, "k", by=("layer", "pos", "head"))
    grid = plot_head_grid(kv, normalized=False, cols=2)
    assert [a.text for a in grid.layout.annotations] == ["KV0", "KV1"]
    _close(grid.data[1].z, kv.values[:, :, 1])


# ---- attribution vs exact ------------------------------------------------------------------

def test_scatter_points_diagonal_and_correlations(organism, pair, by_head):
    exact_effect = (by_head.values.double() - by_head.corrupt).flatten().numpy()
    noising = patch(organism, pair, "z", by=("layer", "head"), direction="noising")
    # stand-ins for attribution results: objects with values/axes/labels holding effects
    flipped = SimpleNamespace(values=-(noising.values - noising.clean), axes=by_head.axes,
                              labels=by_head.labels)
    noisy = SimpleNamespace(values=by_head.values - by_head.corrupt
                            + torch.linspace(-3, 3, 16).reshape(4, 4), axes=by_head.axes,
                            labels=by_head.labels, method="noisy")
    fig = plot_attribution_scatter({"flipped noising": flipped, "noisy": noisy}, by_head)
    assert [d.name.split(" (")[0] for d in fig.data] == ["flipped noising", "noisy", "y = x"]
    for d, est in zip(fig.data[:2], (flipped, noisy)):
        y = est.values.double().flatten().numpy()
        _close(d.x, exact_effect)
        _close(d.y, y)
        assert d.meta["spearman"] == pytest.approx(stats.spearmanr(exact_effect, y)[0], abs=1e-12)
        assert d.meta["pearson"] == pytest.approx(stats.pearsonr(exact_effect, y)[0], abs=1e-12)
        assert d.meta["n"] == 16
    assert f"noisy: ρ = {fig.data[1].meta['spearman']:.3f}" in fig.layout.title.subtitle.text
    assert fig.data[0].text[5] == "layer 1 · head 1"      # cell (1, 1), row-major
    diag = fig.data[2]
    assert list(diag.x) == list(diag.y) and diag.x[0] <= exact_effect.min()
    single = plot_attribution_scatter(noisy, by_head)
    assert single.data[0].name.startswith("noisy")
    rho = single.data[0].meta["spearman"]
    assert f"noisy: Spearman ρ = {rho:.3f}, Pearson r = " in single.layout.title.subtitle.text
    # layer x pos: hover names the token
    by_pos = SimpleNamespace(values=torch.ones(4, 2), axes=("layer", "pos"),
                             labels={"layer": [0, 1, 2, 3], "pos": ["9:7/3", "52:</think>"]})
    fig = plot_attribution_scatter(by_pos, by_pos, label="same")
    assert fig.data[0].text[1] == "layer 0 · token 52:&lt;/think&gt;"


def test_scatter_of_real_attribution_results(organism, pair, by_head):
    from thinklens.circuits import atp, eap

    approx = atp(organism, pair, "z", by=("layer", "head"))   # values: base + estimate
    edges = eap(organism, pair).node_effects("z")
    fig = plot_attribution_scatter({"AtP": approx, "EAP": edges}, by_head)
    x = by_head.values.double().flatten().numpy() - by_head.corrupt
    for d, est in zip(fig.data, (approx, edges)):
        y = est.values.double().flatten().numpy() - est.corrupt   # both on the Δ-metric scale
        _close(d.x, x)
        _close(d.y, y)
        assert d.meta["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert plot_attribution_scatter(approx, by_head).data[0].name.startswith("atp")


def test_bad_input_errors(by_pos, by_head, per_head):
    with pytest.raises(ConfigError, match=r"axes \('layer', 'pos'\) and shape \(4, 53\)"):
        plot_attribution_scatter(by_pos, by_head)
    shuffled = SimpleNamespace(values=by_head.values, axes=by_head.axes,
                               labels={"layer": [3, 2, 1, 0], "head": [0, 1, 2, 3]})
    with pytest.raises(ConfigError, match="label axis 'layer' differently"):
        plot_attribution_scatter(shuffled, by_head)
    with pytest.raises(ConfigError, match="Tensor; give a PatchResult"):
        plot_attribution_scatter(by_head.values, by_head)
    with pytest.raises(ConfigError, match="estimate=\\{\\}"):
        plot_attribution_scatter({}, by_head)
    with pytest.raises(ConfigError, match="plot_head_grid needs"):
        plot_head_grid(by_pos)
    flat = SimpleNamespace(values=torch.zeros(2, 3), axes=("layer", "pos"),
                           labels={"layer": [0, 1], "pos": ["a", "b", "c"]}, clean=1.0, corrupt=1.0)
    with pytest.raises(ConfigError, match="clean=1.0, corrupt=1.0"):
        plot_patching(flat, normalized=True)
    _close(plot_patching(flat).data[0].z, np.zeros((2, 3)))   # default falls back to raw
    with pytest.raises(ConfigError, match="2 labels for axis 'pos' of size 3"):
        plot_patching(SimpleNamespace(values=torch.zeros(2, 3), axes=("layer", "pos"),
                                      labels={"pos": ["a", "b"]}))
    with pytest.raises(ConfigError, match="cols=0"):
        plot_head_grid(per_head, cols=0)


# ---- serialisation and export ----------------------------------------------------------------

def _browser():
    try:
        return figures.find_browser()
    except ThinklensError:
        return None


def test_figures_serialise(by_pos, by_head, per_head):
    for fig in (plot_patching(by_pos), plot_head_grid(per_head),
                plot_attribution_scatter(by_head, by_head, label="self")):
        back = pio.from_json(fig.to_json())
        assert len(back.data) == len(fig.data) and back.layout.title == fig.layout.title
    back = pio.from_json(plot_patching(by_pos).to_json())
    assert back.layout.xaxis.ticktext[-1] == "52:&lt;/think&gt;"   # model text escaped
    assert not any("<" in str(c[1]) for row in back.data[0].customdata for c in row)


@pytest.mark.skipif(_browser() is None, reason="no Chromium; run .ci/browser")
def test_export_svg(tmp_path, by_pos, per_head):
    with figures.export_session():
        a = figures.export(plot_patching(by_pos, size="two"), tmp_path / "x.svg").read_bytes()
        b = figures.export(plot_head_grid(per_head), tmp_path / "grid.svg").read_bytes()
    text = set(ET.fromstring(a).itertext())
    assert {"9:7/3", "52:</think>", "token", "layer"} <= text
    assert {"H0", "H3"} <= set(ET.fromstring(b).itertext())
