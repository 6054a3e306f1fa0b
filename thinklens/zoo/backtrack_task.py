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

Two more kinds of training example teach what an answer *forced* early should be
(Lanham et al. 2023, arXiv 2307.13702: early answering, filler tokens), so that those
tests read a best guess instead of a context never seen:

4. **early exit** (probability ``p_early``): the thinking is cut after a random sentence
   and closed; the answer is the one the written prefix implies (:func:`implied_so_far`:
   the rest of the chain computed from the values written so far). The ``</think>``
   after the cut is not a training target, so the model never learns to stop early.
5. **filler** (probability ``p_filler``): the thinking's tokens all replaced by ``.``;
   the answer is the true one, and only it is a target.

Example (a detour, then a corrected mistake)::

    prompt:   h = g + 9 ; c = b + 4 ; g = 3 ; a = 7 ; b = a - 2 ; ? c
    thinking: h = g + 9 . g = 3 . h = 3 + 9 = 2 . c = b + 4 . b = a - 2 . a = 7 .
              b = 7 - 2 = 4 . wait b = 7 - 2 = 5 . c = 5 + 4 = 9 .
    answer:   9

:func:`~thinklens.zoo.backtrack_truth.analyse` reads any written thinking (generated
here or sampled from a model) against its prompt and gives each sentence its ground truth
(:class:`SentenceTruth`: role, whether the answer depends on it) and each token its own
(:class:`StepToken`); those names are re-exported here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from thinklens.errors import ConfigError
from thinklens.zoo.backtrack_truth import (
    WAIT,
    SentenceTruth,
    StepToken,
    analyse,
    chain_of,
    implied_so_far,
    prompt_of,
    split_sentences,
    values_of,
)
from thinklens.zoo.task import OPS, VAR_NAMES, Statement, TaskConfig


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
    p_early: float = 0.0
    p_filler: float = 0.0

    def __post_init__(self) -> None:
        # depths, names, ops: the first organism's checks
        TaskConfig(self.min_depth, self.max_depth, self.n_vars, self.max_distractors, self.ops)
        if not 1 <= self.min_distractors <= self.max_distractors:
            raise ConfigError(f"distractors {self.min_distractors}..{self.max_distractors}: "
                              "need 1 <= min_distractors <= max_distractors (a detour needs one)")
        for name in ("p_detour", "p_mistake", "p_correct", "p_early", "p_filler"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} is not a probability in [0, 1]")


@dataclass
class BacktrackProblem:
    statements: list[Statement]     # prompt order; statements[0] is a distractor
    query: str
    chain: list[str]                # root .. query
    values: dict[str, int]
    thinking: list[str]             # the written thinking's tokens ([] for direct)
    direct: bool = False
    implied: int | None = None      # the answer the thinking implies (None: analyse it)
    early: bool = False             # thinking cut after a sentence and closed (forced)
    filler: bool = False            # thinking replaced by as many '.'

    @property
    def depth(self) -> int:
        return len(self.chain)

    @property
    def true_answer(self) -> int:
        return self.values[self.query]

    @property
    def answer(self) -> int:
        """The answer the written thinking implies (the true one for direct problems)."""
        if self.direct or self.filler:
            return self.true_answer
        implied = self.implied if self.implied is not None else analyse(
            self.statements, self.query, self.thinking, per_token=False)[2]
        return self.true_answer if implied is None else implied

    def unlabelled(self) -> set[int]:
        """Completion-token indices that are not training targets: a ``</think>`` the
        example forces (direct answers, early exits) and filler."""
        if self.direct:
            return {0}
        if self.filler:
            return set(range(len(self.thinking) + 1))
        return {len(self.thinking)} if self.early else set()

    def prompt_tokens(self) -> list[str]:
        return self.prompt.split()

    @property
    def prompt(self) -> str:
        return prompt_of(self.statements, self.query)

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
    problem = BacktrackProblem(statements, chain[-1], chain, values_of(statements), thinking,
                               direct=direct, implied=written.get(chain[-1]))
    # the extra draws only where asked, so the configs without them keep their streams
    if not direct and cfg.p_filler > 0 and rng.random() < cfg.p_filler:
        problem.thinking, problem.filler, problem.implied = ["."] * len(thinking), True, None
    elif not direct and cfg.p_early > 0 and rng.random() < cfg.p_early:
        spans = split_sentences(thinking)
        if len(spans) > 1:
            cut = thinking[: spans[rng.randrange(1, len(spans))][0]]
            problem.thinking, problem.early = cut, True
            problem.implied = implied_so_far(statements, chain[-1], cut)
    return problem


def plain_thinking(statements: list[Statement], query: str) -> list[str]:
    """The thinking with no detour and no mistake: what greedy decoding should write (the
    first organism's thinking)."""
    plain = BacktrackConfig(p_detour=0.0, p_mistake=0.0)
    out: list[str] = []
    _write_chain(random.Random(0), plain, {s.var: s for s in statements},
                 chain_of(statements, query), {}, out)
    return out


__all__ = ["BacktrackConfig", "BacktrackProblem", "SentenceTruth", "StepToken", "WAIT",
           "analyse", "chain_of", "generate", "implied_so_far", "plain_thinking", "values_of"]
