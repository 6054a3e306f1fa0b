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
from thinklens.hooks.blockwise import block_rows

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}
ATTENTION = ("eager", "sdpa", "blockwise")


def parse_budget(budget: int | float | str | None, device: torch.device) -> int:
    """Bytes from ``8_000_000_000``, ``"8GB"`` or ``"512MiB"``; None = 60% of free memory."""
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
    if need <= budget:
        return
    ways = sorted((n, text) for text, n in (alternatives or ()) if n < need)
    listed = "; ".join(f"{text} (about {fmt(n)}{', fits' if n <= budget else ''})"
                       for n, text in ways)
    raise BudgetError(
        f"capture needs about {fmt(need)} (kept {fmt(need - est.forward_peak)} + forward "
        f"pass peak {fmt(est.forward_peak)}) but the memory budget is {fmt(budget)}. "
        + (f"Alternatives: {listed}; " if listed else "No change of the capture lowers it; ")
        + "or raise the budget with budget='32GB' if the memory is really there.")


__all__ = ["ATTENTION", "Estimate", "parse_budget", "fmt", "statistics_bytes",
           "forward_peak", "check"]
