"""Attention statistics of long traces from rotated q/k, in blocks of query rows.

The eager route (:func:`sentence_means`) reduces a full
``[batch, head, T, T]`` pattern. This module never makes one: it computes the
probabilities of a few query rows at a time from the rotated q and k the attention pass
uses and reduces them at once; with ``v`` it also returns the attention output from the
same probabilities, so one pass over QKᵀ serves both (the SDPA call is skipped).

1. **Token bins**: ``sent[t]`` = the sentence whose span ``[start, end)`` holds token
   ``t``; ``S`` for real tokens outside every sentence, ``S + 1`` for padding.
2. **A block of query rows** ``[a, a + B)``: ``scores = q[a:a+B] · kᵀ · scale`` over the
   keys the rows can see (causal: keys ``< a + B``, so half of QKᵀ is never computed;
   a mask that lets a row see a later key switches to all keys), masked (the layer's
   SDPA mask: boolean ``True`` = attend, or additive float; ``None`` = causal, aligned
   bottom-right), softmax per row in float32. A full row of keys is in the block, so
   each row's softmax is exact (no running max). Grouped-query attention: q is viewed as
   ``[kv_head, group·B, d_head]`` and multiplied by its KV head's keys (K and V never
   expanded per head). ``B`` makes one float32 ``[head, B, key]`` block about
   ``block_bytes`` (4 MB: near the cache; 64 MB blocks ran 2× slower on CPU), at least
   16 rows.
3. **Output** (when ``v`` is given): ``probabilities · v`` per KV group.
4. **Reduce the block**: query rows are first summed by sentence (``R[u, key]``, one row
   per sentence present in the block), which makes the data ~10× smaller before the
   key axis is binned: ``C[u, j]`` = ``R`` summed over the keys of sentence ``j``
   (``index_add_``). From these:
   - ``sentence``: ``C`` added into the ``[head, S, S]`` float32 sums; at the end divided
     by the token counts of the query and key sentences (the Thought Anchors mean).
   - ``vertical``: ``Σ_u C[u, j] / (n_u n_j)`` over query sentences ``u >= j + proximity``,
     divided at the end by the number of such sentences: :func:`vertical_scores` of the
     sentence matrix, computed without it (Bogdan et al. 2025; METHODS.md).
   - ``columns``: ``R`` summed over its real rows: each key token's column sum of the
     pattern (the attention it receives from every real query token).

Example::

    from thinklens.hooks.blockwise import attention_statistics, blockwise_sentence_means

    means = blockwise_sentence_means(q_rot, k_rot, bounds)   # [batch, head, S, S] float32
    stats = attention_statistics(q_rot, k_rot, bounds, v=v, vertical=True, columns=True)
    stats.output, stats.vertical, stats.columns
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from jaxtyping import Float, Int
from torch import Tensor

BLOCK_BYTES = 4 * 2**20
MIN_ROWS = 16
PROXIMITY = 4  # a sentence's vertical score skips the next 3 sentences (METHODS.md)


@dataclass
class BlockStatistics:
    """One layer's attention output and statistics (None where not asked for)."""

    output: Float[Tensor, "batch head pos d_head"] | None
    sentence: Float[Tensor, "batch head query_sentence key_sentence"] | None
    vertical: Float[Tensor, "batch head sentence"] | None
    columns: Float[Tensor, "batch head key_pos"] | None


def sentence_index(bounds: Int[Tensor, "sentence 2"], n_tokens: int) -> Int[Tensor, " pos"]:
    """Per token, the sentence holding it, or ``len(bounds)`` outside every sentence.

    Sentences do not overlap (a trace's sentences never do); ``start == end`` pads.
    O(T) memory: each span's positions are written once (no ``[T, S]`` comparison).
    """
    n_sent = bounds.shape[0]
    start, end = bounds[:, 0], bounds[:, 1].clamp(max=n_tokens)
    n = (end - start).clamp(min=0)
    ids = torch.repeat_interleave(torch.arange(n_sent, device=bounds.device), n)
    first = torch.repeat_interleave(start - (torch.cumsum(n, 0) - n), n)
    out = torch.full((n_tokens,), n_sent, dtype=torch.long, device=bounds.device)
    out[first + torch.arange(len(ids), device=bounds.device)] = ids
    return out


def block_rows(n_heads: int, n_keys: int, block_bytes: int | None = None) -> int:
    """Query rows per block: one float32 ``[head, rows, key]`` block of ``block_bytes``
    (default :data:`BLOCK_BYTES`), but at least :data:`MIN_ROWS` rows (fewer rows per
    block cost more in per-block overhead than the cache saves)."""
    limit = BLOCK_BYTES if block_bytes is None else block_bytes
    return max(MIN_ROWS, limit // max(1, n_heads * n_keys * 4))


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
    :func:`sentence_means` (``start == end`` pads). ``mask``: the
    layer's SDPA mask (``[batch or 1, 1, T_q, T_k]``, boolean ``True`` = attend, or
    additive float) or None for causal. ``scale`` defaults to ``d ** -0.5``. Returns
    float32 ``[batch, head, S, S]``, equal to ``sentence_means`` of the full pattern.
    """
    return cast(Tensor, attention_statistics(q, k, bounds, mask, scale=scale,
                                             rows_per_block=rows_per_block).sentence)


def attention_statistics(
        q: Float[Tensor, "batch head pos d_head"],
        k: Float[Tensor, "batch kv_head key_pos d_head"],
        bounds: Int[Tensor, "batch sentence 2"],
        mask: Tensor | None = None, *, v: Float[Tensor, "batch kv_head key_pos d_head"] | None = None,
        scale: float | None = None, lengths: Int[Tensor, " batch"] | None = None,
        sentence: bool = True, vertical: bool = False, columns: bool = False,
        proximity: int = PROXIMITY, rows_per_block: int | None = None,
        sentence_into: Float[Tensor, "batch head query_sentence key_sentence"] | None = None,
) -> BlockStatistics:
    """One layer's attention output (with ``v``) and statistics, blockwise (module steps).

    Shapes and ``mask`` as in :func:`blockwise_sentence_means`. ``lengths``: real key
    tokens per row of the batch (default all); padded query rows add nothing. Returns
    ``sentence`` ``[batch, head, S, S]`` (into ``sentence_into`` when given: float32,
    zeroed), ``vertical`` ``[batch, head, S]`` (NaN where no real sentence lies
    ``proximity`` or more after), ``columns`` ``[batch, head, T_k]`` and ``output``
    ``[batch, head, T_q, d]`` in v's dtype; all statistics float32.
    """
    if proximity < 0:
        raise ValueError(f"proximity={proximity}; need an integer >= 0")
    b, n_heads, t_q, d = q.shape
    n_kv, t_k = k.shape[1], k.shape[2]
    groups, n_sent, dev, f32 = n_heads // n_kv, bounds.shape[1], q.device, torch.float32
    scale = d ** -0.5 if scale is None else scale
    step = rows_per_block or block_rows(n_heads, t_k)
    offset = t_k - t_q  # causal from the bottom-right (cached keys)
    acc = None
    if sentence:
        acc = sentence_into if sentence_into is not None else torch.zeros(
            (b, n_heads, n_sent, n_sent), dtype=f32, device=dev)
    vert = torch.zeros((b, n_heads, n_sent), dtype=f32, device=dev) if vertical else None
    cols_out = torch.zeros((b, n_heads, t_k), dtype=f32, device=dev) if columns else None
    out = (torch.empty((b, n_heads, t_q, v.shape[-1]), dtype=v.dtype, device=dev)
           if v is not None else None)
    reduce = sentence or vertical
    later = torch.arange(n_sent, device=dev)[None, :] + proximity
    for j in range(b):
        sent = sentence_index(bounds[j], t_k)
        if lengths is not None:
            sent[int(lengths[j]):] = n_sent + 1
        sent_q = sent[offset:]
        count = (bounds[j, :, 1] - bounds[j, :, 0]).clamp(min=1).to(f32)
        kt = k[j].transpose(1, 2).contiguous()       # [kv, d, T_k]: bmm runs 1.4x faster
        qj = q[j] * scale
        mj = None if mask is None else mask[j if mask.shape[0] > 1 else 0, 0]
        for a in range(0, t_q, step):
            e = min(a + step, t_q)
            n, lo = e - a, a + offset
            hi = t_k if mj is not None and _sees_later(mj, a, e, lo + n) else min(t_k, lo + n)
            qb = qj[:, a:e].reshape(n_kv, groups * n, d)
            s = torch.matmul(qb, kt[:, :, :hi]).view(n_heads, n, hi).to(f32)
            if mj is None:
                tri = torch.ones(n, hi - lo, dtype=torch.bool, device=dev).triu_(1)
                s[:, :, lo:].masked_fill_(tri, torch.finfo(f32).min)
            elif mj.dtype == torch.bool:
                s.masked_fill_(~mj[a:e, :hi], torch.finfo(f32).min)
            else:
                s += mj[a:e, :hi].to(f32)
            p = torch.softmax(s, dim=-1)                                # [H, B, keys]
            del s
            if out is not None:
                pv = p.view(n_kv, groups * n, hi).to(v.dtype)
                out[j, :, a:e] = torch.matmul(pv, v[j, :, :hi]).view(n_heads, n, -1)
            if not (reduce or columns):
                continue
            uniq, inv = torch.unique(sent_q[a:e], return_inverse=True)
            rows = torch.zeros((n_heads, len(uniq), hi), dtype=f32, device=dev)
            rows.index_add_(1, inv, p)                                  # [H, U, keys]
            if columns:
                cols_out[j, :, :hi] += rows[:, uniq <= n_sent].sum(1)
            if not reduce:
                continue
            inside = uniq < n_sent
            c = torch.zeros((n_heads, len(uniq), n_sent + 2), dtype=f32, device=dev)
            c.index_add_(2, sent[:hi], rows)
            c, ids = c[:, inside, :n_sent], uniq[inside]
            if acc is not None:
                acc[j].index_add_(1, ids, c)
            if vert is not None:
                w = (ids[:, None] >= later).to(f32) / count[ids][:, None]
                vert[j] += (c * w).sum(1)
        if acc is not None:
            acc[j].div_(count[:, None]).div_(count[None, :])
        if vert is not None:
            real = int((bounds[j, :, 1] > bounds[j, :, 0]).sum())
            n_later = (real - later[0]).clamp(min=0).to(f32)
            vert[j] /= count * n_later.where(n_later > 0, torch.full_like(n_later, float("nan")))
    return BlockStatistics(output=out, sentence=acc, vertical=vert, columns=cols_out)


def _sees_later(m: Tensor, a: int, e: int, first: int) -> bool:
    """Whether mask rows ``[a, e)`` let any query see a key at or after ``first``."""
    rest = m[a:e, first:]
    if rest.numel() == 0:
        return False
    return bool(rest.any()) if rest.dtype == torch.bool else bool(
        (rest > torch.finfo(rest.dtype).min / 2).any())


def vertical_scores(
        sentence_attention: Float[Tensor, "... query_sentence key_sentence"],
        proximity: int = PROXIMITY) -> Float[Tensor, "... key_sentence"]:
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


STATISTICS = {"sentence": "sentence_attention", "vertical": "vertical_scores",
              "columns": "column_sums"}  # capture(attention=...) name -> capture key
AXES = {"sentence": ("layer", "head", "query_sentence", "key_sentence"),
        "vertical": ("layer", "head", "sentence"), "columns": ("layer", "head", "key_pos")}


class KeptStatistics:
    """The statistics one capture batch keeps, per trace, filled one layer at a time.

    Each trace's result is allocated once in its kept dtype (``[layer, head, S, S]``,
    ``[layer, head, S]``, ``[layer, head, T]`` on CPU) and each layer is written into it,
    so nothing is stacked or copied at the end. Where the kept sentence matrix is the
    float32 sums' own shape (a batch of one trace on CPU, kept in float32), the blockwise
    reduction accumulates straight into it (:meth:`into`).
    """

    def __init__(self, wanted: tuple[str, ...], n_layers: int, n_heads: int,
                 bounds: list[list[tuple[int, int]]], lengths: list[int], dtype: torch.dtype,
                 device: torch.device | str, proximity: int = PROXIMITY):
        self.wanted, self.n_layers, self.dtype, self.proximity = wanted, n_layers, dtype, proximity
        n_sent = max((len(b) for b in bounds), default=0)
        padded = torch.zeros((len(bounds), max(n_sent, 1), 2), dtype=torch.long)
        for j, spans in enumerate(bounds):
            if spans:
                padded[j, : len(spans)] = torch.tensor(spans)
        self.bounds = padded.to(device)
        self.lengths = torch.tensor(lengths, device=device)
        self.n_sent = [len(b) for b in bounds]
        shapes = {"sentence": lambda s, t: (s, s), "vertical": lambda s, t: (s,),
                  "columns": lambda s, t: (t,)}
        self.kept = {w: [torch.zeros((n_layers, n_heads, *shapes[w](s, t)), dtype=dtype)
                         for s, t in zip(self.n_sent, lengths)] for w in wanted}
        self.done: set[int] = set()

    def into(self, layer: int) -> Tensor | None:
        """The kept ``[1, head, S, S]`` float32 of ``layer`` to accumulate into, or None."""
        if ("sentence" in self.wanted and len(self.n_sent) == 1 and self.dtype == torch.float32
                and self.bounds.device.type == "cpu" and self.n_sent[0] == self.bounds.shape[1]):
            return self.kept["sentence"][0][layer][None]
        return None

    def add(self, layer: int, stats: BlockStatistics) -> None:
        """Keep one layer's statistics (padded ``[batch, head, ...]``) per trace."""
        for j, (s, t) in enumerate(zip(self.n_sent, self.lengths.tolist())):
            if stats.sentence is not None and "sentence" in self.wanted:
                dst = self.kept["sentence"][j][layer]
                if dst.data_ptr() != stats.sentence[j].data_ptr():
                    dst.copy_(stats.sentence[j, :, :s, :s])
            if stats.vertical is not None:
                self.kept["vertical"][j][layer].copy_(stats.vertical[j, :, :s])
            if stats.columns is not None:
                self.kept["columns"][j][layer].copy_(stats.columns[j, :, :t])
        self.done.add(layer)

    def add_pattern(self, layer: int, pattern: Float[Tensor, "batch head query_pos key_pos"],
                    sentence: Float[Tensor, "batch head query_sentence key_sentence"] | None,
                    ) -> None:
        """Keep one layer's statistics from its full pattern and its sentence means."""
        vert = cols = None
        if "vertical" in self.wanted and sentence is not None:
            vert = torch.stack([torch.nn.functional.pad(
                vertical_scores(sentence[j, :, :s, :s], self.proximity),
                (0, sentence.shape[-1] - s)) for j, s in enumerate(self.n_sent)])
        if "columns" in self.wanted:
            cols = torch.zeros(pattern.shape[:2] + pattern.shape[-1:], dtype=torch.float32,
                               device=pattern.device)
            for j, t in enumerate(self.lengths.tolist()):
                cols[j, :, :t] = pattern[j, :, :t, :t].sum(1, dtype=torch.float32)
        self.add(layer, BlockStatistics(None, sentence, vert, cols))

    def missing(self) -> list[int]:
        return sorted(set(range(self.n_layers)) - self.done)

    def results(self) -> dict[str, list[Tensor]]:
        """``{capture key: [per-trace tensor]}``."""
        return {STATISTICS[w]: v for w, v in self.kept.items()}


__all__ = ["BLOCK_BYTES", "MIN_ROWS", "PROXIMITY", "BlockStatistics", "sentence_index", "block_rows",
           "blockwise_sentence_means", "attention_statistics", "vertical_scores",
           "STATISTICS", "AXES", "KeptStatistics", "sentence_means"]
