"""Figures of probing results: each takes a result dataclass and returns a ``go.Figure``."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from thinklens.errors import ConfigError
from thinklens.theme import DIVERGING, SEQUENTIAL, apply, escape


def plot_probe_by_layer(result, metric: str | None = None, *, position: int = 0,
                        size: str | None = None) -> go.Figure:
    """Probe score by site with its 95% bootstrap interval and the shuffled-label control.

    ``result`` is a :class:`~thinklens.probes.SweepResult`.
    """
    metric = metric or result.main_metric
    if metric not in result.metrics:
        raise ConfigError(f"metric {metric!r} not in this sweep; valid: {sorted(result.metrics)}")
    if not 0 <= position < len(result.positions):
        raise ConfigError(f"position index {position} out of range 0..{len(result.positions) - 1}")
    y = result.metrics[metric][position].tolist()
    lo, hi = result.ci[metric][position].unbind(-1)
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=result.sites, y=y, name=f"probe ({metric})", mode="lines+markers",
        error_y={"type": "data", "symmetric": False, "array": (hi - result.metrics[metric][position]).tolist(),
                 "arrayminus": (result.metrics[metric][position] - lo).tolist()}))
    if metric in result.control:
        fig.add_trace(go.Scatter(x=result.sites, y=result.control[metric][position].tolist(),
                                 name="control (shuffled labels)", mode="lines+markers",
                                 line={"dash": "dot"}))
    fig.update_layout(xaxis_title="site", yaxis_title=f"held-out {metric}",
                      title=f"probe by layer ({result.n_test_traces} test traces)")
    return apply(fig, size=size)


def plot_probe_grid(result, metric: str | None = None, *, size: str | None = None) -> go.Figure:
    """Layer × position heatmap of a sweep over several positions."""
    metric = metric or result.main_metric
    grid = result.grid(metric)
    fig = go.Figure(go.Heatmap(z=grid.tolist(), x=result.sites, y=[str(p) for p in result.positions],
                               colorscale=SEQUENTIAL, colorbar={"title": metric},
                               hovertemplate="site %{x}<br>position %{y}<br>%{z:.3f}<extra></extra>"))
    fig.update_layout(xaxis_title="site", yaxis_title="position")
    return apply(fig, size=size)


def plot_logit_lens(lens, trace_index: int = 0, *, value: str = "prob",
                    size: str | None = None) -> go.Figure:
    """Logit-lens heatmap over one trace's thinking tokens (token strings on the axis)."""
    if value not in ("prob", "rank"):
        raise ConfigError(f"value={value!r}; valid: 'prob', 'rank'")
    n = int(lens.lengths[trace_index])
    z = getattr(lens, value)[trace_index, :, :n].float()
    toks = [escape(t) for t in lens.tokens[trace_index][:n]]
    x = list(range(n))
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=x, y=lens.layers, colorscale=SEQUENTIAL, reversescale=value == "rank",
        customdata=[toks] * len(lens.layers),
        colorbar={"title": f"answer {value}"},
        hovertemplate="%{y}<br>token %{customdata}<br>%{z}<extra></extra>"))
    fig.update_xaxes(tickmode="array", tickvals=x, ticktext=toks, title_text="thinking token")
    fig.update_layout(title=f"logit lens: {value} of answer {escape(lens.answer_tokens[trace_index])!r}")
    return apply(fig, size=size)


def plot_early_exit(curve, *, size: str | None = None) -> go.Figure:
    """Thinking tokens saved against accuracy kept, one point per confidence threshold."""
    fig = go.Figure(go.Scatter(
        x=(100 * curve.tokens_saved).tolist(), y=(100 * curve.accuracy).tolist(),
        mode="lines+markers", text=[f"τ={t:.2f}" for t in curve.thresholds.tolist()],
        hovertemplate="%{text}<br>saved %{x:.1f}%<br>accuracy %{y:.1f}%<extra></extra>"))
    fig.add_hline(y=100 * curve.full_accuracy, line_dash="dot",
                  annotation_text="full thinking")
    fig.update_layout(xaxis_title="thinking tokens saved (%)", yaxis_title="accuracy (%)")
    return apply(fig, size=size)


def plot_dose_response(dose, *, size: str | None = None) -> go.Figure:
    """Behaviour frequency and answer accuracy against steering strength α."""
    alphas = dose.alphas.tolist()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=alphas, y=dose.frequency.tolist(), name=dose.metric_name,
                             mode="lines+markers"))
    if not torch.isnan(dose.accuracy).all():
        fig.add_trace(go.Scatter(x=alphas, y=dose.accuracy.tolist(), name="answer accuracy",
                                 mode="lines+markers", line={"dash": "dot",
                                                             "color": DIVERGING[0][1]}))
    fig.update_layout(xaxis_title="steering strength α", yaxis_title="fraction")
    return apply(fig, size=size)


__all__ = ["plot_probe_by_layer", "plot_probe_grid", "plot_logit_lens", "plot_early_exit",
           "plot_dose_response"]
