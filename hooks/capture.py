"""Capture activations and attention from traces, to memory or to a disk store.

1. Resolve sites (hook names or globs) and positions per trace; estimate the memory and
   refuse, before running, a capture over budget (:mod:`thinklens.hooks.budget`).
2. Batch traces by length and right-pad them (:mod:`thinklens.hooks.forward`, the one
   forward runner): with causal attention and positions counted from 0 per sequence,
   real tokens never see the padding, so a padded batch captures what one-by-one
   capture does. The pass stops after the deepest hooked site. A capture that hooks no
   pattern (no pattern or score site, no ``attention=[(layer, head)]``) runs SDPA
   attention, the same values without ``[heads, T, T]`` per layer; one that does runs
   eager (:mod:`thinklens.hooks.attention_impl`). Attention statistics alone stay on
   SDPA: each layer's attention output and statistics come from one blockwise pass over
   its rotated q/k (:mod:`thinklens.hooks.blockwise`), never a full pattern.
3. Forward hooks (scoped, removed in ``finally``) copy each site's rows at the chosen
   positions. An attention pattern, as a site or through ``attention=[(layer, head)]``,
   is kept in TransformerLens's layout ``(head, query_pos, key_pos)`` per trace, its
   query rows at the chosen positions. Attention statistics (``attention=`` a name or a
   list of names, mixable with ``(layer, head)`` pairs), every layer and head, reduced
   while the pass runs, one layer at a time (Thought Anchors, Bogdan et al. 2025):
   ``"sentence"`` the ``(layer, head, query_sentence, key_sentence)`` matrix ``A[i, j]``
   = the mean token-to-token weight from the tokens of sentence i to those of sentence
   j; ``"vertical"`` each sentence's vertical score ``(layer, head, sentence)``, the mean
   of ``A[i, j]`` over ``i >= j + 4`` (computed without keeping A); ``"columns"`` each
   token's column sum of the pattern ``(layer, head, key_pos)``. They are kept in
   ``dtype=`` when given, else float32 (the S x S of a 32k-token trace of 10-token
   sentences is 4 GB per 8 layers x 12 heads in float32). The full patterns of all
   layers are never held at once.
4. Results go to a :class:`Capture` (memory) or are appended batch by batch to a
   :class:`~thinklens.hooks.store.Store`, skipping traces it already holds.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from thinklens.errors import ConfigError
from thinklens.hooks import attention_impl
from thinklens.hooks import budget as _budget
from thinklens.hooks import forward as fwd
from thinklens.hooks.activations import ActivationReader
from thinklens.hooks.blockwise import (
    AXES,
    STATISTICS,
    KeptStatistics,
    attention_statistics,
    sentence_means,
)
from thinklens.hooks.dtypes import parse_dtype
from thinklens.hooks.positions import positions_of, warn_lacking
from thinklens.hooks.sites import is_pattern_site
from thinklens.hooks.store import Store
from thinklens.hooks.trace import Trace, check_tokenizer

SENTENCE_KEY = STATISTICS["sentence"]


class Capture(ActivationReader):
    """Activations in memory; read like a store: ``capture["blocks.0.hook_resid_post"]``."""

    def __init__(self, traces: list[Trace], data: dict[str, list[torch.Tensor]],
                 axes: dict[str, tuple[str, ...]], positions: list[torch.Tensor],
                 meta: dict[str, Any]):
        self.traces = traces
        self._data = data
        self.keys = list(data)
        self.axes = axes
        self._pos = positions
        self.meta = meta

    def _per_trace(self, key: str) -> list[torch.Tensor]:
        return self._data[key]

    def _positions(self) -> list[torch.Tensor]:
        return self._pos

    def __repr__(self) -> str:
        return f"Capture({len(self.traces)} traces, keys={self.keys})"


def trace_id(trace: Trace) -> str:
    """Stable id: ``trace.meta['id']`` when given, else a hash of model and tokens."""
    if "id" in trace.meta:
        return str(trace.meta["id"])
    h = hashlib.sha256(f"{trace.model_name}|{trace.token_ids}".encode())
    return h.hexdigest()[:16]


def _parse_attention(attention: Any, cfg) -> tuple[tuple[str, ...], dict[int, list[int]]]:
    """``(statistics, heads)``: names from :data:`~thinklens.hooks.blockwise.STATISTICS`
    (a string or several in a list) and ``(layer, head)`` pairs, in any mix."""
    if attention is None:
        return (), {}
    items = [attention] if isinstance(attention, str) else list(attention)
    stats = tuple(w for w in STATISTICS if w in items)
    heads: dict[int, list[int]] = defaultdict(list)
    for pair in items:
        if isinstance(pair, str) and pair in STATISTICS:
            continue
        if isinstance(pair, str):
            raise ConfigError(f"attention={pair!r}; valid: None, {', '.join(map(repr, STATISTICS))} "
                              "(or a list of them), or a list of (layer, head) pairs such as "
                              "[(2, 1), (3, 0)]")
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise ConfigError(f"attention pair {pair!r} is not (layer, head)")
        layer, head = int(pair[0]), int(pair[1])
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise ConfigError(f"attention head ({layer}, {head}) out of range: layers "
                              f"0..{cfg.n_layers - 1}, heads 0..{cfg.n_heads - 1}")
        if head not in heads[layer]:
            heads[layer].append(head)
    return stats, {k: sorted(v) for k, v in sorted(heads.items())}


def _site_shapes(model, sites: list[str]) -> dict[str, tuple[int, ...]]:
    """Trailing shape per token of every site, from a 2-token dry run (keys not counted).

    Shapes never change for a model: the dry run happens once per site, then is cached.
    """
    cache = model.__dict__.setdefault("_site_shape_cache", {})
    missing = [s for s in sites if s not in cache]
    if missing:
        cache.update(_dry_run_shapes(model, missing))
    return {s: cache[s] for s in sites}


def _dry_run_shapes(model, sites: list[str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def rec(name):
        def fn(x, hook):  # a pattern is [batch, head, query_pos, key_pos]: per row, (head,)
            shapes[name] = (x.shape[1],) if is_pattern_site(name) else tuple(x.shape[2:])
            return x
        return fn

    ids = torch.tensor([[model.tokenizer.eos_token_id or 0] * 2], device=model.device)
    with torch.no_grad(), model.hooks([(s, rec(s)) for s in sites]):
        model.bridge(ids)
    return shapes


def _axes(model, site: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    c = model.config
    if is_pattern_site(site):  # TransformerLens's layout, rows at the chosen positions
        return ("head", "query_pos", "key_pos")
    if len(shape) == 2:
        return ("pos", "kv_head" if shape[0] == c.n_kv_heads and shape[0] != c.n_heads
                else "head", "d_head")
    if shape == (1,):
        return ("pos", "one")
    if site.endswith(("mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear")):
        return ("pos", "d_mlp")
    if "unembed" in site:
        return ("pos", "d_vocab")
    if shape == (c.d_model,):
        return ("pos", "d_model")
    names = {c.d_mlp: "d_mlp", c.d_vocab: "d_vocab"}
    return ("pos", *[names.get(n, f"dim{i}") for i, n in enumerate(shape)])


def capture(model, traces, *, sites=(), positions: Any = "all", attention: Any = None,
            dtype: Any = None, store: Any = None, batch_size: int = 8, budget: Any = None,
            progress: bool | None = None):
    """Record activations of ``traces`` at ``sites`` and ``positions``.

    Example::

        cap = model.capture(traces, sites="blocks.*.hook_resid_post", positions="thinking",
                            attention="sentence")
        cap["blocks.3.hook_resid_post"].values.shape   # (trace, pos, d_model)
        cap["sentence_attention"].values.shape  # (trace, layer, head, query_sentence, key_sentence)
        long = model.capture(traces, attention=["vertical", "columns"])  # no S x S kept
        long["vertical_scores"].values.shape    # (trace, layer, head, sentence)
        long["column_sums"].values.shape        # (trace, layer, head, key_pos)

    With ``store="acts/"`` (a folder or an open Store) results stream to disk batch by
    batch, traces already there are skipped, and the Store is returned.
    """
    if isinstance(traces, Trace):
        traces = [traces]
    traces = list(traces)
    if not traces:
        raise ConfigError("no traces to capture; build some with model.think(...) or "
                          "Trace.from_text(model, prompt, completion)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}; must be a positive integer")
    for t in traces:
        check_tokenizer(t, model.tokenizer)
    site_list = model.sites(sites) if sites not in ((), [], None, "") else []
    stats, heads = _parse_attention(attention, model.config)
    clash = [f"blocks.{layer}.attn.hook_pattern" for layer in heads
             if f"blocks.{layer}.attn.hook_pattern" in site_list]
    if clash:
        raise ConfigError(f"{clash[0]} is both a site and in attention=; choose one")
    if not site_list and not stats and not heads:
        raise ConfigError("nothing to capture: give sites= (e.g. 'blocks.*.hook_resid_post') "
                          "and/or attention= ('sentence', 'vertical', 'columns' or "
                          "[(layer, head), ...])")
    pos = positions_of(traces, positions)  # warns when traces lack thinking/sentences
    if {"sentence", "vertical"} & set(stats):
        warn_lacking(traces, [k for k, t in enumerate(traces) if not t.sentences],
                     f"thinking sentences (attention={attention!r})")
    out_dtype = parse_dtype(dtype) or model.dtype
    stats_dtype = parse_dtype(dtype) or torch.float32  # attention statistics: float32 unless asked
    shapes = _site_shapes(model, site_list) if site_list else {}
    axes = {s: _axes(model, s, shapes[s]) for s in site_list}
    for w in stats:
        axes[STATISTICS[w]] = AXES[w]
    for layer in heads:
        axes[f"blocks.{layer}.attn.hook_pattern"] = ("head", "query_pos", "key_pos")
    # head ids of every pattern key: all heads for a site, the chosen ones for attention=
    meta_heads = {s: list(range(model.config.n_heads)) for s in site_list
                  if is_pattern_site(s)}
    meta_heads.update({f"blocks.{k}.attn.hook_pattern": v for k, v in heads.items()})
    est = _budget.estimate(model, traces, site_list, shapes, pos, stats, heads, out_dtype, batch_size,
                   stats_dtype)
    _budget.check(est, _budget.parse_budget(budget, model.device), streaming=store is not None,
                  alternatives=_budget.alternatives(model, traces, site_list, shapes, pos, stats, heads,
                                             out_dtype, batch_size, stats_dtype, store))

    st = None
    todo = list(range(len(traces)))
    if store is not None:
        st = _open_store(model, store, list(axes), out_dtype, meta_heads)
        todo = [i for i in todo if trace_id(traces[i]) not in st]
    seqs = [traces[i].token_ids for i in todo]
    # attention statistics from q/k inside the SDPA pass, unless the pass is eager anyway
    blockwise = _budget.implementation_for(model, site_list, stats, heads) == "blockwise"
    # batch traces of similar length (less padding); a store keeps input order
    plan = fwd.plan(model, [len(x) for x in seqs], batch_size=batch_size, sort=st is None)
    data: dict[str, list] = {k: [None] * len(traces) for k in axes}
    show = progress if progress is not None else len(plan) > 4
    for rows in tqdm(plan, desc="capture", disable=not show):
        batch = [todo[r] for r in rows]
        got: dict[str, list] = {}
        hooks, observer = _batch_hooks(model, [traces[i] for i in batch],
                                       [pos[i] for i in batch], site_list, stats, heads,
                                       out_dtype, got, blockwise, stats_dtype)
        with attention_impl.observe(model, observer, output=True):
            fwd.forward(model, fwd.pad(model, seqs, rows), hooks, stop_early=True)
        if st is not None:
            records = []
            for j, i in enumerate(batch):
                tensors = {k: got[k][j] for k in axes}
                tensors["__positions__"] = pos[i].to(torch.int64)
                records.append((trace_id(traces[i]), traces[i].to_dict(), tensors))
            st.append(records, axes)
        else:
            for k in axes:
                for j, i in enumerate(batch):
                    data[k][i] = got[k][j]
    if st is not None:
        return st
    meta = {"model_name": model.name, "revision": model.revision, "dtype": str(out_dtype),
            "positions": positions if isinstance(positions, str) else "explicit",
            "heads": meta_heads}
    return Capture(traces, data, axes, [p.to(torch.int64) for p in pos], meta)


def _open_store(model, store, keys, out_dtype, heads):
    if isinstance(store, Store):
        return store
    if not isinstance(store, str | Path):
        raise ConfigError(f"store={store!r}; give a folder path or an open Store")
    # sizes and headers only: hashing every existing shard on each resume costs a full read
    return Store.open(store, verify="size",
                      create={"model_name": model.name, "revision": model.revision,
                              "dtype": str(out_dtype).replace("torch.", ""), "sites": keys,
                              "heads": heads})


def _batch_hooks(model, traces, pos, sites, stats, heads, out_dtype, got, blockwise=False,
                 stats_dtype=torch.float32):
    """Hooks of one padded batch and an attention observer (None unless ``blockwise``).

    They fill ``got`` with ``{key: [per-trace tensor on CPU]}``. With ``blockwise`` the
    attention statistics (``stats``) come from each layer's rotated q/k in the SDPA pass,
    which also computes the attention output from the same probabilities
    (:func:`~thinklens.hooks.blockwise.attention_statistics`, via
    :func:`~thinklens.hooks.attention_impl.observe`); else from the eager patterns.
    """
    dev = model.device
    lengths = [len(t) for t in traces]
    rows = [p.to(dev) for p in pos]

    def site_hook(name):
        def fn(x, hook):
            # advanced indexing already copies: no further clone
            if is_pattern_site(name):  # [batch, head, query_pos, key_pos]: query rows at pos
                got[name] = [x[j][:, rows[j], : lengths[j]].detach().to("cpu", out_dtype)
                             for j in range(len(traces))]
            else:
                got[name] = [x[j, rows[j]].detach().to("cpu", out_dtype)
                             for j in range(len(traces))]
            return x
        return fn

    n_layers = model.config.n_layers
    kept = KeptStatistics(stats, n_layers, model.config.n_heads,
                          [[(s.start, s.end) for s in t.sentences] for t in traces], lengths,
                          stats_dtype, dev) if stats else None

    def observer(layer, q, k, mask, scale, v):
        out = attention_statistics(
            q.detach(), k.detach(), kept.bounds, mask, v=v.detach(), scale=scale,
            lengths=kept.lengths, sentence="sentence" in stats, vertical="vertical" in stats,
            columns="columns" in stats, sentence_into=kept.into(layer))
        kept.add(layer, out)
        return out.output

    def last_attention(x, hook):  # every layer's observer has run: the pass may stop here
        if kept.missing():
            raise RuntimeError(f"attention statistics missing for layers {kept.missing()}: "
                               "their attention did not run the SDPA path")
        got.update(kept.results())
        return x

    def pattern_hook(layer):
        def fn(x, hook):
            if kept is not None:
                x0 = x.detach()
                means = (sentence_means(x0, kept.bounds)
                         if {"sentence", "vertical"} & set(stats) else None)
                kept.add_pattern(layer, x0, means)
                if layer == n_layers - 1:
                    got.update(kept.results())
            if layer in heads:
                key = f"blocks.{layer}.attn.hook_pattern"
                got[key] = [x[j, heads[layer]][:, rows[j], : lengths[j]].detach()
                            .to("cpu", out_dtype) for j in range(len(traces))]
            return x
        return fn

    hooks = [(s, site_hook(s)) for s in sites]
    if blockwise:
        hooks.append((f"blocks.{n_layers - 1}.hook_attn_out", last_attention))
        return hooks, observer
    pattern_layers = range(n_layers) if stats else heads.keys()
    hooks += [(f"blocks.{layer}.attn.hook_pattern", pattern_hook(layer))
              for layer in pattern_layers]
    return hooks, None


__all__ = ["Capture", "trace_id", "sentence_means", "capture"]
