"""A trace viewer: the thinking sentence by sentence, coloured by a score or by its tag.

1. Take the trace (or trace ``trace_index`` of a Capture or Store) and its sentences.
2. Draw one row per sentence, top to bottom: a one-column heatmap whose cell holds the
   sentence's text and whose colour is the per-sentence score (diverging and centred at
   0 when a score is negative, sequential from 0 otherwise) or, without scores, the
   behaviour tag. Row labels are ``index · tag``; hover shows the full sentence.
3. The title holds the prompt and the subtitle the answer. All model text goes through
   :func:`thinklens.theme.escape`, so ``<script>`` or ``<b>`` in a prompt shows as text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from thinklens import theme
from thinklens.errors import ConfigError
from thinklens.hooks.activations import ActivationReader
from thinklens.hooks.segment import TAGS
from thinklens.hooks.trace import Trace

_CELL_CHARS = 110   # sentence text shown in a cell; the hover has all of it
_HOVER_WRAP = 70


def plot_trace(source: Trace | ActivationReader, scores: Any = None, *,
               score_name: str = "score", trace_index: int = 0,
               size: str | None = None) -> go.Figure:
    """The thinking of one trace, a row per sentence, coloured by ``scores`` or by tag.

    Example::

        fig = plot_trace(trace)                                  # coloured by tag
        fig = plot_trace(trace, importance, score_name="resampling importance")
        len(fig.data[0].z)      # one row per sentence: len(trace.sentences)
    """
    trace = trace_of(source, trace_index)
    sents = trace.sentences
    n = len(sents)
    rows = [f"{i} · {theme.escape(s.tag)}" for i, s in enumerate(sents)]
    text = [theme.escape(s.text, _CELL_CHARS) for s in sents]
    hover = [_wrap(s.text) for s in sents]
    if scores is None:
        z, color = _by_tag([s.tag for s in sents])
        custom = [[h, theme.escape(s.tag), ""] for h, s in zip(hover, sents)]
        value = ""
    else:
        vals = _scores(scores, n, score_name)
        z = vals
        color = _score_colors(vals, score_name)
        custom = [[h, theme.escape(s.tag), f"{v:.4g}"] for h, s, v in zip(hover, sents, vals)]
        value = f"<br>{theme.escape(score_name)}: %{{customdata[2]}}"
    fig = go.Figure(go.Heatmap(
        z=[[v] for v in z], y=list(range(n)), x=[0], text=[[t] for t in text],
        texttemplate="%{text}", customdata=[[c] for c in custom], xgap=0, ygap=2,
        hovertemplate=("sentence %{y} · %{customdata[1]}<br>%{customdata[0]}" + value
                       + "<extra></extra>"), **color))
    answer = theme.escape(trace.answer_text.strip(), 60) or "(none)"
    flags = " · truncated" if trace.truncated else ""
    fig.update_layout(
        title=dict(text=theme.escape(trace.prompt, 100),
                   subtitle=dict(text=f"answer: {answer} · {n} sentences{flags}")),
        height=max(260, 110 + 26 * n))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(tickvals=list(range(n)), ticktext=rows, autorange="reversed",
                     showgrid=False)
    if n == 0:
        fig.add_annotation(text="no thinking sentences", showarrow=False,
                           xref="paper", yref="paper", x=0.5, y=0.5)
    return theme.apply(fig, size)


def trace_of(source: Trace | ActivationReader, trace_index: int = 0) -> Trace:
    """``source`` itself, or trace ``trace_index`` of a Capture or Store."""
    if isinstance(source, Trace):
        return source
    if isinstance(source, ActivationReader):
        traces = source.traces
        if not -len(traces) <= trace_index < len(traces):
            raise ConfigError(f"trace_index={trace_index} out of range: the {type(source).__name__}"
                              f" holds {len(traces)} traces (0..{len(traces) - 1})")
        t = traces[trace_index]
        return t if isinstance(t, Trace) else Trace.from_dict(t)
    raise ConfigError(f"expected a Trace, Capture or Store, got {type(source).__name__}; "
                      "make one with model.think(prompt) or model.capture(...)")


def _scores(scores: Any, n: int, name: str) -> list[float]:
    if hasattr(scores, "detach"):
        scores = scores.detach().cpu().numpy()
    arr = np.asarray(scores, dtype=float)
    if arr.ndim != 1 or len(arr) != n:
        raise ConfigError(f"{name}: need one score per sentence, {n} values for this trace's "
                          f"{n} sentences; got shape {tuple(arr.shape)}")
    return arr.tolist()


def _score_colors(vals: Sequence[float], name: str) -> dict[str, Any]:
    bar = dict(title=dict(text=theme.escape(name), side="right"))
    finite = [v for v in vals if np.isfinite(v)]
    if any(v < 0 for v in finite):
        lo, hi = theme.diverging_range(finite)
        return dict(colorscale=theme.DIVERGING, zmin=lo, zmax=hi, zmid=0, colorbar=bar)
    return dict(colorscale=theme.SEQUENTIAL, zmin=0, zmax=max(finite, default=1) or 1,
                colorbar=bar)


def _by_tag(tags: list[str]) -> tuple[list[int], dict[str, Any]]:
    """Tag index per sentence and a discrete colour scale with one band per tag present."""
    known = [t for t in TAGS if t in tags] + sorted(set(tags) - set(TAGS))
    k = max(len(known), 1)
    colors = [theme.QUALITATIVE[(TAGS.index(t) if t in TAGS else len(TAGS) + i)
                                % len(theme.QUALITATIVE)] for i, t in enumerate(known)]
    scale = [[b / k, c] for i, c in enumerate(colors or ["#BBBBBB"]) for b in (i, i + 1)]
    bar = dict(tickvals=list(range(k)), ticktext=[theme.escape(t) for t in known],
               title=dict(text="tag", side="right"))
    return ([known.index(t) for t in tags],
            dict(colorscale=scale, zmin=-0.5, zmax=k - 0.5, colorbar=bar))


def _wrap(text: str) -> str:
    """Escaped text with ``<br>`` every ~70 characters (at spaces), for hover boxes."""
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + len(word) + 1 > _HOVER_WRAP:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "<br>".join(theme.escape(x) for x in lines)


__all__ = ["plot_trace", "trace_of"]
