"""Figures of head scores and of measurements across training checkpoints.

1. :func:`plot_head_scores` — one model: a layer × head panel per kind of score
   (:func:`thinklens.circuits.head_scores`), one colour scale from 0 to 1.
2. :func:`plot_checkpoint_heads` — one kind across checkpoints
   (:func:`thinklens.jobs.dynamics.run_dynamics` with ``heads_measure``): small
   multiples, one layer × head panel per checkpoint, on one shared colour axis, so a head
   that forms is seen lighting up from panel to panel.
3. :func:`plot_dynamics` — chosen heads' scores against the training step, stacked under
   the training curve's loss and held-out accuracy on one shared x axis, so a phase
   change is one vertical line through all panels; the interval where the first head's
   score rises most is shaded in every panel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from thinklens import theme
from thinklens.errors import ConfigError

_COLOUR_AXIS = {"colorscale": theme.SEQUENTIAL, "cmin": 0.0, "cmax": 1.0,
                "colorbar": {"title": {"text": "score"}}}


def _grid(values: Any, name: str) -> go.Heatmap:
    rows = values.tolist()
    return go.Heatmap(z=rows, x=[f"H{h}" for h in range(len(rows[0]))],
                      y=[f"L{la}" for la in range(len(rows))], coloraxis="coloraxis",
                      name=name, hovertemplate=f"{name}<br>%{{y}} %{{x}}: %{{z:.3f}}<extra></extra>")


def _panels(grids: list[tuple[str, Any]], title: str, cols: int | None,
            size: str | None) -> go.Figure:
    cols = cols or min(len(grids), 5)
    rows = math.ceil(len(grids) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[n for n, _ in grids],
                        shared_yaxes=True, horizontal_spacing=0.03,
                        vertical_spacing=min(0.3 / rows, 0.15))
    for k, (name, values) in enumerate(grids):
        fig.add_trace(_grid(values, name), row=k // cols + 1, col=k % cols + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(coloraxis=_COLOUR_AXIS, title_text=title,
                      height=max(260, 60 + rows * (40 + 22 * len(grids[0][1]))))
    return theme.apply(fig, size=size)


def plot_head_scores(scores: Any, *, kinds: Sequence[str] | None = None,
                     size: str | None = None) -> go.Figure:
    """Every head's score, one layer × head panel per kind (0 to 1, one colour scale).

    Example::

        fig = plot_head_scores(circuits.head_scores(model))   # panels 'previous' … 'lookup'
    """
    kinds = list(kinds or scores.kinds)
    return _panels([(k, scores[k]) for k in kinds], "Head scores", None, size)


def plot_checkpoint_heads(dyn: Any, kind: str, *, cols: int | None = None,
                          size: str | None = None) -> go.Figure:
    """One kind of head score, one layer × head panel per checkpoint, one colour axis.

    Example::

        dyn = run_dynamics("organism", heads_measure())
        plot_checkpoint_heads(dyn, "lookup")        # 5 panels: step 250 … final
    """
    v = dyn.values(f"heads.{kind}")                    # [checkpoint, layer, head]
    names = [f"step {s}" if s is not None else lab for lab, s in zip(dyn.labels, dyn.steps)]
    return _panels(list(zip(names, v)), f"{kind} score of every head, by checkpoint", cols,
                   size)


def _mean_accuracy(row: dict) -> float:
    acc = row["acc_think"]
    return sum(acc.values()) / len(acc)


def plot_dynamics(dyn: Any, key: str, heads: Sequence[tuple[int, int]] | None = None, *,
                  curve: Sequence[dict] | None = None, depths: Sequence[str] | None = None,
                  size: str | None = None) -> go.Figure:
    """Chosen heads' ``key`` (e.g. ``"heads.lookup"``) against the training step, under
    the training curve's loss and accuracy (``curve``: rows with step, loss, acc_think by
    depth; default ``dyn.curve``), one shared x axis.

    Example::

        plot_dynamics(dyn, "heads.lookup", [(1, 0)])    # 3 panels: loss, accuracy, score

    ``heads``: ``(layer, head)`` pairs (default: the best head at the last checkpoint);
    a scalar ``key`` (``"icl"``) takes no heads. ``depths``: accuracy lines drawn
    (default every depth, plus their mean).
    """
    values = dyn.values(key)
    if values.ndim == 3 and heads is None:
        last = values[-1]
        heads = [divmod(int(last.argmax()), last.shape[1])]
    series = [(f"L{la}H{h}", values[:, la, h].tolist()) for la, h in heads] \
        if values.ndim == 3 else [(key, values.tolist())]
    if values.ndim not in (1, 3):
        raise ConfigError(f"{key!r} has shape {tuple(values.shape)} per checkpoint; plot a "
                          "scalar or a [layer, head] key")
    steps = list(dyn.steps)
    if any(s is None for s in steps):
        raise ConfigError(f"checkpoints {dyn.labels} need training steps for this axis")
    curve = list(curve if curve is not None else dyn.curve)
    n = 3 if curve else 1
    label = f"{key[6:]} score" if key.startswith("heads.") else key
    titles = (["training loss", "held-out accuracy (thinking)"] if curve else []) + [label]
    fig = make_subplots(rows=n, cols=1, shared_xaxes=True, subplot_titles=titles,
                        vertical_spacing=0.08)
    if curve:
        cs = [r["step"] for r in curve]
        fig.add_trace(go.Scatter(x=cs, y=[r["loss"] for r in curve], name="loss",
                                 mode="lines+markers", line={"color": "#444"}), row=1, col=1)
        ds = list(depths or sorted(curve[0]["acc_think"], key=int))
        for k, d in enumerate(ds):
            fig.add_trace(go.Scatter(x=cs, y=[r["acc_think"][d] for r in curve],
                                     name=f"depth {d}", mode="lines",
                                     line={"color": theme.QUALITATIVE[k % len(theme.QUALITATIVE)],
                                           "width": 1}), row=2, col=1)
        fig.add_trace(go.Scatter(x=cs, y=[_mean_accuracy(r) for r in curve],
                                 name="mean over depths", mode="lines+markers",
                                 line={"color": "#000", "dash": "dot"}), row=2, col=1)
        fig.update_yaxes(type="log", row=1, col=1)
        fig.update_yaxes(range=[0, 1.02], row=2, col=1)
    for k, (name, ys) in enumerate(series):
        fig.add_trace(go.Scatter(x=steps, y=ys, name=name, mode="lines+markers",
                                 line={"color": theme.QUALITATIVE[k % len(theme.QUALITATIVE)],
                                       "width": 2.5}), row=n, col=1)
    first = series[0][1]
    if len(first) > 1:
        k = max(range(len(first) - 1), key=lambda i: first[i + 1] - first[i])
        for r in range(1, n + 1):
            fig.add_vrect(x0=steps[k], x1=steps[k + 1], fillcolor="#999", opacity=0.15,
                          line_width=0, row=r, col=1)
    fig.update_xaxes(title_text="training step", row=n, col=1)
    fig.update_layout(height=260 * n, title_text=f"{label} across training")
    return theme.apply(fig, size=size)


__all__ = ["plot_head_scores", "plot_checkpoint_heads", "plot_dynamics"]
