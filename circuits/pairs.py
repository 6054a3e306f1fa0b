"""Clean/corrupted input pairs for patching, from text, token ids or traces.

Activation patching compares two runs position by position, so the two inputs must
tokenize to the same length with corresponding tokens at corresponding positions
(Heimersheim & Nanda 2024, "How to use and interpret activation patching"; the IOI pair
of Wang et al. 2022 swaps two names of one token each). :func:`make_pair`:

1. Tokenizes both inputs (text as it is, no special tokens added; a :class:`Trace` by
   its ids, after checking it was made by this model's tokenizer).
2. Refuses inputs of different lengths, naming the first position where they differ and
   both tokens there.
3. Resolves the answer and wrong tokens (text that must be exactly one token, or ids) and
   the answer position: the position whose next-token logits the metric reads.

For the organism (``thinklens.load("organism")``), :func:`change_constant` and
:func:`change_thinking_value` build aligned traces from a task prompt: the corruption
changes one digit, so every other token stays in place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from thinklens.errors import ConfigError
from thinklens.hooks.trace import Trace, check_tokenizer


@dataclass(frozen=True)
class Pair:
    """Aligned clean and corrupted inputs plus the answer the metric reads.

    Example::

        pair = make_pair(model, "When John and Mary went to the store, John gave a drink to",
                         "When Mary and John went to the store, Mary gave a drink to",
                         answer=" Mary", wrong=" John")
        pair.clean_ids.shape, pair.diff_positions, pair.answer_pos   # (14,), [1, 3, 9], 13
    """

    clean_ids: Int[Tensor, "pos"]  # noqa: F821
    corrupt_ids: Int[Tensor, "pos"]  # noqa: F821
    clean_tokens: list[str]
    corrupt_tokens: list[str]
    answer_pos: int
    answer: int | None = None
    wrong: int | None = None
    clean_trace: Trace | None = None
    corrupt_trace: Trace | None = None

    def __len__(self) -> int:
        return len(self.clean_tokens)

    @property
    def diff_positions(self) -> list[int]:
        """Positions where the clean and corrupted tokens differ."""
        return (self.clean_ids != self.corrupt_ids).nonzero().flatten().tolist()

    def labels(self) -> list[str]:
        """One label per position: the token, or ``clean/corrupt`` where they differ."""
        return [a if a == b else f"{a}/{b}" for a, b in zip(self.clean_tokens, self.corrupt_tokens)]


def input_tokens(model: Any, x: Any, which: str) -> tuple[list[int], list[str], Trace | None]:
    """(ids, token strings, trace or None) of one patching input: text, token ids or a Trace.

    ``which`` names the input in error messages (``"clean"``, ``"corrupted"``).
    """
    if isinstance(x, Trace):
        check_tokenizer(x, model.tokenizer)
        return list(x.token_ids), list(x.tokens), x
    if isinstance(x, str):
        ids = model.encode(x)
    elif isinstance(x, Tensor | list | tuple):
        ids = torch.as_tensor(x).reshape(-1).tolist()
    else:
        raise ConfigError(f"{which} must be text, token ids or a Trace, got {type(x).__name__}")
    if not ids:
        raise ConfigError(f"{which} input {x!r} has no tokens")
    return ids, [model.tokenizer.decode([i]) for i in ids], None


def _token_id(model: Any, tok: str | int | None, which: str) -> int | None:
    if tok is None:
        return None
    if isinstance(tok, str):
        ids = model.encode(tok)
        if len(ids) != 1:
            pieces = [model.tokenizer.decode([i]) for i in ids]
            raise ConfigError(f"{which} {tok!r} is {len(ids)} tokens {pieces}; a patching "
                              "metric reads one next-token logit, so give a single token "
                              "(e.g. its first piece) or a token id")
        return ids[0]
    vocab = len(model.tokenizer)
    if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab:
        raise ConfigError(f"{which} {tok!r} is not a token id (0..{vocab - 1}) or a string")
    return tok


def make_pair(model: Any, clean: str | Trace | Any, corrupt: str | Trace | Any, *,
              answer: str | int | None = None, wrong: str | int | None = None,
              answer_pos: int = -1) -> Pair:
    """An aligned :class:`Pair`; raises ConfigError when the token lengths differ."""
    c_ids, c_toks, c_trace = input_tokens(model, clean, "clean")
    x_ids, x_toks, x_trace = input_tokens(model, corrupt, "corrupted")
    if len(c_ids) != len(x_ids):
        i = next((k for k, (a, b) in enumerate(zip(c_ids, x_ids)) if a != b),
                 min(len(c_ids), len(x_ids)))
        a = repr(c_toks[i]) if i < len(c_toks) else "nothing (it ended)"
        b = repr(x_toks[i]) if i < len(x_toks) else "nothing (it ended)"
        raise ConfigError(
            f"clean and corrupted inputs tokenize to different lengths ({len(c_ids)} vs "
            f"{len(x_ids)} tokens); they first differ at position {i}: clean {a} vs corrupted "
            f"{b}. Patching compares positions one to one: change words for words of the same "
            "token count (e.g. swap names that are one token each)")
    if c_ids == x_ids:
        raise ConfigError("clean and corrupted inputs are the same tokens; there is nothing "
                          "to patch between them")
    n = len(c_ids)
    if not -n <= answer_pos < n:
        raise ConfigError(f"answer_pos {answer_pos} is out of range for {n} tokens "
                          f"(valid: {-n}..{n - 1})")
    return Pair(torch.tensor(c_ids), torch.tensor(x_ids), c_toks, x_toks, answer_pos % n,
                _token_id(model, answer, "answer"), _token_id(model, wrong, "wrong answer"),
                c_trace, x_trace)


# ---- the organism ------------------------------------------------------------------------

def _organism_pair(model: Any, prompt: str, clean_think: list[str], corrupt_think: list[str],
                   clean_answer: int, corrupt_answer: int, what: str) -> Pair:
    if clean_answer == corrupt_answer:
        raise ConfigError(f"{what} leaves the answer at {clean_answer}, so no logit difference "
                          "can measure it; change a variable on the asked chain")
    traces = [Trace.from_text(model, p, " ".join(t + ["</think>"]), meta=meta)
              for p, t, meta in ((prompt[0], clean_think, {}),
                                 (prompt[1], corrupt_think, {"corruption": what}))]
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
    from thinklens.zoo.task import problem_from_prompt

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
    from thinklens.zoo.task import OPS, problem_from_prompt

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
    from thinklens.zoo.task import problem_from_prompt

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
    from thinklens.zoo.organism import token_truth
    from thinklens.zoo.task import problem_from_prompt

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
