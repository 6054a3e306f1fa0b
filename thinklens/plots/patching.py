"""Figures of patching results: heatmaps, per-head grids, attribution-vs-exact scatter.

Every function takes a :class:`~thinklens.circuits.PatchResult` (or any object with the
same ``values`` / ``axes`` / ``labels`` fields, such as attribution-patching results) and
returns a ``go.Figure``:

1. :func:`plot_patching` lays the result out by its axes: one axis (``layer`` or
   ``sender``) as bars; two axes as a heatmap, the first axis (layers) on y read top-down
   and the second (token positions, heads) on x, with the pair's token strings as tick
   text; three axes (``layer, pos, head``) as :func:`plot_head_grid`. Effects use the
   diverging scale centred at 0 (:func:`thinklens.theme.diverging_range`). Hover names
   the cell and gives the metric and the normalised value
   ``(m - m_corrupt) / (m_clean - m_corrupt)`` (0 = corrupted run, 1 = clean run).
2. :func:`plot_head_grid` draws a ``(layer, pos, head)`` result as small multiples, one
   layer × position heatmap per head on one shared colour axis; a ``(layer, head)``
   result as the layer × head grid with each cell's value written in it.
3. :func:`plot_attribution_scatter` puts an estimate (AtP, EAP, EAP-IG; Nanda 2023,
   Kramár et al. 2024, Syed et al. 2023, Hanna et al. 2024) against exact patching cell
   by cell: x = exact effect, y = estimate, the y = x diagonal, and the Pearson and
   Spearman correlations over the cells (:func:`thinklens.probes.metrics.pearson`,
   :func:`~thinklens.probes.metrics.spearman`). Effects are changes of the metric: a
   ``PatchResult`` (and an ``AttributionResult`` from ``atp`` or
   ``Circuit.node_effects``) holds the metric after each patch, so its base run's value
   (corrupted run when denoising, clean run when noising) is subtracted; other objects
   are taken to hold effects already.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from thinklens import theme
from thinklens.circuits.metrics import normalize
from thinklens.circuits.results import PatchResult
from thinklens.errors import ConfigError
from thinklens.probes.metrics import pearson, spearman

_AXIS_TITLES = {"layer": "layer", "pos": "token", "head": "head", "kv_head": "KV head",
                "sender": "sender"}
_PANELS_PER_ROW = 4
_TEXT_CELLS = 256  # write values into heatmap cells up to this many cells


def plot_patching(result: Any, *, normalized: bool | None = None, title: str | None = None,
                  size: str | None = None) -> go.Figure:
    """The figure of a patching result, laid out by its axes.

    Example::

        r = patch(model, pair, "resid_pre", by=("layer", "pos"))   # values [layer, pos]
        fig = plot_patching(r)   # heatmap: z = r.normalized(), x ticks = r.labels["pos"]
        plot_patching(r, normalized=False)   # colour = r.values, the metric itself
        plot_patching(patch(model, pair, "resid_pre", by="layer"))   # bars, one per layer

    ``normalized``: colour by ``(m - m_corrupt) / (m_clean - m_corrupt)`` (0 = corrupted
    run, 1 = clean run); default: when the result's clean and corrupted values differ.
    ``title`` defaults to the site, direction and metric of the result.
    """
    values, axes, labels = _fields(result, "result")
    if len(axes) == 3:
        return plot_head_grid(result, normalized=normalized, title=title, size=size)
    if len(axes) not in (1, 2):
        raise ConfigError(f"result with axes {axes}: plot_patching draws 1 to 3 axes")
    norm, normalized = _normalized(result, values, required=normalized)
    z = norm if normalized else values
    name = "normalised " + _metric(result) if normalized else _metric(result)
    if len(axes) == 1:
        fig = _bars(result, values, norm, z, axes[0], labels[axes[0]], name)
    else:
        fig = go.Figure(_heatmap(values, norm, z, axes, labels, name))
        _ticks(fig, axes, labels)
        fig.update_layout(coloraxis=_coloraxis(z, name),
                          height=min(900, 160 + max(28 * values.shape[0], 120)))
    fig.update_layout(title_text=_title(result, title))
    return theme.apply(fig, size)


def plot_head_grid(result: Any, *, normalized: bool | None = None, cols: int | None = None,
                   title: str | None = None, size: str | None = None) -> go.Figure:
    """Per-head patching effects: one layer × position panel per head, one colour axis.

    Example::

        r = patch(model, pair, "z", by=("layer", "pos", "head"))   # [layer, pos, head]
        fig = plot_head_grid(r)      # 4 panels 'H0'..'H3', panel h: z = r.values[:, :, h]
        plot_head_grid(patch(model, pair, "z", by=("layer", "head")))  # layer × head grid

    ``normalized`` as in :func:`plot_patching`; ``cols``: panels per row (default: one column when there are more than 24 positions,
    else up to 4).
    """
    values, axes, labels = _fields(result, "result")
    if len(axes) == 2 and axes[0] == "layer" and axes[1] in ("head", "kv_head"):
        return plot_patching(result, normalized=normalized, title=title, size=size)
    if len(axes) != 3 or axes[0] != "layer" or axes[2] not in ("head", "kv_head"):
        raise ConfigError(f"plot_head_grid needs a result with axes ('layer', 'pos', 'head') or "
                          f"('layer', 'head'), got {axes}; patch with by=('layer', 'pos', "
                          "'head') on a per-head site ('z', 'q', 'k', 'v', 'pattern')")
    norm, normalized = _normalized(result, values, required=normalized)
    z = norm if normalized else values
    name = "normalised " + _metric(result) if normalized else _metric(result)
    n_layers, n_pos, n_heads = values.shape
    if cols is None:
        cols = 1 if n_pos > 24 else min(n_heads, _PANELS_PER_ROW)
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
        raise ConfigError(f"cols={cols!r}; give a positive int (panels per row)")
    cols = min(cols, n_heads)
    rows = math.ceil(n_heads / cols)
    prefix = "KV" if axes[2] == "kv_head" else "H"
    names = [f"{prefix}{h}" for h in labels[axes[2]]]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, shared_yaxes=True,
                        horizontal_spacing=0.03, vertical_spacing=min(0.3 / rows, 0.12))
    for k, panel in enumerate(names):
        trace = _heatmap(values[:, :, k], norm[:, :, k], z[:, :, k], axes[:2], labels, name,
                         extra=f"{_AXIS_TITLES[axes[2]]} {labels[axes[2]][k]}")
        trace.update(name=panel)
        fig.add_trace(trace, row=k // cols + 1, col=k % cols + 1)
    _ticks(fig, axes[:2], labels, grid=True)
    fig.update_xaxes(title_text=None)
    fig.update_xaxes(title_text=_AXIS_TITLES[axes[1]], row=rows)
    fig.update_layout(coloraxis=_coloraxis(z, name), title_text=_title(result, title),
                      height=110 + rows * (50 + max(14 * n_layers, 90)))
    return theme.apply(fig, size)


def plot_attribution_scatter(estimate: Any, exact: Any, *, label: str | None = None,
                             title: str | None = None, size: str | None = None) -> go.Figure:
    """Attribution estimate against exact patching, one point per cell.

    Example::

        exact = patch(model, pair, "z", by=("layer", "head"))      # [layer, head]
        approx = atp(model, pair, "z", by=("layer", "head"))      # same axes and shape
        fig = plot_attribution_scatter(approx, exact, label="AtP")
        ig = eap(model, pair, steps=5).node_effects("z")
        fig = plot_attribution_scatter({"AtP": approx, "EAP-IG": ig}, exact)  # a trace each
        fig.data[0].meta                # {'pearson': ..., 'spearman': ..., 'n': 16}

    x is the exact effect (the metric's change), y the estimate; the legend and title give
    each estimate's Pearson r and Spearman ρ over the finite cells.
    """
    x, axes, labels = _fields(exact, "exact")
    shape = x.shape
    x = _effect(exact, x).ravel()
    if isinstance(estimate, Mapping):
        if not estimate:
            raise ConfigError("estimate={}: give a result, or a dict {'AtP': result, ...}")
        named = {str(k): v for k, v in estimate.items()}
    else:
        named = {label or getattr(estimate, "method", None) or "estimate": estimate}
    cells = [" · ".join(f"{_AXIS_TITLES.get(a, a)} {theme.escape(str(v))}"
                        for a, v in zip(axes, combo))
             for combo in itertools.product(*(labels[a] for a in axes))]
    fig = go.Figure()
    stats, lo, hi = [], np.nanmin(x, initial=np.inf), np.nanmax(x, initial=-np.inf)
    for name, est in named.items():
        y, e_axes, e_labels = _fields(est, f"estimate {name!r}")
        _same_cells(name, y.shape, e_axes, e_labels, axes, labels, shape)
        y = _effect(est, y).ravel()
        r, rho, n = pearson(x, y), spearman(x, y), int(np.isfinite(x + y).sum())
        stats.append((theme.escape(name), rho, r))
        lo, hi = min(lo, np.nanmin(y, initial=np.inf)), max(hi, np.nanmax(y, initial=-np.inf))
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="markers", name=f"{theme.escape(name)} (ρ = {rho:.2f})",
            text=cells, meta={"pearson": r, "spearman": rho, "n": n},
            hovertemplate=("%{text}<br>exact %{x:.4g}<br>" + theme.escape(name)
                           + " %{y:.4g}<extra></extra>")))
    if np.isfinite(lo) and np.isfinite(hi):
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                                 hoverinfo="skip", line=dict(dash="dot", color="#888888")))
    metric = _metric(exact)
    fig.update_layout(
        title=dict(text=theme.escape(title) if title is not None else
                   f"attribution vs exact patching ({theme.escape(str(getattr(exact, 'site', '')))})",
                   subtitle=dict(text=_stats_line(stats, x.size))),
        xaxis_title=f"exact effect (Δ {metric})", yaxis_title=f"estimate (Δ {metric})",
        height=520)
    return theme.apply(fig, size)


def _stats_line(stats: list[tuple[str, float, float]], n: int) -> str:
    if len(stats) == 1:
        name, rho, r = stats[0]
        return f"{name}: Spearman ρ = {rho:.3f}, Pearson r = {r:.3f} · {n} cells"
    return (" · ".join(f"{name}: ρ = {rho:.3f}, r = {r:.3f}" for name, rho, r in stats)
            + f" (Spearman ρ, Pearson r over {n} cells)")


# ---- helpers ------------------------------------------------------------------------------

def _fields(r: Any, what: str) -> tuple[np.ndarray, tuple[str, ...], dict[str, list]]:
    """``(values as float64 numpy, axes, labels per axis)``, checked against each other."""
    if not all(hasattr(r, f) for f in ("values", "axes", "labels")):
        raise ConfigError(f"{what} is a {type(r).__name__}; give a PatchResult (patch(...), "
                          "path_patch(...)) or an object with .values, .axes and .labels")
    values = _numpy(r.values)
    axes = tuple(r.axes)
    if values.ndim != len(axes):
        raise ConfigError(f"{what}: values of shape {values.shape} but axes {axes}")
    labels = {}
    for a, n in zip(axes, values.shape):
        given = (r.labels or {}).get(a)
        labels[a] = list(range(n)) if given is None else list(given)
        if len(labels[a]) != n:
            raise ConfigError(f"{what}: {len(labels[a])} labels for axis {a!r} of size {n}")
    return values, axes, labels


def _numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().to("cpu").double().numpy()
    return np.asarray(v, dtype=float)


def _base(r: Any) -> float | None:
    """The metric of the run a PatchResult patched into; None for estimate-like results."""
    if not isinstance(r, PatchResult):
        return None
    return r.corrupt if r.direction == "denoising" else r.clean


def _effect(r: Any, values: np.ndarray) -> np.ndarray:
    base = _base(r)
    return values if base is None else values - base


def _normalized(r: Any, values: np.ndarray, required: bool | None
                ) -> tuple[np.ndarray, bool]:
    """``((values - corrupt) / (clean - corrupt), whether to colour by it)``.

    NaN when the result has no distinct clean and corrupted values (an error if required).
    """
    clean, corrupt = getattr(r, "clean", None), getattr(r, "corrupt", None)
    ok = isinstance(clean, int | float) and isinstance(corrupt, int | float) and clean != corrupt
    if not ok:
        if required:
            raise ConfigError(f"normalized=True needs different clean and corrupted metric "
                              f"values; this result has clean={clean!r}, corrupt={corrupt!r}")
        return np.full_like(values, np.nan), False
    return normalize(values, clean, corrupt), required is not False


def _metric(r: Any) -> str:
    return theme.escape(str(getattr(r, "metric", None) or "value"))


def _title(r: Any, title: str | None) -> str:
    if title is not None:
        return theme.escape(title)
    parts = [str(p) for p in (getattr(r, "site", None), getattr(r, "direction", None),
                              getattr(r, "metric", None)) if p]
    clean, corrupt = getattr(r, "clean", None), getattr(r, "corrupt", None)
    if isinstance(clean, int | float) and isinstance(corrupt, int | float):
        parts.append(f"clean {clean:.3g}, corrupt {corrupt:.3g}")
    return theme.escape(" · ".join(parts) or "patching")


def _coloraxis(z: np.ndarray, name: str) -> dict[str, Any]:
    lo, hi = theme.diverging_range(z[np.isfinite(z)].tolist())
    return dict(colorscale=theme.DIVERGING, cmin=lo, cmax=hi, cmid=0,
                colorbar=dict(title=dict(text=name, side="right")))


def _heatmap(values: np.ndarray, norm: np.ndarray, z: np.ndarray, axes: tuple[str, ...],
             labels: dict[str, list], name: str, extra: str = "") -> go.Heatmap:
    """Heatmap of a ``[axes[0], axes[1]]`` grid on index positions (labels as tick text)."""
    n0, n1 = values.shape
    lab0 = np.array([theme.escape(str(v)) for v in labels[axes[0]]], dtype=object)
    lab1 = np.array([theme.escape(str(v)) for v in labels[axes[1]]], dtype=object)
    custom = np.empty((n0, n1, 4), dtype=object)
    custom[:, :, 0], custom[:, :, 1] = lab0[:, None], lab1[None, :]
    custom[:, :, 2], custom[:, :, 3] = values, norm
    head = f"{extra}<br>" if extra else ""
    hover = (f"{head}{_AXIS_TITLES.get(axes[0], axes[0])} %{{customdata[0]}}<br>"
             f"{_AXIS_TITLES.get(axes[1], axes[1])} %{{customdata[1]}}<br>"
             f"{_metric_of(name)} %{{customdata[2]:.4g}}<br>"
             "normalised %{customdata[3]:.3f}<extra></extra>")
    text = {}
    if axes[1] in ("head", "kv_head") and n0 * n1 <= _TEXT_CELLS:
        text = dict(texttemplate="%{z:.2f}", textfont=dict(size=9))
    return go.Heatmap(z=z, x=list(range(n1)), y=list(range(n0)), customdata=custom,
                      coloraxis="coloraxis", hovertemplate=hover, xgap=1 if text else 0,
                      ygap=1 if text else 0, **text)


def _metric_of(name: str) -> str:
    return name.removeprefix("normalised ")


def _ticks(fig: go.Figure, axes: tuple[str, ...], labels: dict[str, list],
           grid: bool = False) -> None:
    n0, n1 = len(labels[axes[0]]), len(labels[axes[1]])
    many = axes[1] == "pos" and n1 > 8
    fig.update_xaxes(tickvals=list(range(n1)), showgrid=False,
                     ticktext=[theme.escape(str(v)) for v in labels[axes[1]]],
                     tickangle=-90 if many else 0, tickfont_size=8 if many else None,
                     title_text=_AXIS_TITLES.get(axes[1], axes[1]))
    fig.update_yaxes(tickvals=list(range(n0)), ticktext=[str(v) for v in labels[axes[0]]],
                     autorange="reversed", showgrid=False)
    fig.update_yaxes(title_text=_AXIS_TITLES.get(axes[0], axes[0]), **({"col": 1} if grid else {}))


def _bars(r: Any, values: np.ndarray, norm: np.ndarray, z: np.ndarray, axis: str,
          labels: list, name: str) -> go.Figure:
    ticks = [theme.escape(str(v)) for v in labels]
    fig = go.Figure(go.Bar(
        x=list(range(len(z))), y=z, customdata=np.stack([values, norm], -1), text=ticks,
        marker_color=[theme.DIVERGING[2][1] if v < 0 else theme.DIVERGING[8][1] for v in z],
        textposition="none",
        hovertemplate=(f"{_AXIS_TITLES.get(axis, axis)} %{{text}}<br>{_metric_of(name)} "
                       "%{customdata[0]:.4g}<br>normalised %{customdata[1]:.3f}<extra></extra>")))
    clean, corrupt = getattr(r, "clean", None), getattr(r, "corrupt", None)
    if name.startswith("normalised "):
        clean, corrupt = 1.0, 0.0
    for level, what in ((clean, "clean run"), (corrupt, "corrupted run")):
        if isinstance(level, int | float):
            fig.add_hline(y=level, line_dash="dot", line_color="#666666",
                          annotation_text=what, annotation_position="top right")
    fig.update_xaxes(tickvals=list(range(len(z))), ticktext=ticks,
                     title_text=_AXIS_TITLES.get(axis, axis))
    fig.update_layout(yaxis_title=name, showlegend=False)
    return fig


def _same_cells(name: str, shape: tuple[int, ...], axes: tuple[str, ...], labels: dict,
                exact_axes: tuple[str, ...], exact_labels: dict,
                exact_shape: tuple[int, ...]) -> None:
    if axes != exact_axes or shape != exact_shape:
        raise ConfigError(
            f"estimate {name!r} has axes {axes} and shape {shape} but exact has axes "
            f"{exact_axes} and shape {exact_shape}; compare results over the same site and "
            "cells (same by=, layers=, positions=, heads=)")
    for a in axes:
        if [str(v) for v in labels[a]] != [str(v) for v in exact_labels[a]]:
            raise ConfigError(f"estimate {name!r} and exact label axis {a!r} differently: "
                              f"{labels[a][:6]}... vs {exact_labels[a][:6]}...; the cells must "
                              "be the same layers / positions / heads in the same order")


__all__ = ["plot_patching", "plot_head_grid", "plot_attribution_scatter"]
