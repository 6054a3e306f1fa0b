"""The one read interface shared by an in-memory ``Capture`` and an on-disk ``Store``.

Both hold, for each *key* (a TransformerLens hook name such as
``blocks.3.hook_resid_post``, or a reduction such as ``sentence_attention``), one tensor
per trace. Traces are ragged (different lengths), so reading a key across traces gives a
:class:`SiteActivations`: the per-trace tensors right-padded into one tensor with named
axes, plus the lengths and the token positions each row came from.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from thinklens.errors import SiteError, did_you_mean


@dataclass
class SiteActivations:
    """Activations of one key across traces, padded along the second axis.

    Example::

        acts = capture["blocks.0.hook_resid_post"]
        acts.values.shape      # (trace, pos, d_model) = (8, 93, 128)
        acts.axes              # ('trace', 'pos', 'd_model')
        acts.lengths           # tensor([93, 71, ...]) valid rows per trace
        acts.positions[1, :3]  # token index in trace 1 of its first three rows
        acts.unpadded(1)       # (71, 128), trace 1 without padding

    ``positions`` is -1 on padded rows; ``values`` is 0 there.
    """

    key: str
    values: Tensor
    axes: tuple[str, ...]
    lengths: Int[Tensor, trace]  # noqa: F821
    positions: Int[Tensor, "trace pos"] | None = None  # noqa: F722
    labels: dict[str, list[Any]] = field(default_factory=dict)
    shapes: list[tuple[int, ...]] | None = None  # per-trace shape before padding

    @property
    def mask(self) -> Tensor:
        """Bool ``[trace, pos]``: True on real rows, False on padding."""
        n = self.values.shape[1] if self.values.ndim > 1 else 0
        return torch.arange(n)[None, :] < self.lengths[:, None]

    def unpadded(self, i: int) -> Tensor:
        """Trace ``i`` without padding (on every ragged axis)."""
        if self.shapes is None:
            return self.values[i, : int(self.lengths[i])]
        return self.values[(i, *[slice(0, n) for n in self.shapes[i]])]

    def flat(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(rows [n, ...], trace index [n], token position [n])`` over real rows only."""
        m = self.mask
        tr = torch.arange(self.values.shape[0])[:, None].expand_as(m)[m]
        pos = self.positions[m] if self.positions is not None else torch.full_like(tr, -1)
        return self.values[m], tr, pos


def pad_stack(tensors: Sequence[Tensor], pad_value: float = 0.0) -> tuple[Tensor, Tensor]:
    """Right-pad tensors ``[len_i, ...]`` into ``[n, max_len, ...]``; returns (values, lengths).

    Every axis is padded to its largest size (pattern rows ``[pos, head, key_pos]`` and
    sentence matrices are ragged in more than the first axis).
    """
    lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.long)
    if not tensors:
        return torch.empty(0), lengths
    dims = [max(t.shape[d] for t in tensors) for d in range(tensors[0].ndim)]
    out = torch.full((len(tensors), *dims), pad_value, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[(i, *[slice(0, n) for n in t.shape])] = t
    return out, lengths


class ActivationReader:
    """Mixin: ``reader[key]`` and key globbing, given ``keys``, ``axes`` and ``_per_trace``.

    Subclasses provide ``keys`` (list of str), ``axes`` (key -> axis names of the
    per-trace tensor, the leading ``trace`` axis excluded), ``traces`` (list of
    :class:`~thinklens.hooks.trace.Trace`), ``_per_trace(key) -> list[Tensor]`` and
    ``_positions() -> list[Tensor] | None`` (token index of each row, per trace).
    """

    keys: list[str]
    axes: dict[str, tuple[str, ...]]

    def _per_trace(self, key: str) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _positions(self) -> list[Tensor] | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def match(self, pattern: str) -> list[str]:
        """Keys matching a hook name or glob (``blocks.*.hook_resid_post``), in stored order."""
        if pattern in self.keys:
            return [pattern]
        hits = [k for k in self.keys if fnmatch.fnmatchcase(k, pattern)]
        if not hits:
            raise SiteError(
                f"no captured key matches {pattern!r}.{did_you_mean(pattern, self.keys)} "
                f"Captured keys: {', '.join(self.keys[:12])}{' …' if len(self.keys) > 12 else ''}"
            )
        return hits

    def __getitem__(self, key: str) -> SiteActivations:
        (name,) = self.match(key) if key in self.keys else (self._one(key),)
        per_trace = self._per_trace(name)
        values, lengths = pad_stack(per_trace)
        axes = ("trace", *self.axes[name])
        positions = None
        if len(axes) > 1 and axes[1] == "pos":
            pos = self._positions()
            if pos is not None:
                positions, _ = pad_stack(pos, pad_value=-1)
        return SiteActivations(key=name, values=values, axes=axes, lengths=lengths,
                               positions=positions, shapes=[tuple(t.shape) for t in per_trace])

    def _one(self, pattern: str) -> str:
        hits = self.match(pattern)
        if len(hits) != 1:
            raise SiteError(
                f"{pattern!r} matches {len(hits)} keys ({', '.join(hits[:6])}…); "
                "index with one name, or use .stack(pattern) to stack them along a layer axis"
            )
        return hits[0]

    def stack(self, pattern: str) -> SiteActivations:
        """Stack every key matching ``pattern`` along a new ``layer`` axis after ``trace``.

        Example: ``capture.stack("blocks.*.hook_resid_post").values`` is
        ``[trace, layer, pos, d_model]``.
        """
        names = self.match(pattern)
        parts = [self[n] for n in names]
        values = torch.stack([p.values for p in parts], dim=1)
        first = parts[0]
        return SiteActivations(key=pattern, values=values,
                               axes=("trace", "layer", *first.axes[1:]),
                               lengths=first.lengths, positions=first.positions,
                               labels={"layer": names},
                               shapes=[(len(names), *sh) for sh in first.shapes or []] or None)
