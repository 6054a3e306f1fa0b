"""The patching engine that activation patching, path patching, attribution and circuits share.

Every analysis in :mod:`thinklens.circuits` runs a clean/corrupted
:class:`~thinklens.circuits.pairs.Pair` the same way:

1. :func:`run_pair` runs the *base* input (the one patched into: the corrupted run when
   denoising, the clean run when noising) and the *source* input once each, recording
   the activations asked for (:func:`recorder`); it resolves the metric
   (:func:`resolve`: a name of :data:`METRIC_NAMES` or a callable) and reads its clean
   and corrupted values into a :class:`PairRuns`. Every metric output is checked to be
   one float per batch row (:func:`check_rows`): patched runs share a batch.
2. Patched runs are rows of one batch of copies of the base input, chunked to a memory
   budget (:func:`rows_per_pass`, :func:`chunked`).
3. :func:`run_answer` runs one such batch and unembeds the answer position only
   (``logits_to_keep``), optionally after a KV-cache prefix of the tokens no row changes.
   These rows are all the same length (copies of one pair), so they need no padding, and
   the padded-batch forward runner (:mod:`thinklens.hooks.forward`) neither takes nor
   returns a KV cache: these runs bypass it. Inputs of different lengths (the mean
   ablation's ``mean_over`` in :mod:`thinklens.circuits.circuit`) go through the runner.
4. Sites are named by kind (:data:`SITE_KINDS`) or by hook names (:func:`site_kind`);
   their tensor layout (:func:`layout_of`) decides how the one setter :func:`put` writes
   a cell.

Grouped-query attention: ``hook_k``/``hook_v`` hold ``n_kv_heads`` heads (layout ``kv``).
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from thinklens.circuits import metrics
from thinklens.circuits.pairs import Pair
from thinklens.errors import ConfigError, did_you_mean
from thinklens.hooks import budget as _budget

# kind -> hook name inside a block; layouts: "pos" [b, pos, ...], "head" [b, pos, head, d],
# "kv" like "head" with n_kv_heads, "pattern" [b, head, query, key]
SITE_KINDS = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid",
              "resid_post": "hook_resid_post", "attn_out": "hook_attn_out",
              "mlp_out": "hook_mlp_out", "z": "attn.hook_z", "q": "attn.hook_q",
              "k": "attn.hook_k", "v": "attn.hook_v", "pattern": "attn.hook_pattern"}
DIRECTIONS = ("denoising", "noising")
METRIC_NAMES = ("logit_diff", "normalized_logit_diff", "prob", "kl")
_MAX_ROWS = 128  # more rows per pass stop paying off on CPU and crowd the KV-prefix reuse


@dataclass
class PairRuns:
    """What :func:`run_pair` read from one base and one source run of a pair.

    ``base``: the base input's token ids; ``acts_base`` / ``acts_src``: the activations
    recorded in each run (detached copies, batch-first); ``cache``: the base run's KV
    cache when asked for (None otherwise, or for sliding-window models); ``name`` /
    ``fn``: the resolved metric; ``clean`` / ``corrupt``: its value on each run;
    ``base_value``: its value on the base run.
    """

    base: Int[Tensor, "1 pos"]
    name: str
    fn: metrics.MetricFn
    clean: float
    corrupt: float
    base_value: float
    acts_base: dict[str, Tensor] = field(default_factory=dict)
    acts_src: dict[str, Tensor] = field(default_factory=dict)
    cache: Any = None


def check_rows(out: object, n: int, name: str) -> Tensor:
    """``out`` as a float tensor of shape ``(n,)``, or a ConfigError saying how to fix it."""
    if not isinstance(out, Tensor) or out.shape != (n,) or not out.is_floating_point():
        got = (f"shape {tuple(out.shape)} and dtype {out.dtype}" if isinstance(out, Tensor)
               else f"a {type(out).__name__}")
        raise ConfigError(
            f"metric {name!r} returned {got} for a batch of {n} rows; it must return one "
            f"float per row, shape ({n},). Patched runs share a batch, so do not average "
            "over it: e.g. lambda logits: logits[:, answer] - logits[:, wrong] "
            "(logits are [batch, d_vocab] at the answer position)")
    return out


def _resolve(metric: str | metrics.MetricFn, *, answer: int | None, wrong: int | None,
            clean: Tensor, corrupt: Tensor) -> tuple[str, metrics.MetricFn]:
    """(name, fn) for a metric name or callable; ``clean``/``corrupt``: ``[d_vocab]`` logits."""
    if callable(metric):
        name = getattr(metric, "name", getattr(metric, "__name__", "metric"))
        return name, metric
    if metric not in METRIC_NAMES:
        raise ConfigError(f"unknown metric {metric!r}.{did_you_mean(str(metric), METRIC_NAMES)}"
                          f" Valid names: {', '.join(METRIC_NAMES)}, or a callable "
                          "logits [batch, d_vocab] -> [batch]")
    if metric == "kl":
        return "kl", metrics.kl_to(clean)
    need = ["answer"] if metric == "prob" else ["answer", "wrong"]
    missing = [k for k in need if {"answer": answer, "wrong": wrong}[k] is None]
    if missing:
        raise ConfigError(f"metric {metric!r} needs the pair's {' and '.join(missing)} token; "
                          "make the pair with make_pair(model, clean, corrupt, answer=' Mary', "
                          "wrong=' John')")
    if metric == "prob":
        return "prob", metrics.answer_prob(answer)
    base = metrics.logit_diff(answer, wrong)
    if metric == "logit_diff":
        return "logit_diff", base
    both = base(torch.stack([clean, corrupt]))
    return metric, metrics.normalized(base, float(both[0]), float(both[1]))


def layout_of(site: str) -> str:
    """Layout of a hook name: ``pos``, ``head``, ``kv`` or ``pattern`` (see module doc)."""
    if site.endswith(("attn.hook_pattern", "attn.hook_attn_scores")):
        return "pattern"
    if site.endswith(("attn.hook_k", "attn.hook_v", "attn.hook_rot_k")):
        return "kv"
    return "head" if site.endswith(("attn.hook_z", "attn.hook_q", "attn.hook_rot_q")) else "pos"


def put(act: Tensor, layout: str, rows: Tensor, pos: Tensor, heads: Tensor | None,
        src: Tensor, src_pos: Tensor | None = None, src_rows: Tensor | None = None) -> Tensor:
    """The one setter: ``act[rows, pos, heads] = src[src_rows, src_pos, heads]`` in place.

    ``rows [n]``, ``pos [n|1, P]``, ``heads [n|1, H]`` (None for the "pos" layout);
    ``src`` is batch-first like ``act`` (``src_rows`` default 0: one source sequence).
    ``src_pos`` (default ``pos``) differs when ``act`` starts at a later token. The
    attention pattern ``[b, head, query, key]`` is viewed query-major, so "pos" is the
    query position.
    """
    view = act.transpose(1, 2) if layout == "pattern" else act
    s_view = src.transpose(1, 2) if layout == "pattern" else src
    dev = act.device
    src_pos = (pos if src_pos is None else src_pos).to(dev)
    src_rows = torch.zeros_like(rows) if src_rows is None else src_rows
    rows, pos, src_rows = rows.to(dev), pos.to(dev), src_rows.to(dev)
    heads = None if heads is None else heads.to(dev)
    if heads is None:
        view[rows[:, None], pos] = s_view[src_rows[:, None], src_pos]
    else:
        r, sr = rows[:, None, None], src_rows[:, None, None]
        h = heads[:, None, :]
        view[r, pos[:, :, None], h] = s_view[sr, src_pos[:, :, None], h]
    return act


def _site_kind(model: Any, site: str) -> tuple[str, str, list[int]]:
    """``(hook suffix, label, layers)`` of a kind name, hook names or a glob of one kind.

    Example: ``_site_kind(model, "z")`` -> ``("attn.hook_z", "z", [0, 1, 2, 3])``.
    """
    if site in SITE_KINDS:
        return SITE_KINDS[site], site, list(range(model.config.n_layers))
    if "." not in site:
        raise ConfigError(f"unknown site kind {site!r}.{did_you_mean(site, SITE_KINDS)} Valid "
                          f"kinds: {', '.join(SITE_KINDS)}, or hook names such as "
                          "'blocks.3.hook_resid_pre' / globs such as 'blocks.*.attn.hook_z'")
    names = model.sites(site)  # SiteError with a did-you-mean for unknown names
    parsed = [re.fullmatch(r"blocks\.(\d+)\.(.+)", n) for n in names]
    suffixes = {m.group(2) for m in parsed if m}
    if not all(parsed) or len(suffixes) != 1:
        raise ConfigError(f"site {site!r} matches {names[:4]}...; patch one activation kind "
                          "inside the blocks at a time, e.g. 'blocks.*.hook_resid_pre'")
    return suffixes.pop(), site, [int(m.group(1)) for m in parsed]


def _indices(given: Any, n: int, what: str) -> list[int]:
    """Sorted distinct indices in ``0..n-1`` (negatives from the end); None: all of them."""
    if given is None:
        return list(range(n))
    given = given.tolist() if hasattr(given, "tolist") else given
    given = list(given) if isinstance(given, Sequence | range) else [given]
    bad = [i for i in given if isinstance(i, bool) or not isinstance(i, numbers.Integral)
           or not -n <= i < n]
    if bad or not given:
        raise ConfigError(f"{what} {bad or given!r}: give token/layer/head indices in "
                          f"0..{n - 1} (negatives count from the end)")
    return sorted({int(i) % n for i in given})


def _sweep_axes(by: str | Sequence[str], layout: str) -> tuple[str, ...]:
    """The swept axes of ``by`` in canonical order ``layer, pos, head`` for a site layout."""
    by = (by,) if isinstance(by, str) else tuple(by)
    allowed = ("layer", "pos") if layout == "pos" else ("layer", "pos", "head", "kv_head")
    if "layer" not in by or any(a not in allowed for a in by):
        raise ConfigError(f"by={by!r}: give 'layer' plus any of {allowed[1:]} for this site")
    return tuple(a for a in ("layer", "pos", "head") if a in by or (a == "head" and "kv_head" in by))


@dataclass
class Sweep:
    """The cells of one site kind that :func:`~thinklens.circuits.patch` and
    :func:`~thinklens.circuits.atp` sweep: ``names[layer]`` is each layer's hook name;
    ``axes`` the swept axes (``layer``, then ``pos`` / ``head`` as asked); ``heads`` None
    for sites without heads."""

    label: str
    layout: str
    axes: tuple[str, ...]
    layers: list[int]
    pos: list[int]
    heads: list[int] | None
    names: dict[int, str]

    @classmethod
    def of(cls, model: Any, pair: Pair, site: str, by: str | Sequence[str], layers: Any,
           positions: Any, heads: Any) -> Sweep:
        suffix, label, site_layers = _site_kind(model, site)
        layout = layout_of(suffix)
        cfg = model.config
        lays = _indices(layers, cfg.n_layers, "layers") if layers is not None else site_layers
        n_heads = cfg.n_kv_heads if layout == "kv" else cfg.n_heads
        hds = _indices(heads, n_heads, "heads") if layout != "pos" else None
        names = {layer: f"blocks.{layer}.{suffix}" for layer in lays}
        model.sites(list(names.values()))
        return cls(label, layout, _sweep_axes(by, layout), lays,
                   _indices(positions, len(pair), "positions"), hds, names)

    def result_axes(self, pair: Pair) -> tuple[tuple[str, ...], dict[str, list]]:
        """``(axes, labels)`` of the result: ``head`` is ``kv_head`` for k and v, and
        positions are labelled ``"i:token"``."""
        axes = tuple("kv_head" if a == "head" and self.layout == "kv" else a for a in self.axes)
        pos_labels = [f"{i}:{t}" for i, t in enumerate(pair.labels())]
        labels = {"layer": self.layers, "pos": [pos_labels[i] for i in self.pos],
                  "head": self.heads, "kv_head": self.heads}
        return axes, {a: labels[a] for a in axes}


def run_answer(model: Any, ids: Tensor, answer_pos: int, fwd: Sequence = (), cache: Any = None,
               p0: int = 0, want_cache: bool = False) -> tuple[Float[Tensor, "batch d_vocab"], Any]:
    """Answer-position logits of ``ids[:, p0:]`` run after ``cache`` (tokens ``< p0``).

    ``fwd``: forward hooks ``(name, fn)`` for this run only. Returns the logits and, with
    ``want_cache``, the run's KV cache (else None). No gradients.
    """
    kw: dict[str, Any] = {"logits_to_keep": torch.tensor([answer_pos - p0])}
    if cache is not None:
        kw["past_key_values"] = cache
    if want_cache:
        kw["return_type"] = "logits_and_cache"
    with torch.no_grad(), model.hooks(list(fwd)):
        out = model.bridge(ids[:, p0:].to(model.device), **kw)
    logits, cache = out if want_cache else (out, None)
    return logits[:, -1], cache


def recorder(store: dict[str, Tensor]) -> Callable[[str], tuple[str, Callable]]:
    """``rec = recorder(acts); run_answer(model, ids, p, [rec(s) for s in sites])`` fills
    ``acts[site]`` with a detached copy of each site's activation."""
    def hook(site: str):
        def fn(act, hook):
            store[site] = act.detach().clone()
            return act
        return site, fn
    return hook


def run_pair(model: Any, pair: Pair, metric: Any, direction: str, record_base: Sequence[str],
             record_src: Sequence[str], want_cache: bool = False) -> PairRuns:
    """Run base and source once: recorded activations, the metric and its two values."""
    if not isinstance(pair, Pair):
        raise ConfigError(f"pair must be a Pair (make_pair(model, clean, corrupt, ...)), got "
                          f"{type(pair).__name__}")
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    clean, corrupt = pair.clean_ids[None], pair.corrupt_ids[None]
    base, src = (corrupt, clean) if direction == "denoising" else (clean, corrupt)
    acts_base: dict[str, Tensor] = {}
    acts_src: dict[str, Tensor] = {}
    rec_b, rec_s = recorder(acts_base), recorder(acts_src)
    base_logits, cache = run_answer(model, base, pair.answer_pos,
                                    [rec_b(s) for s in record_base], want_cache=want_cache)
    src_logits, _ = run_answer(model, src, pair.answer_pos, [rec_s(s) for s in record_src])
    lc, lx = (src_logits, base_logits) if direction == "denoising" else (base_logits, src_logits)
    name, fn = _resolve(metric, answer=pair.answer, wrong=pair.wrong, clean=lc[0],
                               corrupt=lx[0])
    both = check_rows(fn(torch.cat([lc, lx])), 2, name).detach().cpu()
    if cache is not None and any(getattr(cache, "is_sliding", None) or []):
        cache = None  # sliding-window layers crop differently; run every token instead
    return PairRuns(base, name, fn, float(both[0]), float(both[1]),
                    float(both[1] if direction == "denoising" else both[0]),
                    acts_base, acts_src, cache)


def rows_per_pass(model: Any, length: int, batch_size: int | None, budget: Any) -> int:
    """Rows per forward pass: ``batch_size``, or what the memory budget allows (<= 128)."""
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r}; give a positive int or None")
        return batch_size
    limit = _budget.parse_budget(budget, model.device)
    per_row = _budget.forward_peak(model.config, 1, length, model.dtype.itemsize)
    return max(1, min(_MAX_ROWS, limit // max(per_row, 1)))


def chunked(items: Any, step: int, progress: bool | None, desc: str) -> Iterator[Any]:
    """``items[i:i + step]`` for each run of ``step``; a progress bar when ``progress`` is
    True, or by default when there are more than 4 runs."""
    runs = [items[i:i + step] for i in range(0, len(items), step)]
    show = progress if progress is not None else len(runs) > 4
    return iter(tqdm(runs, disable=not show, desc=desc))


__all__ = ["PairRuns", "Sweep", "check_rows", "layout_of", "put", "run_answer", "recorder",
           "run_pair", "rows_per_pass", "chunked", "SITE_KINDS"]
