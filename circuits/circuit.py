"""Circuits: sets of edges, run with every other edge ablated, and their faithfulness.

A :class:`Circuit` is a subset of the edges of a model's
:class:`~thinklens.circuits.graph.Graph`, with the attribution score of every edge
(:func:`~thinklens.circuits.eap` returns the full graph; :meth:`Circuit.top` keeps the
best edges). Evaluating it (Hanna et al. 2024, "Have faith in faithfulness"; Conmy et
al. 2023, ACDC):

1. Run the clean input. Every receiver's input is rebuilt as the sum of its senders'
   outputs, where a kept edge carries the sender's output in *this* run and an
   ablated edge carries the sender's ablated output: its output in the corrupted run
   (``ablation="corrupt"``), or its mean over ``mean_over`` inputs (``"mean"``;
   position by position when every input is at least as long as the pair up to the
   answer, else one mean over positions too). See :mod:`thinklens.circuits._edges`.
2. Read the metric at the answer position. With every edge kept this is the clean run;
   with none, the corrupted run (or the mean-ablated one).
3. Faithfulness ``(m(C) - m(∅)) / (m(full) - m(∅))``: 1 = the circuit recovers the full
   model's metric, 0 = no better than ablating everything (the normalised metric of
   METHODS.md, with ``m(∅)`` = the corrupted run when ablating to it).

:func:`faithfulness_curve` evaluates the top-n circuits for many n as rows of one
batched pass (chunked to the memory budget).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from thinklens.circuits import _edges, _engine
from thinklens.circuits.graph import Graph
from thinklens.circuits.metrics import normalize
from thinklens.circuits.pairs import Pair, input_tokens
from thinklens.circuits.results import AttributionResult
from thinklens.errors import ConfigError
from thinklens.hooks import forward
from thinklens.hooks._fileio import atomic_write_text

_FORMAT, _VERSION = "thinklens.circuit", 1
_ABLATIONS = ("corrupt", "mean")


@dataclass
class Circuit:
    """Edges of a graph with their scores; ``edges`` marks the ones in the circuit.

    Example::

        full = eap(model, pair, steps=5)           # every edge, scored
        c = full.top(n=40)                          # or full.top(threshold=0.05)
        c.n_edges, c.nodes[:3]                      # 40, ['input', 'a0.h1', ...]
        c.faithfulness(model, pair)                 # e.g. 0.93
        c.to_json("circuit.json"); Circuit.from_json("circuit.json")
    """

    graph: Graph
    scores: Float[Tensor, "sender receiver"]  # noqa: F821
    edges: Bool[Tensor, "sender receiver"]  # noqa: F821
    metric: str
    clean: float
    corrupt: float
    direction: str = "denoising"
    method: str = "eap"
    model: str = ""

    def __post_init__(self) -> None:
        shape = tuple(self.graph.valid.shape)
        if tuple(self.scores.shape) != shape or tuple(self.edges.shape) != shape:
            raise ConfigError(f"scores {tuple(self.scores.shape)} and edges "
                              f"{tuple(self.edges.shape)} must both be {shape} "
                              f"(senders x receivers of {self.graph.describe()})")
        self.edges = self.edges.bool() & self.graph.valid

    def __repr__(self) -> str:
        return (f"Circuit({self.method}, {self.n_edges}/{self.graph.valid.sum()} edges, "
                f"{len(self.nodes)} nodes, metric {self.metric}: clean={self.clean:.4g}, "
                f"corrupt={self.corrupt:.4g})")

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    @property
    def nodes(self) -> list[str]:
        """Senders and receiving nodes touched by an edge of the circuit, in graph order."""
        s, r = self.edges.nonzero(as_tuple=True)
        names = {self.graph.senders[i] for i in s.tolist()}
        names |= {self.graph.node_of_receiver(i) for i in r.tolist()}
        order = self.graph.senders + ["logits"]
        return [n for n in order if n in names]

    def edge_list(self) -> list[tuple[str, str, float]]:
        """``(sender, receiver, score)`` of the circuit's edges, largest ``|score|`` first."""
        s, r = self.edges.nonzero(as_tuple=True)
        out = [(self.graph.senders[i], self.graph.receivers[j], float(self.scores[i, j]))
               for i, j in zip(s.tolist(), r.tolist())]
        return sorted(out, key=lambda e: -abs(e[2]))

    def ranking(self, absolute: bool = True) -> Tensor:
        """``Long[S, R]``: rank of each circuit edge by score (0 = best); others -1."""
        key = self.scores.abs() if absolute else self.scores
        key = torch.where(self.edges, key.float(), torch.tensor(-math.inf))
        order = torch.argsort(key.flatten(), descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        return torch.where(self.edges, rank.view_as(key), -1)

    def top(self, n: int | None = None, *, threshold: float | None = None,
            absolute: bool = True) -> Circuit:
        """The ``n`` best edges, or those with ``|score| >= threshold``.

        ``absolute=False`` ranks by signed score (edges that help the metric most).
        """
        if (n is None) == (threshold is None):
            raise ConfigError("give one of n= (number of edges) or threshold= (minimum score)")
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.n_edges:
                raise ConfigError(f"n={n!r}; give an int in 0..{self.n_edges} (edges in this "
                                  "circuit)")
            keep = (self.ranking(absolute) < n) & self.edges
        else:
            if not isinstance(threshold, int | float) or math.isnan(threshold):
                raise ConfigError(f"threshold={threshold!r}; give a number")
            key = self.scores.abs() if absolute else self.scores
            keep = (key >= threshold) & self.edges
        return replace(self, edges=keep)

    def node_effects(self, site: str = "z") -> AttributionResult:
        """Each sender's summed out-edge scores as an estimate of patching it.

        ``site="z"``: heads, ``values [layer, head]`` comparable with
        ``patch(model, pair, "z", by=("layer", "head"))``; ``"mlp_out"``: ``[layer]``.
        Over the full graph (all edges), EAP's node effect is AtP's.
        """
        g = self.graph
        total = (self.scores * self.graph.valid).sum(1)
        base = self.corrupt if self.direction == "denoising" else self.clean
        layers = list(range(g.n_layers))
        if site == "z":
            idx = torch.tensor([[g.attn_start(la) + h for h in range(g.n_heads)] for la in layers])
            axes, labels = ("layer", "head"), {"layer": layers, "head": list(range(g.n_heads))}
        elif site == "mlp_out":
            idx = torch.tensor([g.attn_start(la) + g.n_heads for la in layers])
            axes, labels = ("layer",), {"layer": layers}
        else:
            raise ConfigError(f"site={site!r}; valid: 'z' (heads), 'mlp_out' (MLPs)")
        return AttributionResult(base + total[idx], axes, labels, self.metric, self.clean,
                                 self.corrupt, site, self.direction, self.method)

    def faithfulness(self, model: Any, pair: Pair, *, ablation: str = "corrupt",
                     mean_over: Sequence[Any] | None = None, metric: Any = None) -> float:
        """``(m(C) - m(∅)) / (m(full) - m(∅))`` with every edge outside ablated."""
        curve = _evaluate(model, pair, self, [self.edges], ablation, mean_over, metric)
        return float(curve.faithfulness[0])

    def to_json(self, path: str | Path) -> Path:
        """Write every edge of the graph (score, in circuit or not) atomically."""
        path = Path(path)
        s, r = self.graph.valid.nonzero(as_tuple=True)
        edges = [{"edge": self.graph.edge_name(i, j), "score": float(self.scores[i, j]),
                  "in_circuit": bool(self.edges[i, j])} for i, j in zip(s.tolist(), r.tolist())]
        doc = {"format": _FORMAT, "version": _VERSION, "model": self.model,
               "graph": self.graph.to_dict(), "metric": self.metric, "clean": self.clean,
               "corrupt": self.corrupt, "direction": self.direction, "method": self.method,
               "edges": edges}
        try:
            text = json.dumps(doc, indent=1, allow_nan=False)
        except ValueError as err:
            raise ConfigError(f"circuit has a non-finite score or baseline ({err}); "
                              "cannot write it as JSON") from err
        atomic_write_text(path, text)
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> Circuit:
        """Load :meth:`to_json`'s file; edges not listed get score 0, out of the circuit."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no circuit file at {str(path)!r}")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{str(path)!r} is not a JSON circuit file: {err}") from err
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ConfigError(f"{str(path)!r} is not a thinklens circuit (format "
                              f"{_FORMAT!r} expected); write one with Circuit.to_json")
        if doc.get("version") != _VERSION:
            raise ConfigError(f"{str(path)!r}: circuit format version {doc.get('version')!r}; "
                              f"this thinklens reads version {_VERSION}")
        graph = Graph.from_dict(doc.get("graph"))
        for key, kind in (("metric", str), ("clean", float), ("corrupt", float),
                          ("direction", str), ("method", str), ("model", str),
                          ("edges", list)):
            ok = isinstance(doc.get(key), int | float) if kind is float else \
                isinstance(doc.get(key), kind)
            if not ok or isinstance(doc.get(key), bool):
                raise ConfigError(f"{str(path)!r}: field {key!r} is {doc.get(key)!r}; "
                                  f"expected a {kind.__name__}")
        scores = torch.zeros(graph.valid.shape)
        edges = torch.zeros(graph.valid.shape, dtype=torch.bool)
        seen = set()
        for k, e in enumerate(doc["edges"]):
            if not isinstance(e, dict) or not isinstance(e.get("score"), int | float) \
                    or not isinstance(e.get("in_circuit"), bool):
                raise ConfigError(f"{str(path)!r}: edge #{k} is {e!r}; expected "
                                  "{'edge': 'u->v', 'score': number, 'in_circuit': bool}")
            s, r = graph.parse_edge(e.get("edge"))
            if (s, r) in seen:
                raise ConfigError(f"{str(path)!r}: edge {e['edge']!r} is listed twice")
            seen.add((s, r))
            scores[s, r], edges[s, r] = float(e["score"]), e["in_circuit"]
        return cls(graph, scores, edges, doc["metric"], float(doc["clean"]),
                   float(doc["corrupt"]), doc["direction"], doc["method"], doc["model"])


@dataclass
class FaithfulnessCurve:
    """Faithfulness of the top-n circuits: ``n_edges[i]`` edges -> ``faithfulness[i]``.

    ``values``: the raw metric of each circuit; ``full``/``empty``: the metric with
    every edge / no edge kept (``empty`` = the corrupted run when ablating to it).
    """

    n_edges: list[int]
    faithfulness: Float[Tensor, "size"]  # noqa: F821
    values: Float[Tensor, "size"]  # noqa: F821
    full: float
    empty: float
    total_edges: int
    metric: str
    ablation: str
    method: str = ""

    def smallest(self, at_least: float = 0.8) -> int | None:
        """Fewest edges whose circuit reaches ``at_least`` faithfulness (None if none)."""
        hits = [n for n, f in zip(self.n_edges, self.faithfulness.tolist()) if f >= at_least]
        return min(hits) if hits else None


def faithfulness_curve(model: Any, pair: Pair, circuit: Circuit,
                       sizes: Sequence[int] | None = None, *, ablation: str = "corrupt",
                       mean_over: Sequence[Any] | None = None, metric: Any = None,
                       absolute: bool = True, batch_size: int | None = None,
                       budget: Any = None, progress: bool | None = None) -> FaithfulnessCurve:
    """Faithfulness of ``circuit.top(n)`` for each ``n`` in ``sizes``, batched.

    Example::

        curve = faithfulness_curve(model, pair, eap(model, pair, steps=5))
        curve.n_edges[:4], curve.faithfulness[:4]     # [0, 1, 2, 3], tensor([0., .2, ...])
        curve.smallest(0.8)                            # edges needed for 80%
    """
    total = circuit.n_edges
    if sizes is None:
        sizes = sorted({0, total, *torch.logspace(0, math.log10(max(total, 1)), 24)
                        .round().long().tolist()})
    sizes = list(sizes)
    bad = [n for n in sizes if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= total]
    if bad or not sizes:
        raise ConfigError(f"sizes {bad or sizes!r}: give edge counts in 0..{total}")
    rank = circuit.ranking(absolute)
    masks = [(rank < n) & circuit.edges for n in sizes]
    return _evaluate(model, pair, circuit, masks, ablation, mean_over, metric, sizes,
                     batch_size, budget, progress)


def _mean_outputs(model: Any, inputs: Sequence[Any], n: int) -> Tensor:
    """``[S, n | 1, d_model]``: mean sender outputs over ``inputs``, run in padded batches
    (:mod:`thinklens.hooks.forward`; each input's padding is cut off before averaging)."""
    if isinstance(inputs, str | Pair) or not inputs:
        raise ConfigError("mean_over: give a list of inputs (text, token ids or Traces) to "
                          "average the senders' outputs over")
    seqs = [input_tokens(model, x, f"mean_over[{k}]")[0] for k, x in enumerate(inputs)]
    weights = _edges.layer_weights(model)
    sites = model.sites(list(_edges.SENDER_SITES))
    outs: list[Tensor] = [torch.empty(0)] * len(seqs)
    acts: dict[str, Tensor] = {}

    def hooks(batch: forward.Batch) -> list:
        acts.clear()
        rec = _engine.recorder(acts)
        return [rec(s) for s in sites]

    def after(batch: forward.Batch) -> None:
        out = _edges.sender_outputs(acts, weights)                 # [b, S, pos, d_model]
        for j, i in enumerate(batch.rows):
            outs[i] = out[j, :, :int(batch.lengths[j])]

    forward.run(model, seqs, hooks, after=after)
    if all(o.shape[1] >= n for o in outs):
        return torch.stack([o[:, :n] for o in outs]).mean(0)
    return torch.cat(outs, 1).mean(1, keepdim=True)


def _evaluate(model: Any, pair: Pair, circuit: Circuit, masks: list[Tensor], ablation: str,
              mean_over: Sequence[Any] | None, metric: Any, sizes: list[int] | None = None,
              batch_size: int | None = None, budget: Any = None,
              progress: bool | None = None) -> FaithfulnessCurve:
    graph = Graph.of(model)
    if graph != circuit.graph:
        raise ConfigError(f"circuit graph ({circuit.graph.describe()}) does not match model "
                          f"{model.name!r} ({graph.describe()})")
    if ablation not in _ABLATIONS:
        raise ConfigError(f"ablation={ablation!r}; valid: {', '.join(_ABLATIONS)}")
    if (ablation == "mean") != (mean_over is not None):
        raise ConfigError("ablation='mean' needs mean_over=[inputs...] (and mean_over only "
                          "goes with ablation='mean')")
    metric = metric if metric is not None else circuit.metric
    sites = model.sites(list(_edges.SENDER_SITES))
    ctx = _engine.run_pair(model, pair, metric, "noising", (), sites)  # base clean, source corrupt
    n = pair.answer_pos + 1
    if ablation == "corrupt":
        ablated = _edges.sender_outputs(ctx.acts_src, _edges.layer_weights(model))[0, :, :n]
    else:
        ablated = _mean_outputs(model, mean_over, n)
    rows = [torch.zeros_like(graph.valid)] + list(masks)  # row 0: everything ablated
    out = torch.empty(len(rows))
    step = _engine.rows_per_pass(model, n, batch_size, budget)
    for idx in _engine.chunked(list(range(len(rows))), step, progress, "circuits"):
        keep = torch.stack([rows[i] for i in idx])
        ids = ctx.base[:, :n].expand(len(idx), -1)
        logits, _ = _edges.edge_run(model, graph, ids, keep=keep, ablated=ablated)
        out[idx] = _engine.check_rows(ctx.fn(logits), len(idx), ctx.name).float().cpu()
    empty, full = float(out[0]), ctx.clean
    values = out[1:]
    faith = normalize(values, full, empty, what=f"metric {ctx.name!r} (every edge kept vs none)")
    return FaithfulnessCurve(list(sizes) if sizes is not None else [int(m.sum()) for m in masks],
                             faith, values, full, empty, int(graph.valid.sum()), ctx.name,
                             ablation, circuit.method)


__all__ = ["Circuit", "FaithfulnessCurve", "faithfulness_curve"]
