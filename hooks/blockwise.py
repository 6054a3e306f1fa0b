"""Sentence×sentence mean attention from rotated queries and keys, in blocks of query rows.

The eager route (:func:`thinklens.hooks.capture.sentence_means`) reduces a full
``[batch, head, T, T]`` pattern. This module never makes one: it recomputes the
probabilities of a few query rows at a time from the same rotated q and k the attention
pass uses, and sums them into sentence bins at once.

1. **Sentence of every token**: ``sent[t]`` = the index of the sentence whose span
   ``[start, end)`` holds token ``t``, or ``S`` (a discarded bin) for tokens outside
   every sentence and for padding.
2. **A block of query rows** ``[a, a + B)``: ``scores = q[a:a+B] · kᵀ · scale`` plus the
   mask (the SDPA mask the layer got: boolean, ``True`` = attend, or additive float;
   ``None`` = causal, aligned bottom-right), then a softmax per row in float32. A full row
   of keys is in the block, so each row's softmax is exact (no running max needed).
   Grouped-query attention: q is viewed as ``[kv_head, group·B, d_head]`` and multiplied
   by its KV head's keys, so K is never expanded per head.
3. **Bin the block**: the keys are summed into sentence columns (``index_add_`` along the
   key axis, ``[head, B, S+1]``), then the rows into sentence rows of a
   ``[head, S+1, S+1]`` float32 accumulator (``index_add_`` with ``sent[a:a+B]``).
4. **Means**: the accumulator's ``[:S, :S]`` divided by the token counts of the query and
   key sentences. The largest ``[T, T]``-like buffer is one block's ``[head, B, T]``
   scores and probabilities; ``B`` is chosen so a block is about ``block_bytes`` (64 MB).

Example::

    from thinklens.hooks.blockwise import blockwise_sentence_means

    means = blockwise_sentence_means(q_rot, k_rot, bounds)   # [batch, head, S, S] float32
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

BLOCK_BYTES = 64 * 2**20


def sentence_index(bounds: Int[Tensor, "sentence 2"], n_tokens: int) -> Int[Tensor, " pos"]:
    """Per token, the sentence holding it, or ``len(bounds)`` outside every sentence."""
    n_sent = bounds.shape[0]
    pos = torch.arange(n_tokens, device=bounds.device)
    start, end = bounds[:, 0], bounds[:, 1]
    inside = (pos[:, None] >= start[None, :]) & (pos[:, None] < end[None, :])
    return torch.where(inside.any(1), inside.to(torch.int8).argmax(1), n_sent)


def block_rows(n_heads: int, n_keys: int, block_bytes: int | None = None) -> int:
    """Query rows per block so one float32 ``[head, rows, key]`` block is ``block_bytes``
    (default :data:`BLOCK_BYTES`)."""
    limit = BLOCK_BYTES if block_bytes is None else block_bytes
    return max(1, limit // max(1, n_heads * n_keys * 4))


def blockwise_sentence_means(
        q: Float[Tensor, "batch head pos d_head"],
        k: Float[Tensor, "batch kv_head key_pos d_head"],
        bounds: Int[Tensor, "batch sentence 2"],
        mask: Tensor | None = None, *, scale: float | None = None,
        rows_per_block: int | None = None,
) -> Float[Tensor, "batch head query_sentence key_sentence"]:
    """Per-head sentence×sentence mean attention of one layer, from rotated q and k.

    ``q`` ``[batch, head, T_q, d]`` and ``k`` ``[batch, kv_head, T_k, d]`` (grouped-query:
    head ``h`` uses KV head ``h // (head / kv_head)``); ``bounds`` as in
    :func:`thinklens.hooks.capture.sentence_means` (``start == end`` pads). ``mask``: the
    layer's SDPA mask (``[batch or 1, 1, T_q, T_k]``, boolean ``True`` = attend, or
    additive float) or None for causal. ``scale`` defaults to ``d ** -0.5``. Returns
    float32 ``[batch, head, S, S]``, equal to ``sentence_means`` of the full pattern.
    """
    b, n_heads, t_q, d = q.shape
    n_kv, t_k = k.shape[1], k.shape[2]
    groups = n_heads // n_kv
    n_sent = bounds.shape[1]
    scale = d ** -0.5 if scale is None else scale
    step = rows_per_block or block_rows(n_heads, t_k)
    dev = q.device
    out = torch.zeros((b, n_heads, n_sent, n_sent), dtype=torch.float32, device=dev)
    offset = t_k - t_q  # causal from the bottom-right (cached keys)
    keys = torch.arange(t_k, device=dev)
    for j in range(b):
        sent_k = sentence_index(bounds[j], t_k)
        sent_q = sentence_index(bounds[j], t_q + offset)[offset:]
        acc = torch.zeros((n_heads, n_sent + 1, n_sent + 1), dtype=torch.float32, device=dev)
        kj = k[j].transpose(1, 2)                                       # [kv, d, T_k]
        for a in range(0, t_q, step):
            e = min(a + step, t_q)
            qb = q[j, :, a:e].reshape(n_kv, groups * (e - a), d)       # [kv, g·B, d]
            s = torch.matmul(qb, kj).view(n_heads, e - a, t_k).float() * scale
            if mask is None:
                rows = torch.arange(a, e, device=dev)[:, None] + offset
                s.masked_fill_(keys[None, :] > rows, torch.finfo(torch.float32).min)
            else:
                m = mask[j if mask.shape[0] > 1 else 0, :, a:e, :t_k]
                if m.dtype == torch.bool:
                    s.masked_fill_(~m, torch.finfo(torch.float32).min)
                else:
                    s += m.float()
            p = torch.softmax(s, dim=-1)                                # [H, B, T_k]
            cols = torch.zeros((n_heads, e - a, n_sent + 1), dtype=torch.float32, device=dev)
            cols.index_add_(2, sent_k, p)
            acc.index_add_(1, sent_q[a:e], cols)
        count = (bounds[j, :, 1] - bounds[j, :, 0]).clamp(min=1).to(torch.float32)
        out[j] = acc[:, :n_sent, :n_sent] / count[:, None] / count[None, :]
    return out


def vertical_scores(
        sentence_attention: Float[Tensor, "*lead query_sentence key_sentence"],
        proximity: int = 4) -> Float[Tensor, "*lead key_sentence"]:
    """Each sentence's vertical score (Bogdan et al. 2025, Thought Anchors).

    ``v[..., j]`` = mean of ``sentence_attention[..., i, j]`` over the query sentences
    ``i >= j + proximity`` (each later sentence weighted equally, whatever its length);
    NaN where no sentence is that far after ``j`` (the last ``proximity`` sentences).
    """
    if proximity < 0:
        raise ValueError(f"proximity={proximity}; need an integer >= 0")
    n_q, n_k = sentence_attention.shape[-2:]
    i = torch.arange(n_q, device=sentence_attention.device)[:, None]
    j = torch.arange(n_k, device=sentence_attention.device)[None, :]
    keep = (i >= j + proximity).to(sentence_attention.dtype)
    total = (sentence_attention * keep).sum(-2)
    count = keep.sum(0)
    return total / count.where(count > 0, torch.full_like(count, float("nan")))


__all__ = ["BLOCK_BYTES", "sentence_index", "block_rows", "blockwise_sentence_means",
           "vertical_scores"]
