"""Memory estimates for a capture, computed before any forward pass runs.

A capture costs (1) what it keeps, per trace and key, and (2) the peak of one batch's
forward pass. The peak is counted for the attention that really runs
(:mod:`thinklens.hooks.attention_impl`):

1. **Phases**: the residual stream stays; the largest of one layer's attention phase
   (q/k/v, rotated copies, output, plus what the implementation needs, below), its MLP
   phase (three ``d_mlp`` activations) and the logits comes on top (checked against
   measured peak RSS in tests/test_budget.py).
2. **Eager** attention materialises one layer's scores and probabilities,
   ``batch × heads × T²`` each, plus the masked scores (2.5× measured); the eager sentence
   reduction of a bf16/fp16 pattern makes a float32 copy of one trace's pattern.
3. **SDPA** expands K and V per head (grouped-query ``repeat_kv``): ``2 × batch × heads ×
   T × d_head``; its kernel works in small tiles.
4. **Blockwise statistics** (:mod:`thinklens.hooks.blockwise`): one block's float32
   scores, probabilities and row sums (``heads × rows × T``), the scaled q, the keys'
   transposed copy and the attention output, and the float32 ``[batch, head, S, S]``
   sums of one layer unless they accumulate straight into the kept result.
5. **Kept statistics**: ``layer × head × S²`` (sentence), ``× S`` (vertical scores) and
   ``× T`` (column sums), in their kept dtype.

A refusal (:func:`check`) lists only alternatives that lower the number it refuses, each
with its own estimate.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from thinklens.errors import BudgetError, ConfigError
from thinklens.hooks import attention_impl
from thinklens.hooks.blockwise import block_rows
from thinklens.hooks.sites import is_pattern_site
from thinklens.hooks.weighted_attention import block_peak

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}
ATTENTION = ("eager", "sdpa", "blockwise")
CHECKPOINT_PER_TOKEN = 2.0  # d_model floats per token a recomputed block keeps (measured)


def parse_budget(budget: int | float | str | None, device: torch.device) -> int:
    """Bytes from ``8_000_000_000``, ``"8GB"`` or ``"512MiB"``; None = 60% of available memory
    (GPU: free device memory; Linux: ``MemAvailable``, which counts the page cache the
    kernel can drop)."""
    if budget is None:
        return int(0.6 * _free_memory(device))
    if isinstance(budget, int | float) and budget > 0:
        return int(budget)
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(budget))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"budget {budget!r} is not a size; write e.g. 8000000000, '8GB' "
                          "or '512MiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:  # MemAvailable: free pages plus the page cache and slabs the kernel can reclaim
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return 8 * 10**9


def fmt(n: float) -> str:
    """``1.2 GB``-style size."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


@dataclass
class Estimate:
    """Bytes a capture needs: what it keeps, and the peak of one batch's forward pass."""

    kept: int
    kept_per_batch: int
    forward_peak: int

    def in_memory(self) -> int:
        return self.kept + self.forward_peak

    def streaming(self) -> int:
        return self.kept_per_batch + self.forward_peak

    def need(self, streaming: bool) -> int:
        return self.streaming() if streaming else self.in_memory()


def statistics_bytes(cfg, statistics: Sequence[str], sentences: int, tokens: int,
                     bytes_per: int = 4) -> int:
    """Kept bytes of one trace's attention statistics (step 5)."""
    per = {"sentence": sentences ** 2, "vertical": sentences, "columns": tokens}
    return cfg.n_layers * cfg.n_heads * sum(per[s] for s in statistics) * bytes_per


def forward_peak(cfg, batch: int, length: int, bytes_per: int, attention: str = "eager", *,
                 statistics: Sequence[str] = (), sentences: int = 0,
                 sums_in_kept: bool = False) -> int:
    """Peak bytes of one no-grad forward pass of ``batch`` sequences of ``length``.

    ``attention``: "eager" (the default, the most), "sdpa" or "blockwise" (SDPA with
    :mod:`~thinklens.hooks.blockwise` statistics); ``statistics``, ``sentences`` and
    ``sums_in_kept`` describe the attention statistics computed in the pass. The peak is
    the residual stream plus the larger of a layer's attention phase, its MLP phase and
    the logits (each phase's temporaries are freed before the next).
    """
    if attention not in ATTENTION:
        raise ConfigError(f"attention={attention!r}; valid: {', '.join(ATTENTION)}")
    d, dh, h = cfg.d_model, cfg.d_head, cfg.n_heads
    tokens = batch * length
    kv = cfg.n_kv_heads * dh
    residual = tokens * 2 * d * bytes_per
    mlp = tokens * (3 * max(cfg.d_mlp, d) + 4 * d) * bytes_per
    attn = tokens * (2 * h * dh + 4 * kv + 2 * d) * bytes_per  # q, k, v, rotated, output
    if attention == "eager":  # scores, masked scores, probabilities (measured: 2.5x)
        attn += 2.5 * batch * h * length * length * bytes_per
        if statistics and bytes_per < 4:  # sentence_means reduces a float32 copy
            attn += h * length * length * 4
        if statistics:  # its row sums [head, S + 1, T], one trace at a time
            attn += h * (sentences + 1) * length * 4
    elif attention == "sdpa":  # K, V expanded per head
        attn += 2 * tokens * h * dh * bytes_per
    else:
        rows = min(length, block_rows(h, length))
        attn += 2.2 * h * rows * length * 4                   # one block's scores, probs
        attn += tokens * (2 * h * dh + kv) * bytes_per        # scaled q, output, keys' copy
        if "sentence" in statistics and not sums_in_kept:
            attn += batch * h * sentences ** 2 * 4
        attn += batch * h * (sentences + length) * 4           # vertical, columns
    logits = tokens * cfg.d_vocab * bytes_per
    return int(residual + max(mlp, attn, logits))


def check(est: Estimate, budget: int, streaming: bool,
          alternatives: Sequence[tuple[str, int]] | None = None) -> None:
    """Refuse (``BudgetError``) a capture whose estimate exceeds ``budget``.

    ``alternatives``: ``(change, bytes it would need)``; only those below the refused
    number are listed, with their estimate.
    """
    need = est.need(streaming)
    check_need("capture", need, budget, alternatives,
               detail=f" (kept {fmt(need - est.forward_peak)} + forward pass peak "
                      f"{fmt(est.forward_peak)})")


def check_need(what: str, need: int, budget: int,
               alternatives: Sequence[tuple[str, int]] | None = None, *,
               detail: str = "") -> None:
    """Refuse (``BudgetError``) ``what`` when its estimated ``need`` exceeds ``budget``,
    listing only the ``(change, bytes)`` alternatives that lower it, with their estimates."""
    if need <= budget:
        return
    ways = sorted((n, text) for text, n in (alternatives or ()) if n < need)
    listed = "; ".join(f"{text} (about {fmt(n)}{', fits' if n <= budget else ''})"
                       for n, text in ways)
    raise BudgetError(
        f"{what} needs about {fmt(need)}{detail} but the memory budget is {fmt(budget)}. "
        + (f"Alternatives: {listed}; " if listed else "No other setting lowers it; ")
        + "or raise the budget with budget='32GB' if the memory is really there.")


def attribution_peak(cfg, length: int, attention: str = "eager", *,
                     checkpoint: bool = False) -> int:
    """Peak bytes of one forward + backward pass of one sequence of ``length`` through
    sentence attribution's pattern path (float32 inside), measured on CPU
    (tests/test_budget.py, two shapes, 1.5k-6k tokens).

    Kept per layer for the backward pass: about 2.5 copies of the MLP's three ``d_mlp``
    activations and, with ``attention="eager"``, 4.9 copies of the ``heads × T²`` scores;
    ``"blockwise"`` (:mod:`~thinklens.hooks.weighted_attention`) keeps about
    ``5.1 · d_mlp + 16 · d_model`` floats per token and its backward pass's blocks come
    on top where they exceed what one layer keeps. ``checkpoint=True``
    (:func:`~thinklens.hooks.forward.recompute_blocks`): every layer keeps its input
    (``CHECKPOINT_PER_TOKEN · d_model`` floats per token), and two layers' worth (one for
    a two-layer model) plus the blocks is alive at once (SmolLM2-135M at 1k-8k tokens:
    0.83-1.11 of the measured peak, benchmarks/RESULTS.md (p)).
    """
    if attention not in ("eager", "blockwise"):
        raise ConfigError(f"attention={attention!r}; valid: eager, blockwise")
    blocks = 0.0 if attention == "eager" else float(block_peak(1, cfg.n_heads, length))
    if attention == "eager":
        layer = 4 * (7.5 * max(cfg.d_mlp, cfg.d_model) * length
                     + 4.9 * cfg.n_heads * length ** 2)
    else:
        layer = 4 * length * (5.1 * max(cfg.d_mlp, cfg.d_model) + 16 * cfg.d_model)
    if not checkpoint:
        return int(cfg.n_layers * layer + max(0.0, blocks - layer))
    inputs = 4 * CHECKPOINT_PER_TOKEN * cfg.d_model * length
    alive = max(1, min(2, cfg.n_layers - 1))
    return int(cfg.n_layers * inputs + alive * layer + blocks)


def estimate(model, traces, sites, shapes, pos, sentence, heads, out_dtype, batch_size,
             stats_dtype=torch.float32, implementation=None):
    """An :class:`~thinklens.hooks.budget.Estimate` for this capture.

    ``sentence``: the attention statistics asked for (names of
    :data:`~thinklens.hooks.blockwise.STATISTICS`; True = ``("sentence",)``), kept in
    ``stats_dtype``. ``implementation``: "eager", "sdpa" or "blockwise" (default: what
    :func:`~thinklens.hooks.capture.capture` would run).
    """
    stats = ("sentence",) if sentence is True else tuple(sentence or ())
    c = model.config
    nb, ns = torch.finfo(out_dtype).bits // 8, torch.finfo(stats_dtype).bits // 8
    per_trace = []
    for t, p in zip(traces, pos):
        n = len(t)
        b = 0
        for s in sites:
            elems = int(torch.tensor(shapes[s]).prod()) if shapes[s] else 1
            b += len(p) * elems * (n if is_pattern_site(s) else 1) * nb
        b += statistics_bytes(c, stats, len(t.sentences), n, ns)
        b += sum(len(h) for h in heads.values()) * len(p) * n * nb
        per_trace.append(b)
    if implementation is None:
        implementation = implementation_for(model, sites, stats, heads)
    longest = max((len(t) for t in traces), default=1)
    batch = min(batch_size, len(traces))
    worst_batch = sum(sorted(per_trace)[-batch_size:])
    n_sent = max((len(t.sentences) for t in traces), default=0)
    into = batch == 1 and stats_dtype == torch.float32 and model.device.type == "cpu"
    return Estimate(kept=sum(per_trace), kept_per_batch=worst_batch,
                            forward_peak=forward_peak(
                                c, batch, longest, torch.finfo(model.dtype).bits // 8,
                                attention=implementation, statistics=stats, sentences=n_sent,
                                sums_in_kept=into))


def implementation_for(model, sites, stats, heads) -> str:
    """"blockwise" (statistics from q/k in the SDPA pass), "sdpa" or "eager"."""
    chosen = attention_impl.choose(model, sites) if not heads else "eager"
    if stats and chosen == "sdpa" and not attention_impl.observable(model):
        return "eager"
    return "blockwise" if stats and chosen == "sdpa" else chosen


def alternatives(model, traces, sites, shapes, pos, stats, heads, out_dtype, batch_size,
                  stats_dtype, store) -> list[tuple[str, int]]:
    """``(change, bytes it needs)`` for each change of this capture that saves memory."""
    def need(streaming=store is not None, **kw):
        a = dict(sites=sites, shapes=shapes, pos=pos, stats=stats, heads=heads,
                 batch_size=batch_size, stats_dtype=stats_dtype, out_dtype=out_dtype) | kw
        return estimate(model, traces, a["sites"], a["shapes"], a["pos"], a["stats"],
                        a["heads"], a["out_dtype"], a["batch_size"],
                        a["stats_dtype"]).need(streaming)
    out = []
    if store is None:
        out.append(("write to a store (store='acts/', streamed batch by batch)", need(True)))
    if batch_size > 1 and len(traces) > 1:
        out.append(("batch_size=1", need(batch_size=1)))
    if sites:
        out.append(("positions='last' (or 'sentence_ends')",
                    need(pos=[p[-1:] for p in pos])))
    patterns = [s for s in sites if is_pattern_site(s)]
    if patterns or heads:
        rest = [s for s in sites if not is_pattern_site(s)]
        out.append(("attention='sentence' instead of full patterns (SDPA, blockwise)",
                    need(sites=rest, heads={}, stats=tuple(dict.fromkeys(
                        [*stats, "sentence"])))))
    if "sentence" in stats:
        out.append(("attention='vertical' instead of 'sentence' (no S x S kept)",
                    need(stats=tuple(w if w != "sentence" else "vertical" for w in stats))))
    if (stats and stats_dtype.itemsize > 2) or (sites and out_dtype.itemsize > 2):
        out.append(("dtype='bfloat16' (statistics and activations kept in bf16)",
                    need(stats_dtype=torch.bfloat16, out_dtype=torch.bfloat16)))
    return out


__all__ = ["ATTENTION", "Estimate", "parse_budget", "fmt", "statistics_bytes",
           "forward_peak", "check", "check_need", "attribution_peak", "estimate",
           "implementation_for", "alternatives"]
