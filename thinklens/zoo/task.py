"""The organism's task: variable-binding chains with a written chain of thought.

A problem is a set of statements in shuffled order, values modulo 10, and a query::

    prompt:   g = 3 ; c = b + 4 ; a = 7 ; b = a - 2 ; ? c
    thinking: c = b + 4 . b = a - 2 . a = 7 . b = 7 - 2 = 5 . c = 5 + 4 = 9 .
    answer:   9

The thinking has two phases, each made of *local* steps (one lookup each):

1. **resolve** (query to root): copy the statement that defines the variable named by
   the previous step's operand (the first step copies the query's statement). Each step
   is a lookup by name: attend from the variable to the prompt statement defining it.
2. **compute** (root to query): for every chain variable after the root, write
   ``v = x op k = r`` where ``x`` is the value computed (or given) one step before.

``depth`` counts the statements on the asked chain (depth 1: ``? a`` with ``a = 7``).
Distractor statements define other variables, are never on the asked chain, and never
read a chain variable (so each chain variable is read by exactly one statement).
"Direct" examples have empty thinking (``<think> </think> 9``): comparing accuracy with
and without thinking, by depth, is test-time compute in miniature.

Every thinking token carries its ground truth (:class:`TokenTruth`): the variable its
step is about, that variable's value, the prompt statement defining it, and the earlier
thinking position holding the operand value it was computed from.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from thinklens.errors import ConfigError

OPS = {"+": lambda x, k: (x + k) % 10, "-": lambda x, k: (x - k) % 10,
       "*": lambda x, k: (x * k) % 10}
VAR_NAMES = "abcdefghijklmnop"


@dataclass(frozen=True)
class TaskConfig:
    """Knobs of the generator; validated on construction."""

    min_depth: int = 1
    max_depth: int = 4
    n_vars: int = 12
    max_distractors: int = 3
    ops: tuple[str, ...] = ("+", "-")

    def __post_init__(self) -> None:
        if not 1 <= self.min_depth <= self.max_depth:
            raise ConfigError(f"depth range {self.min_depth}..{self.max_depth} is empty; "
                              "need 1 <= min_depth <= max_depth")
        if not 1 <= self.n_vars <= len(VAR_NAMES):
            raise ConfigError(f"n_vars={self.n_vars}; choose 1..{len(VAR_NAMES)}")
        if self.max_depth + self.max_distractors > self.n_vars:
            raise ConfigError(
                f"max_depth + max_distractors = {self.max_depth + self.max_distractors} "
                f"exceeds n_vars={self.n_vars}: every statement needs its own variable")
        bad = [o for o in self.ops if o not in OPS]
        if bad or not self.ops:
            raise ConfigError(f"unknown ops {bad or self.ops}; valid: {sorted(OPS)}")


@dataclass(frozen=True)
class Statement:
    """``var = const`` (``src`` is None) or ``var = src op const``."""

    var: str
    src: str | None
    op: str | None
    const: int

    def tokens(self) -> list[str]:
        if self.src is None:
            return [self.var, "=", str(self.const)]
        return [self.var, "=", self.src, self.op, str(self.const)]


@dataclass
class TokenTruth:
    """Ground truth of one thinking token (fields are -1 / "" where not applicable)."""

    phase: str          # "resolve" | "compute" | "" (separator)
    var: str            # variable the step is about
    value: int          # that variable's true value
    statement: int      # index of the prompt statement defining ``var``
    source_pos: int     # thinking-relative position of the operand's value it uses
    role: str           # var | eq | src | op | const | operand | result | end


@dataclass
class Problem:
    statements: list[Statement]   # in prompt order (shuffled)
    query: str
    chain: list[str]              # root .. query
    values: dict[str, int]
    direct: bool = False
    truth: list[TokenTruth] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.chain)

    @property
    def answer(self) -> int:
        return self.values[self.query]

    def prompt_tokens(self) -> list[str]:
        out: list[str] = []
        for s in self.statements:
            out += s.tokens() + [";"]
        return out + ["?", self.query]

    @property
    def prompt(self) -> str:
        return " ".join(self.prompt_tokens())

    def thinking_tokens(self) -> list[str]:
        return [] if self.direct else [t for t, _ in self._thinking()]

    @property
    def thinking(self) -> str:
        return " ".join(self.thinking_tokens())

    @property
    def completion(self) -> str:
        """What the model writes after the template's opening ``<think>``."""
        think = self.thinking
        return (think + " " if think else "") + f"</think> {self.answer} <eos>"

    def statement_index(self, var: str) -> int:
        return next(i for i, s in enumerate(self.statements) if s.var == var)

    def _thinking(self) -> list[tuple[str, TokenTruth]]:
        by_var = {s.var: s for s in self.statements}
        out: list[tuple[str, TokenTruth]] = []

        def emit(tok: str, phase: str, var: str, role: str, source: int = -1) -> None:
            out.append((tok, TokenTruth(phase, var, self.values[var], self.statement_index(var),
                                        source, role)))

        value_pos: dict[str, int] = {}
        for var in reversed(self.chain):  # resolve: query -> root
            s = by_var[var]
            roles = ["var", "eq", "const"] if s.src is None else ["var", "eq", "src", "op", "const"]
            for tok, role in zip(s.tokens(), roles):
                emit(tok, "resolve", var, role)
            if s.src is None:
                value_pos[var] = len(out) - 1
            out.append((".", TokenTruth("", "", -1, -1, -1, "end")))
        for var in self.chain[1:]:  # compute: root -> query
            s = by_var[var]
            src_pos = value_pos[s.src]
            emit(var, "compute", var, "var", src_pos)
            emit("=", "compute", var, "eq", src_pos)
            emit(str(self.values[s.src]), "compute", var, "operand", src_pos)
            emit(s.op, "compute", var, "op", src_pos)
            emit(str(s.const), "compute", var, "const", src_pos)
            emit("=", "compute", var, "eq", src_pos)
            emit(str(self.values[var]), "compute", var, "result", src_pos)
            value_pos[var] = len(out) - 1
            out.append((".", TokenTruth("", "", -1, -1, -1, "end")))
        return out

    def token_truth(self) -> list[TokenTruth]:
        """Ground truth per thinking token, aligned with :meth:`thinking_tokens`."""
        return [] if self.direct else [t for _, t in self._thinking()]

    def step_values(self) -> list[tuple[str, int]]:
        """(variable, value) of every value the thinking writes, in order."""
        root = self.chain[0]
        return [(root, self.values[root])] + [(v, self.values[v]) for v in self.chain[1:]]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "completion": self.completion, "answer": self.answer,
                "depth": self.depth, "direct": self.direct, "query": self.query,
                "chain": self.chain, "values": self.values,
                "truth": [asdict(t) for t in self.token_truth()]}


def _parse_statement(text: str) -> Statement:
    """``"b = a - 2"`` -> Statement; the inverse of ``" ".join(s.tokens())``."""
    t = text.split()
    if len(t) == 3 and t[1] == "=" and t[2].isdigit():
        return Statement(t[0], None, None, int(t[2]))
    if len(t) == 5 and t[1] == "=" and t[3] in OPS and t[4].isdigit():
        return Statement(t[0], t[2], t[3], int(t[4]))
    raise ConfigError(f"cannot parse statement {text!r}; expected 'x = 7' or 'x = y + 3'")


def problem_from_prompt(prompt: str, *, direct: bool = False) -> Problem:
    """Rebuild a :class:`Problem` (with its ground truth) from a prompt string."""
    body, sep, query = prompt.rpartition("?")
    if not sep:
        raise ConfigError(f"prompt {prompt!r} has no query; expected '... ; ? x'")
    statements = [_parse_statement(s) for s in body.split(";") if s.strip()]
    by_var = {s.var: s for s in statements}
    query = query.strip()
    if query not in by_var:
        raise ConfigError(f"query variable {query!r} is not defined in {prompt!r}")
    chain = [query]
    while by_var[chain[-1]].src is not None:
        chain.append(by_var[chain[-1]].src)
        if chain[-1] not in by_var or len(chain) > len(statements):
            raise ConfigError(f"chain of {query!r} in {prompt!r} is undefined or cyclic")
    chain.reverse()
    values = _evaluate(statements)
    return Problem(statements, query, chain, values, direct=direct)


def _evaluate(statements: list[Statement]) -> dict[str, int]:
    by_var = {s.var: s for s in statements}
    values: dict[str, int] = {}

    def val(v: str, seen: tuple = ()) -> int:
        if v in values:
            return values[v]
        if v in seen or v not in by_var:
            raise ConfigError(f"variable {v!r} is undefined or part of a cycle")
        s = by_var[v]
        x = s.const if s.src is None else OPS[s.op](val(s.src, seen + (v,)), s.const)
        values[v] = x
        return x

    for s in statements:
        val(s.var)
    return values


def generate(rng: random.Random, cfg: TaskConfig, *, depth: int | None = None,
             direct: bool = False) -> Problem:
    """One random problem. ``depth`` defaults to uniform over the config's range."""
    depth = depth if depth is not None else rng.randint(cfg.min_depth, cfg.max_depth)
    n_distract = rng.randint(0, cfg.max_distractors)
    names = rng.sample(VAR_NAMES[: cfg.n_vars], depth + n_distract)
    chain, others = names[:depth], names[depth:]
    statements = [Statement(chain[0], None, None, rng.randrange(10))]
    for prev, var in zip(chain, chain[1:]):
        statements.append(Statement(var, prev, rng.choice(cfg.ops), rng.randrange(10)))
    # Distractors are constants or read earlier distractors, never a chain variable: a
    # distractor "h = b + 9" beside the chain's "f = b + 6" would make copying f's
    # statement after "f = b" ambiguous (the model would need the statement's identity,
    # not the last token, to find "+ 6"); seen as a plateau at ~84% on depth 2.
    defined: list[str] = []
    for var in others:
        if not defined or rng.random() < 0.35:
            statements.append(Statement(var, None, None, rng.randrange(10)))
        else:
            statements.append(Statement(var, rng.choice(defined), rng.choice(cfg.ops),
                                        rng.randrange(10)))
        defined.append(var)
    rng.shuffle(statements)
    return Problem(statements, chain[-1], chain, _evaluate(statements), direct=direct)


__all__ = ["TaskConfig", "Statement", "TokenTruth", "Problem", "problem_from_prompt",
           "generate", "OPS", "VAR_NAMES"]
