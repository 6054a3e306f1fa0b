"""Attention with a weight per sentence on its keys, computed blockwise with its gradient.

Sentence attribution (:mod:`thinklens.circuits.anchors_attribution`) needs the gradient of
a score with respect to ``u_j``, the share of the attention to sentence ``j``'s keys that
is taken away (``u = 0``: the plain pattern; ``u_j = 1``: sentence ``j`` suppressed, as in
Thought Anchors' attention suppression, Bogdan et al. 2025, arXiv 2506.19143). Through the
bridge's eager attention, autograd keeps every layer's ``heads × T²`` scores and
probabilities for the backward pass: 1.4 TB for SmolLM2-135M at 16k tokens. This module
computes the same pattern path without keeping any ``[T, T]`` tensor, the way
FlashAttention (Dao et al. 2022, arXiv 2205.14135) recomputes attention in its backward
pass instead of storing it:

1. **Forward, by blocks of query rows** (:func:`weighted_attention`): for rows ``r`` of a
   block, ``p = softmax(scale · q kᵀ + mask)``; ``P_j`` = the row's weight on sentence
   ``j`` (its keys' sum); the row's pattern becomes ``p' = p · f`` with
   ``f_k = 1 + Σ_j u_j P_j / (1 − P_j) − u_{s(k)} / (1 − P_{s(k)})`` (``s(k)``: the
   sentence holding key ``k``; keys outside every sentence have ``u = 0``), which moves the
   weight taken from ``j`` to the row's other keys in proportion to their weights; rows at
   or after ``below`` keep ``p``. The output is ``p' v``. Only ``q``, ``k``, ``v`` and ``u``
   are kept for the backward pass. At ``u = 0`` (where attribution takes its gradient)
   ``f = 1``: the forward pass is plain attention and neither pass builds ``f``.
2. **Backward, the same blocks recomputed**: with ``dO`` the output's gradient,
   ``dp' = dO vᵀ``; ``dv += p'ᵀ dO``; ``du_j += Σ_rows [P_j/(1 − P_j) · Σ_k g_k −
   1/(1 − P_j) · Σ_{k ∈ j} g_k]`` with ``g = dp' ⊙ p``; through the softmax,
   ``dp = dp' ⊙ f``, ``ds = p ⊙ (dp − Σ_k dp ⊙ p)``, ``dq = scale · ds k``,
   ``dk += scale · dsᵀ q``. ``P`` is held constant, as in the eager path's hook
   (:func:`~thinklens.circuits.anchors_attribution.interp_hooks` detaches it): the terms
   it enters are multiplied by ``u``, so at ``u = 0``, where attribution takes its
   gradient, every gradient is exact.

Everything inside runs in float32 (float64 for float64 inputs); the outputs have the inputs' dtypes. Peak memory per
layer: about four float32 ``[batch, head, rows, T]`` blocks (``rows_per_block``; default
blocks of :data:`BLOCK_BYTES`), against ``heads × T²`` per layer *kept* by the eager path.
Checked against the eager path and ``torch.autograd.gradcheck`` in tests/test_budget.py
and tests/test_anchors_attention.py.

Example::

    out = weighted_attention(q, k, v, u, sent, scale=d ** -0.5)   # [batch, head, T, d]
    out.sum().backward()                                           # u.grad: [S]
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from thinklens.errors import ConfigError

BLOCK_BYTES = 48 * 2**20   # one float32 [batch, head, rows, T] block (above glibc's 32 MiB mmap threshold)
TEMPORARIES = 4            # such blocks alive at once in the backward pass (counted)


def rows_for(batch: int, heads: int, keys: int, block_bytes: int | None = None) -> int:
    """Query rows per block so that one float32 block is about ``block_bytes``."""
    limit = BLOCK_BYTES if block_bytes is None else block_bytes
    return max(16, limit // max(1, batch * heads * keys * 4))


def _block(q: Tensor, k: Tensor, u: Tensor, sent: Tensor, mask: Tensor | None,
           scale: float, a: int, offset: int, below: int | None, *, sums: bool = True,
           moved: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None,
                                        Tensor]:
    """Rows ``a .. a + len(q)`` (query positions ``offset + a ..``): the plain pattern ``p``,
    ``P`` ``[b, h, rows, S]``, ``1/(1 − P)``, the factor ``f`` and the rows' weight mask.
    ``u = 0`` (attribution's point) has ``f = 1``: ``moved=False`` skips it (None), and
    ``sums=False`` skips ``P`` and ``1/(1 − P)`` too (the forward pass needs neither)."""
    n, rows, keys = u.shape[0], q.shape[-2], k.shape[-2]
    ct = _compute_dtype(q)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)).mul_(scale)
    pos = torch.arange(offset + a, offset + a + rows, device=q.device)
    low = torch.finfo(ct).min
    if mask is None:
        s.masked_fill_(torch.arange(keys, device=q.device)[None, :] > pos[:, None], low)
    elif mask.dtype == torch.bool:
        s.masked_fill_(~mask[..., a:a + rows, :], low)
    else:
        s.add_(mask[..., a:a + rows, :].to(ct)).clamp_(min=low)
    p = torch.softmax(s, -1)
    del s
    live = (pos < below) if below is not None else torch.ones_like(pos, dtype=torch.bool)
    if not (sums or moved):
        return p, None, None, None, live
    big = torch.zeros((*p.shape[:-1], n + 1), dtype=ct, device=p.device).index_add_(
        -1, sent, p)[..., :n]
    inv = 1.0 / (1.0 - big).clamp(min=1e-6)
    if not moved:
        return p, big, inv, None, live
    uc = u.to(ct)
    spread = (uc * big * inv).sum(-1, keepdim=True)                        # [b, h, r, 1]
    u_key = torch.cat([uc, uc.new_zeros(1)])[sent]
    factor = torch.cat([inv, inv.new_zeros((*inv.shape[:-1], 1))], -1)[..., sent]
    factor.mul_(-u_key).add_(1.0 + spread)        # 1 + spread − u_{s(k)} / (1 − P_{s(k)})
    if not bool(live.all()):
        factor[..., ~live, :] = 1.0
    return p, big, inv, factor, live


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _WeightedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, u: Tensor, sent: Tensor,
                mask: Tensor | None, scale: float, below: int | None, rows: int) -> Tensor:
        offset = k.shape[-2] - q.shape[-2]
        ct = _compute_dtype(q)
        out = torch.empty(q.shape, dtype=ct, device=q.device)
        vf = v.to(ct)
        moved = bool(u.detach().any())
        for a in range(0, q.shape[-2], rows):
            p, _, _, factor, _ = _block(q[..., a:a + rows, :], k, u, sent, mask, scale, a,
                                        offset, below, sums=moved, moved=moved)
            out[..., a:a + rows, :] = torch.matmul(p if factor is None else p * factor, vf)
            del p, factor
        ctx.save_for_backward(q, k, v, u, sent, mask if mask is not None else torch.empty(0))
        ctx.args = (mask is not None, scale, below, rows)
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx: Any, d_out: Tensor):  # type: ignore[override]
        q, k, v, u, sent, mask = ctx.saved_tensors
        has_mask, scale, below, rows = ctx.args
        mask = mask if has_mask else None
        offset = k.shape[-2] - q.shape[-2]
        n = u.shape[0]
        ct = _compute_dtype(q)
        kf, vf, dof = k.to(ct), v.to(ct), d_out.to(ct)
        dq = torch.empty(q.shape, dtype=ct, device=q.device)
        dk = torch.zeros(k.shape, dtype=ct, device=k.device)
        dv = torch.zeros(v.shape, dtype=ct, device=v.device)
        du = torch.zeros(n, dtype=ct, device=u.device)
        moved = bool(u.detach().any())
        for a in range(0, q.shape[-2], rows):
            qb = q[..., a:a + rows, :].to(ct)
            p, big, inv, factor, live = _block(qb, kf, u, sent, mask, scale, a, offset, below,
                                               moved=moved)
            assert big is not None and inv is not None
            do = dof[..., a:a + rows, :]
            dv += torch.matmul((p if factor is None else p * factor).transpose(-1, -2), do)
            dpp = torch.matmul(do, vf.transpose(-1, -2))                   # [b, h, r, T]
            g = dpp * p
            whole = g.sum(-1, keepdim=True)                                  # [b, h, r, 1]
            per = torch.zeros((*g.shape[:-1], n + 1), dtype=ct, device=g.device).index_add_(
                -1, sent, g)[..., :n]                                        # [b, h, r, S]
            del g
            contrib = (big * inv * whole - inv * per) * live[:, None].to(ct)
            du += contrib.sum(dim=tuple(range(contrib.dim() - 1)))
            del per, contrib, big, inv
            dp = dpp if factor is None else dpp.mul_(factor)
            del dpp, factor
            ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p)          # softmax backward
            del dp, p
            dq[..., a:a + rows, :] = torch.matmul(ds, kf).mul_(scale)
            dk += torch.matmul(ds.transpose(-1, -2), qb).mul_(scale)
            del ds
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), du.to(u.dtype),
                None, None, None, None, None)


def weighted_attention(
        q: Float[Tensor, "batch head query_pos d_head"],
        k: Float[Tensor, "batch head key_pos d_head"],
        v: Float[Tensor, "batch head key_pos d_head"],
        u: Float[Tensor, " sentence"],
        sent: Int[Tensor, " key_pos"], *,
        scale: float, mask: Tensor | None = None, below: int | None = None,
        rows_per_block: int | None = None,
) -> Float[Tensor, "batch head query_pos d_head"]:
    """Attention whose rows move the share ``u_j`` of their weight on sentence ``j`` to
    their other keys (module step 1), differentiable in ``q``, ``k``, ``v`` and ``u``
    (step 2) with no ``[T, T]`` tensor kept.

    ``k``/``v`` have one head per query head (expand grouped-query K/V first). ``sent``:
    per key, its sentence index, ``len(u)`` outside every sentence
    (:func:`~thinklens.hooks.blockwise.sentence_index`). ``mask``: None (causal from the
    bottom-right), a boolean ``[batch or 1, 1, T_q, T_k]`` (True = attend) or an additive
    float mask. ``below``: query positions from ``below`` on keep the plain pattern.
    """
    if q.shape[-3] != k.shape[-3] or k.shape != v.shape:
        raise ConfigError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                          "give k and v one head per query head (expand grouped-query K/V)")
    if sent.shape != (k.shape[-2],):
        raise ConfigError(f"sent has shape {tuple(sent.shape)}; need one sentence index per "
                          f"key ({k.shape[-2]})")
    rows = rows_per_block or rows_for(q.shape[0], q.shape[1], k.shape[-2])
    return _WeightedAttention.apply(q, k, v, u, sent, mask, float(scale), below, int(rows))


def block_peak(batch: int, heads: int, keys: int, rows_per_block: int | None = None) -> int:
    """Bytes of the temporaries one layer's blocks need at once (the backward pass's)."""
    rows = min(keys, rows_per_block or rows_for(batch, heads, keys))
    return TEMPORARIES * batch * heads * rows * keys * 4


__all__ = ["BLOCK_BYTES", "weighted_attention", "rows_for", "block_peak"]
