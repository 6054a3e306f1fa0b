"""Attention figures: token-level patterns of chosen heads, and sentence×sentence views.

Token level (:func:`plot_attention`):

1. Get one trace's pattern ``[head, query_pos, key_pos]`` (the one layout of a pattern,
   TransformerLens's): given directly, from a ``SiteActivations``
   (``cap["blocks.1.attn.hook_pattern"]``), or from a Capture/Store by ``layer``.
   Captures made with ``attention=[(layer, head), ...]`` hold only those heads,
   ``sites="blocks.1.attn.hook_pattern"`` all of them (the ids of either in
   ``meta["heads"]``, and ``labels["head"]`` of the ``SiteActivations``); query rows are
   at the captured positions (``positions=``).
2. Draw one heatmap panel per head, four panels a row, on one shared colour axis from 0:
   key (source) tokens on x, query (destination) tokens on y, a matrix read top-down.
   Axis positions are numeric with the token strings as tick text, so repeated tokens
   (``=``, ``.``) keep their own columns. Hover names both tokens and the weight.

Sentence level (:func:`plot_sentence_attention`): the ``sentence_attention`` reduction
``[layer, head, query_sentence, key_sentence]`` (Thought Anchors, Bogdan et al. 2025), one heatmap
per head, one shown at a time, picked in a dropdown with one entry per layer×head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from thinklens import theme
from thinklens.errors import ConfigError
from thinklens.hooks.activations import ActivationReader, SiteActivations
from thinklens.hooks.trace import Trace
from thinklens.plots.trace import trace_of

SENTENCE_KEY = "sentence_attention"
_PANELS_PER_ROW = 4
_SENTENCE_LABEL_CHARS = 28


def plot_attention(source: Trace | ActivationReader, pattern: Any = None, *,
                   heads: Sequence[int] | None = None, layer: int | None = None,
                   trace_index: int = 0, size: str | None = None) -> go.Figure:
    """Token-level attention of chosen heads of one trace, a panel per head.

    Example::

        cap = model.capture(trace, attention=[(1, 0), (1, 2)])
        fig = plot_attention(cap, layer=1, heads=[0, 2])      # two panels, 'L1 H0', 'L1 H2'
        fig = plot_attention(trace, pattern)                  # pattern [head, query, key]
        fig.layout.xaxis.ticktext                             # the trace's tokens, escaped
    """
    trace = trace_of(source, trace_index)
    values, head_ids, queries, prefix = _pattern(source, pattern, layer, trace_index)
    if values.shape[-1] != len(trace) or max(queries, default=-1) >= len(trace):
        raise ConfigError(f"pattern has {values.shape[-1]} key positions but the trace has "
                          f"{len(trace)} tokens; pass the pattern captured from this trace")
    chosen = list(head_ids) if heads is None else [int(h) for h in heads]
    bad = [h for h in chosen if h not in head_ids]
    if bad or not chosen:
        raise ConfigError(f"heads={list(heads or [])!r}: the pattern holds heads "
                          f"{list(head_ids)} (panels {', '.join(prefix + str(h) for h in head_ids)})")
    cols = min(len(chosen), _PANELS_PER_ROW)
    rows = math.ceil(len(chosen) / cols)
    names = [f"{prefix}{h}" for h in chosen]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, shared_yaxes=True,
                        horizontal_spacing=0.04, vertical_spacing=0.12 / rows)
    toks = [theme.escape(t) for t in trace.tokens]
    qtoks = [toks[q] for q in queries]
    keys = list(range(len(trace)))
    custom = np.empty((len(queries), len(keys), 2), dtype=object)
    custom[:, :, 0] = np.array(qtoks, dtype=object)[:, None]
    custom[:, :, 1] = np.array(toks, dtype=object)[None, :]
    zmax = 0.0
    for n, (h, name) in enumerate(zip(chosen, names)):
        z = values[head_ids.index(h)]
        zmax = max(zmax, float(np.nanmax(z)) if z.size else 0.0)
        fig.add_trace(go.Heatmap(
            z=z, x=keys, y=queries, customdata=custom, coloraxis="coloraxis",
            hovertemplate=("destination (query) %{y}: %{customdata[0]}<br>"
                           "source (key) %{x}: %{customdata[1]}<br>"
                           f"weight %{{z:.3f}}<extra>{name}</extra>")),
            row=n // cols + 1, col=n % cols + 1)
    fig.update_xaxes(tickvals=keys, ticktext=toks, tickangle=-90, showgrid=False,
                     title_text="source (key)", tickfont_size=8)
    fig.update_yaxes(tickvals=queries, ticktext=qtoks, autorange="reversed", showgrid=False,
                     tickfont_size=8)
    fig.update_yaxes(title_text="destination (query)", col=1)
    fig.update_layout(coloraxis=dict(colorscale=theme.SEQUENTIAL, cmin=0, cmax=zmax or 1,
                                     colorbar_title_text="weight"),
                      height=120 + 380 * rows, title_text=theme.escape(trace.prompt, 100))
    return theme.apply(fig, size)


def plot_sentence_attention(source: Trace | ActivationReader, sentence_attention: Any = None, *,
                            heads: Sequence[tuple[int, int]] | None = None,
                            trace_index: int = 0, size: str | None = None) -> go.Figure:
    """Sentence×sentence attention of every head of one trace, a dropdown to pick the head.

    Example::

        cap = model.capture(trace, attention="sentence")
        fig = plot_sentence_attention(cap)          # organism: 4 layers × 4 heads
        len(fig.layout.updatemenus[0].buttons)      # 16, labelled 'layer 0 head 0', ...
    """
    trace = trace_of(source, trace_index)
    sa = _sentence_values(source, sentence_attention, trace_index)
    n_layers, n_heads, s_q, s_k = sa.shape
    n = len(trace.sentences)
    if n == 0:
        raise ConfigError(f"trace {trace_index} has no thinking sentences (thinking text "
                          f"{theme.escape(trace.thinking_text, 60)!r}), so there is no "
                          "sentence×sentence attention to draw; use plot_attention for "
                          "token-level attention instead")
    if (s_q, s_k) != (n, n):
        raise ConfigError(f"sentence attention is {s_q}×{s_k} but the trace has {n} sentences; "
                          "pass the sentence_attention captured from this trace")
    pairs = ([(l_, h) for l_ in range(n_layers) for h in range(n_heads)] if heads is None
             else [(int(a), int(b)) for a, b in heads])
    bad = [p for p in pairs if not (0 <= p[0] < n_layers and 0 <= p[1] < n_heads)]
    if bad or not pairs:
        raise ConfigError(f"heads={heads!r}: give (layer, head) pairs with layer in "
                          f"0..{n_layers - 1} and head in 0..{n_heads - 1}")
    labels = [f"{i} {theme.escape(s.tag)}: {theme.escape(s.text, _SENTENCE_LABEL_CHARS)}"
              for i, s in enumerate(trace.sentences)]
    full = [theme.escape(s.text, 120) for s in trace.sentences]
    custom = np.empty((n, n, 2), dtype=object)
    custom[:, :, 0] = np.array(full, dtype=object)[:, None]
    custom[:, :, 1] = np.array(full, dtype=object)[None, :]
    idx = list(range(n))
    fig = go.Figure()
    for k, (l_, h) in enumerate(pairs):
        fig.add_trace(go.Heatmap(
            z=sa[l_, h], x=idx, y=idx, customdata=custom, coloraxis="coloraxis",
            visible=k == 0, name=f"L{l_} H{h}",
            hovertemplate=("query sentence %{y}: %{customdata[0]}<br>"
                           "key sentence %{x}: %{customdata[1]}<br>"
                           f"mean weight %{{z:.4f}}<extra>L{l_} H{h}</extra>")))
    title = theme.escape(trace.prompt, 80)
    buttons = [dict(label=f"layer {l_} head {h}", method="update",
                    args=[{"visible": [j == k for j in range(len(pairs))]},
                          {"title.text": f"{title} · layer {l_} head {h}"}])
               for k, (l_, h) in enumerate(pairs)]
    zmax = float(np.nanmax(sa)) if sa.size else 1.0
    fig.update_layout(
        updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right",
                          y=1.12, yanchor="bottom", showactive=True)],
        coloraxis=dict(colorscale=theme.SEQUENTIAL, cmin=0, cmax=zmax or 1,
                       colorbar_title_text="mean weight"),
        title_text=f"{title} · layer {pairs[0][0]} head {pairs[0][1]}",
        height=max(420, 160 + 24 * n))
    fig.update_xaxes(tickvals=idx, ticktext=labels, tickangle=-45, title_text="key sentence",
                     showgrid=False)
    fig.update_yaxes(tickvals=idx, ticktext=labels, autorange="reversed", showgrid=False,
                     title_text="query sentence")
    return theme.apply(fig, size)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=float)


def _pattern(source: Any, pattern: Any, layer: int | None, i: int
             ) -> tuple[np.ndarray, list[int], list[int], str]:
    """``(values [head, query, key], head ids, query positions, panel prefix 'L1 H')``."""
    prefix = "H" if layer is None else f"L{layer} H"
    if pattern is None:
        if not isinstance(source, ActivationReader):
            raise ConfigError("plot_attention(trace, pattern): give the pattern "
                              "[head, query_pos, key_pos], or pass a Capture instead of a Trace")
        key = _pattern_key(source, layer)
        pos = source._positions()
        vals, queries = _by_axes(source._per_trace(key)[i], source.axes[key],
                                 None if pos is None else pos[i], key)
        head_ids = ((getattr(source, "meta", None) or {}).get("heads") or {}).get(key)
        prefix = _prefix(key, head_ids)
    elif isinstance(pattern, SiteActivations):
        pos = None if pattern.positions is None else pattern.positions[i]
        vals, queries = _by_axes(pattern.unpadded(i), pattern.axes[1:], pos, pattern.key)
        head_ids = pattern.labels.get("head")
        prefix = _prefix(pattern.key, head_ids)
    else:
        vals = _numpy(pattern)
        vals = vals[None] if vals.ndim == 2 else vals
        if vals.ndim != 3:
            raise ConfigError(f"pattern of shape {vals.shape}; need [head, query_pos, key_pos] "
                              "or [query_pos, key_pos] for one trace")
        queries, head_ids = list(range(vals.shape[1])), None
    head_ids = list(head_ids) if head_ids is not None else list(range(vals.shape[0]))
    if len(head_ids) != vals.shape[0]:
        raise ConfigError(f"capture meta lists heads {head_ids} for {vals.shape[0]} stored heads")
    return vals, head_ids, queries, prefix


def _prefix(key: str, head_ids: Any) -> str:
    """Panel title prefix: ``L1 H``; ``L1 stored head `` when the heads' ids are unknown."""
    layer = key.split(".")[1] if key.startswith("blocks.") else "?"
    if head_ids is None:  # a store or tensor without the capture's head ids
        return f"L{layer} stored head "
    return f"L{layer} H"


def _pattern_key(source: ActivationReader, layer: int | None) -> str:
    layers = [int(k.split(".")[1]) for k in source.keys
              if k.startswith("blocks.") and k.endswith(".attn.hook_pattern")]
    if not layers:
        raise ConfigError(f"no attention pattern in {source!r}; capture with "
                          "attention=[(layer, head), ...] or sites='blocks.L.attn.hook_pattern'")
    if layer is None and len(layers) > 1:
        raise ConfigError(f"the capture holds patterns of layers {layers}; pick one with layer=")
    layer = layers[0] if layer is None else int(layer)
    if layer not in layers:
        raise ConfigError(f"layer={layer}: the capture holds patterns of layers {layers}")
    return f"blocks.{layer}.attn.hook_pattern"


def _by_axes(t: Any, axes: Sequence[str], positions: Any, key: str
             ) -> tuple[np.ndarray, list[int]]:
    """One trace's pattern as ``[head, query, key]`` and the query positions of its rows."""
    vals = _numpy(t)
    if tuple(axes) == ("pos", "head", "key_pos"):  # stores written before the one layout
        vals = vals.transpose(1, 0, 2)
    elif tuple(axes) != ("head", "query_pos", "key_pos"):
        raise ConfigError(f"{key} has axes {tuple(axes)}; need an attention pattern "
                          "(head, query_pos, key_pos)")
    rows = vals.shape[1]  # query rows sit at the captured positions
    queries = positions[:rows].tolist() if positions is not None else list(range(rows))
    return vals, [int(q) for q in queries]


def _sentence_values(source: Any, sa: Any, i: int) -> np.ndarray:
    if sa is None:
        if not isinstance(source, ActivationReader):
            raise ConfigError("plot_sentence_attention(trace, sentence_attention): give the "
                              "[layer, head, query_sentence, key_sentence] tensor, or pass a "
                              "Capture")
        if SENTENCE_KEY not in source.keys:
            raise ConfigError(f"no {SENTENCE_KEY!r} in {source!r}; capture with "
                              "attention='sentence'")
        return _numpy(source._per_trace(SENTENCE_KEY)[i])
    if isinstance(sa, SiteActivations):
        return _numpy(sa.unpadded(i))
    vals = _numpy(sa)
    if vals.ndim == 5 and vals.shape[0] == 1:
        vals = vals[0]
    if vals.ndim != 4:
        raise ConfigError(f"sentence attention of shape {vals.shape}; need "
                          "[layer, head, query_sentence, key_sentence] for one trace")
    return vals


__all__ = ["plot_attention", "plot_sentence_attention"]
