"""Theme, attention and trace figures on the organism's traces, and paper export for real."""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

from thinklens import figures, theme
from thinklens.errors import ConfigError, ThinklensError
from thinklens.plots import plot_attention, plot_sentence_attention, plot_trace

PROMPT = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"
NASTY = "<script>alert(1)</script> <b>x</b> c = 1 ; ? c"


@pytest.fixture(scope="module")
def trace(organism):
    return organism.think(PROMPT)


@pytest.fixture(scope="module")
def nasty(organism):
    return organism.think(NASTY)


@pytest.fixture(scope="module")
def heads_cap(organism, trace):
    return organism.capture(trace, attention=[(1, 0), (1, 2)])


@pytest.fixture(scope="module")
def sentence_cap(organism, trace):
    return organism.capture(trace, attention="sentence")


def _escaped(tokens):
    return [theme.escape(t) for t in tokens]


# -- theme -----------------------------------------------------------------------------

def test_theme_leaves_plotly_default_alone(trace):
    assert pio.templates.default == "plotly"      # importing thinklens changed nothing
    assert theme.NAME not in pio.templates         # and registered nothing
    fig = plot_trace(trace)
    assert fig.layout.template.layout.font.family == theme.FONT_FAMILY
    assert go.Figure().layout.template.layout.font.family != theme.FONT_FAMILY
    try:
        assert theme.register() == "thinklens" and "thinklens" in pio.templates
        assert pio.templates.default == "plotly"
    finally:
        del pio.templates["thinklens"]


def test_theme_sizes_and_ranges():
    fig = theme.apply(go.Figure(), size="one")
    assert (fig.layout.width, fig.layout.height) == (312, 240)   # 3.25 in x 2.5 in at 96 px/in
    assert theme.apply(go.Figure(), size="two").layout.width == 648
    with pytest.raises(ConfigError, match=r"'one', 'two'"):
        theme.apply(go.Figure(), size="three")
    assert theme.diverging_range(torch.tensor([[-0.2, 0.5], [0.1, float("nan")]])) == (-0.5, 0.5)
    assert theme.diverging_range([0.0, 0.0]) == (-1.0, 1.0)
    assert theme.escape("<b>$x$</b>\n") == "&lt;b&gt;&#36;x&#36;&lt;/b&gt;↵"


# -- attention -------------------------------------------------------------------------

def test_attention_panels_ticks_hover(trace, heads_cap):
    fig = plot_attention(heads_cap, trace_index=0, layer=1, heads=[0, 2])
    want = heads_cap["blocks.1.attn.hook_pattern"].values[0]          # [head, query, key]
    assert [a.text for a in fig.layout.annotations] == ["L1 H0", "L1 H2"]
    assert len(fig.data) == 2
    np.testing.assert_allclose(np.asarray(fig.data[1].z), want[1].numpy(), atol=1e-6)
    toks = _escaped(trace.tokens)
    for ax in (fig.layout.xaxis, fig.layout.xaxis2, fig.layout.yaxis):
        assert list(ax.ticktext) == toks and list(ax.tickvals) == list(range(len(trace)))
    assert "&lt;think&gt;" in toks                                   # special tokens stay visible
    h = fig.data[0].hovertemplate
    assert "destination (query)" in h and "source (key)" in h and "%{z" in h
    q, k = trace.tokens.index("<think>"), 5
    assert tuple(fig.data[0].customdata[q][k]) == ("&lt;think&gt;", theme.escape(trace.tokens[k]))
    assert fig.layout.coloraxis.cmin == 0


def test_attention_from_sites_store_and_errors(organism, trace, heads_cap, tmp_path):
    cap = organism.capture(trace, sites="blocks.2.attn.hook_pattern", positions="thinking")
    store = organism.capture(trace, sites="blocks.2.attn.hook_pattern", positions="thinking",
                             store=tmp_path / "acts")
    rows = trace.think_span.range
    want = cap["blocks.2.attn.hook_pattern"].unpadded(0)[3]          # [query, key] of head 3
    for fig in (plot_attention(cap, heads=[3]), plot_attention(store, heads=[3])):
        assert fig.layout.annotations[0].text == "L2 H3"
        assert list(fig.layout.yaxis.tickvals) == list(rows)
        assert list(fig.layout.yaxis.ticktext) == _escaped(trace.tokens[rows.start:rows.stop])
        np.testing.assert_allclose(np.asarray(fig.data[0].z), want.numpy(), atol=1e-6)
    # a head-subset pattern read from a capture keeps which heads it holds (labels["head"]);
    # a bare one without them says so
    direct = plot_attention(trace, heads_cap["blocks.1.attn.hook_pattern"])
    assert [a.text for a in direct.layout.annotations] == ["L1 H0", "L1 H2"]
    bare = heads_cap["blocks.1.attn.hook_pattern"]
    bare.labels.clear()
    assert [a.text for a in plot_attention(trace, bare).layout.annotations] == [
        "L1 stored head 0", "L1 stored head 1"]
    with pytest.raises(ConfigError, match=r"\[0, 2\]"):
        plot_attention(heads_cap, heads=[1])
    with pytest.raises(ConfigError, match="key positions"):
        plot_attention(trace, torch.zeros(2, 3, 3))


def test_sentence_attention_one_entry_per_head(organism, trace, sentence_cap):
    fig = plot_sentence_attention(sentence_cap)
    sa = sentence_cap["sentence_attention"].values[0]                 # [layer, head, S, S]
    n_layers, n_heads = organism.config.n_layers, organism.config.n_heads
    buttons = fig.layout.updatemenus[0].buttons
    assert len(buttons) == len(fig.data) == n_layers * n_heads
    assert len({b.label for b in buttons}) == len(buttons)
    for k, b in enumerate(buttons):
        assert b.args[0]["visible"] == [j == k for j in range(len(buttons))]
    l_, h = 2, 3
    k = [b.label for b in buttons].index(f"layer {l_} head {h}")
    np.testing.assert_allclose(np.asarray(fig.data[k].z), sa[l_, h].numpy(), atol=1e-6)
    assert [d.visible for d in fig.data].count(True) == 1
    assert len(fig.layout.xaxis.ticktext) == len(trace.sentences)
    with pytest.raises(ConfigError, match="sentences"):
        plot_sentence_attention(trace, torch.zeros(4, 4, 2, 2))


# -- trace viewer ----------------------------------------------------------------------

def test_trace_viewer_scores_and_tags(trace):
    n = len(trace.sentences)
    fig = plot_trace(trace)
    assert [row[0] for row in fig.data[0].text] == [s.text for s in trace.sentences]
    assert list(fig.layout.yaxis.ticktext) == [f"{i} · {t}" for i, t in enumerate(trace.tags)]
    assert set(fig.data[0].colorbar.ticktext) == set(trace.tags)
    scores = [0.1, -0.5, 0.2, 0.9, 0.0][:n]
    fig = plot_trace(trace, scores, score_name="importance")
    assert [row[0] for row in fig.data[0].z] == scores
    assert fig.data[0].zmid == 0 and fig.data[0].zmin == -fig.data[0].zmax == -0.9
    assert "importance" in fig.data[0].hovertemplate
    with pytest.raises(ConfigError, match=f"{n} values"):
        plot_trace(trace, [1.0] * (n + 1))


def test_model_text_is_escaped(nasty):
    figs = [plot_trace(nasty), plot_attention(nasty, torch.eye(len(nasty))[None])]
    for fig in figs:
        js = fig.to_json()
        assert "<script" not in js and "<b>" not in js and "</b>" not in js
    assert figs[0].layout.title.text.startswith("&lt;script&gt;alert(1)&lt;/script&gt;")
    assert "&lt;" in figs[1].layout.xaxis.ticktext


# -- export ----------------------------------------------------------------------------

def test_export_rejects_bad_suffix_and_missing_browser(tmp_path, trace, monkeypatch):
    fig = plot_trace(trace)
    with pytest.raises(ConfigError, match=r"'\.jpg'.*\.pdf, \.svg, \.png"):
        figures.export(fig, tmp_path / "fig.jpg")
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chromium"))
    with pytest.raises(ThinklensError, match="apt-get install -y chromium") as e:
        figures.export(fig, tmp_path / "fig.pdf")
    assert "no-chromium" in str(e.value) and not (tmp_path / "fig.pdf").exists()
    monkeypatch.delenv("BROWSER_PATH")
    monkeypatch.setattr(figures, "DEBIAN_CHROMIUM", str(tmp_path / "none"))
    monkeypatch.setenv("PATH", str(tmp_path))
    from choreographer.browsers.chromium import Chromium
    monkeypatch.setattr(Chromium, "find_browser", classmethod(lambda cls, **kw: None))
    with pytest.raises(ThinklensError, match=r"\.ci/browser"):
        figures.find_browser()


def _browser():
    try:
        return figures.find_browser()
    except ThinklensError:
        return None


@pytest.mark.skipif(_browser() is None, reason="no Chromium; run .ci/browser")
class TestExport:
    """Several exports in one browser session: each browser start costs seconds."""

    @pytest.fixture(scope="class", autouse=True)
    def _session(self):
        with figures.export_session():
            yield

    def test_pdf_has_pages_and_is_reproducible(self, tmp_path, trace):
        fig = plot_trace(trace, size="one")
        a = figures.export(fig, tmp_path / "a.pdf").read_bytes()
        b = figures.export(fig, tmp_path / "b.PDF").read_bytes()
        assert a.startswith(b"%PDF-") and a.rstrip().endswith(b"%%EOF")
        assert re.search(rb"/Type\s*/Page\b(?!s)", a)
        assert b"/CreationDate (D:19700101000000" in a
        assert re.search(rb"/MediaBox \[0 0 234 180\]", a)    # 3.25 x 2.5 in, in points
        assert a == b

    def test_svg_parses_holds_text_and_is_reproducible(self, tmp_path, nasty):
        fig = plot_attention(nasty, torch.eye(len(nasty))[None])
        a = figures.export(fig, tmp_path / "a.svg").read_bytes()
        b = figures.export(fig, tmp_path / "b.svg").read_bytes()
        assert a == b
        text = set(ET.fromstring(a).itertext())
        assert any(t.startswith("<script>alert(1)</script> <b>x</b>") for t in text)  # title
        assert {"<bos>", "<think>", "<"} <= text                                     # ticks


@pytest.mark.slow  # starts its own browser: the default path of export()
def test_png_size_without_session(tmp_path, trace):
    if _browser() is None:
        pytest.skip("no Chromium; run .ci/browser")
    out = figures.export(plot_trace(trace), tmp_path / "t.png", width=200, height=150, scale=2)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (400, 300)


def test_sentence_attention_of_a_trace_without_sentences_is_refused(organism):
    from thinklens import Trace
    from thinklens.errors import ConfigError, ThinklensWarning

    direct = Trace.from_text(organism, "b = 4 ; ? b", "</think> 4 <eos>")
    assert direct.sentences == []
    with pytest.warns(ThinklensWarning, match="1 of 1 traces have no thinking sentences"):
        cap = organism.capture(direct, attention="sentence")
    with pytest.raises(ConfigError, match="no thinking sentences.*use plot_attention"):
        plot_sentence_attention(cap)
