"""The one look of every thinklens figure: template, colour scales, paper sizes, safe text.

1. :func:`template` builds a plotly template (fonts, white background, light grids, the
   sequential scale as every heatmap's default) and :func:`register` adds it to plotly's
   registry as ``"thinklens"``. Neither touches ``plotly.io.templates.default``, and
   importing thinklens registers nothing: your own figures keep plotly's look.
2. Effects (patching deltas, logit differences, probe weights) use :data:`DIVERGING`,
   centred at 0 by :func:`diverging_range`; attention and probabilities use
   :data:`SEQUENTIAL` from 0. Both are ColorBrewer scales that survive greyscale print.
3. :func:`apply` puts the template on a figure and, with ``size="one"`` or ``"two"``,
   the width of a one- or two-column paper figure (3.25 in and 6.75 in at 96 px/in,
   the scale at which Chromium prints ``px`` to PDF) with a smaller font.
4. :func:`escape` makes model text safe for plotly labels: plotly renders a subset of
   HTML (``<b>``, ``<br>``, …) and ``$…$`` as LaTeX, so a token such as ``<think>`` or a
   prompt holding ``<script>`` must be escaped to show as the characters it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

from thinklens.errors import ConfigError

NAME = "thinklens"
FONT_FAMILY = "Helvetica, Arial, 'DejaVu Sans', sans-serif"
FONT_SIZE = 12        # px, screen
PAPER_FONT_SIZE = 10  # px = 7.5 pt in print
DPI = 96

#: ColorBrewer RdBu, blue for negative and red for positive effects; white at 0.
DIVERGING: list[list[Any]] = [
    [i / 10, c] for i, c in enumerate(
        ["rgb(5,48,97)", "rgb(33,102,172)", "rgb(67,147,195)", "rgb(146,197,222)",
         "rgb(209,229,240)", "rgb(247,247,247)", "rgb(253,219,199)", "rgb(244,165,130)",
         "rgb(214,96,77)", "rgb(178,24,43)", "rgb(103,0,31)"])]
#: ColorBrewer Blues: white at 0, dark blue at the maximum.
SEQUENTIAL: list[list[Any]] = [
    [i / 8, c] for i, c in enumerate(
        ["rgb(247,251,255)", "rgb(222,235,247)", "rgb(198,219,239)", "rgb(158,202,225)",
         "rgb(107,174,214)", "rgb(66,146,198)", "rgb(33,113,181)", "rgb(8,81,156)",
         "rgb(8,48,107)"])]
#: Paul Tol's colour-blind-safe qualitative palette, for categories (behaviour tags).
QUALITATIVE: tuple[str, ...] = (
    "#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#BBBBBB",
    "#332288", "#117733", "#882255")

#: ``(width, height)`` in px of one- and two-column paper figures.
SIZES: dict[str, tuple[int, int]] = {
    "one": (round(3.25 * DPI), round(2.5 * DPI)),   # 312 x 240
    "two": (round(6.75 * DPI), round(3.0 * DPI)),   # 648 x 288
}


def _template() -> go.layout.Template:
    """The thinklens plotly template (a fresh copy each call)."""
    axis = dict(showgrid=True, gridcolor="#EBEBEB", zeroline=False, linecolor="#444444",
                showline=True, ticks="outside", tickcolor="#444444", automargin=True)
    t = go.layout.Template()
    t.layout = go.Layout(
        font=dict(family=FONT_FAMILY, size=FONT_SIZE, color="#222222"),
        paper_bgcolor="white", plot_bgcolor="white", colorway=list(QUALITATIVE),
        colorscale=dict(sequential=SEQUENTIAL, diverging=DIVERGING),
        coloraxis=dict(colorscale=SEQUENTIAL, colorbar=dict(thickness=12, outlinewidth=0)),
        xaxis=axis, yaxis=axis, hoverlabel=dict(font_family=FONT_FAMILY, align="left"),
        title=dict(x=0.02, xanchor="left", font=dict(size=FONT_SIZE + 2)),
        margin=dict(l=60, r=20, t=50, b=50))
    t.data.heatmap = [go.Heatmap(colorscale=SEQUENTIAL, colorbar=dict(thickness=12))]
    return t


def register() -> str:
    """Add the template to ``plotly.io.templates`` as ``"thinklens"`` (not as default).

    Then ``fig.update_layout(template="thinklens")`` works on your own figures.
    """
    pio.templates[NAME] = _template()
    return NAME


def apply(fig: go.Figure, size: str | None = None) -> go.Figure:
    """Give ``fig`` the thinklens look, and a paper size when asked; returns ``fig``.

    Example::

        apply(fig, size="one").layout.width   # 312 px = 3.25 in at 96 px/in
    """
    if size is not None and size not in SIZES:
        raise ConfigError(f"size={size!r}; valid: None (screen), "
                          + ", ".join(repr(s) for s in SIZES) + " (paper columns)")
    fig.update_layout(template=_template())
    title = fig.layout.title
    lines = bool(title.text) + bool(title.subtitle and title.subtitle.text)
    if size is None:
        fig.update_layout(margin_t=(30, 55, 80)[lines])
    else:
        width, height = SIZES[size]
        fig.update_layout(width=width, height=height, font_size=PAPER_FONT_SIZE,
                          margin=dict(l=40, r=10, t=(15, 35, 55)[lines], b=35))
    return fig


def diverging_range(values: Any) -> tuple[float, float]:
    """``(-m, m)`` with ``m`` the largest finite ``|value|``, so 0 sits in the middle.

    Example::

        diverging_range([-0.2, 0.5])   # (-0.5, 0.5)
        diverging_range([0.0])         # (-1.0, 1.0): an all-zero effect still has a scale
    """
    m = max((abs(v) for v in _flat(values) if math.isfinite(v)), default=0.0)
    m = m if m > 0 else 1.0
    return (-m, m)


def _flat(values: Any) -> Iterable[float]:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu()
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, int | float):
        yield float(values)
        return
    for v in values:
        yield from _flat(v)


_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "$": "&#36;",
                          "\n": "↵", "\t": "⇥", "\r": "␍"})


def escape(text: str, max_chars: int | None = None) -> str:
    """``text`` as plotly shows it literally: HTML and LaTeX markers escaped, newlines as ↵.

    Example::

        escape("<think>")           # '&lt;think&gt;' (plotly shows '<think>')
        escape(" ")                 # '␣': whitespace-only tokens stay visible
        escape("a long sentence", max_chars=6)   # 'a lon…'
    """
    text = str(text)
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    if text and not text.strip(" "):
        return "␣" * len(text)
    return text.translate(_ESCAPES)


__all__ = ["register", "apply", "diverging_range", "escape", "DIVERGING", "QUALITATIVE",
           "SEQUENTIAL"]
