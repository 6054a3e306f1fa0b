"""Logit lens and answer probe: when, during the thinking, does the model know its answer?

Logit lens (nostalgebraist 2020; applied to thinking as in METHODS.md, "Probing"):

1. One forward pass per batch of traces (right-padded, attention-masked), with scoped hooks
   on the embeddings (``blocks.0.hook_resid_pre``) and every ``blocks.L.hook_resid_post``.
2. Inside each hook, at the chosen positions only, apply the model's own final norm and
   unembedding (:func:`lens_logits`) and reduce at once to the final answer token's rank,
   probability and the top-1 token; no residual stream is kept after its hook returns.
3. At the last layer this is exactly the model's output distribution, so the lens ends
   where the model does; earlier layers show when the answer becomes readable.

Answer probe (a linear probe per thinking position, Alain & Bengio 2016; split by trace
and reported with a shuffled-label control, Hewitt & Liang 2019):

1. Place ``n_bins`` points evenly from each trace's first thinking token (0%) to its
   closing tag (100%, the position that predicts the answer), or take the last token of
   each sentence, and read the residual stream there at each layer.
2. Split traces (never tokens) into train and test; per layer and point, fit a multinomial
   logistic regression from the residual to the final answer, and the same on shuffled
   labels (the control).
3. Test accuracy over the points is the "when does it know" curve; accuracy minus the
   control's is its selectivity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from thinklens.errors import ConfigError
from thinklens.hooks import forward as fwd
from thinklens.hooks.positions import positions_of, warn_lacking
from thinklens.hooks.reprs import compact_repr
from thinklens.hooks.trace import Trace
from thinklens.probes.data import ProbeData, split_traces
from thinklens.probes.linear import fit_probe

_ROWS = 512  # positions decoded at once: bounds the [rows, d_vocab] buffer of large vocabularies


@dataclass
class LensResult:
    """Answer rank/probability per ``[trace, layer, pos]``; padding is -1 (rank, top), nan (prob).

    ``layers`` labels the layer axis with site names, ``positions[t, p]`` is the token
    index of row ``p`` of trace ``t`` and ``tokens[t][p]`` its text.
    """

    __repr__ = compact_repr  # shapes, not whole tensors (hooks/reprs.py)

    rank: Int[Tensor, "trace layer pos"]  # noqa: F722
    prob: Float[Tensor, "trace layer pos"]  # noqa: F722
    top: Int[Tensor, "trace layer pos"]  # noqa: F722
    positions: Int[Tensor, "trace pos"]  # noqa: F722
    lengths: Int[Tensor, " trace"]  # noqa: F722
    layers: list[str]
    tokens: list[list[str]]
    answer_ids: list[int]
    answer_tokens: list[str]
    axes: tuple[str, ...] = ("trace", "layer", "pos")


@dataclass
class AnswerProbeResult:
    """Test accuracy of answer probes per ``[layer, bin]``, with a shuffled-label control."""

    __repr__ = compact_repr  # shapes, not whole tensors (hooks/reprs.py)

    accuracy: Float[Tensor, "layer bin"]  # noqa: F722
    control: Float[Tensor, "layer bin"]  # noqa: F722
    chance: Float[Tensor, " bin"]  # noqa: F722
    n_test: Int[Tensor, " bin"]  # noqa: F722
    layers: list[str]
    bins: list[str]
    axes: tuple[str, ...] = ("layer", "bin")
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def selectivity(self) -> Float[Tensor, "layer bin"]:  # noqa: F722
        return self.accuracy - self.control


def lens_logits(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:  # noqa: F722
    """The model's final norm, then its unembedding: ``lens_logits(model, resid).shape == (..., d_vocab)``."""
    return model.bridge.unembed(model.bridge.ln_final(resid))


def logit_lens(model, traces, *, answer: Any = None, layers: Any = "all",
               positions: Any = "thinking", batch_size: int = 8) -> LensResult:
    """Rank and probability of the final answer token at every layer and position.

    Example::

        lens = logit_lens(model, traces)              # thinking positions, embed + every layer
        lens.rank.shape                               # (trace, layer, pos) = (8, 5, 41)
        lens.layers[-1], lens.rank[0, -1, :4]         # 'blocks.3.hook_resid_post', tensor([7, 3, 3, 0])

    ``answer``: None (each trace's first non-blank answer token), a token id or string
    for all traces, or one per trace. ``layers``: "all" (embeddings, then each block's
    ``hook_resid_post``) or block indices (negatives count from the end; "embed" for the
    embeddings). ``positions``: any selector of :func:`thinklens.hooks.positions.positions`.
    """
    traces = fwd.as_traces(model, traces)
    sites = layer_sites(model, layers)
    ans = answer_ids(model, traces, answer)
    pos = positions_of(traces, positions)  # warns when traces lack thinking/sentences
    n, n_layers, width = len(traces), len(sites), max((len(p) for p in pos), default=0)
    rank = torch.full((n, n_layers, width), -1, dtype=torch.long)
    top = torch.full((n, n_layers, width), -1, dtype=torch.long)
    prob = torch.full((n, n_layers, width), float("nan"))

    def reduce(site: str, x: Tensor, idx: list[int]) -> None:
        li = sites.index(site)
        for j, i in enumerate(idx):
            for a in range(0, len(pos[i]), _ROWS):
                rows = pos[i][a: a + _ROWS]
                lp = lens_logits(model, x[j, rows.to(x.device)]).float().log_softmax(-1)
                target = lp[:, ans[i]: ans[i] + 1]
                rank[i, li, a: a + len(rows)] = (lp > target).sum(-1).cpu()
                prob[i, li, a: a + len(rows)] = target[:, 0].exp().cpu()
                top[i, li, a: a + len(rows)] = lp.argmax(-1).cpu()

    fwd.read(model, traces, sites, reduce, batch_size=batch_size)
    positions_t = torch.full((n, width), -1, dtype=torch.long)
    for i, p in enumerate(pos):
        positions_t[i, : len(p)] = p
    conv = model.tokenizer.convert_ids_to_tokens
    return LensResult(rank=rank, prob=prob, top=top, positions=positions_t,
                      lengths=torch.tensor([len(p) for p in pos], dtype=torch.long),
                      layers=sites, tokens=[[t.tokens[k] for k in p.tolist()]
                                            for t, p in zip(traces, pos)],
                      answer_ids=ans, answer_tokens=[conv(a) for a in ans])


def answer_probe(model, traces, *, answers: Sequence | None = None, layers: Any = "all",
                 by: str = "relative", n_bins: int = 10, test_frac: float = 0.3,
                 l2: float = 1.0, seed: int = 0, batch_size: int = 8) -> AnswerProbeResult:
    """Accuracy of a linear probe for the final answer along the thinking.

    Example::

        res = answer_probe(model, traces, by="relative", n_bins=5)
        res.accuracy.shape, res.bins     # (layer, bin) = (5, 5), ['0%', '25%', ..., '100%']

    ``answers``: one label per trace (default: each trace's first answer token).
    ``by``: "relative" (``n_bins`` evenly spaced tokens, first thinking token to ``</think>``) or
    "sentence" (last token of sentence k; traces with fewer sentences sit that one out).
    """
    traces = fwd.as_traces(model, traces)
    if by not in ("relative", "sentence"):
        raise ConfigError(f"by={by!r}; valid: 'relative', 'sentence'")
    if not 0 < test_frac < 1 or len(traces) < 4:
        raise ConfigError(f"need >= 4 traces and 0 < test_frac < 1, got {len(traces)} traces "
                          f"and test_frac={test_frac}")
    labels = list(answers) if answers is not None else answer_ids(model, traces, None)
    if len(labels) != len(traces):
        raise ConfigError(f"{len(labels)} answers for {len(traces)} traces; give one per trace")
    sites = layer_sites(model, layers)
    if by == "relative":
        n_pts = n_bins
        bins = [f"{k / max(1, n_bins - 1):.0%}" for k in range(n_bins)]
        pts = [[t.think_span.start + round(k / max(1, n_bins - 1) * _reach(t))
                for k in range(n_bins)] if len(t.think_span) else [] for t in traces]
    else:
        pts = [[s.end - 1 for s in t.sentences] for t in traces]
        n_pts = max((len(p) for p in pts), default=0)
        bins = [f"sentence {k}" for k in range(n_pts)]
    warn_lacking(traces, [k for k, p in enumerate(pts) if not p],
                 "thinking tokens" if by == "relative" else "thinking sentences")
    feats = torch.zeros(len(traces), len(sites), n_pts, model.config.d_model)
    has = torch.zeros(len(traces), n_pts, dtype=torch.bool)
    for i, p in enumerate(pts):
        has[i, : len(p)] = True

    def keep(site: str, x: Tensor, idx: list[int]) -> None:
        for j, i in enumerate(idx):
            if pts[i]:
                feats[i, sites.index(site), : len(pts[i])] = x[j, pts[i]].float().cpu()

    fwd.read(model, traces, sites, keep, batch_size=batch_size)
    classes = sorted(set(labels), key=str)
    y = torch.tensor([classes.index(c) for c in labels])
    is_test = torch.zeros(len(traces), dtype=torch.bool)
    is_test[split_traces(len(traces), test_frac, seed)[1]] = True
    g = torch.Generator().manual_seed(seed)  # the control's label shuffles
    acc = torch.full((len(sites), n_pts), float("nan"))
    ctl, chance = acc.clone(), torch.full((n_pts,), float("nan"))
    counts = torch.zeros(n_pts, dtype=torch.long)
    for b in range(n_pts):
        rows = has[:, b].nonzero()[:, 0]
        train, test = (~is_test[rows]).nonzero()[:, 0], is_test[rows].nonzero()[:, 0]
        counts[b] = len(test)
        if len(test) == 0 or len(y[rows[train]].unique()) < 2:
            continue
        yb = y[rows]
        chance[b] = (yb[test] == yb[train].mode().values).float().mean()
        tok = torch.tensor([pts[i][b] for i in rows.tolist()])
        data = ProbeData(feats[rows, :, b].transpose(0, 1).contiguous(), yb, rows, tok,
                         sites, classes)
        control = ProbeData(data.X, yb.clone(), rows, tok, sites, classes)
        control.y[train] = yb[train][torch.randperm(len(train), generator=g)]
        acc[:, b] = fit_probe(data, (train, test), l2=l2, seed=seed).test["accuracy"].float()
        ctl[:, b] = fit_probe(control, (train, test), l2=l2, seed=seed).test["accuracy"].float()
    return AnswerProbeResult(accuracy=acc, control=ctl, chance=chance, n_test=counts,
                             layers=sites, bins=bins,
                             meta={"by": by, "n_test_traces": int(is_test.sum()),
                                   "classes": classes})


def answer_ids(model, traces: list[Trace], answer: Any) -> list[int]:
    """Token id of the answer per trace (see :func:`logit_lens`'s ``answer``)."""
    if answer is None:
        out = [first_answer_token(t) for t in traces]
        for k, (t, a) in enumerate(zip(traces, out)):
            if a is None:
                raise ConfigError(f"trace {k} has no answer after its thinking (truncated="
                                  f"{t.truncated}); pass answer= (a token or string per trace)")
        return out
    if isinstance(answer, str | int):
        answer = [answer] * len(traces)
    answer = list(answer)
    if len(answer) != len(traces):
        raise ConfigError(f"{len(answer)} answers for {len(traces)} traces; give one per trace")
    out = []
    for a in answer:
        ids = [int(a)] if isinstance(a, int) else model.encode(str(a))
        if not ids or not 0 <= ids[0] < model.config.d_vocab:
            raise ConfigError(f"answer {a!r} is not a token of this model (vocabulary of "
                              f"{model.config.d_vocab}); give a token id or a non-empty string")
        out.append(ids[0])
    return out


def _reach(trace: Trace) -> int:
    """Tokens from the thinking's first token to its closing tag (the last token if none)."""
    return min(trace.think_span.end, len(trace) - 1) - trace.think_span.start


def first_answer_token(trace: Trace) -> int | None:
    """Id of the first non-blank token after the thinking, or None."""
    ids = [trace.token_ids[i] for i in trace.answer_span.range if trace.tokens[i].strip()]
    return ids[0] if ids else None


def layer_sites(model, layers: Any) -> list[str]:
    """Residual-stream sites of ``layers``: ``layer_sites(model, [-1]) == ['blocks.3.hook_resid_post']``.

    "all" is the embeddings (``blocks.0.hook_resid_pre``) then every ``hook_resid_post``.
    """
    n = model.config.n_layers
    if isinstance(layers, str) and layers == "all":
        return ["blocks.0.hook_resid_pre"] + [f"blocks.{k}.hook_resid_post" for k in range(n)]
    out = []
    for k in [layers] if isinstance(layers, int | str) else list(layers):
        if k == "embed":
            out.append("blocks.0.hook_resid_pre")
        elif isinstance(k, int) and -n <= k < n:
            out.append(f"blocks.{k % n}.hook_resid_post")
        else:
            raise ConfigError(f"layer {k!r} is not valid; give 'all', 'embed' or block indices "
                              f"{-n}..{n - 1}")
    return list(dict.fromkeys(out))


__all__ = ["LensResult", "AnswerProbeResult", "lens_logits", "logit_lens", "answer_probe",
           "answer_ids", "first_answer_token", "layer_sites"]
