"""The organism's training curve: loss and held-out accuracy per checkpoint."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from thinklens.errors import ConfigError
from thinklens.theme import QUALITATIVE, apply


def plot_training_curve(curve: list[dict], *, size: str | None = None) -> go.Figure:
    """Loss (log scale) and accuracy by depth, with and without thinking, per checkpoint.

    ``curve`` is the rows of a training run's ``curve.json``, e.g. the shipped organism's::

        fig = plot_training_curve(thinklens.zoo.training_curve())   # two panels: loss | accuracy
    """
    if not curve:
        raise ConfigError("empty training curve; train with `thinklens organism train` first")
    steps = [r["step"] for r in curve]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "held-out exact match"))
    fig.add_trace(go.Scatter(x=steps, y=[r["loss"] for r in curve], name="loss",
                             mode="lines+markers", line={"color": "#444"}), row=1, col=1)
    depths = sorted(curve[0]["acc_think"], key=int)
    for k, d in enumerate(depths):
        colour = QUALITATIVE[k % len(QUALITATIVE)]
        fig.add_trace(go.Scatter(x=steps, y=[r["acc_think"][d] for r in curve],
                                 name=f"depth {d}, thinking", mode="lines+markers",
                                 line={"color": colour}), row=1, col=2)
        fig.add_trace(go.Scatter(x=steps, y=[r["acc_direct"][d] for r in curve],
                                 name=f"depth {d}, direct", mode="lines",
                                 line={"color": colour, "dash": "dot"}), row=1, col=2)
    fig.update_yaxes(type="log", title_text="cross-entropy", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], title_text="accuracy", row=1, col=2)
    fig.update_xaxes(title_text="step")
    fig = apply(fig, size=size)
    fig.update_layout(margin={"t": 50})
    return fig


__all__ = ["plot_training_curve"]
