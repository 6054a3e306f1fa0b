"""Path patching: a sender's effect along its direct paths into chosen receivers only.

Wang et al. 2022 (IOI, section 3.1), two-pass form. With the *base* run clean and the
*source* run corrupted (``direction="noising"``, the paper's setting; ``"denoising"``
swaps them):

1. Record the base run's output of every attention head (``hook_z``) and, with
   ``freeze_mlps=True``, of every MLP; record the senders' activations in the source run.
2. First pass, on the base input: every head's output (and MLP output) is overwritten by
   its base value, except the senders', which get their source values; record the
   receivers' inputs. Only paths sender -> residual stream (-> MLPs unless frozen) ->
   receiver carry the change: every other head is frozen.
3. Second pass, on the base input: patch the receivers' inputs with the values recorded in
   step 2, nothing else; measure the metric.

Senders are heads ``(layer, head)`` (their ``hook_z`` output, all positions) or whole
sites (``"blocks.3.hook_mlp_out"``); a list of nodes is patched jointly as one sender.
Receivers are head inputs ``(layer, head, "q" | "k" | "v")`` (for k and v, ``head`` is
the KV head: with grouped-query attention one KV head serves several query heads) or
residual-stream sites (``"blocks.5.hook_resid_pre"``; the last ``hook_resid_post`` gives
the sender's effect on the logits through the paths that end there).
Each sender (or sender group) is one row of a batched pass, as in activation patching.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from thinklens.circuits import _engine
from thinklens.circuits._engine import PairRuns, layout_of, put, run_answer
from thinklens.circuits.pairs import Pair
from thinklens.circuits.results import PatchResult
from thinklens.errors import ConfigError

# a head (layer, head), a head input (layer, head, "q" | "k" | "v"), or a site name
_Node = tuple[int, int] | tuple[int, int, str] | str


def _node(model: Any, node: Any, receiver: bool) -> tuple[str, int | None]:
    """(site, head or None) of a sender or receiver node."""
    cfg = model.config
    if isinstance(node, str):
        return model.sites(node)[0] if "*" not in node else _bad(node, receiver), None
    kinds = ("q", "k", "v") if receiver else ()
    ok = isinstance(node, tuple) and len(node) == 2 + bool(receiver) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in node[:2])
    if ok and receiver:
        ok = node[2] in kinds
    if not ok:
        _bad(node, receiver)
    layer, head = node[0], node[1]
    n = cfg.n_kv_heads if receiver and node[2] in ("k", "v") else cfg.n_heads
    if not (0 <= layer < cfg.n_layers and 0 <= head < n):
        raise ConfigError(f"node {node!r} out of range: layers 0..{cfg.n_layers - 1}, "
                          f"heads 0..{n - 1}")
    return f"blocks.{layer}.attn.hook_{node[2] if receiver else 'z'}", head


def _bad(node: Any, receiver: bool) -> Any:
    want = ("(layer, head, 'q'|'k'|'v') for a head's input (head = KV head for k, v) or a "
            "site such as 'blocks.5.hook_resid_pre'" if receiver else
            "(layer, head) for a head's output, or a site such as 'blocks.3.hook_mlp_out'")
    raise ConfigError(f"bad {'receiver' if receiver else 'sender'} {node!r}; give {want}")


def _write(act: torch.Tensor, site: str, rows: torch.Tensor, head: int | None,
           src: torch.Tensor, src_rows: torch.Tensor | None = None) -> None:
    """``act[rows] = src[src_rows]`` at every position: one head, or the whole site."""
    src_rows = torch.zeros_like(rows) if src_rows is None else src_rows
    if head is None:
        act[rows.to(act.device)] = src[src_rows.to(src.device)]
        return
    allpos = torch.arange(act.shape[2] if layout_of(site) == "pattern" else act.shape[1])[None]
    put(act, layout_of(site), rows, allpos, torch.tensor([[head]]), src, src_rows=src_rows)


def _two_passes(model: Any, ctx: PairRuns, pair: Pair, groups: list[list], recv: list,
                frozen: list[str]) -> torch.Tensor:
    """Answer logits ``[len(groups), d_vocab]``: row i path-patches sender group i."""
    n = len(groups)
    writes: dict[str, list] = defaultdict(list)
    for row, group in enumerate(groups):
        for site, head in group:
            writes[site].append((row, head))
    recv_sites = {s for s, _ in recv}
    recorded: dict[str, torch.Tensor] = {}

    def first(act, hook, site):
        # freeze at the base value, then give each row its sender's source value
        frozen_act = ctx.acts_base.get(site)
        act = (act if frozen_act is None else frozen_act.expand_as(act)).clone()
        for row, head in writes.get(site, []):
            _write(act, site, torch.tensor([row]), head, ctx.acts_src[site])
        if site in recv_sites:
            recorded[site] = act.clone()
        return act

    def second(act, hook, site):
        act = act.clone()
        for s, head in recv:
            if s == site:
                _write(act, s, rows, head, recorded[s], src_rows=rows)
        return act

    base, rows = ctx.base.expand(n, -1), torch.arange(n)
    hooked = sorted(set(frozen) | set(writes) | recv_sites)
    run_answer(model, base, pair.answer_pos,
               [(s, lambda a, hook, s=s: first(a, hook, s)) for s in hooked])
    logits, _ = run_answer(model, base, pair.answer_pos,
                           [(s, lambda a, hook, s=s: second(a, hook, s)) for s in recv_sites])
    return logits


def path_patch(model: Any, pair: Pair, senders: str | Sequence[_Node | list[_Node]],
               receivers: Sequence[_Node], *, metric: Any = "logit_diff", direction: str = "noising",
               freeze_mlps: bool = False, batch_size: int | None = None, budget: Any = None,
               progress: bool | None = None) -> PatchResult:
    """Path patching from each sender (or sender group) to ``receivers`` together.

    Example::

        r = path_patch(model, pair, "heads", [(9, 0, "q"), (9, 1, "q")])
        r.values.shape, r.axes            # (n_layers, n_heads), ('layer', 'head')
        r = path_patch(model, pair, [(0, 1), [(0, 2), (1, 3)]], ["blocks.2.hook_resid_pre"])
        r.values.shape, r.axes            # (2,), ('sender',)
    """
    cfg = model.config
    grid = isinstance(senders, str)
    if grid and senders != "heads":
        raise ConfigError(f"senders={senders!r}; give 'heads' (every head, one at a time) or "
                          "a list of nodes")
    if grid:
        senders = [(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    groups = [[_node(model, s, False) for s in (g if isinstance(g, list) else [g])]
              for g in senders]
    if not groups or not receivers:
        raise ConfigError("give at least one sender and one receiver")
    recv = [_node(model, r, True) for r in receivers]
    frozen = [f"blocks.{i}.attn.hook_z" for i in range(cfg.n_layers)]
    frozen += [f"blocks.{i}.hook_mlp_out" for i in range(cfg.n_layers)] if freeze_mlps else []
    held = [s for s, _ in recv if s in frozen]
    if held:
        raise ConfigError(f"receiver site {held[0]!r} is held at its base value in the first "
                          "pass; receivers are head inputs (layer, head, 'q') or residual sites")
    send_sites = sorted({s for g in groups for s, _ in g})
    ctx = _engine.run_pair(model, pair, metric, direction, frozen, send_sites)
    out = torch.empty(len(groups))
    step = _engine.rows_per_pass(model, len(pair), batch_size, budget)
    for chunk in _engine.chunked(list(range(len(groups))), step, progress, "path patching"):
        logits = _two_passes(model, ctx, pair, [groups[g] for g in chunk], recv, frozen)
        out[chunk] = _engine.check_rows(ctx.fn(logits), len(chunk), ctx.name).detach().float().cpu()
    about = f"path -> {', '.join(map(str, receivers))}"
    if grid:
        return PatchResult(out.reshape(cfg.n_layers, cfg.n_heads), ("layer", "head"),
                           {"layer": list(range(cfg.n_layers)), "head": list(range(cfg.n_heads))},
                           ctx.name, ctx.clean, ctx.corrupt, about, direction)
    return PatchResult(out, ("sender",), {"sender": [str(g) for g in senders]}, ctx.name,
                       ctx.clean, ctx.corrupt, about, direction)


__all__ = ["path_patch"]
