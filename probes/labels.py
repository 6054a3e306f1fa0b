"""Named label sets for batch probing jobs (``thinklens probe CONFIG.toml``).

A probe needs a label per trace, per sentence or per token (:mod:`thinklens.probes.data`).
In Python any callable or list works; a config file names one of these instead:

``organism.value``
    The organism's ground truth: the value each compute step ``v = x op k = r`` writes,
    labelled at the step's second ``=`` (the token whose next-token prediction is ``r``).
    Token level; ten classes.
``organism.answer``
    The problem's final answer, at every thinking token whose ground truth is known
    ("when does it know": is the final answer readable while the model still thinks?).
``organism.variable``
    The variable a thinking step is about, at every token of the step (which binding
    the model is working on).
``answer``
    The text after ``</think>`` (stripped), one label per trace: any model.
``tag``
    The behaviour tag of each thinking sentence (``backtracking``, ``verification``…,
    or the organism's ``lookup`` / ``computation``): sentence level, any model.
``field:NAME``
    The value of key ``NAME`` in the trace's row of the prompts file: trace level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from thinklens.errors import ConfigError, did_you_mean

NAMES = ("organism.value", "organism.answer", "organism.variable", "answer", "tag", "field:NAME")


@dataclass
class Labels:
    """Labels ready for :func:`thinklens.probes.sweep`: ``labels`` at ``level``."""

    name: str
    labels: Any          # callable (trace_index, trace, token) -> label | None, or a list
    level: str           # "token" | "sentence" | "trace"


def _truth_fn(traces: Sequence, pick: Callable) -> Callable:
    """Token labels from organism ground truth; ``pick(truth, i) -> label | None``."""
    from thinklens.zoo.organism import token_truth

    cache: dict[int, list] = {}

    def fn(ti: int, trace: Any, i: int):
        if ti not in cache:
            try:
                cache[ti] = token_truth(trace)
            except Exception as e:  # not an organism prompt
                raise ConfigError(f"labels 'organism.*' need organism task prompts; trace {ti} "
                                  f"({trace.prompt[:60]!r}) is not one ({e})") from e
        return pick(cache[ti], i)

    return fn


def _value(truth: list, i: int):
    t, prev = truth[i], truth[i - 1] if i else None
    return t.value if t and t.role == "eq" and prev and prev.role == "const" else None


def _answer(traces: Sequence) -> Callable:
    from thinklens.zoo.task import problem_from_prompt

    answers: dict[int, int] = {}

    def pick_for(ti: int, trace: Any):
        if ti not in answers:
            answers[ti] = problem_from_prompt(trace.prompt).answer
        return answers[ti]

    truth = _truth_fn(traces, lambda tr, i: tr[i])
    return lambda ti, trace, i: pick_for(ti, trace) if truth(ti, trace, i) else None


def resolve(name: str, traces: Sequence, rows: Sequence[dict] | None = None) -> Labels:
    """The label set called ``name`` for ``traces`` (``rows``: their prompts-file rows)."""
    if not isinstance(name, str):
        raise ConfigError(f"labels must be a name, got {name!r}; valid: {', '.join(NAMES)}")
    if name == "organism.value":
        return Labels(name, _truth_fn(traces, _value), "token")
    if name == "organism.answer":
        return Labels(name, _answer(traces), "token")
    if name == "organism.variable":
        return Labels(name, _truth_fn(traces, lambda tr, i: tr[i].var if tr[i] and tr[i].var
                                      else None), "token")
    if name == "answer":
        return Labels(name, [t.answer_text.strip() or None for t in traces], "trace")
    if name == "tag":
        return Labels(name, [list(t.tags) for t in traces], "sentence")
    if name.startswith("field:") and len(name) > 6:
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
    raise ConfigError(f"unknown labels {name!r}.{did_you_mean(name, NAMES)} Valid: "
                      f"{', '.join(NAMES)}")
