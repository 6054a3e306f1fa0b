"""Capture activations and attention from traces, to memory or to a disk store.

1. Resolve sites (hook names or globs) and positions per trace; estimate the memory and
   refuse, before running, a capture over budget (:mod:`thinklens.hooks.budget`).
2. Batch traces by length and right-pad them (:mod:`thinklens.hooks.forward`, the one
   forward runner): with causal attention and positions counted from 0 per sequence,
   real tokens never see the padding, so a padded batch captures what one-by-one
   capture does. The pass stops after the deepest hooked site. A capture that hooks no
   pattern (no pattern or score site, no ``attention=[(layer, head)]``) runs SDPA
   attention, the same values without ``[heads, T, T]`` per layer; one that does runs
   eager (:mod:`thinklens.hooks.attention_impl`). ``attention="sentence"`` alone stays
   on SDPA: each layer's sentence means are computed from its rotated q/k in blocks of
   query rows (:mod:`thinklens.hooks.blockwise`), never a full pattern.
3. Forward hooks (scoped, removed in ``finally``) copy each site's rows at the chosen
   positions. An attention pattern, as a site or through ``attention=[(layer, head)]``,
   is kept in TransformerLens's layout ``(head, query_pos, key_pos)`` per trace, its
   query rows at the chosen positions. Attention is reduced while the pass runs, one
   layer at a time: ``attention="sentence"`` averages every head's pattern into a
   ``(layer, head, query_sentence, key_sentence)`` matrix (Thought Anchors, Bogdan et
   al. 2025: ``A[i, j]`` = the mean token-to-token weight from the tokens of sentence i
   to those of sentence j), summed with ``index_add_`` (blockwise from q/k on SDPA, from
   the pattern when the pass is eager anyway); a list of ``(layer, head)`` keeps only those heads. The
   full patterns of all layers are never held at once.
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
from thinklens.hooks.blockwise import blockwise_sentence_means
from thinklens.hooks.dtypes import parse_dtype
from thinklens.hooks.positions import positions_of, warn_lacking
from thinklens.hooks.sites import is_pattern_site
from thinklens.hooks.store import Store
from thinklens.hooks.trace import Trace, check_tokenizer

SENTENCE_KEY = "sentence_attention"


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


def _parse_attention(attention: Any, cfg) -> tuple[bool, dict[int, list[int]]]:
    if attention is None:
        return False, {}
    if attention == "sentence":
        return True, {}
    if isinstance(attention, str):
        raise ConfigError(f"attention={attention!r}; valid: None, 'sentence', or a list of "
                          "(layer, head) pairs such as [(2, 1), (3, 0)]")
    heads: dict[int, list[int]] = defaultdict(list)
    for pair in attention:
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise ConfigError(f"attention pair {pair!r} is not (layer, head)")
        layer, head = int(pair[0]), int(pair[1])
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise ConfigError(f"attention head ({layer}, {head}) out of range: layers "
                              f"0..{cfg.n_layers - 1}, heads 0..{cfg.n_heads - 1}")
        if head not in heads[layer]:
            heads[layer].append(head)
    return False, {k: sorted(v) for k, v in sorted(heads.items())}


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


def estimate(model, traces, sites, shapes, pos, sentence, heads, out_dtype, batch_size):
    """An :class:`~thinklens.hooks.budget.Estimate` for this capture."""
    nb = torch.finfo(out_dtype).bits // 8
    per_trace = []
    for t, p in zip(traces, pos):
        n = len(t)
        b = 0
        for s in sites:
            elems = int(torch.tensor(shapes[s]).prod()) if shapes[s] else 1
            b += len(p) * elems * (n if is_pattern_site(s) else 1) * nb
        if sentence:
            b += model.config.n_layers * model.config.n_heads * len(t.sentences) ** 2 * 4
        b += sum(len(h) for h in heads.values()) * len(p) * n * nb
        per_trace.append(b)
    longest = max((len(t) for t in traces), default=1)
    worst_batch = sum(sorted(per_trace)[-batch_size:])
    return _budget.Estimate(kept=sum(per_trace), kept_per_batch=worst_batch,
                            forward_peak=_budget.forward_peak(
                                model.config, min(batch_size, len(traces)), longest,
                                torch.finfo(model.dtype).bits // 8))


def sentence_means(pattern: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Per-head sentence×sentence mean attention of one layer.

    ``pattern`` is ``[batch, head, query, key]``; ``bounds`` is ``[batch, sentence, 2]``
    token spans (``start == end`` pads). Returns ``[batch, head, query_sentence, key_sentence]``
    float32: ``out[b, h, i, j]`` = mean over query tokens of sentence i and key tokens of
    sentence j of ``pattern[b, h, q, k]``. Sums are taken with ``index_add_`` (each
    token adds into its sentence's row; tokens outside every sentence into a discarded
    one), so no second ``T × T`` buffer is made.
    """
    b, n_heads, t_q, t_k = pattern.shape
    n_sent = bounds.shape[1]
    dev = pattern.device
    out = torch.zeros((b, n_heads, n_sent, n_sent), dtype=torch.float32, device=dev)
    pos = torch.arange(max(t_q, t_k), device=dev)
    for j in range(b):
        start, end = bounds[j, :, 0], bounds[j, :, 1]
        inside = (pos[:, None] >= start[None, :]) & (pos[:, None] < end[None, :])  # [T, S]
        sent = torch.where(inside.any(1), inside.float().argmax(1), n_sent)      # [T]
        count = (end - start).clamp(min=1).to(torch.float32)
        p = pattern[j].to(torch.float32)                                          # [H, T, T]
        rows = torch.zeros((n_heads, n_sent + 1, t_k), dtype=torch.float32, device=dev)
        rows.index_add_(1, sent[:t_q], p)
        both = torch.zeros((n_heads, n_sent + 1, n_sent + 1), dtype=torch.float32, device=dev)
        both.index_add_(2, sent[:t_k], rows)
        out[j] = both[:, :n_sent, :n_sent] / count[:, None] / count[None, :]
    return out


def capture(model, traces, *, sites=(), positions: Any = "all", attention: Any = None,
            dtype: Any = None, store: Any = None, batch_size: int = 8, budget: Any = None,
            progress: bool | None = None):
    """Record activations of ``traces`` at ``sites`` and ``positions``.

    Example::

        cap = model.capture(traces, sites="blocks.*.hook_resid_post", positions="thinking",
                            attention="sentence")
        cap["blocks.3.hook_resid_post"].values.shape   # (trace, pos, d_model)
        cap["sentence_attention"].values.shape  # (trace, layer, head, query_sentence, key_sentence)

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
    sentence, heads = _parse_attention(attention, model.config)
    clash = [f"blocks.{layer}.attn.hook_pattern" for layer in heads
             if f"blocks.{layer}.attn.hook_pattern" in site_list]
    if clash:
        raise ConfigError(f"{clash[0]} is both a site and in attention=; choose one")
    if not site_list and not sentence and not heads:
        raise ConfigError("nothing to capture: give sites= (e.g. 'blocks.*.hook_resid_post') "
                          "and/or attention= ('sentence' or [(layer, head), ...])")
    pos = positions_of(traces, positions)  # warns when traces lack thinking/sentences
    if sentence:
        warn_lacking(traces, [k for k, t in enumerate(traces) if not t.sentences],
                     "thinking sentences (attention='sentence')")
    out_dtype = parse_dtype(dtype) or model.dtype
    shapes = _site_shapes(model, site_list) if site_list else {}
    axes = {s: _axes(model, s, shapes[s]) for s in site_list}
    if sentence:
        axes[SENTENCE_KEY] = ("layer", "head", "query_sentence", "key_sentence")
    for layer in heads:
        axes[f"blocks.{layer}.attn.hook_pattern"] = ("head", "query_pos", "key_pos")
    # head ids of every pattern key: all heads for a site, the chosen ones for attention=
    meta_heads = {s: list(range(model.config.n_heads)) for s in site_list
                  if is_pattern_site(s)}
    meta_heads.update({f"blocks.{k}.attn.hook_pattern": v for k, v in heads.items()})
    est = estimate(model, traces, site_list, shapes, pos, sentence, heads, out_dtype, batch_size)
    _budget.check(est, _budget.parse_budget(budget, model.device), streaming=store is not None)

    st = None
    todo = list(range(len(traces)))
    if store is not None:
        st = _open_store(model, store, list(axes), out_dtype, meta_heads)
        todo = [i for i in todo if trace_id(traces[i]) not in st]
    seqs = [traces[i].token_ids for i in todo]
    # sentence attention from q/k inside the SDPA pass, unless the pass is eager anyway
    blockwise = (sentence and not heads and attention_impl.observable(model)
                 and attention_impl.choose(model, site_list) == "sdpa")
    # batch traces of similar length (less padding); a store keeps input order
    plan = fwd.plan(model, [len(x) for x in seqs], batch_size=batch_size, sort=st is None)
    data: dict[str, list] = {k: [None] * len(traces) for k in axes}
    show = progress if progress is not None else len(plan) > 4
    for rows in tqdm(plan, desc="capture", disable=not show):
        batch = [todo[r] for r in rows]
        got: dict[str, list] = {}
        hooks, observer = _batch_hooks(model, [traces[i] for i in batch],
                                       [pos[i] for i in batch], site_list, sentence, heads,
                                       out_dtype, got, blockwise)
        with attention_impl.observe(model, observer):
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


def _batch_hooks(model, traces, pos, sites, sentence, heads, out_dtype, got, blockwise=False):
    """Hooks of one padded batch and an attention observer (None unless ``blockwise``).

    They fill ``got`` with ``{key: [per-trace tensor on CPU]}``. With ``blockwise`` the
    sentence means come from each layer's rotated q/k in the SDPA pass
    (:func:`~thinklens.hooks.blockwise.blockwise_sentence_means`, via
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

    n_sent = max((len(t.sentences) for t in traces), default=0)
    bounds = torch.zeros((len(traces), max(n_sent, 1), 2), dtype=torch.long)
    for j, t in enumerate(traces):
        for k, s in enumerate(t.sentences):
            bounds[j, k] = torch.tensor([s.start, s.end])
    bounds = bounds.to(dev)
    sent_layers: dict[int, torch.Tensor] = {}
    n_layers = model.config.n_layers

    def keep_sentence(layer, means):
        sent_layers[layer] = means.cpu()
        if len(sent_layers) == n_layers:
            stacked = torch.stack([sent_layers[k] for k in range(n_layers)], 1)
            got[SENTENCE_KEY] = [stacked[j, :, :, : len(t.sentences), : len(t.sentences)].clone()
                                 for j, t in enumerate(traces)]

    def observer(layer, q, k, mask, scale):
        keep_sentence(layer, blockwise_sentence_means(q.detach(), k.detach(), bounds, mask,
                                                      scale=scale))

    def last_attention(x, hook):  # every layer's observer has run: the pass may stop here
        if SENTENCE_KEY not in got:
            raise RuntimeError(f"sentence attention missing for layers "
                               f"{sorted(set(range(n_layers)) - set(sent_layers))}: their "
                               "attention did not run the SDPA path")
        return x

    def pattern_hook(layer):
        def fn(x, hook):
            if sentence:
                keep_sentence(layer, sentence_means(x.detach(), bounds))
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
    pattern_layers = range(n_layers) if sentence else heads.keys()
    hooks += [(f"blocks.{layer}.attn.hook_pattern", pattern_hook(layer))
              for layer in pattern_layers]
    return hooks, None


__all__ = ["Capture", "trace_id", "sentence_means", "capture", "estimate"]
