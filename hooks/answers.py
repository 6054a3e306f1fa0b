"""Final-answer extractors: ``extract(trace) -> str | None``, pluggable wherever answers count.

Rollouts (:mod:`thinklens.hooks.rollouts`) and any study that scores answers take an
extractor, a callable from a :class:`~thinklens.hooks.trace.Trace` to its final answer
(a stripped string) or ``None`` when it has none. The defaults, in order:

1. the model's task (``model.task.extract_answer``; the organism's is its first answer
   token after ``</think>``);
2. otherwise :func:`boxed` — the last ``\\boxed{...}`` (braces balanced), searched in the
   answer and then in the whole completion;
3. otherwise :func:`last_number` — the last number of the answer, then of the completion.

:func:`generic_answer` is 2 then 3; :func:`default_extractor` picks 1 when the model has
a task. Example::

    boxed(trace)                     # '42' for an answer '... so \\boxed{42}.'
    last_number(trace)               # '-3.5' for an answer 'x = -3.5'
    extract = default_extractor(model)
    extract(trace)                   # the organism: '9'
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Extractor = Callable[[Any], str | None]

_BOXED = re.compile(r"\\boxed\s*\{")
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _boxed_text(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` of ``text`` with balanced braces."""
    found = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end(): i - 1].strip()
    return found


def _last_number_text(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def _parts(trace: Any) -> list[str]:
    """Where to look, in order: the answer, then the whole completion."""
    return [trace.answer_text, trace.completion_text]


def boxed(trace: Any) -> str | None:
    """The content of the last ``\\boxed{...}`` of the answer, else of the completion."""
    for text in _parts(trace):
        found = _boxed_text(text)
        if found is not None:
            return found
    return None


def last_number(trace: Any) -> str | None:
    """The last number (commas dropped) of the answer, else of the completion."""
    for text in _parts(trace):
        found = _last_number_text(text)
        if found is not None:
            return found
    return None


def generic_answer(trace: Any) -> str | None:
    """:func:`boxed`, else :func:`last_number`: the default for a model with no task."""
    found = boxed(trace)
    return found if found is not None else last_number(trace)


def default_extractor(model: Any) -> Extractor:
    """The model's task's ``extract_answer`` when it has a task, else :func:`generic_answer`."""
    task = getattr(model, "task", None)
    return task.extract_answer if task is not None else generic_answer


__all__ = ["Extractor", "boxed", "last_number", "generic_answer", "default_extractor"]
