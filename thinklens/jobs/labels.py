"""Named label sets for probe studies (``labels = "..."`` in a ``[[probe]]`` table).

A probe needs a label per trace, per sentence or per token (:mod:`thinklens.probes.data`).
In Python any callable or list works; a study file names one instead. These work on
any model:

``answer``
    The text after ``</think>`` (stripped), one label per trace.
``tag``
    The behaviour tag of each thinking sentence (``backtracking``, ``verification``…, or
    the task's own tags): sentence level.
``field:KEY``
    The value of key ``KEY`` in the trace's row of the prompts file: trace level.

A model's task adds its own, named ``TASK.KEY`` (``model.task.label_sets``, see
:mod:`thinklens.hooks.task`); the bundled organism's are ``organism.value`` (the value each
compute step writes, at the step's second ``=``), ``organism.answer`` (the final answer, at
every thinking token with known ground truth) and ``organism.variable`` (the variable each
thinking step is about).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from thinklens.errors import ConfigError, did_you_mean

GENERAL = ("answer", "tag", "field:KEY")
TASK_NAME = re.compile(r"^[A-Za-z_][\w-]*\.[A-Za-z_][\w-]*$")  # e.g. organism.value


@dataclass
class Labels:
    """Labels ready for :func:`thinklens.probes.sweep`: ``labels`` at ``level``."""

    name: str
    labels: Any          # callable (trace_index, trace, token) -> label | None, or a list
    level: str           # "token" | "sentence" | "trace"


def _valid_names(task: Any = None) -> list[str]:
    """Every label name that works for a model with this task (``None``: no task)."""
    return [*(task.label_sets if task is not None else {}), *GENERAL]


def check(name: Any, task: Any = None, *, task_known: bool = True) -> None:
    """Refuse an unknown label name, naming the valid ones.

    With ``task_known=False`` (the model is not loaded yet and no registered task is known
    for it) a ``TASK.KEY``-shaped name is let through, to be checked after loading.
    """
    if not isinstance(name, str):
        raise ConfigError(f"labels must be a name, got {name!r}; valid: "
                          f"{', '.join(_valid_names(task))}")
    if name in GENERAL[:-1] or (name.startswith("field:") and len(name) > 6):
        return
    if task is not None and name in task.label_sets:
        return
    if not task_known and TASK_NAME.match(name):
        return
    names = _valid_names(task)
    owner = ("" if task is not None or not TASK_NAME.match(name) else
             " (a task's label set, and this model has no registered task)")
    raise ConfigError(f"unknown labels {name!r}{owner}.{did_you_mean(name, names)} Valid: "
                      f"{', '.join(names)}")


def resolve(name: str, traces: Sequence[Any], rows: Sequence[dict] | None = None, *,
            task: Any = None) -> Labels:
    """The label set called ``name`` for ``traces`` (``rows``: their prompts-file rows).

    Example::

        lab = resolve("organism.value", store.traces, task=model.task)
        lab.level                       # 'token'
        sweep(store, "blocks.*.hook_resid_post", lab.labels, level=lab.level)
    """
    check(name, task)
    if task is not None and name in task.label_sets:
        ls = task.label_sets[name]
        return Labels(name, ls.make(traces, rows), ls.level)
    if name == "answer":
        return Labels(name, [t.answer_text.strip() or None for t in traces], "trace")
    if name == "tag":
        return Labels(name, [list(t.tags) for t in traces], "sentence")
    key = name[6:]
    if rows is None or len(rows) != len(traces):
        raise ConfigError(f"labels {name!r} read the prompts file's rows, which this job "
                          "does not have; use a prompts file with that key")
    absent = [k for k, r in enumerate(rows) if key not in r]
    if absent:
        keys = sorted({k for r in rows for k in r})
        raise ConfigError(f"labels {name!r}: {len(absent)} prompt rows have no key {key!r} "
                          f"(first: row {absent[0] + 1}); keys present: {keys}")
    return Labels(name, [r[key] for r in rows], "trace")


__all__ = ["Labels", "check", "resolve"]
