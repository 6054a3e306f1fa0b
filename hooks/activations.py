"""The one read interface shared by an in-memory ``Capture`` and an on-disk ``Store``.

Both hold, for each *key* (a TransformerLens hook name such as
``blocks.3.hook_resid_post``, or a reduction such as ``sentence_attention``), one tensor
per trace. Traces are ragged (different lengths), so reading a key across traces gives a
:class:`SiteActivations`: the per-trace tensors right-padded into one tensor with named
axes, plus the lengths and the token positions each row came from.

The *ragged axis* of a key is the one whose length is the trace's own: ``pos`` for a
site's rows ``(pos, d_model)``, ``query_pos`` for an attention pattern
``(head, query_pos, key_pos)``, ``query_sentence`` for sentence attention
``(layer, head, query_sentence, key_sentence)``. ``lengths`` counts along it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from thinklens.errors import SiteError, did_you_mean
from thinklens.hooks.reprs import compact_repr

RAGGED = ("pos", "query_pos", "query_sentence", "sentence")  # first found is the ragged axis


def ragged_axis(axes: Sequence[str]) -> int:
    """Index of the per-trace ragged axis in ``axes``: ``ragged_axis(("trace", "head",
    "query_pos", "key_pos")) == 2``; the axis after ``trace`` when none is named."""
    for name in RAGGED:
        if name in axes:
            return list(axes).index(name)
    return 1


@dataclass
class SiteActivations:
    """Activations of one key across traces, right-padded on every ragged axis.

    Example::

        acts = capture["blocks.0.hook_resid_post"]
        acts.values.shape      # (trace, pos, d_model) = (8, 93, 128)
        acts.axes              # ('trace', 'pos', 'd_model')
        acts.lengths           # tensor([93, 71, ...]) valid rows per trace
        acts.positions[1, :3]  # token index in trace 1 of its first three rows
        acts.unpadded(1)       # (71, 128), trace 1 without padding
        pat = capture["blocks.1.attn.hook_pattern"]
        pat.axes, pat.lengths  # ('trace', 'head', 'query_pos', 'key_pos'), query rows per trace

    ``values`` is ``[trace, *axes]``: its axes after ``trace`` depend on the key and are
    named in ``axes`` (``pos d_model``, ``head query_pos key_pos``, ``layer head
    query_sentence key_sentence``, …). ``lengths[i]`` is trace ``i``'s length along the
    ragged axis (:func:`ragged_axis`); ``positions[i]`` the token index of each row
    along it (-1 on padding; None for sentence attention). ``values`` is 0 on padding.
    """

    __repr__ = compact_repr  # shapes, not whole tensors (hooks/reprs.py)

    key: str
    values: Float[Tensor, "trace *axes"]  # noqa: F821  (jaxtyping dims, not names)
    axes: tuple[str, ...]
    lengths: Int[Tensor, " trace"]  # noqa: F722
    positions: Int[Tensor, "trace pos"] | None = None  # noqa: F722
    labels: dict[str, list[Any]] = field(default_factory=dict)
    shapes: list[tuple[int, ...]] | None = None  # per-trace shape before padding

    @property
    def ragged(self) -> int:
        """Index of the ragged axis in ``values`` (``lengths`` counts along it)."""
        return ragged_axis(self.axes)

    @property
    def mask(self) -> Tensor:
        """Bool ``[trace, n]`` along the ragged axis: True on real rows, False on padding."""
        n = self.values.shape[self.ragged] if self.values.ndim > self.ragged else 0
        return torch.arange(n)[None, :] < self.lengths[:, None]

    def unpadded(self, i: int) -> Tensor:
        """Trace ``i`` without padding (on every ragged axis)."""
        if self.shapes is None:
            return self.values[i].narrow(self.ragged - 1, 0, int(self.lengths[i]))
        return self.values[(i, *[slice(0, n) for n in self.shapes[i]])]

    def flat(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(rows [n, ...], trace index [n], token position [n])`` over real rows only.

        Rows are taken along the ragged axis; the other axes follow in order.
        """
        m = self.mask
        tr = torch.arange(self.values.shape[0])[:, None].expand_as(m)[m]
        pos = self.positions[m] if self.positions is not None else torch.full_like(tr, -1)
        return self.values.movedim(self.ragged, 1)[m], tr, pos


def _pad_stack(tensors: Sequence[Tensor], pad_value: float | int = 0.0, axis: int = 0
              ) -> tuple[Tensor, Tensor]:
    """Right-pad tensors ``[len_i, ...]`` into ``[n, max_len, ...]``; returns (values, lengths).

    Every axis is padded to its largest size (patterns ``[head, query_pos, key_pos]`` and
    sentence matrices are ragged in more than one axis); ``lengths`` is each tensor's
    size along ``axis`` (its ragged axis).
    """
    lengths = torch.tensor([t.shape[axis] for t in tensors], dtype=torch.long)
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
        axes = ("trace", *self.axes[name])
        ragged = ragged_axis(axes)
        values, lengths = _pad_stack(per_trace, axis=ragged - 1)
        positions = None
        if axes[ragged] in ("pos", "query_pos"):  # rows at the captured token positions
            pos = self._positions()
            if pos is not None:
                positions, _ = _pad_stack(pos, pad_value=-1)
        heads = ((getattr(self, "meta", None) or {}).get("heads") or {}).get(name)
        return SiteActivations(key=name, values=values, axes=axes, lengths=lengths,
                               positions=positions, shapes=[tuple(t.shape) for t in per_trace],
                               labels={"head": list(heads)} if heads is not None else {})

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
                               labels={**first.labels, "layer": names},
                               shapes=[(len(names), *sh) for sh in first.shapes or []] or None)


__all__ = ["SiteActivations", "ActivationReader", "ragged_axis"]
