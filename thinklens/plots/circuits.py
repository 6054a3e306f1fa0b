"""Figures of circuits: the layered edge graph and the faithfulness curve.

1. :func:`plot_circuit` places the nodes of a :class:`~thinklens.circuits.Circuit` by
   layer (input at the bottom, each layer's heads in a row with its MLP above them, the
   logits on top) and draws every edge of the circuit as a line from sender to
   receiving node: width by ``|score|``, colour by score on the diverging scale centred
   at 0, dash by the receiver's input (query solid, key dashed, value dotted). Hover on
   an edge's midpoint gives its name and score; on a node, its summed in/out scores.
   Nodes outside the circuit are drawn faintly for orientation.
2. :func:`plot_faithfulness` draws a :class:`~thinklens.circuits.FaithfulnessCurve`:
   faithfulness against the number of edges kept, with the full model (1) and the
   ablated model (0) as reference lines.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from thinklens.theme import DIVERGING, QUALITATIVE, apply, diverging_range

_DASH = {"q": "solid", "k": "dash", "v": "dot"}


def _positions(graph) -> dict[str, tuple[float, float]]:
    pos = {"input": (0.0, -1.0), "logits": (0.0, float(graph.n_layers))}
    mid = (graph.n_heads - 1) / 2
    for layer in range(graph.n_layers):
        for h in range(graph.n_heads):
            pos[f"a{layer}.h{h}"] = (h - mid, float(layer))
        pos[f"m{layer}"] = (mid + 1.0, layer + 0.5)  # beside the heads: edges skip past it
    return pos


def plot_circuit(circuit, *, title: str | None = None, size: str | None = None) -> go.Figure:
    """Layered graph of a circuit's edges.

    Example::

        c = eap(model, pair, steps=5).top(n=12)
        fig = plot_circuit(c)        # nodes by layer; edge width and colour by score
    """
    g = circuit.graph
    pos = _positions(g)
    edges = circuit.edge_list()
    lo, hi = diverging_range([s for *_, s in edges] or [0.0])
    biggest = max((abs(s) for *_, s in edges), default=1.0) or 1.0
    fig = go.Figure()
    mx, my, mtext = [], [], []
    for u, v, score in reversed(edges):  # strongest drawn last, on top
        (x0, y0), (x1, y1) = pos[u], pos[g.node_of_receiver(g.receiver_index[v])]
        kind = v.rsplit(".", 1)[-1] if v.startswith("a") else ""
        colour = sample_colorscale(DIVERGING, (score - lo) / (hi - lo))[0]
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip",
                                 showlegend=False,
                                 line={"color": colour, "width": 1 + 6 * abs(score) / biggest,
                                       "dash": _DASH.get(kind, "solid")}))
        mx.append((x0 + x1) / 2)
        my.append((y0 + y1) / 2)
        mtext.append(f"{u} → {v}<br>score {score:.4g}")
    fig.add_trace(go.Scatter(  # hover targets at edge midpoints, and the colour bar
        x=mx, y=my, mode="markers", text=mtext, hovertemplate="%{text}<extra></extra>",
        showlegend=False, marker={"size": 7, "opacity": 0.01, "color": [lo] * len(mx),
                                  "colorscale": DIVERGING, "cmin": lo, "cmax": hi,
                                  "showscale": True, "colorbar": {"title": "score",
                                                                  "thickness": 12}}))
    used = set(circuit.nodes)
    s_in = {n: 0.0 for n in pos}
    s_out = dict(s_in)
    for u, v, score in edges:
        s_out[u] += score
        s_in[g.node_of_receiver(g.receiver_index[v])] += score
    for inside in (False, True):
        names = [n for n in pos if (n in used) == inside]
        fig.add_trace(go.Scatter(
            x=[pos[n][0] for n in names], y=[pos[n][1] for n in names],
            mode="markers+text" if inside else "markers", text=names,
            textposition="middle right", showlegend=False,
            customdata=[[s_in[n], s_out[n]] for n in names],
            hovertemplate="%{text}<br>in %{customdata[0]:.4g}, out %{customdata[1]:.4g}"
                          "<extra></extra>",
            marker={"size": 14 if inside else 8, "color": QUALITATIVE[0] if inside else "#DDDDDD",
                    "symbol": ["square" if n.startswith("m") else "circle" for n in names],
                    "line": {"width": 1, "color": "#444444" if inside else "#DDDDDD"}}))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(tickmode="array", tickvals=[-1, *range(g.n_layers), g.n_layers],
                     ticktext=["input", *[f"layer {i}" for i in range(g.n_layers)], "logits"],
                     showgrid=False)
    n_all = int(g.valid.sum())
    fig.update_layout(title=title or f"{circuit.method} circuit: {circuit.n_edges} of {n_all} "
                                     f"edges (q solid, k dashed, v dotted)")
    return apply(fig, size=size)


def plot_faithfulness(curve, *, title: str | None = None, size: str | None = None) -> go.Figure:
    """Faithfulness against the number of edges kept.

    Example::

        curve = faithfulness_curve(model, pair, eap(model, pair, steps=5))
        fig = plot_faithfulness(curve)   # x: edges kept (log), y: 0 = ablated, 1 = full
    """
    x = curve.n_edges
    share = [100 * n / curve.total_edges for n in x]
    fig = go.Figure(go.Scatter(
        x=[max(n, 0.5) for n in x], y=curve.faithfulness.tolist(), mode="lines+markers",
        name=curve.method or "circuit", customdata=list(zip(x, share, curve.values.tolist())),
        hovertemplate="%{customdata[0]} edges (%{customdata[1]:.1f}%)<br>faithfulness "
                      "%{y:.3f}<br>" + curve.metric + " %{customdata[2]:.4g}<extra></extra>"))
    fig.add_hline(y=1, line_dash="dot", annotation_text="full model")
    fig.add_hline(y=0, line_dash="dot", annotation_text=f"all ablated ({curve.ablation})",
                  annotation_position="bottom right")
    fig.update_xaxes(type="log", title_text="edges kept")
    fig.update_yaxes(title_text="faithfulness")
    fig.update_layout(title=title or f"faithfulness ({curve.metric}, {curve.total_edges} "
                                     "edges in the graph)")
    return apply(fig, size=size)


__all__ = ["plot_circuit", "plot_faithfulness"]
