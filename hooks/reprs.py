"""Compact reprs for result dataclasses: shapes instead of whole tensors.

A dataclass's generated ``__repr__`` prints every tensor element, so printing a capture's
activations or a sweep's result in a notebook fills the screen. :func:`compact_repr`
prints each field in one short piece instead:

1. a tensor as ``Tensor(trace=2, pos=32, d_model=128, float32)`` — named by the object's
   ``axes`` when they match the shape, else ``Tensor(2, 32, 128, float32)``;
2. a dict as ``{key: <its piece>, ...}`` (the first few keys);
3. a list or tuple longer than a few items as ``[first, second, ... (n items)]``;
4. anything else by its own repr, cut to a line.

Use it as ``__repr__ = compact_repr`` in a dataclass body (the decorator then keeps it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

_ITEMS = 4    # list items and dict keys shown
_WIDTH = 60   # characters of a plain repr kept


def _tensor(t: torch.Tensor, axes: Any = None) -> str:
    dtype = str(t.dtype).removeprefix("torch.")
    if t.ndim == 0:
        return f"tensor({t.item():.4g})" if t.is_floating_point() else f"tensor({t.item()})"
    names = list(axes) if isinstance(axes, list | tuple) and len(axes) == t.ndim else None
    dims = [f"{a}={n}" for a, n in zip(names, t.shape)] if names else [str(n) for n in t.shape]
    return f"Tensor({', '.join(dims)}, {dtype})"


def _piece(v: Any, axes: Any = None) -> str:
    if isinstance(v, torch.Tensor):
        return _tensor(v, axes)
    if isinstance(v, dict):
        keys = list(v)
        inner = ", ".join(f"{k!r}: {_piece(v[k])}" for k in keys[:_ITEMS])
        return "{" + inner + (f", ... ({len(keys)} keys)" if len(keys) > _ITEMS else "") + "}"
    if isinstance(v, list | tuple) and len(v) > _ITEMS:
        open_, close = ("[", "]") if isinstance(v, list) else ("(", ")")
        head = ", ".join(_piece(x) for x in v[:2])
        return f"{open_}{head}, ... ({len(v)} items){close}"
    if isinstance(v, list | tuple):
        open_, close = ("[", "]") if isinstance(v, list) else ("(", ")")
        return open_ + ", ".join(_piece(x) for x in v) + (",)" if len(v) == 1 and
                                                          isinstance(v, tuple) else close)
    text = repr(v)
    return text if len(text) <= _WIDTH else text[: _WIDTH - 3] + "..."


def compact_repr(self: Any) -> str:
    """``Name(field=piece, ...)`` for a dataclass instance; see the module docstring.

    Example::

        acts = cap["blocks.0.hook_resid_post"]
        acts   # SiteActivations(key='blocks.0.hook_resid_post',
               #   values=Tensor(trace=2, pos=32, d_model=128, float32), ...)
    """
    axes = getattr(self, "axes", None)
    parts = []
    for f in dataclasses.fields(self):
        if not f.repr:
            continue
        v = getattr(self, f.name)
        parts.append(f"{f.name}={_piece(v, axes if f.name == 'values' else None)}")
    return f"{type(self).__name__}({', '.join(parts)})"


__all__ = ["compact_repr"]
