"""Token positions of a trace: selector names (``"thinking"``, ``"sentence_ends"``, …) or
indices, and the warning when traces lack what a selector asks for.

1. :func:`positions` turns one trace and a selector into token indices (negatives count
   from the end; out-of-range and non-integer positions are refused, naming the range).
2. :func:`positions_of` does it for many traces and warns once (:class:`ThinklensWarning`)
   naming the traces whose thinking tokens or sentences are missing, since their rows
   would silently come out empty.
"""

from __future__ import annotations

import operator
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from thinklens.errors import PositionError, ThinklensWarning, did_you_mean
from thinklens.hooks.trace import Trace

_SELECTORS = {
    "all": lambda t: range(len(t)),
    "thinking": lambda t: t.think_span.range,
    "sentence_ends": lambda t: [s.end - 1 for s in t.sentences],
    "last": lambda t: [len(t) - 1] if len(t) else [],
    "prompt": lambda t: t.prompt_span.range,
    "answer": lambda t: t.answer_span.range,
}
POSITION_SELECTORS: tuple[str, ...] = tuple(_SELECTORS)


def positions(trace: Trace,
              selector: str | int | Sequence[int] | Tensor | np.ndarray) -> Int[Tensor, "pos"]:  # noqa: F821, UP037
    """Token indices picked by a selector name, or given (negatives count from the end).

    Example::

        positions(trace, "sentence_ends")  # tensor([40, 57, 81]): last token of each sentence
        positions(trace, [0, -1])          # tensor([0, 120]) for a 121-token trace
    """
    n = len(trace)
    if isinstance(selector, str):
        if selector not in _SELECTORS:
            raise PositionError(f"unknown position selector {selector!r}."
                                f"{did_you_mean(selector, POSITION_SELECTORS)} Valid selectors: "
                                f"{', '.join(POSITION_SELECTORS)}, or a list of token indices")
        return torch.tensor(list(_SELECTORS[selector](trace)), dtype=torch.long)
    if isinstance(selector, Tensor):
        if selector.is_floating_point() or selector.dtype == torch.bool or selector.ndim > 1:
            raise PositionError(f"positions tensor must be 1-D integer token indices, got "
                                f"dtype {selector.dtype} and shape {tuple(selector.shape)}")
        selector = selector.reshape(-1).tolist()
    elif hasattr(selector, "tolist"):  # numpy arrays and scalars
        selector = selector.tolist()
    values = [selector] if not isinstance(selector, Sequence | range) else list(selector)
    out = []
    for v in values:
        try:
            i = operator.index(v)
        except TypeError:
            i = None
        if i is None or isinstance(v, bool):
            raise PositionError(f"position {v!r} is not a token index; give ints, or one of "
                                f"{', '.join(POSITION_SELECTORS)}")
        if not -n <= i < n:
            raise PositionError(f"position {i} is out of range for a trace of {n} tokens; "
                                f"valid positions are {-n}..{n - 1} (negatives count from the end)")
        out.append(i % n)
    return torch.tensor(out, dtype=torch.long)


# what a selector needs that a trace may lack (their rows come out empty)
_NEEDS = {"thinking": "thinking tokens", "sentence_ends": "thinking sentences"}


def positions_of(traces: Sequence[Trace],
                 selector: str | int | Sequence[int] | Tensor | np.ndarray) -> list[Tensor]:
    """:func:`positions` of every trace, with one :class:`ThinklensWarning` naming the
    traces that lack what ``"thinking"`` or ``"sentence_ends"`` asks for.

    Example::

        pos = positions_of(traces, "thinking")   # [tensor([10, 11, 12]), tensor([])]
        # ThinklensWarning: 1 of 2 traces have no thinking tokens: trace 1 ('p1') ...
    """
    out = [positions(t, selector) for t in traces]
    if isinstance(selector, str) and selector in _NEEDS:
        warn_lacking(traces, [k for k, p in enumerate(out) if not len(p)],
                     f"{_NEEDS[selector]} (positions={selector!r})")
    return out


def warn_lacking(traces: Sequence[Trace], lacking: Sequence[int], what: str) -> None:
    """Warn once (:class:`ThinklensWarning`) that ``traces[k]`` for ``k in lacking`` have no
    ``what``, naming the first few by index and ``meta["id"]``; nothing when none lack it."""
    if not lacking:
        return
    names = [f"trace {k}" + (f" ({traces[k].meta['id']!r})" if "id" in traces[k].meta else "")
             for k in lacking[:5]]
    more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
    untagged = any(traces[k].meta.get("no_think") and traces[k].meta.get("thinking", "tags")
                   == "tags" for k in lacking)
    hint = (" Traces of a model that writes no <think> tags get their thinking from "
            "thinking='answer' (or 'auto')." if untagged else "")
    # point at the user's call: skip thinklens's frames (and the run-time type checkers'
    # wrappers around its functions); stacklevel 2 is the frame of warn_lacking's caller
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in (
            "thinklens", "jaxtyping", "beartype"):
        frame, level = frame.f_back, level + 1
    warnings.warn(ThinklensWarning(
        f"{len(lacking)} of {len(traces)} traces have no {what}: {', '.join(names)}{more}; "
        f"their rows are empty.{hint}"), stacklevel=level)


__all__ = ["POSITION_SELECTORS", "positions", "positions_of", "warn_lacking"]
