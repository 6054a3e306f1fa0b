"""Rollouts: regenerate a trace's thinking from chosen cut points, many times, and count answers.

The primitive of resampling studies. Thought Anchors (Bogdan et al. 2025, "Thought
Anchors: Which LLM Reasoning Steps Matter?", arXiv 2506.19143) measures how much a
thinking sentence matters by resampling the thinking from just before it and counting
how often the final answer changes. :func:`rollouts` (``model.rollouts``) does this:

1. **Cut points.** ``at`` names thinking sentences: the cut for sentence ``i`` is the token
   index ``trace.sentences[i].start``, so the prefix is every token before sentence ``i``,
   and sentence ``i`` and everything after it are regenerated (the reference code's
   ``chunk_i``). ``at`` is an index, a list of them, or ``"all"``; ``at={"tokens": [...]}``
   gives token indices instead (from the end of the prompt to the end of the trace). The
   cut is a token index, never a text match: the reference code builds its prefix with
   ``full_prefix.replace(chunk, "")``, which deletes every earlier copy of a repeated
   sentence too; here the prefix is exactly ``trace.token_ids[:cut]``.
2. **Cost.** What is left to generate (cut points × ``n`` × ``max_new_tokens`` tokens on a
   fresh run) is logged and checked against ``budget`` before anything runs; over it, a
   :class:`~thinklens.errors.BudgetError` gives the estimate and the ways to lower it.
3. **Generation.** One engine :class:`~thinklens.hooks.engine.Request` per cut point with
   ``n`` samples, so the engine computes the shared prefix once (vLLM's prefix cache; the
   HF engine's prefill). Rollout ``j`` of the cut at token ``p`` is sample ``j`` of seed
   ``sample_seed(seed, p)``: its tokens depend on ``(seed, p, j)`` alone, not on which
   other cut points or how many rollouts a call asked for.
4. **Traces.** Each continuation becomes a Trace built from ids (the trace's ids after the
   prompt up to the cut, then the new ids; never re-tokenized text), in the original
   trace's thinking mode.
5. **Answers.** ``answer(trace) -> str | None`` extracts each rollout's final answer
   (default: :func:`thinklens.hooks.answers.default_extractor`); per cut point the
   answer counts, and the accuracy against ``reference`` (default: the task's true answer,
   else the original trace's own answer) with a 95 % Wilson score interval.
6. **Journal.** With ``journal="run.jsonl"`` the settings (model, tokenizer, trace, sampling,
   seed, engine) are the first line and each finished (cut point, rollout index) entry is
   appended, fsynced, after its cut point's call. A rerun after a kill regenerates only
   the missing entries (a run of them with one request, its seed shifted by
   :func:`_offset_seed`) and ends with the entries, and with the HF engine the tokens,
   of an uninterrupted run. A rerun with other settings is refused; one with more cut
   points or a larger ``n`` adds to the journal.

Example::

    ro = model.rollouts(trace, at="all", n=100, temperature=0.7, max_new_tokens=64)
    ro[2].counts            # {'9': 81, '7': 15, None: 4}: answers after resampling sentence 2
    ro.accuracy             # [0.97, 0.93, 0.81, ...], one per cut point
    ro[2].interval          # (0.72, 0.87): the 95 % Wilson interval of ro[2].accuracy
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

from thinklens.errors import BudgetError, ConfigError
from thinklens.hooks._fileio import append_jsonl, kill_point, read_jsonl
from thinklens.hooks.answers import default_extractor
from thinklens.hooks.engine import Completion, Request, Sampling, check_engine, sample_seed
from thinklens.hooks.generate import generate_ids
from thinklens.hooks.trace import Trace, build_trace, check_tokenizer

_FORMAT = "thinklens.rollouts/1"
DEFAULT_BUDGET = 2_000_000  # generated tokens a call may cost without budget=
_SEED_STEP = 1_000_003  # sample_seed(s, j) = (s * _SEED_STEP + j) mod _SEED_MOD
_SEED_MOD = 2**63 - 1
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CutRollouts:
    """The rollouts of one cut point: ``traces[j]`` and ``answers[j]`` for rollout ``j``.

    ``position`` is the cut's token index (the prefix is ``token_ids[:position]``);
    ``sentence`` the sentence regenerated from it (``None`` for a token cut point);
    ``counts`` the answers by count, most common first (``None``: no answer found);
    ``correct``, ``accuracy`` and ``interval`` (95 % Wilson) are ``None`` without a reference.
    """

    position: int
    sentence: int | None
    traces: list[Trace]
    answers: list[str | None]
    counts: dict[str | None, int]
    correct: int | None
    accuracy: float | None
    interval: tuple[float, float] | None

    @property
    def n(self) -> int:
        return len(self.traces)


@dataclass(frozen=True)
class Rollouts:
    """Per cut point, the rollouts of one trace (see the module docstring).

    ``cuts[k]`` (also ``ro[k]``) is a :class:`CutRollouts`; ``reference`` the answer scored
    as correct; ``settings`` what the journal records; ``cost`` the tokens this call was
    estimated at (what was left to generate) and ``generated`` the tokens it generated.
    """

    trace: Trace
    cuts: list[CutRollouts]
    reference: str | None
    settings: dict[str, Any] = field(default_factory=dict)
    cost: int = 0
    generated: int = 0

    def __len__(self) -> int:
        return len(self.cuts)

    def __getitem__(self, k: int) -> CutRollouts:
        return self.cuts[k]

    @property
    def positions(self) -> list[int]:
        return [c.position for c in self.cuts]

    @property
    def accuracy(self) -> list[float | None]:
        return [c.accuracy for c in self.cuts]

    @property
    def intervals(self) -> list[tuple[float, float] | None]:
        return [c.interval for c in self.cuts]


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n``.

    Example::

        wilson_interval(8, 10)    # (0.4902, 0.9433)
    """
    if n < 1 or not 0 <= k <= n or not 0 < confidence < 1:
        raise ConfigError(f"wilson_interval(k={k}, n={n}, confidence={confidence}): need "
                          "0 <= k <= n, n >= 1 and 0 < confidence < 1")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _offset_seed(seed: int, a: int) -> int:
    """The seed whose sample ``i`` is sample ``a + i`` of ``seed`` (see :func:`sample_seed`):
    lets one request regenerate rollouts ``a, a+1, ...`` of a cut point alone."""
    return (seed + a * pow(_SEED_STEP, -1, _SEED_MOD)) % _SEED_MOD


def _trace_id(trace: Trace) -> str:
    key = json.dumps([trace.tokenizer_id, trace.token_ids])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _cut_points(trace: Trace, at: Any) -> list[tuple[int, int | None]]:
    """``(token index, sentence index or None)`` for each cut point ``at`` names."""
    lo, hi = trace.prompt_span.end, len(trace)
    tokens_hint = f"at={{'tokens': [...]}} with token indices {lo}..{hi}"
    if isinstance(at, dict):
        if set(at) != {"tokens"}:
            raise ConfigError(f"at={at!r}: a dict cut point must be {{'tokens': [...]}}")
        given, kind = at["tokens"], "tokens"
        given = [given] if isinstance(given, int) else given
    else:
        kind = "sentences"
        n_s = len(trace.sentences)
        if n_s == 0:
            raise ConfigError(f"the trace has no thinking sentences (thinking_text "
                              f"{trace.thinking_text[:40]!r}), so at={at!r} names none; give "
                              f"token cut points, {tokens_hint}")
        given = range(n_s) if at == "all" else [at] if isinstance(at, int) else at
    if isinstance(given, str) or not isinstance(given, Sequence | range) or not len(given):
        raise ConfigError(f"at={at!r}: give a sentence index, a list of them, 'all', or "
                          f"{tokens_hint}")
    out = []
    for v in given:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"cut point {v!r} of at={at!r} is not an integer index")
        if kind == "tokens":
            if not lo <= v <= hi:
                raise ConfigError(f"token cut point {v} is out of range: valid token indices "
                                  f"are {lo}..{hi} (from the end of the prompt to the end of "
                                  f"the {hi}-token trace)")
            out.append((v, None))
        else:
            if not 0 <= v < len(trace.sentences):
                raise ConfigError(f"sentence cut point {v} is out of range: the trace has "
                                  f"{len(trace.sentences)} thinking sentences, valid indices "
                                  f"0..{len(trace.sentences) - 1} (or 'all', or {tokens_hint})")
            out.append((trace.sentences[v].start, v))
    seen = [p for p, _ in out]
    if len(set(seen)) < len(seen):
        raise ConfigError(f"at={at!r} gives the same cut point twice (token indices {seen})")
    return out


def _rendered_prompt(model: Any, trace: Trace) -> str:
    """The rendered prompt text whose tokens are exactly the trace's prompt ids."""
    want = trace.token_ids[:trace.prompt_span.end]
    end = trace.offsets[trace.prompt_span.end - 1][1] if trace.prompt_span.end else 0
    for text in (model.render_prompt(trace.prompt), trace.text[:end]):
        if model.encode(text) == want:
            return text
    raise ConfigError(f"the trace's prompt {trace.prompt[:60]!r} does not re-tokenize to its "
                      "prompt ids under this model's chat template; rebuild the trace with "
                      "this model (Trace.from_text(model, prompt, completion))")


def _journal_open(path: Path, settings: dict) -> dict[tuple[int, int], dict]:
    """Finished entries of the journal at ``path`` (its settings checked), by (cut, index)."""
    rows = read_jsonl(path, repair=True) if path.exists() else []
    if not rows:
        append_jsonl(path, [{"settings": settings}])
        return {}
    head = rows[0]
    if not isinstance(head, dict) or not isinstance(head.get("settings"), dict) \
            or head["settings"].get("format") != _FORMAT:
        raise ConfigError(f"{str(path)!r} is not a rollouts journal (its first line holds no "
                          f"{_FORMAT} settings); give a new journal= path")
    old = head["settings"]
    diff = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
    if diff:
        said = ", ".join(f"{k}: journal {old.get(k)!r}, now {settings.get(k)!r}" for k in diff)
        raise ConfigError(f"journal {str(path)!r} belongs to another run ({said}); rerun with "
                          "its settings, or give a new journal= path")
    done: dict[tuple[int, int], dict] = {}
    for row in rows[1:]:
        done.setdefault((int(row["cut"]), int(row["j"])), row)
    return done


def _runs(missing: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs ``[a, b)`` of sorted rollout indices."""
    runs: list[tuple[int, int]] = []
    for j in missing:
        if runs and runs[-1][1] == j:
            runs[-1] = (runs[-1][0], j + 1)
        else:
            runs.append((j, j + 1))
    return runs


def rollouts(model: Any, trace: Trace, *, at: Any = "all", n: int = 10,
             temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 256,
             engine: str | None = None, seed: int = 0,
             answer: Callable[[Trace], str | None] | None = None, reference: str | None = None,
             journal: str | os.PathLike[str] | None = None, budget: float | None = None,
             progress: bool | None = None) -> Rollouts:
    """Continue ``trace`` ``n`` times from each cut point ``at`` (see the module docstring).

    Example::

        ro = rollouts(model, trace, at=[0, 3], n=50, temperature=1.0, max_new_tokens=48)
        ro[1].position == trace.sentences[3].start   # True: sentence 3 is regenerated
        ro[1].traces[0].token_ids[:ro[1].position] == trace.token_ids[:ro[1].position]
        ro[1].counts, ro[1].accuracy, ro[1].interval
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n={n!r}; give the number of rollouts per cut point, an integer >= 1")
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if engine is not None:
        check_engine(engine)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed={seed!r}; give an integer (rollouts are reproducible by seed)")
    if budget is None:
        budget = DEFAULT_BUDGET
    if not isinstance(budget, int | float) or budget <= 0:
        raise ConfigError(f"budget={budget!r}; give the most tokens to generate, a number > 0")
    extract = default_extractor(model) if answer is None else answer
    if not callable(extract):
        raise ConfigError(f"answer={answer!r}; give a callable trace -> str | None, e.g. "
                          "thinklens.hooks.answers.boxed")
    check_tokenizer(trace, model.tokenizer)
    cuts = _cut_points(trace, at)
    rendered = _rendered_prompt(model, trace)
    settings = {"format": _FORMAT, "model": model.name, "tokenizer": model.tokenizer_id,
                "trace": _trace_id(trace), "max_new_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed,
                "engine": engine if engine is not None else getattr(model, "default_engine",
                                                                    "hf")}
    done = _journal_open(Path(journal), settings) if journal is not None else {}
    todo = {p: [j for j in range(n) if (p, j) not in done] for p, _ in cuts}
    cost = sum(map(len, todo.values())) * max_new_tokens
    _log.info("rollouts: %d cut points x %d rollouts x %d new tokens; %d tokens left to "
              "generate", len(cuts), n, max_new_tokens, cost)
    if cost > budget:
        raise BudgetError(
            f"rollouts would generate up to {cost:,} tokens ({sum(map(len, todo.values()))} "
            f"rollouts x max_new_tokens={max_new_tokens}; {len(cuts)} cut points x n={n}), "
            f"over budget={budget:,}; lower it with fewer cut points (at=), a smaller n, a "
            "smaller max_new_tokens, or raise budget=")
    new: dict[tuple[int, int], Completion] = {}
    groups = [[p] for p in todo] if journal is not None else [list(todo)]
    for group in groups:
        requests, index = [], []
        for p in group:
            for a, b in _runs(todo[p]):
                requests.append(Request(trace.token_ids[:p], n=b - a,
                                        seed=_offset_seed(sample_seed(seed, p), a)))
                index.append([(p, j) for j in range(a, b)])
        if not requests:
            continue
        out = generate_ids(model, requests, sampling, engine=engine, progress=progress)
        for keys, completions in zip(index, out):
            new.update(zip(keys, completions))
        if journal is not None:
            append_jsonl(journal, [{"cut": p, "j": j, "ids": new[p, j].ids,
                                    "finished": new[p, j].finished}
                                   for keys in index for p, j in keys])
            kill_point("rollouts-journaled")
    for key, row in done.items():
        new.setdefault(key, Completion(ids=row["ids"], finished=row["finished"]))
    if reference is None:
        reference = _reference(model, trace, extract)
    info = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "seed": seed, "rollout_of": settings["trace"]}
    result = []
    for p, s in cuts:
        traces = [build_trace(model.tokenizer, prompt=trace.prompt, rendered_prompt=rendered,
                              completion_ids=trace.token_ids[trace.prompt_span.end:p]
                              + new[p, j].ids, model_name=model.name,
                              segmenter=model.segmenter, annotator=model.annotator,
                              thinking=trace.meta.get("thinking", "auto"),
                              finished=new[p, j].finished,
                              meta={**info, "cut": p, "sentence": s, "rollout": j})
                  for j in range(n)]
        result.append(_summarize(p, s, traces, [extract(t) for t in traces], reference))
    generated = sum(len(c.ids) for key, c in new.items() if key not in done)
    return Rollouts(trace=trace, cuts=result, reference=reference, settings=settings,
                    cost=cost, generated=generated)


def _reference(model: Any, trace: Trace, extract: Callable) -> str | None:
    """The task's true answer of the trace's prompt, else the trace's own answer."""
    if getattr(model, "task", None) is not None:
        try:
            return str(model.task.answer(trace))
        except ConfigError:
            pass  # a task that cannot tell true answers: score against the trace itself
    return extract(trace)


def _summarize(p: int, s: int | None, traces: list[Trace], answers: list[str | None],
               reference: str | None) -> CutRollouts:
    counts = dict(Counter(answers).most_common())
    if reference is None:
        return CutRollouts(p, s, traces, answers, counts, None, None, None)
    k = sum(a == reference for a in answers)
    return CutRollouts(p, s, traces, answers, counts, k, k / len(answers),
                       wilson_interval(k, len(answers)))


__all__ = ["CutRollouts", "Rollouts", "rollouts", "wilson_interval", "DEFAULT_BUDGET"]
