"""Dtype names accepted wherever a user gives one (``load``, ``capture``, study configs)."""

from __future__ import annotations

import torch

from thinklens.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` -> ``torch.bfloat16``; a torch dtype or ``None`` passes through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; valid: {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


__all__ = ["parse_dtype"]
