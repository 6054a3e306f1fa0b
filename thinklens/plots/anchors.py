"""Figures of sentence-level attribution of thinking (Thought Anchors) and early answering.

1. :func:`plot_sentence_importance`: the trace viewer with one column per measure (forced
   answer, resampling, suppression, attribution, receiver score, ...), a row per thinking
   sentence. Each column is scaled by its largest absolute value, so measures in
   different units share one diverging colour scale; the cell shows the raw value.
2. :func:`plot_suppression_matrix`: ``M[i, j]``, the mean log-KL over sentence ``i``'s
   tokens when sentence ``j``'s keys are masked (cells above the diagonal are empty).
3. :func:`plot_receiver_kurtosis`: each head's mean kurtosis of vertical scores
   ``[layer, head]``; receiver heads carry their rank, excluded layers are greyed.
4. :func:`plot_early_answering`: the probability of the final answer against the share
   of the thinking kept (Lanham et al. 2023), with the area over the curve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from thinklens import theme
from thinklens.errors import ConfigError
from thinklens.hooks.trace import Trace

_TEXT = 48  # characters of a sentence in its row label


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=float)


def measure_values(result: Any) -> np.ndarray:
    """One importance per sentence from a result (large = the answer needs the sentence).

    ``SuppressionResult``: the drop of the answer's log-odds (``−answer_logodds_delta``);
    ``SentenceAttribution``: its estimate of that drop (``−estimate``); ``ForcedAnswer``:
    ``importance``; ``Resampling``: ``resampling``; arrays and tensors as given.
    """
    if hasattr(result, "answer_logodds_delta"):
        return -_array(result.answer_logodds_delta)
    if hasattr(result, "estimate") and hasattr(result, "metric"):
        return -_array(result.estimate)
    for name in ("importance", "resampling"):
        if hasattr(result, name):
            return _array(getattr(result, name))
    return _array(result)


def plot_sentence_importance(trace: Trace, measures: Mapping[str, Any], *,
                             title: str | None = None, size: str | None = None) -> go.Figure:
    """Several per-sentence measures side by side on one trace.

    Example::

        fig = plot_sentence_importance(trace, {"suppression": sup, "attribution": att,
                                               "forced answer": fa, "receiver": rh.scores[0]})
        len(fig.data[0].x)       # one column per measure
    """
    if not isinstance(trace, Trace):
        raise ConfigError(f"plot_sentence_importance takes a Trace, got {type(trace).__name__}")
    if not measures:
        raise ConfigError("measures is empty; give {name: scores or result}, one score per "
                          "sentence each")
    n = len(trace.sentences)
    cols, names = [], []
    for name, m in measures.items():
        v = measure_values(m)
        if v.ndim != 1 or len(v) != n:
            raise ConfigError(f"measure {name!r}: need one score per sentence ({n}), got shape "
                              f"{tuple(v.shape)}")
        cols.append(v)
        names.append(str(name))
    raw = np.stack(cols, 1)                                              # [sentence, measure]
    scale = np.nanmax(np.abs(raw), 0, initial=0.0)
    z = raw / np.where(scale > 0, scale, 1.0)
    text = [[("" if not np.isfinite(v) else f"{v:.3g}") for v in row] for row in raw]
    hover = [[theme.escape(s.text, 200)] * len(names) for s in trace.sentences]
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=[theme.escape(x) for x in names], y=list(range(n)), text=text,
        texttemplate="%{text}", customdata=hover, zmin=-1, zmax=1, zmid=0,
        colorscale=theme.DIVERGING, xgap=2, ygap=2,
        colorbar=dict(title=dict(text="score / max |score|", side="right")),
        hovertemplate="sentence %{y} · %{x}: %{text}<br>%{customdata}<extra></extra>"))
    labels = [f"{i} · {theme.escape(s.text, _TEXT)}" for i, s in enumerate(trace.sentences)]
    fig.update_yaxes(tickvals=list(range(n)), ticktext=labels, autorange="reversed",
                     showgrid=False)
    fig.update_xaxes(side="top", showgrid=False)
    fig.update_layout(title_text=title or "sentence importance · " +
                      theme.escape(trace.prompt, 80), height=max(260, 120 + 26 * n))
    return theme.apply(fig, size)


def plot_suppression_matrix(result: Any, *, title: str | None = None,
                            size: str | None = None) -> go.Figure:
    """``result.matrix[i, j]`` (a ``SuppressionResult``) as a heatmap, suppressed sentence
    on x, affected sentence on y.

    Example::

        fig = plot_suppression_matrix(circuits.suppression(model, trace))
    """
    if not hasattr(result, "matrix"):
        raise ConfigError(f"plot_suppression_matrix takes a SuppressionResult, got "
                          f"{type(result).__name__}; make one with circuits.suppression(model, "
                          "trace)")
    m = _array(result.matrix)
    n = m.shape[0]
    fin = m[np.isfinite(m)]
    sents = [theme.escape(s, 80) for s in result.sentences]
    hover = [[f"{sents[i]} ← {sents[j]}" for j in range(n)] for i in range(n)]
    fig = go.Figure(go.Heatmap(
        z=np.where(np.isfinite(m), m, None).tolist(), x=list(range(n)), y=list(range(n)),
        colorscale=theme.SEQUENTIAL, zmin=float(fin.min()) if fin.size else 0,
        zmax=float(fin.max()) if fin.size else 1, customdata=hover,
        colorbar=dict(title=dict(text="mean log KL", side="right")),
        hovertemplate=("sentence %{y} with sentence %{x} suppressed: %{z:.3g}<br>"
                       "%{customdata}<extra></extra>")))
    fig.update_xaxes(title_text="suppressed sentence j", tickvals=list(range(n)), showgrid=False)
    fig.update_yaxes(title_text="sentence i", tickvals=list(range(n)), autorange="reversed",
                     showgrid=False, scaleanchor="x")
    fig.update_layout(title_text=title or "attention suppression: log KL(base ‖ suppressed)",
                      height=max(300, 140 + 22 * n))
    return theme.apply(fig, size)


def plot_receiver_kurtosis(result: Any, *, title: str | None = None,
                           size: str | None = None) -> go.Figure:
    """Mean kurtosis per ``[layer, head]`` of a ``ReceiverHeads``; top heads numbered.

    Example::

        fig = plot_receiver_kurtosis(circuits.receiver_heads(model, traces, k=3, proximity=2))
    """
    if not hasattr(result, "top_heads") or not hasattr(result, "kurtosis"):
        raise ConfigError(f"plot_receiver_kurtosis takes a ReceiverHeads, got "
                          f"{type(result).__name__}")
    k = _array(result.kurtosis)
    n_layers, n_heads = k.shape
    shown = k.copy()
    shown[list(result.exclude_layers)] = np.nan
    text = [["" for _ in range(n_heads)] for _ in range(n_layers)]
    for rank, (layer, head) in enumerate(result.top_heads, 1):
        text[layer][head] = f"#{rank}"
    for layer in result.exclude_layers:
        text[layer] = ["excluded"] * n_heads
    fig = go.Figure(go.Heatmap(
        z=np.where(np.isfinite(shown), shown, None).tolist(), x=list(range(n_heads)),
        y=list(range(n_layers)), text=text, texttemplate="%{text}",
        customdata=np.where(np.isfinite(k), k, np.nan).round(4).tolist(),
        colorscale=theme.SEQUENTIAL, xgap=1, ygap=1,
        colorbar=dict(title=dict(text="kurtosis", side="right")),
        hovertemplate="layer %{y} head %{x}: kurtosis %{customdata}<extra></extra>"))
    fig.update_xaxes(title_text="head", tickvals=list(range(n_heads)), showgrid=False)
    fig.update_yaxes(title_text="layer", tickvals=list(range(n_layers)), showgrid=False)
    r = result.split_half_r
    sub = (f"top {len(result.top_heads)} · proximity {result.proximity} · "
           f"{len(result.used)} traces · split-half r = {r:.2f}")
    fig.update_layout(title=dict(text=title or "receiver heads: kurtosis of vertical scores",
                                 subtitle=dict(text=sub)),
                      height=max(260, 140 + 26 * n_layers))
    return theme.apply(fig, size)


def plot_early_answering(curves: Any, *, title: str | None = None,
                         size: str | None = None) -> go.Figure:
    """Probability of the final answer against the share of the thinking kept.

    ``curves``: an ``EarlyAnswering`` (``fraction``, ``match``, ``aoc``), a list of them
    (one line each, and their mean when the fractions agree), or a plain list of
    accuracies after ``k = 0 .. S`` sentences.

    Example::

        fig = plot_early_answering([circuits.early_answering(model, t) for t in traces])
    """
    items = curves if isinstance(curves, Sequence) and curves and \
        hasattr(curves[0], "match") else [curves]
    lines = []
    for c in items:
        if hasattr(c, "match"):
            y, x = _array(c.match), _array(c.fraction)
        else:
            y = _array(c)
            if y.ndim != 1 or len(y) < 2:
                raise ConfigError(f"plot_early_answering: a plain curve needs one accuracy per "
                                  f"k = 0..S (at least 2), got shape {tuple(y.shape)}")
            x = np.arange(len(y)) / (len(y) - 1)
        lines.append((x, y, float(getattr(c, "aoc", np.trapezoid(1 - y, x)))))
    fig = go.Figure()
    many = len(lines) > 1
    for i, (x, y, aoc) in enumerate(lines):
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers", name=f"trace {i} (AOC {aoc:.2f})",
            line=dict(color=theme.QUALITATIVE[0], width=1 if many else 2),
            opacity=0.35 if many else 1, showlegend=not many))
    same = many and all(len(x) == len(lines[0][0]) and np.allclose(x, lines[0][0])
                        for x, _, _ in lines)
    if same:
        y = np.mean([y for _, y, _ in lines], 0)
        fig.add_trace(go.Scatter(x=lines[0][0], y=y, mode="lines+markers", name="mean",
                                 line=dict(color=theme.QUALITATIVE[1], width=3)))
    aocs = [a for _, _, a in lines]
    fig.update_xaxes(title_text="share of the thinking kept", range=[-0.02, 1.02])
    fig.update_yaxes(title_text="P(final answer)", range=[-0.02, 1.02])
    fig.update_layout(title=dict(text=title or "early answering",
                                 subtitle=dict(text=f"area over the curve {np.mean(aocs):.3f}"
                                               + (f" (mean of {len(aocs)})" if many else ""))))
    return theme.apply(fig, size)


__all__ = ["plot_sentence_importance", "plot_suppression_matrix", "plot_receiver_kurtosis",
           "plot_early_answering", "measure_values"]
