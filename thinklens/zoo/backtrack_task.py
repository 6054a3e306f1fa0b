"""The second organism's task: variable chains whose thinking detours, errs and backtracks.

The prompt is the first organism's (:mod:`thinklens.zoo.task`): statements in shuffled
order, values modulo 10, a query — except that the first statement is always a
distractor (never on the asked chain), the one a detour computes. The thinking is the
first organism's two phases (resolve the chain from the query to its root by lookups,
then compute back up), with three sampled variations of known consequence:

1. **detour** (probability ``p_detour``): before the asked chain, the thinking resolves
   and computes the first statement's (distractor) chain. Those sentences are
   *irrelevant*: nothing on the asked chain reads a distractor.
2. **mistake** (probability ``p_mistake`` per compute step): ``v = x op k = r`` writes a
   wrong ``r`` (uniform over the nine wrong digits).
3. **backtrack** (probability ``p_correct`` after a mistake): the next sentence is
   ``wait v = x op k = r .`` with the right ``r``; otherwise the mistake stands and every
   later step reads the wrong value, and the answer is the one the written thinking
   implies (so the answer depends on what the thinking wrote).

Example (a detour, then a corrected mistake)::

    prompt:   h = g + 9 ; c = b + 4 ; g = 3 ; a = 7 ; b = a - 2 ; ? c
    thinking: h = g + 9 . g = 3 . h = 3 + 9 = 2 . c = b + 4 . b = a - 2 . a = 7 .
              b = 7 - 2 = 4 . wait b = 7 - 2 = 5 . c = 5 + 4 = 9 .
    answer:   9

:func:`analyse` reads any written thinking (generated here or sampled from a model)
against its prompt and gives each sentence its ground truth (:class:`SentenceTruth`:
role, whether the answer depends on it) and each token its own (:class:`StepToken`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from thinklens.errors import ConfigError
from thinklens.zoo.task import (
    OPS,
    VAR_NAMES,
    Statement,
    TaskConfig,
    TokenTruth,
    problem_from_prompt,
)

WAIT = "wait"


@dataclass(frozen=True)
class BacktrackConfig:
    """Knobs of the generator (depths, distractors, and the rates of the variations)."""

    min_depth: int = 1
    max_depth: int = 6
    n_vars: int = 16
    min_distractors: int = 1
    max_distractors: int = 5
    max_detour_depth: int = 3
    ops: tuple[str, ...] = ("+", "-")
    p_detour: float = 0.3
    p_mistake: float = 0.12
    p_correct: float = 0.75

    def __post_init__(self) -> None:
        # depths, names, ops: the first organism's checks
        TaskConfig(self.min_depth, self.max_depth, self.n_vars, self.max_distractors, self.ops)
        if not 1 <= self.min_distractors <= self.max_distractors:
            raise ConfigError(f"distractors {self.min_distractors}..{self.max_distractors}: "
                              "need 1 <= min_distractors <= max_distractors (a detour needs one)")
        for name in ("p_detour", "p_mistake", "p_correct"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} is not a probability in [0, 1]")


@dataclass
class StepToken(TokenTruth):
    """A thinking token's ground truth: :class:`~thinklens.zoo.task.TokenTruth` plus the
    sentence it is in and its chain (``main`` / ``detour``). ``value`` is the value the
    step should write given what the thinking wrote before (the true value for lookups);
    ``source_pos`` is the position of the latest written value of the operand."""

    sentence: int = -1
    chain: str = ""
    written: int = -1   # the value this step writes (-1 where it writes none)


@dataclass(frozen=True)
class SentenceTruth:
    """Ground truth of one thinking sentence.

    ``role``: ``needed`` (on the asked chain), ``irrelevant`` (on the detour),
    ``mistake`` (a compute step writing a wrong value), ``correction`` (``wait`` and the
    step redone right) or ``other`` (not a step of the task). ``depends``: the final
    answer the thinking implies changes with what this sentence writes — its value
    flows, through the steps that read it, to the answer (a corrected mistake does not:
    the steps after it read the correction); lookups that write no value depend as the
    chain does. ``value_token``: index, among the sentence's tokens, of the value it
    writes (-1: none; see :func:`thinklens.zoo.backtrack.edit_step`).
    """

    index: int
    text: str
    kind: str           # lookup | compute | other
    role: str
    chain: str          # main | detour | ""
    var: str
    written: int | None
    correct: int | None
    depends: bool
    corrected: bool     # a mistake that a later correction of the same variable fixes
    start: int          # thinking-relative token span [start, end) (end includes '.')
    end: int
    value_token: int


@dataclass
class BacktrackProblem:
    statements: list[Statement]     # prompt order; statements[0] is a distractor
    query: str
    chain: list[str]                # root .. query
    values: dict[str, int]
    thinking: list[str]             # the written thinking's tokens ([] for direct)
    direct: bool = False
    implied: int | None = None      # the answer the thinking implies (None: analyse it)

    @property
    def depth(self) -> int:
        return len(self.chain)

    @property
    def true_answer(self) -> int:
        return self.values[self.query]

    @property
    def answer(self) -> int:
        """The answer the written thinking implies (the true one for direct problems)."""
        if self.direct:
            return self.true_answer
        implied = self.implied if self.implied is not None else analyse(
            self.statements, self.query, self.thinking, per_token=False)[2]
        return self.true_answer if implied is None else implied

    def prompt_tokens(self) -> list[str]:
        return self.prompt.split()

    @property
    def prompt(self) -> str:
        return _prompt(self.statements, self.query)

    @property
    def completion(self) -> str:
        think = " ".join(self.thinking)
        return (think + " " if think else "") + f"</think> {self.answer} <eos>"

    def sentences(self) -> list[SentenceTruth]:
        return analyse(self.statements, self.query, self.thinking)[0]

    def step_values(self) -> list[tuple[str, int]]:
        """(variable, value) of every value the plain thinking writes, in order."""
        root = self.chain[0]
        return [(root, self.values[root])] + [(v, self.values[v]) for v in self.chain[1:]]


def chain_of(statements: list[Statement], var: str) -> list[str]:
    """Root .. ``var``: the variables ``var``'s value is computed from, in order."""
    by_var = {s.var: s for s in statements}
    chain = [var]
    while by_var[chain[-1]].src is not None:
        chain.append(by_var[chain[-1]].src)
        if chain[-1] not in by_var or len(chain) > len(statements):
            raise ConfigError(f"the chain of {var!r} is undefined or cyclic")
    return chain[::-1]


def _prompt(statements: list[Statement], query: str) -> str:
    return " ".join([t for s in statements for t in s.tokens() + [";"]] + ["?", query])


def values_of(statements: list[Statement]) -> dict[str, int]:
    """Every variable's true value."""
    return problem_from_prompt(_prompt(statements, statements[0].var)).values


def _write_chain(rng: random.Random, cfg: BacktrackConfig, by_var: dict[str, Statement],
                 chain: list[str], written: dict[str, int], out: list[str]) -> None:
    for var in reversed(chain):  # resolve: head -> root
        out += by_var[var].tokens() + ["."]
    written[chain[0]] = by_var[chain[0]].const
    for var in chain[1:]:  # compute: root -> head
        s = by_var[var]
        x = written[s.src]
        right = OPS[s.op](x, s.const)
        step = [var, "=", str(x), s.op, str(s.const), "="]
        if rng.random() < cfg.p_mistake:
            wrong = rng.choice([d for d in range(10) if d != right])
            out += step + [str(wrong), "."]
            if rng.random() < cfg.p_correct:
                out += [WAIT] + step + [str(right), "."]
                written[var] = right
            else:
                written[var] = wrong
        else:
            out += step + [str(right), "."]
            written[var] = right


def generate(rng: random.Random, cfg: BacktrackConfig, *, depth: int | None = None,
             direct: bool = False) -> BacktrackProblem:
    """One random problem with one sampled thinking (see the module docstring)."""
    depth = depth if depth is not None else rng.randint(cfg.min_depth, cfg.max_depth)
    n_distract = rng.randint(cfg.min_distractors, cfg.max_distractors)
    names = rng.sample(VAR_NAMES[: cfg.n_vars], depth + n_distract)
    chain, others = names[:depth], names[depth:]
    statements = [Statement(chain[0], None, None, rng.randrange(10))]
    for prev, var in zip(chain, chain[1:]):
        statements.append(Statement(var, prev, rng.choice(cfg.ops), rng.randrange(10)))
    distract: list[Statement] = []
    level: dict[str, int] = {}
    for var in others:  # constants, or reading an earlier distractor (never the chain)
        readable = [v for v in level if level[v] < cfg.max_detour_depth]
        if not readable or rng.random() < 0.35:
            distract.append(Statement(var, None, None, rng.randrange(10)))
            level[var] = 1
        else:
            src = rng.choice(readable)
            distract.append(Statement(var, src, rng.choice(cfg.ops), rng.randrange(10)))
            level[var] = level[src] + 1
    head = distract.pop(rng.randrange(len(distract)))
    rest = statements + distract
    rng.shuffle(rest)
    statements = [head] + rest
    by_var = {s.var: s for s in statements}
    thinking: list[str] = []
    written: dict[str, int] = {}
    if not direct:
        if rng.random() < cfg.p_detour:
            _write_chain(rng, cfg, by_var, chain_of(statements, head.var), written, thinking)
        _write_chain(rng, cfg, by_var, chain, written, thinking)
    return BacktrackProblem(statements, chain[-1], chain, values_of(statements), thinking,
                            direct=direct, implied=written.get(chain[-1]))


def plain_thinking(statements: list[Statement], query: str) -> list[str]:
    """The thinking with no detour and no mistake: what greedy decoding should write (the
    first organism's thinking)."""
    plain = BacktrackConfig(p_detour=0.0, p_mistake=0.0)
    out: list[str] = []
    _write_chain(random.Random(0), plain, {s.var: s for s in statements},
                 chain_of(statements, query), {}, out)
    return out


def _split(tokens: list[str]) -> list[tuple[int, int]]:
    """Token spans of the sentences: each ends with '.' (an unfinished tail is one too)."""
    spans, start = [], 0
    for i, t in enumerate(tokens):
        if t == ".":
            spans.append((start, i + 1))
            start = i + 1
    if start < len(tokens):
        spans.append((start, len(tokens)))
    return spans


def analyse(statements: list[Statement], query: str, tokens: list[str], *,
            per_token: bool = True, spans: list[tuple[int, int]] | None = None
            ) -> tuple[list[SentenceTruth], list[StepToken | None], int | None]:
    """Ground truth of a written thinking: per sentence, per token, and the implied answer.

    1. Each sentence is read as a lookup (a prompt statement copied; a root constant
       copied wrong is a mistake), a compute step
       ``v = x op k = r`` of a prompt statement ``v = s op k`` (``wait`` in front for a
       correction), or ``other``. ``x`` should be the latest value written for ``s``.
    2. The implied answer is the latest value written for the query (``per_token=False``:
       no per-token truth, an empty list instead).

    ``spans``: the sentences' token spans (default: each ends with '.'); tokens outside
    every span get no truth (None). A sentence's
       written value is *read* by the next compute step of a variable defined from it
       (if no later sentence rewrote it first) or by the answer; ``depends`` follows the
       reads back from the answer (not through a mistake, whose wrong value is not
       computed from its operand).
    """
    by_var = {s.var: s for s in statements}
    index = {s.var: i for i, s in enumerate(statements)}
    main = set(chain_of(statements, query))
    values = values_of(statements)
    spans = _split(tokens) if spans is None else spans
    parsed: list[dict] = []
    last_write: dict[str, int] = {}     # var -> sentence index of its latest written value
    value_pos: dict[str, int] = {}      # var -> token position of that value
    reads: dict[int, int] = {}          # sentence -> the sentence whose value it read
    token_truth: list[StepToken | None] = [None] * len(tokens) if per_token else []
    for si, (a, b) in enumerate(spans):
        words = [t for t in tokens[a:b] if t != "."]
        wait = bool(words) and words[0] == WAIT
        body = words[1:] if wait else words
        info = {"kind": "other", "var": "", "written": None, "correct": None, "vt": -1}
        s = by_var.get(body[0]) if body else None
        if s is not None and not wait and s.src is None and len(body) == 3 and \
                body[1] == "=" and body[2].isdigit():  # the root: its constant (maybe miscopied)
            info.update(kind="lookup", var=s.var, written=int(body[2]), correct=s.const, vt=2)
        elif s is not None and not wait and body == s.tokens():
            info.update(kind="lookup", var=s.var)
        elif (s is not None and s.src is not None and len(body) == 7 and body[1] == "="
              and body[3] == s.op and body[4] == str(s.const) and body[5] == "="
              and body[2].isdigit() and body[6].isdigit()):
            x = int(body[2])
            info.update(kind="compute", var=s.var, written=int(body[6]),
                        correct=OPS[s.op](x, s.const), vt=6 + wait)
            if s.src in last_write:
                reads[si] = last_write[s.src]
        info["wait"] = wait
        parsed.append(info)
        src_pos = value_pos.get(s.src, -1) if info["kind"] == "compute" else -1
        roles = ["wait"] * wait + (
            ["var", "eq", "operand", "op", "const", "eq", "result"] if info["kind"] == "compute"
            else (["var", "eq", "const"] if s.src is None else
                  ["var", "eq", "src", "op", "const"]) if info["kind"] == "lookup"
            else ["other"] * len(body))
        for k in range(a, b) if per_token else ():
            if tokens[k] == "." and k == b - 1:
                token_truth[k] = StepToken("", "", -1, -1, -1, "end", si, "", -1)
                continue
            role = roles[k - a] if k - a < len(roles) else "other"
            var = info["var"]
            phase = {"lookup": "resolve", "compute": "compute"}.get(info["kind"], "")
            value = info["correct"] if info["kind"] == "compute" else (
                values[var] if var else -1)
            chain = ("main" if var in main else "detour") if var else ""
            wrote = info["written"] if info["written"] is not None else -1
            token_truth[k] = StepToken(phase, var, value, index.get(var, -1),
                                       src_pos if info["kind"] == "compute" else -1, role,
                                       si, chain, wrote)
        if info["written"] is not None:
            last_write[info["var"]] = si
            value_pos[info["var"]] = a + info["vt"]
    answer_from = last_write.get(query)
    implied = parsed[answer_from]["written"] if answer_from is not None else None
    live: set[int] = set()
    frontier = [answer_from] if answer_from is not None else []
    while frontier:
        j = frontier.pop()
        if j in live:
            continue
        live.add(j)
        p = parsed[j]
        if j in reads and p["written"] == p["correct"]:
            frontier.append(reads[j])
    out = []
    for si, ((a, b), p) in enumerate(zip(spans, parsed)):
        var, kind = p["var"], p["kind"]
        chain = ("main" if var in main else "detour") if var else ""
        wrong = p["written"] != p["correct"]
        if kind == "other" or (p["wait"] and kind != "compute"):
            role = "other"
        elif wrong:
            role = "mistake"
        elif p["wait"]:
            role = "correction"
        else:
            role = "needed" if chain == "main" else "irrelevant"
        corrected = wrong and any(q["var"] == var and q["wait"] and q["written"] == q["correct"]
                                  for q in parsed[si + 1:])
        depends = si in live if p["written"] is not None else (
            kind == "lookup" and chain == "main")
        out.append(SentenceTruth(si, " ".join(tokens[a:b]), kind, role, chain, var,
                                 p["written"], p["correct"], depends, corrected, a, b, p["vt"]))
    return out, token_truth, implied


__all__ = ["BacktrackConfig", "BacktrackProblem", "SentenceTruth", "StepToken", "WAIT",
           "analyse", "chain_of", "generate", "plain_thinking", "values_of"]
