"""Activation patching: many patched runs per batched forward pass.

Causal tracing (Meng et al. 2022) as practised in Wang et al. 2022 (IOI) and Heimersheim &
Nanda 2024 ("How to use and interpret activation patching"):

1. Run the clean and the corrupted input of a :class:`~thinklens.circuits.pairs.Pair`.
   *Denoising* (default) patches clean activations into the corrupted run: which sites
   suffice to restore the clean behaviour. *Noising* patches corrupted activations into
   the clean run: which sites are necessary. The run patched into is the *base*, the other
   the *source*; the source's activations at the swept site kind are recorded.
2. One *cell* per (layer[, position][, head]) of the sweep; axes not swept are patched
   whole (every selected position / head at once).
3. Patches are independent, so cells run as rows of one batch: the base input repeated,
   row i patching cell i. One generic setter writes every row's cell by advanced indexing
   into a ``[batch, pos, head?, ...]`` view of the activation (the attention pattern
   ``[batch, head, query, key]`` is viewed query-major, so "pos" is the query position).
   Rows are chunked to a memory budget (:mod:`thinklens.hooks.budget`).
4. A patch at position p leaves positions < p unchanged (causal attention), so a chunk
   whose earliest patched position is p0 starts from the base run's KV cache of tokens
   < p0 and runs tokens p0.. only; only the answer position is unembedded.
5. The metric (:mod:`thinklens.circuits.metrics`) maps each row's answer logits to a scalar.

Grouped-query attention: ``hook_k``/``hook_v`` hold ``n_kv_heads`` heads (not expanded)
and one KV head feeds ``n_heads / n_kv_heads`` query heads, so k and v are patched per KV
head (axis ``kv_head``): patching one changes what every query head of its group reads.
"""

from __future__ import annotations

import copy
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from thinklens.circuits import metrics as _metrics
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
_MAX_ROWS = 128  # more rows per pass stop paying off on CPU and crowd the KV-prefix reuse


@dataclass
class PatchResult:
    """Metric after each patch, with named axes.

    Example::

        r = patch(model, pair, "resid_pre", by=("layer", "pos"))
        r.values.shape, r.axes        # (30, 14), ('layer', 'pos')
        r.labels["pos"][9]            # "9: John/ Mary"
        r.normalized()                # (values - corrupt) / (clean - corrupt)
    """

    values: Tensor
    axes: tuple[str, ...]
    labels: dict[str, list]
    metric: str
    clean: float
    corrupt: float
    site: str
    direction: str

    def normalized(self) -> Tensor:
        """0 where the patched run scores like the corrupted run, 1 like the clean one."""
        if self.clean == self.corrupt:
            raise ConfigError(f"metric {self.metric!r} is {self.clean:.4g} on both runs; "
                              "nothing to normalise by")
        return (self.values - self.corrupt) / (self.clean - self.corrupt)

    def __repr__(self) -> str:
        shape = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.values.shape))
        return (f"PatchResult({self.site}, {self.direction}, {self.metric}: [{shape}], "
                f"clean={self.clean:.4g}, corrupt={self.corrupt:.4g})")


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
    ``src_pos`` (default ``pos``) differs when ``act`` starts at a later token.
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


def _kind(model: Any, site: str) -> tuple[str, str, list[int]]:
    """(hook suffix, label, layers) of a kind name or of hook names / a glob."""
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


def _by(by: str | Sequence[str], layout: str) -> tuple[str, ...]:
    by = (by,) if isinstance(by, str) else tuple(by)
    allowed = ("layer", "pos") if layout == "pos" else ("layer", "pos", "head", "kv_head")
    if "layer" not in by or any(a not in allowed for a in by):
        raise ConfigError(f"by={by!r}: give 'layer' plus any of {allowed[1:]} for this site")
    return tuple(a for a in ("layer", "pos", "head") if a in by or (a == "head" and "kv_head" in by))


def _run(model: Any, ids: Tensor, answer_pos: int, fwd: Sequence = (), cache: Any = None,
         p0: int = 0, want_cache: bool = False) -> tuple[Tensor, Any]:
    """Answer-position logits ``[batch, d_vocab]`` of ``ids[:, p0:]`` (after ``cache``)."""
    kw: dict[str, Any] = {"logits_to_keep": torch.tensor([answer_pos - p0])}
    if cache is not None:
        kw["past_key_values"] = cache
    if want_cache:
        kw["return_type"] = "logits_and_cache"
    with torch.no_grad(), model.hooks(list(fwd)):
        out = model.bridge(ids[:, p0:].to(model.device), **kw)
    logits, cache = out if want_cache else (out, None)
    return logits[:, -1], cache


def _recorder(store: dict[str, Tensor]) -> Callable[[str], tuple[str, Callable]]:
    def hook(site: str):
        def fn(act, hook):
            store[site] = act.detach().clone()
            return act
        return site, fn
    return hook


def _setup(model: Any, pair: Pair, metric: Any, direction: str, record_base: Sequence[str],
          record_src: Sequence[str], want_cache: bool = False) -> dict[str, Any]:
    """Run base and source once: logits, recorded activations, metric and its baselines."""
    if not isinstance(pair, Pair):
        raise ConfigError(f"pair must be a Pair (make_pair(model, clean, corrupt, ...)), got "
                          f"{type(pair).__name__}")
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    clean, corrupt = pair.clean_ids[None], pair.corrupt_ids[None]
    base, src = (corrupt, clean) if direction == "denoising" else (clean, corrupt)
    acts_base: dict[str, Tensor] = {}
    acts_src: dict[str, Tensor] = {}
    rec_b, rec_s = _recorder(acts_base), _recorder(acts_src)
    base_logits, cache = _run(model, base, pair.answer_pos, [rec_b(s) for s in record_base],
                              want_cache=want_cache)
    src_logits, _ = _run(model, src, pair.answer_pos, [rec_s(s) for s in record_src])
    lc, lx = (src_logits, base_logits) if direction == "denoising" else (base_logits, src_logits)
    name, fn = _metrics.resolve(metric, answer=pair.answer, wrong=pair.wrong, clean=lc[0],
                                corrupt=lx[0])
    both = _metrics.check_rows(fn(torch.cat([lc, lx])), 2, name).detach().cpu()
    if cache is not None and any(getattr(cache, "is_sliding", None) or []):
        cache = None  # sliding-window layers crop differently; run every token instead
    return {"base": base, "acts_base": acts_base, "acts_src": acts_src, "cache": cache,
            "name": name, "fn": fn, "clean": float(both[0]), "corrupt": float(both[1]),
            "base_value": float(both[1] if direction == "denoising" else both[0])}


def rows_per_pass(model: Any, length: int, batch_size: int | None, budget: Any) -> int:
    """Rows per forward pass: ``batch_size``, or what the memory budget allows (<= 128)."""
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r}; give a positive int or None")
        return batch_size
    limit = _budget.parse_budget(budget, model.device)
    per_row = _budget.forward_peak(model.config, 1, length, model.dtype.itemsize)
    return max(1, min(_MAX_ROWS, limit // max(per_row, 1)))


def _run_cells(model: Any, ctx: dict, pair: Pair, layout: str, sites: list[str],
               pos: Tensor, heads: Tensor | None, p0: int) -> Tensor:
    """Answer logits ``[n, d_vocab]``: row i patches ``sites[i]`` at ``pos[i]``, ``heads[i]``.

    Tokens before ``p0`` come from the base run's KV cache (no row patches them).
    """
    n, rows = len(sites), torch.arange(len(sites))
    fwd = []
    for site in dict.fromkeys(sites):
        sel = rows[torch.tensor([s == site for s in sites])]
        p, h, src = pos[sel], None if heads is None else heads[sel], ctx["acts_src"][site]
        fwd.append((site, lambda act, hook, sel=sel, p=p, h=h, src=src:
                    put(act.clone(), layout, sel, p - p0, h, src, p)))
    cache = None
    if p0 > 0:
        cache = copy.deepcopy(ctx["cache"])
        cache.crop(p0 - len(pair))  # negative: drop the tokens from p0 on
        cache.batch_repeat_interleave(n)
    return _run(model, ctx["base"].expand(n, -1), pair.answer_pos, fwd, cache, p0)[0]


def patch(model: Any, pair: Pair, site: str = "resid_pre", *,
          by: str | Sequence[str] = ("layer", "pos"), metric: Any = "logit_diff",
          direction: str = "denoising", layers: Any = None, positions: Any = None,
          heads: Any = None, batch_size: int | None = None, budget: Any = None,
          progress: bool | None = None) -> PatchResult:
    """Activation patching of one site kind, swept over ``by``.

    Example::

        r = patch(model, pair, "z", by=("layer", "head"))       # r.values: (layer, head)
        r = patch(model, pair, "k", by=("layer", "pos", "head")) # (layer, pos, kv_head)
        r = patch(model, pair, "resid_pre", layers=[0, 5], positions=[1, 3, 9])

    ``site``: a kind (:data:`SITE_KINDS`) or hook names / a glob of one kind.
    ``metric``: ``"logit_diff"``, ``"normalized_logit_diff"``, ``"prob"``, ``"kl"`` or a
    callable ``logits [batch, d_vocab] -> [batch]``.
    """
    suffix, label, site_layers = _kind(model, site)
    layout = layout_of(suffix)
    axes = _by(by, layout)
    cfg, n_tok = model.config, len(pair)
    layers = _indices(layers, cfg.n_layers, "layers") if layers is not None else site_layers
    pos = _indices(positions, n_tok, "positions")
    n_heads = cfg.n_kv_heads if layout == "kv" else cfg.n_heads
    hds = _indices(heads, n_heads, "heads") if layout != "pos" else None
    names = {layer: f"blocks.{layer}.{suffix}" for layer in layers}
    model.sites(list(names.values()))
    ctx = _setup(model, pair, metric, direction, (), list(names.values()), want_cache=True)
    grid = [layers] + ([pos] if "pos" in axes else []) + ([hds] if "head" in axes else [])
    cells = torch.cartesian_prod(*[torch.tensor(g) for g in grid]).reshape(-1, len(grid))
    cell_pos = cells[:, 1:2] if "pos" in axes else torch.tensor(pos).expand(len(cells), -1)
    cell_head = (None if hds is None else cells[:, -1:] if "head" in axes
                 else torch.tensor(hds).expand(len(cells), -1))
    out = torch.full((len(cells),), ctx["base_value"])
    order = torch.argsort(cell_pos.min(1).values, stable=True)
    step = rows_per_pass(model, n_tok, batch_size, budget)
    chunks = [order[i:i + step] for i in range(0, len(order), step)]
    for idx in tqdm(chunks, disable=not (progress if progress is not None else len(chunks) > 4),
                    desc=f"patching {label}"):
        p0 = int(cell_pos[idx].min()) if ctx["cache"] is not None else 0
        if p0 > pair.answer_pos:
            continue  # patches after the answer position cannot change its logits
        logits = _run_cells(model, ctx, pair, layout, [names[int(i)] for i in cells[idx, 0]],
                            cell_pos[idx], None if cell_head is None else cell_head[idx], p0)
        out[idx] = _metrics.check_rows(ctx["fn"](logits), len(idx), ctx["name"]).float().cpu()
    shape = [len(g) for g in grid]
    names_ax = tuple("kv_head" if a == "head" and layout == "kv" else a for a in axes)
    pos_labels = [f"{i}:{t}" for i, t in enumerate(pair.labels())]
    labels = {"layer": layers, "pos": [pos_labels[i] for i in pos], "head": hds, "kv_head": hds}
    return PatchResult(out.reshape(shape), names_ax, {a: labels[a] for a in names_ax},
                       ctx["name"], ctx["clean"], ctx["corrupt"], label, direction)

