"""Memory estimates for a capture, computed before any forward pass runs.

A capture costs (1) the activations it keeps, per trace and site, and (2) the peak of
one batch's forward pass: the residual stream and MLP activations, the logits, and one
layer's attention scores and pattern at a time (eager attention materialises
``batch × heads × T²`` per layer; thinklens never keeps more than one layer's).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from thinklens.errors import BudgetError, ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


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


def _fmt(n: float) -> str:
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


def forward_peak(cfg, batch: int, length: int, bytes_per: int) -> int:
    """Peak bytes of one no-grad forward pass of ``batch`` sequences of ``length``."""
    width = 12 * cfg.d_model + 3 * max(cfg.d_mlp, cfg.d_model) + cfg.d_vocab
    attention = 3 * batch * cfg.n_heads * length * length * bytes_per
    return batch * length * width * bytes_per + attention


def check(est: Estimate, budget: int, streaming: bool) -> None:
    need = est.streaming() if streaming else est.in_memory()
    if need <= budget:
        return
    ways = ("smaller batch_size or shorter traces" if streaming else
            "write to a store (store='acts/', streamed batch by batch); ")
    raise BudgetError(
        f"capture needs about {_fmt(need)} (kept activations {_fmt(est.kept if not streaming else est.kept_per_batch)}"
        f" + forward pass peak {_fmt(est.forward_peak)}) but the memory budget is {_fmt(budget)}. "
        f"Alternatives: {ways}capture fewer sites or positions (positions='sentence_ends' "
        "or 'last'); attention='sentence' instead of full patterns; a smaller batch_size; "
        "or raise the budget with budget='32GB' if the memory is really there.")


__all__ = ["Estimate", "parse_budget", "forward_peak", "check"]
