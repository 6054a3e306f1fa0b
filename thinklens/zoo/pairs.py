"""The organism's clean/corrupted pairs: one digit or one name changed, everything aligned.

Activation patching needs two inputs whose tokens correspond position by position
(Heimersheim & Nanda 2024). On the organism's task this is exact by construction:

1. Parse the prompt into its statements (:func:`~thinklens.zoo.task.problem_from_prompt`).
2. Change one thing: a statement's constant (:func:`change_constant`), the value the
   thinking writes for a variable (:func:`change_thinking_value`), or which statements
   define two variables (:func:`swap_names`). Every other token stays in place, since
   every value is one digit and every name one token.
3. Write each side's thinking from the task's ground truth (its own, or the clean one),
   build both traces with :meth:`Trace.from_text` and align them with
   :func:`thinklens.circuits.make_pair`, the answer and wrong answer being the two
   problems' answers. :func:`lookup_step` cuts a pair at the thinking's lookup of one
   variable, so the metric reads that step.

They are the organism task's ``pairs`` (``model.task.pair("change_constant", model, ...)``)
and are importable from :mod:`thinklens.zoo`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from thinklens.circuits.pairs import Pair, make_pair
from thinklens.errors import ConfigError
from thinklens.hooks.trace import Trace
from thinklens.zoo.organism import token_truth
from thinklens.zoo.task import OPS, problem_from_prompt


def _organism_pair(model: Any, prompts: tuple[str, str], clean_think: list[str], corrupt_think: list[str],
                   clean_answer: int, corrupt_answer: int, what: str) -> Pair:
    if clean_answer == corrupt_answer:
        raise ConfigError(f"{what} leaves the answer at {clean_answer}, so no logit difference "
                          "can measure it; change a variable on the asked chain")
    traces = [Trace.from_text(model, p, " ".join(t + ["</think>"]), meta=meta)
              for p, t, meta in ((prompts[0], clean_think, {}),
                                 (prompts[1], corrupt_think, {"corruption": what}))]
    return make_pair(model, traces[0], traces[1], answer=str(clean_answer),
                     wrong=str(corrupt_answer))


def _digit(new: int, old: int, what: str) -> None:
    if isinstance(new, bool) or not isinstance(new, int) or not 0 <= new <= 9 or new == old:
        raise ConfigError(f"new value {new!r} for {what}: give a digit 0..9 other than {old}")


def change_constant(model: Any, prompt: str, var: str, new: int, *,
                    thinking: str = "own") -> Pair:
    """Corrupt one statement's constant in an organism prompt.

    ``thinking="own"``: each trace carries the correct thinking for its own prompt;
    ``"clean"``: both carry the clean prompt's thinking (only the prompt differs).

    Example::

        pair = change_constant(model, "c = b + 4 ; a = 7 ; b = a - 2 ; ? c", "a", 3)
        pair.diff_positions   # the prompt's '7' and every thinking digit that follows
    """

    if thinking not in ("own", "clean"):
        raise ConfigError(f"thinking={thinking!r}; valid: 'own', 'clean'")
    problem = problem_from_prompt(prompt)
    names = [s.var for s in problem.statements]
    if var not in names:
        raise ConfigError(f"no statement defines {var!r} in {prompt!r}; valid: {names}")
    k = names.index(var)
    _digit(new, problem.statements[k].const, f"the constant of {var!r}")
    statements = list(problem.statements)
    statements[k] = replace(statements[k], const=new)
    other = problem_from_prompt(replace(problem, statements=statements).prompt)
    think = other.thinking_tokens() if thinking == "own" else problem.thinking_tokens()
    return _organism_pair(model, (problem.prompt, other.prompt), problem.thinking_tokens(),
                          think, problem.answer, other.answer,
                          f"changing the constant of {var!r} to {new}")


def change_thinking_value(model: Any, prompt: str, var: str, new: int, *,
                          propagate: bool = True) -> Pair:
    """Corrupt the value the thinking writes for ``var`` (the prompt stays the same).

    ``propagate=True`` recomputes every later written value from the new one (the
    corrupted thinking stays self-consistent after the change); ``False`` changes that
    one digit only. The wrong answer is the one the corrupted thinking implies.
    """

    problem = problem_from_prompt(prompt)
    if var not in problem.chain:
        raise ConfigError(f"the thinking writes no value for {var!r}; variables on the asked "
                          f"chain: {problem.chain}")
    _digit(new, problem.values[var], f"the written value of {var!r}")
    by_var = {s.var: s for s in problem.statements}
    values = dict(problem.values, **{var: new})
    if propagate:
        for v in problem.chain[problem.chain.index(var) + 1:]:
            values[v] = OPS[by_var[v].op](values[by_var[v].src], by_var[v].const)
    tokens = problem.thinking_tokens()
    for k, t in enumerate(problem.token_truth()):
        root_write = t.phase == "resolve" and t.role == "const" and by_var[t.var].src is None
        if t.role == "result" or root_write:
            written = t.var
        elif t.role == "operand" and propagate:
            written = by_var[t.var].src
        else:
            continue
        if propagate or written == var:
            tokens[k] = str(values[written])
    implied = values[problem.query] if propagate or var == problem.query else problem.answer
    return _organism_pair(model, (problem.prompt, problem.prompt), problem.thinking_tokens(),
                          tokens, problem.answer, implied,
                          f"changing the written value of {var!r} to {new}")


def swap_names(model: Any, prompt: str, var: str, other: str, *,
               thinking: str = "clean") -> Pair:
    """Swap which statements define ``var`` and ``other`` (the names trade places; every
    constant, operand and the query stay put), so the corrupted run must look ``var`` up
    in the other statement.

    ``thinking="clean"`` (default): both traces carry the clean prompt's thinking, so the
    two names in the prompt are the only tokens that differ; ``"own"``: each its own.

    Example::

        pair = swap_names(model, "c = b + 4 ; a = 7 ; b = a - 2 ; g = 3 ; ? c", "a", "g")
        pair.diff_positions          # [7, 17]: the two names
        step = lookup_step(model, pair, "a")   # read at the thinking's 'a =': 7 vs 3
    """

    if thinking not in ("own", "clean"):
        raise ConfigError(f"thinking={thinking!r}; valid: 'own', 'clean'")
    problem = problem_from_prompt(prompt)
    names = [s.var for s in problem.statements]
    bad = [v for v in (var, other) if v not in names]
    if bad or var == other:
        raise ConfigError(f"swap_names needs two different variables defined in {prompt!r}; "
                          f"got {var!r} and {other!r}, valid: {names}")
    i, j = names.index(var), names.index(other)
    statements = list(problem.statements)
    statements[i], statements[j] = (replace(statements[i], var=other),
                                    replace(statements[j], var=var))
    corrupt = replace(problem, statements=statements).prompt
    try:
        swapped = problem_from_prompt(corrupt)
    except ConfigError as e:
        raise ConfigError(f"swapping {var!r} and {other!r} in {prompt!r} gives no valid "
                          f"problem ({e}); swap two statements that read no variable") from e
    think = swapped.thinking_tokens() if thinking == "own" else problem.thinking_tokens()
    return _organism_pair(model, (problem.prompt, swapped.prompt), problem.thinking_tokens(),
                          think, problem.answer, swapped.answer,
                          f"swapping the names {var!r} and {other!r}")


def lookup_step(model: Any, pair: Pair, var: str) -> Pair:
    """``pair`` cut after the thinking's lookup of ``var``: the resolve step ``var =``.

    The metric then reads what the model writes next, copied from the prompt statement
    defining ``var``: the clean prompt's token (answer) against the corrupted prompt's
    (wrong). Build ``pair`` with ``change_constant(..., thinking="clean")`` or
    :func:`swap_names`, so that the thinking up to that step is the same in both runs.

    Example::

        pair = change_constant(model, "c = b + 4 ; a = 7 ; b = a - 2 ; ? c", "a", 3,
                               thinking="clean")
        step = lookup_step(model, pair, "a")   # 34 tokens; answer '7', wrong '3' at 33
    """

    if not isinstance(pair, Pair) or pair.clean_trace is None or pair.corrupt_trace is None:
        raise ConfigError("lookup_step needs an organism pair made from traces, e.g. "
                          "change_constant(model, prompt, var, new, thinking='clean')")
    truth = token_truth(pair.clean_trace)
    steps = [t.var for t in truth if t and t.phase == "resolve" and t.role == "eq"]
    if var not in steps:
        raise ConfigError(f"the thinking looks up no {var!r}; it looks up {steps}")
    pos = next(i for i, t in enumerate(truth)
               if t and t.phase == "resolve" and t.role == "eq" and t.var == var)
    stmt = next(s for s in problem_from_prompt(pair.corrupt_trace.prompt).statements
                if s.var == var)
    answer, wrong = pair.clean_tokens[pos + 1].strip(), stmt.tokens()[2]
    if answer == wrong:
        raise ConfigError(f"at the lookup of {var!r} both prompts give {answer!r}; the "
                          "corruption does not change this step")
    return make_pair(model, pair.clean_ids[:pos + 1], pair.corrupt_ids[:pos + 1],
                     answer=answer, wrong=wrong, answer_pos=pos)


__all__ = ["change_constant", "change_thinking_value", "swap_names", "lookup_step"]
