"""One forward pass in which every receiver reads its own copy of the residual stream.

Edge-level ablation as in Hanna et al. 2024 (EAP-IG code) and Conmy et al. 2023 (ACDC):

1. Run the input. At each sender (the input embedding, each head's output
   ``z_h @ W_O[h]``, each MLP's output) record its *current* output in this run.
2. At each receiver (a head's q, k or v input, an MLP's input, the logits) rebuild its
   input from the residual stream ``x`` of its layer (before the norm):
   ``x_v = x + sum over senders u whose edge u -> v is ablated of (a_u - cur_u)``, where
   ``a_u`` is the ablated value (the corrupted run's output, or a mean). Since ``x`` is
   the sum of the current outputs of the senders upstream, ``x_v`` is the sum over kept
   edges of current outputs plus the sum over ablated edges of ablated outputs.
3. The receiver is recomputed from ``x_v``: the head's projection ``W_Q[h] norm(x_v)``
   (each head and KV head gets its own input, so q/k/v are rebuilt from the block's
   norm and projection weights), the MLP from ``norm(x_v)``, the logits from
   ``x_v`` as the last ``hook_resid_post``.

Each batch row has its own ``keep`` mask, so several circuits run in one pass. With
``grad=True`` and no ablation, the rebuilt inputs ``x_v`` are tensors of the autograd
graph: the gradient of the metric with respect to them is ``d metric / d (input of v)``,
taken before the norm, the standard EAP choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from thinklens.circuits.graph import Graph
from thinklens.errors import ConfigError


@dataclass
class LayerWeights:
    """One block's norms and attention weights, as :func:`edge_run` rebuilds receivers."""

    ln1: nn.Module
    ln2: nn.Module
    proj: dict[str, tuple[Tensor, Tensor | None]]  # q/k/v: weight [n, d_head, d_model], bias
    w_o: Tensor                                     # [d_model, n_heads, d_head]


def _orig(module: Any) -> nn.Module:
    return getattr(module, "original_component", None) or module


def layer_weights(model: Any) -> list[LayerWeights]:
    """Norms and per-head projections of every block, read from the bridge."""
    cfg, out = model.config, []
    for block in model.bridge.blocks:
        attn = block.attn
        if not all(hasattr(attn, n) for n in ("q", "k", "v", "o")):
            raise ConfigError(f"{model.name}: edge attribution needs separate q/k/v/o "
                              "projections in every attention block (this architecture "
                              "fuses them); use atp() for node attribution")
        proj = {}
        for kind, n in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)):
            lin = _orig(getattr(attn, kind))
            bias = None if lin.bias is None else lin.bias.view(n, cfg.d_head)
            proj[kind] = (lin.weight.view(n, cfg.d_head, cfg.d_model), bias)
        w_o = _orig(attn.o).weight.view(cfg.d_model, cfg.n_heads, cfg.d_head)
        out.append(LayerWeights(_orig(block.ln1), _orig(block.ln2), proj, w_o))
    return out


def _head_outputs(z: Tensor, w_o: Tensor) -> Tensor:
    """``[b, pos, head, d_model]``: what each head adds to the residual stream."""
    return torch.einsum("bphe,dhe->bphd", z, w_o.to(z.dtype))


def sender_outputs(acts: dict[str, Tensor], weights: list[LayerWeights]) -> Tensor:
    """``[b, S, pos, d_model]`` from recorded ``resid_pre 0``, ``hook_z``, ``hook_mlp_out``."""
    out = [acts["blocks.0.hook_resid_pre"][:, None]]
    with torch.no_grad():
        for layer, w in enumerate(weights):
            out.append(_head_outputs(acts[f"blocks.{layer}.attn.hook_z"], w.w_o).transpose(1, 2))
            out.append(acts[f"blocks.{layer}.hook_mlp_out"][:, None])
    return torch.cat(out, 1).detach()


SENDER_SITES = ("blocks.0.hook_resid_pre", "blocks.*.attn.hook_z", "blocks.*.hook_mlp_out")


def edge_run(model: Any, graph: Graph, ids: Tensor, *, keep: Tensor | None = None,
             ablated: Tensor | None = None, inputs: Tensor | None = None,
             grad: bool = False) -> tuple[Tensor, list[Tensor]]:
    """Last-position logits ``[b, d_vocab]`` of ``ids [b, pos]`` with receivers rebuilt.

    ``keep``: ``Bool[b, S, R]`` edges kept per row (None: all; the run is then the plain
    model's, up to rounding); ``ablated``: ``[S, pos | 1, d_model]`` values of ablated
    edges; ``inputs``: ``[b, pos, d_model]`` replaces ``resid_pre 0`` (EAP-IG's
    interpolated embeddings). With ``grad=True`` also returns the rebuilt receiver
    inputs in graph order as ``[b, pos, n, d_model]`` blocks (q, k, v, mlp per layer,
    then logits), to differentiate against.
    """
    weights = layer_weights(model)
    L, H = graph.n_layers, graph.n_heads
    b, n_s = ids.shape[0], len(graph.senders)
    resid: dict[str, Tensor] = {}
    recv: list[Tensor] = []
    cur: Tensor | None = None
    drop = None if keep is None else (~keep.to(model.device)).to(model.dtype)
    if drop is not None:
        if ablated is None:
            raise ConfigError("give the ablated sender values with keep=")
        ablated = ablated.to(model.device, model.dtype)

    def record(s0: int, out: Tensor) -> None:  # out: [b, n, pos, d]
        nonlocal cur
        if drop is None:
            return
        if cur is None:
            cur = out.new_zeros(b, n_s, *out.shape[2:])
        cur[:, s0:s0 + out.shape[1]] = out

    def rebuild(x: Tensor, r0: int, n: int | None) -> Tensor:
        """x ``[b, pos, d]`` -> ``[b, pos, n, d]`` (or ``[b, pos, d]`` when n is None)."""
        xs = x[:, :, None].expand(-1, -1, n or 1, -1)
        if drop is not None:
            bound = int(graph.sender_bound[r0])
            w = drop[:, :bound, r0:r0 + (n or 1)]
            xs = xs + torch.einsum("bsr,bspd->bprd", w, ablated[None, :bound] - cur[:, :bound])
        elif grad:
            xs = xs.clone()
        if grad:
            recv.append(xs)
        return xs if n is not None else xs[:, :, 0]

    def at_input(act, hook):
        act = inputs.to(act) if inputs is not None else act
        if grad and not act.requires_grad:
            act = act.detach().requires_grad_(True)
        resid[("pre", 0)] = act
        record(0, act[:, None])
        return act

    def at_resid(act, hook, key):
        resid[key] = act
        return act

    def at_qkv(act, hook, layer, kind):
        w, bias = weights[layer].proj[kind]
        n = w.shape[0]
        r0 = graph.receiver_start(layer) + {"q": 0, "k": H, "v": H + n}[kind]
        x = weights[layer].ln1(rebuild(resid[("pre", layer)], r0, n))
        out = torch.einsum("bpnd,ned->bpne", x, w.to(x.dtype))
        return (out if bias is None else out + bias.to(x.dtype)).to(act.dtype)

    def at_z(act, hook, layer):
        record(graph.attn_start(layer), _head_outputs(act, weights[layer].w_o).transpose(1, 2))
        return act

    def at_mlp_in(act, hook, layer):
        r0 = graph.receiver_start(layer) + H + 2 * graph.n_kv_heads
        return weights[layer].ln2(rebuild(resid[("mid", layer)], r0, None)).to(act.dtype)

    def at_mlp_out(act, hook, layer):
        record(graph.attn_start(layer) + H, act[:, None])
        return act

    def at_logits(act, hook):
        return rebuild(act, len(graph.receivers) - 1, None)

    fwd: list[tuple[str, Any]] = [("blocks.0.hook_resid_pre", at_input)]
    for layer in range(L):
        p = f"blocks.{layer}."
        if layer:  # layer 0's residual is the input, kept by at_input
            fwd.append((p + "hook_resid_pre", lambda a, hook, k=("pre", layer): at_resid(a, hook, k)))
        fwd += [(p + f"attn.hook_{kind}", lambda a, hook, la=layer, k=kind: at_qkv(a, hook, la, k))
                for kind in "qkv"]
        fwd += [(p + "attn.hook_z", lambda a, hook, la=layer: at_z(a, hook, la)),
                (p + "hook_resid_mid", lambda a, hook, k=("mid", layer): at_resid(a, hook, k)),
                (p + "mlp.hook_in", lambda a, hook, la=layer: at_mlp_in(a, hook, la)),
                (p + "hook_mlp_out", lambda a, hook, la=layer: at_mlp_out(a, hook, la))]
    fwd.append((f"blocks.{L - 1}.hook_resid_post", at_logits))
    with torch.set_grad_enabled(grad), model.hooks(fwd):
        logits = model.bridge(ids.to(model.device))[:, -1]
    return logits, recv


def receiver_grads(recv: Sequence[Tensor], grads: Sequence[Tensor | None]) -> Tensor:
    """``[b, pos, R, d_model]`` from :func:`edge_run`'s blocks and their gradients."""
    out = [torch.zeros_like(x) if g is None else g for x, g in zip(recv, grads)]
    return torch.cat([g if g.dim() == 4 else g[:, :, None] for g in out], 2)


__all__ = ["LayerWeights", "layer_weights", "sender_outputs", "edge_run", "receiver_grads"]
