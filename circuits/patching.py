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

The runs, recordings, site names and the setter are the shared engine's
(:mod:`thinklens.circuits._engine`). These runs do not go through the padded-batch
forward runner (:mod:`thinklens.hooks.forward`): every row is a copy of one pair, so
there is nothing to pad, and the runner would give up the KV-cache prefix of step 4
(it neither takes nor returns a cache).

Grouped-query attention: ``hook_k``/``hook_v`` hold ``n_kv_heads`` heads (not expanded)
and one KV head feeds ``n_heads / n_kv_heads`` query heads, so k and v are patched per KV
head (axis ``kv_head``): patching one changes what every query head of its group reads.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from thinklens.circuits import _engine
from thinklens.circuits._engine import SITE_KINDS, PairRuns
from thinklens.circuits.pairs import Pair
from thinklens.circuits.results import PatchResult


def _run_cells(model: Any, ctx: PairRuns, pair: Pair, layout: str, sites: list[str],
               pos: Tensor, heads: Tensor | None, p0: int) -> Tensor:
    """Answer logits ``[n, d_vocab]``: row i patches ``sites[i]`` at ``pos[i]``, ``heads[i]``.

    Tokens before ``p0`` come from the base run's KV cache (no row patches them).
    """
    n, rows = len(sites), torch.arange(len(sites))
    fwd = []
    for site in dict.fromkeys(sites):
        sel = rows[torch.tensor([s == site for s in sites])]
        p, h, src = pos[sel], None if heads is None else heads[sel], ctx.acts_src[site]
        fwd.append((site, lambda act, hook, sel=sel, p=p, h=h, src=src:
                    _engine.put(act.clone(), layout, sel, p - p0, h, src, p)))
    cache = None
    if p0 > 0:
        cache = copy.deepcopy(ctx.cache)
        cache.crop(p0 - len(pair))  # negative: drop the tokens from p0 on
        cache.batch_repeat_interleave(n)
    return _engine.run_answer(model, ctx.base.expand(n, -1), pair.answer_pos, fwd, cache, p0)[0]


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
    sw = _engine.Sweep.of(model, pair, site, by, layers, positions, heads)
    names, layout, axes = sw.names, sw.layout, sw.axes
    ctx = _engine.run_pair(model, pair, metric, direction, (), list(names.values()),
                           want_cache=True)
    grid = ([sw.layers] + ([sw.pos] if "pos" in axes else [])
            + ([sw.heads] if "head" in axes else []))
    cells = torch.cartesian_prod(*[torch.tensor(g) for g in grid]).reshape(-1, len(grid))
    cell_pos = cells[:, 1:2] if "pos" in axes else torch.tensor(sw.pos).expand(len(cells), -1)
    cell_head = (None if sw.heads is None else cells[:, -1:] if "head" in axes
                 else torch.tensor(sw.heads).expand(len(cells), -1))
    out = torch.full((len(cells),), ctx.base_value)
    order = torch.argsort(cell_pos.min(1).values, stable=True)
    step = _engine.rows_per_pass(model, len(pair), batch_size, budget)
    for idx in _engine.chunked(order, step, progress, f"patching {sw.label}"):
        p0 = int(cell_pos[idx].min()) if ctx.cache is not None else 0
        if p0 > pair.answer_pos:
            continue  # patches after the answer position cannot change its logits
        logits = _run_cells(model, ctx, pair, layout, [names[int(i)] for i in cells[idx, 0]],
                            cell_pos[idx], None if cell_head is None else cell_head[idx], p0)
        out[idx] = _engine.check_rows(ctx.fn(logits), len(idx), ctx.name).float().cpu()
    res_axes, labels = sw.result_axes(pair)
    return PatchResult(out.reshape([len(g) for g in grid]), res_axes, labels, ctx.name,
                       ctx.clean, ctx.corrupt, sw.label, direction)


__all__ = ["patch", "PatchResult", "SITE_KINDS"]
