"""The report's problems: a bundled set of grade-school math problems, and answers checked.

1. :func:`bundled_problems` reads ``problems.jsonl`` beside this module: 40 short word
   problems (one or two steps, small numbers), each ``{"id", "prompt", "answer"}``,
   written for thinklens (no data set is downloaded). ``thinklens report --model`` thinks
   on the first ``--n-problems`` of them when no prompts are given.
2. :func:`as_rows` turns what a study is given (prompt strings, ``{"prompt", ...}``
   rows, or traces whose ``meta`` may hold an ``answer``) into rows of one shape.
3. :func:`correct` compares the answer a trace wrote (the model's own final answer,
   extracted as rollouts extract it: :func:`thinklens.hooks.answers.default_extractor`)
   with the row's answer, numbers compared as numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from thinklens.errors import ConfigError
from thinklens.hooks.answers import default_extractor

PROBLEMS = Path(__file__).with_name("problems.jsonl")


def bundled_problems(n: int | None = None) -> list[dict[str, str]]:
    """The first ``n`` (default all 40) bundled problems as rows ``{"id", "prompt", "answer"}``.

    Example::

        bundled_problems(2)[0]   # {'id': 'gsm-00', 'prompt': 'Tom has 3 apples ...', 'answer': '7'}
    """
    rows = [json.loads(line) for line in PROBLEMS.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    if n is not None and not 1 <= n <= len(rows):
        raise ConfigError(f"n_problems={n}: the bundled set has {len(rows)} problems; give "
                          f"1..{len(rows)}, or your own prompts (--prompts P.jsonl)")
    return rows[:n] if n is not None else rows


def as_rows(prompts: Sequence[Any]) -> list[dict[str, Any]]:
    """Rows ``{"prompt", "answer"?...}`` from prompt strings or dict rows (checked)."""
    out = []
    for k, p in enumerate(prompts):
        row = {"prompt": p} if isinstance(p, str) else dict(p) if isinstance(p, dict) else None
        if row is None or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ConfigError(f"prompts[{k}] = {p!r}; give non-empty strings or rows "
                              '{"prompt": "...", "answer": "..."}')
        out.append(row)
    return out


def _number(s: str) -> float | None:
    try:
        return float(s.replace(",", "").strip().rstrip("."))
    except ValueError:
        return None


def correct(model: Any, traces: Sequence[Any], answers: Sequence[Any]) -> list[bool | None]:
    """Per trace: whether its own final answer equals ``answers[k]`` (None where no answer
    is given; False where the trace wrote none, e.g. cut at the token limit)."""
    extract = default_extractor(model)
    out: list[bool | None] = []
    for t, want in zip(traces, answers):
        got = extract(t) if want is not None else None
        if want is None or got is None:
            out.append(None if want is None else False)
            continue
        a, b = _number(str(got)), _number(str(want))
        out.append(a == b if a is not None and b is not None
                   else str(got).strip() == str(want).strip())
    return out


__all__ = ["PROBLEMS", "bundled_problems", "as_rows", "correct"]
