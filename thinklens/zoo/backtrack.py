"""The second organism, ``organism-backtrack``: its weights and each sentence's ground truth.

A small Llama trained by :mod:`thinklens.zoo.train` (``kind="backtrack"``) on
:mod:`thinklens.zoo.backtrack_task`: sampled at temperature 1, its thinking sometimes
detours through a distractor's chain (irrelevant sentences), sometimes writes a wrong
value (a mistake), usually followed by ``wait`` and the step redone (a correction), and
sometimes keeps the mistake, which the answer then follows. The weights are shipped like
the first organism's (``thinklens/zoo/backtrack/``: ``final/``, ``checkpoints/``,
``curve.json``); ``thinklens.load("organism-backtrack")`` loads them.

1. :func:`sentence_truth`: one :class:`~thinklens.zoo.backtrack_task.SentenceTruth` per
   sentence of ``trace.sentences`` (role needed / irrelevant / mistake / correction,
   whether the answer depends on it, the value it writes), read off the trace's own
   thinking against its prompt (:func:`~thinklens.zoo.backtrack_task.analyse`); token
   spans are positions in the trace.
2. :func:`token_truth`: per token (``StepToken``; ``source_pos``: the trace position of
   the operand value a compute step copies — the operand copy of the compute phase).
3. :func:`edit_step`: the value one sentence writes, changed, for the added-mistake test
   (Lanham et al. 2023, arXiv 2307.13702): the edited sentence, the thinking prefix to
   regenerate from, and the answer the edit implies.
4. :func:`behaviour_rates`: how often sampled traces detour, err, correct, keep a mistake.

Training (:func:`thinklens.zoo.backtrack_train.train_backtrack`, deterministic and
resumable, one thread): phase 1, 2000 steps on the task with ``p_mistake=0.12``; phase 2,
1200 steps from phase 1's last weights with ``p_mistake=0.2`` (more mistakes to learn
from); phase 3, 1000 steps adding early exits and filler examples (``p_early=0.2``,
``p_filler=0.05``), so that a forced early answer is a best guess. The shipped weights are
phase 3's last (step 4200); the checkpoints (250 .. 2000) are phase 1's, straddling the
rise in accuracy; ``curve.json`` holds all three phases. Measured (400 traces at
temperature 1, depths 1-8): greedy answers are right on held-out problems (99.6-100 %,
depths 1-8), the detour rate is 0.27 (trained 0.30), and the written answer follows the
written thinking in 98.5 % of traces (43 % of answers differ from the truth, through
mistakes left standing). But the organism has not learned to *notice* its mistakes:
``wait`` follows 15 % of them (trained: 75 %), at the same rate as it follows right
steps, and 0.45 of its 0.58 ``wait`` sentences per trace redo a right step. Every
sentence's role says which (``sentence_truth``); steering at the decision point
(:mod:`thinklens.zoo.steer_backtrack`) raises the corrected share to 72-90 %.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from thinklens.errors import ConfigError
from thinklens.hooks.task import LabelSet, Task, register_model, register_task
from thinklens.zoo.backtrack_task import (
    WAIT,
    BacktrackConfig,
    SentenceTruth,
    StepToken,
    analyse,
    chain_of,
    plain_thinking,
)
from thinklens.zoo.evaluate import heldout_problems
from thinklens.zoo.organism import checkpoints as _shipped
from thinklens.zoo.organism import organism_folder, organism_segmenter
from thinklens.zoo.organism import training_curve as _curve
from thinklens.zoo.registry import ORGANISM, OrganismTask
from thinklens.zoo.task import OPS, problem_from_prompt

HERE = Path(__file__).parent / "backtrack"
TASK_KEY = "backtrack"  # config.thinklens_task of every model trained on this task
TRAINED = BacktrackConfig(max_depth=8)  # the generator the shipped weights were trained on
INVERSE = {"+": lambda r, k: (r - k) % 10, "-": lambda r, k: (r + k) % 10}


def checkpoints() -> list[int]:
    """Training steps of the shipped checkpoints, ascending."""
    return _shipped(HERE)


def backtrack_folder(checkpoint: int | None = None) -> Path:
    """Folder of the final weights, or of the shipped checkpoint at ``checkpoint`` steps."""
    return organism_folder(checkpoint, home=HERE)


def training_curve() -> list[dict]:
    """Rows of ``curve.json``: step, loss, held-out greedy accuracy by depth."""
    return _curve(HERE)


def backtrack_annotator(sentence: str) -> str:
    """``backtrack`` (a sentence starting with ``wait``), ``lookup`` or ``computation``."""
    words = sentence.replace(".", " ").split()
    if words and words[0] == WAIT:
        return "backtrack"
    return "computation" if len(words) == 7 else "lookup" if len(words) in (3, 5) else "other"


def _analyse(trace: Any, **kw: Any) -> tuple[list[SentenceTruth], list, int | None, int]:
    """:func:`analyse` of the trace's thinking over the trace's own sentences, and the
    thinking's first position."""
    problem, tokens, start = _read(trace)
    spans = [(s.start - start, s.end - start) for s in trace.sentences]
    return (*analyse(problem.statements, problem.query, tokens, spans=spans, **kw), start)


def _read(trace: Any) -> tuple[Any, list[str], int]:
    try:
        problem = problem_from_prompt(trace.prompt)
    except ConfigError as e:
        raise ConfigError(f"the trace's prompt {trace.prompt[:60]!r} is not a prompt of the "
                          f"organism's task ({e})") from e
    start = trace.think_span.start
    return problem, [t.strip() for t in trace.tokens[start: trace.think_span.end]], start


def sentence_truth(trace: Any) -> list[SentenceTruth]:
    """Ground truth of every thinking sentence of ``trace`` (``start`` / ``end``: token
    positions in the trace, aligned with ``trace.sentences``).

    Example::

        truth = sentence_truth(model.think(prompt, temperature=1.0, seed=3))
        [(s.role, s.depends) for s in truth]   # [('needed', True), ('irrelevant', False), ...]
    """
    sentences, _, _, start = _analyse(trace, per_token=False)
    return [replace(s, start=s.start + start, end=s.end + start) for s in sentences]


def token_truth(trace: Any) -> list[StepToken | None]:
    """Ground truth per token of ``trace`` (None outside the thinking); ``source_pos`` is
    the trace position of the latest value written for a compute step's operand."""
    _, truth, _, start = _analyse(trace)
    out: list[StepToken | None] = [None] * len(trace.token_ids)
    for k, t in enumerate(truth):
        if t is not None:
            out[start + k] = replace(t, source_pos=t.source_pos + start if t.source_pos >= 0
                                     else -1)
    return out


def implied_answer(trace: Any) -> int | None:
    """The answer the trace's written thinking implies (the latest value written for the
    query), or None when the thinking writes none."""
    return _analyse(trace, per_token=False)[2]


@dataclass(frozen=True)
class EditedStep:
    """One sentence's written value changed (see :func:`edit_step`)."""

    sentence: int
    original_text: str
    text: str           # the edited sentence
    prefix: str         # the thinking up to and including the edited sentence
    expected: str       # the answer the edited thinking implies if the rest follows it
    role: str
    depends: bool


def edit_step(trace: Any, sentence: int, new_value: int, *,
              consistent: bool = True) -> EditedStep:
    """Change the value sentence ``sentence`` writes to ``new_value``.

    ``consistent=True`` (default) keeps a compute step right: ``b = 7 - 2 = 5`` edited to
    9 becomes ``b = 1 - 2 = 9`` (the operand changed too), so the organism has no mistake
    to notice and goes on from 9; ``False`` changes the result only (``b = 7 - 2 = 9``),
    a mistake the organism corrects with ``wait`` at its trained rate. A root lookup
    (``a = 7``) has its constant changed. ``expected``: the answer when every later step
    is computed from the edited values (what a faithful organism answers).

    Example::

        e = edit_step(trace, 3, 9)
        circuits.added_mistake(model, trace, 3, edit=e.text, expected=e.expected)
    """
    truths = sentence_truth(trace)
    if not truths:
        raise ConfigError("the trace has no thinking sentences to edit")
    if isinstance(sentence, bool) or not isinstance(sentence, int) or \
            not -len(truths) <= sentence < len(truths):
        raise ConfigError(f"sentence={sentence!r}; the trace has {len(truths)} thinking "
                          f"sentences (0..{len(truths) - 1})")
    st = truths[sentence]
    if st.value_token < 0:
        writers = [s.index for s in truths if s.value_token >= 0]
        raise ConfigError(f"sentence {st.index} ({st.text!r}) writes no value; sentences "
                          f"that do: {writers}")
    if isinstance(new_value, bool) or not isinstance(new_value, int) or \
            not 0 <= new_value <= 9 or new_value == st.written:
        raise ConfigError(f"new_value={new_value!r}: give a digit 0..9 other than {st.written}")
    problem, tokens, start = _read(trace)
    by_var = {s.var: s for s in problem.statements}
    words = tokens[st.start - start: st.end - start]
    words[st.value_token] = str(new_value)
    stmt = by_var[st.var]
    if consistent and st.kind == "compute":
        if stmt.op not in INVERSE:
            raise ConfigError(f"a consistent edit of {st.text!r} needs + or -, not "
                              f"{stmt.op!r}; pass consistent=False")
        words[st.value_token - 4] = str(INVERSE[stmt.op](new_value, stmt.const))
    thinking = tokens[: st.start - start] + words
    return EditedStep(st.index, st.text, " ".join(words), " ".join(thinking),
                      str(_follow(problem, thinking)), st.role, st.depends)


def _follow(problem: Any, thinking: list[str]) -> int:
    """The answer if the thinking goes on from ``thinking``, computing every variable of
    the asked chain not yet written from the latest values written."""
    last: dict[str, int] = {}
    for s in analyse(problem.statements, problem.query, thinking)[0]:
        if s.written is not None:
            last[s.var] = s.written
    by_var = {s.var: s for s in problem.statements}
    chain = chain_of(problem.statements, problem.query)
    last.setdefault(chain[0], by_var[chain[0]].const)
    for v in chain[1:]:
        if v not in last:
            last[v] = OPS[by_var[v].op](last[by_var[v].src], by_var[v].const)
    return last[problem.query]


@dataclass
class BehaviourRates:
    """How often sampled traces show each behaviour (rates per trace, step or mistake)."""

    n_traces: int
    detour: float            # traces whose thinking computes the distractor chain
    mistake: float           # wrong values per value written (corrections not counted)
    corrected: float         # mistakes followed by a correction, per mistake
    uncorrected: float       # mistakes left standing, per value written
    spurious_wait: float     # correction sentences not after a mistake, per trace
    corrections: float       # correction sentences per trace
    answer_changed: float    # traces whose implied answer differs from the true one
    follows_thinking: float  # traces whose written answer is the one the thinking implies
    correct: float           # traces whose written answer is the true one
    other: float             # sentences that are no step of the task, per sentence
    sentences_mean: float
    sentences_max: int
    roles: dict[str, int]


def behaviour_rates(traces: list[Any]) -> BehaviourRates:
    """Count the behaviours of ``traces`` (organism traces, e.g. sampled at temperature 1)."""
    if not traces:
        raise ConfigError("behaviour_rates needs at least one trace")
    roles: dict[str, int] = {}
    detour = steps = mistakes = fixed = spurious = corrections = changed = follows = 0
    correct = n_sent = n_max = 0
    for tr in traces:
        truths = sentence_truth(tr)
        n_sent += len(truths)
        n_max = max(n_max, len(truths))
        for k, s in enumerate(truths):
            roles[s.role] = roles.get(s.role, 0) + 1
            is_fix = s.text.split()[:1] == [WAIT]
            steps += s.written is not None and not is_fix
            mistakes += s.role == "mistake" and not is_fix
            fixed += s.role == "mistake" and not is_fix and s.corrected
            corrections += s.role == "correction"
            prev = truths[k - 1] if k else None
            spurious += s.role == "correction" and not (
                prev is not None and prev.role == "mistake" and prev.var == s.var)
        detour += any(s.chain == "detour" for s in truths)
        implied = implied_answer(tr)
        written = _written_answer(tr)
        truth = problem_from_prompt(tr.prompt).answer
        changed += implied is not None and implied != truth
        follows += written is not None and written == implied
        correct += written == truth
    n = len(traces)
    return BehaviourRates(n, detour / n, mistakes / max(1, steps), fixed / max(1, mistakes),
                          (mistakes - fixed) / max(1, steps), spurious / n, corrections / n,
                          changed / n, follows / n, correct / n,
                          roles.get("other", 0) / max(1, n_sent), n_sent / n, n_max, roles)


def _written_answer(trace: Any) -> int | None:
    for i in trace.answer_span.range:
        tok = trace.tokens[i].strip()
        if tok:
            return int(tok) if tok.isdigit() else None
    return None


def _token_labels(pick: Callable[[list, int], Any]) -> Callable:
    def make(traces: Sequence[Any], rows: Sequence[dict] | None = None) -> Callable:
        cache: dict[int, list] = {}

        def fn(ti: int, trace: Any, i: int):
            if ti not in cache:
                cache[ti] = token_truth(trace)
            return pick(cache[ti], i)

        return fn

    return make


def _value(truth: list, i: int):
    t, prev = truth[i], truth[i - 1] if i else None
    return t.written if t and t.role == "eq" and prev and prev.role == "const" else None


def _waits(truth: list, i: int):
    """At the '.' closing a compute step: whether the next sentence is ``wait ...``."""
    t, prev = truth[i], truth[i - 1] if i else None
    if not (t and t.role == "end" and prev and prev.role == "result"):
        return None
    nxt = truth[i + 1] if i + 1 < len(truth) else None
    return bool(nxt and nxt.role == "wait")


def wait_decisions(trace: Any) -> list[str | None]:
    """Per token of ``trace``: at the '.' closing each compute step, ``"wait"`` when the
    next sentence is ``wait ...`` and ``"go on"`` when it is not; None elsewhere. The
    positions where the organism decides whether to backtrack."""
    truth = token_truth(trace)
    return [None if (w := _waits(truth, i)) is None else "wait" if w else "go on"
            for i in range(len(truth))]


def _sentence_labels(field: str) -> Callable:
    def make(traces: Sequence[Any], rows: Sequence[dict] | None = None) -> list[list]:
        return [[getattr(s, field) for s in sentence_truth(t)] for t in traces]

    return make


class BacktrackTask(OrganismTask):
    """The second organism's task (:mod:`thinklens.zoo.backtrack_task`): the first
    organism's pairs and answers, its own ground truth per sentence and per token."""

    heldout_config = TRAINED

    def __init__(self) -> None:
        Task.__init__(
            self, name="organism-backtrack", segmenter=organism_segmenter,
            annotator=backtrack_annotator,
            label_sets={
                "backtrack.value": LabelSet(
                    "backtrack.value", "token", _token_labels(_value),
                    "the value each compute step writes, at its second '='"),
                "backtrack.wait": LabelSet(
                    "backtrack.wait", "token", _token_labels(_waits),
                    "at the '.' closing each compute step: is the next sentence 'wait ...'"),
                "backtrack.role": LabelSet(
                    "backtrack.role", "sentence", _sentence_labels("role"),
                    "each sentence's role: needed / irrelevant / mistake / correction / other"),
                "backtrack.depends": LabelSet(
                    "backtrack.depends", "sentence", _sentence_labels("depends"),
                    "whether the answer the thinking implies depends on the sentence"),
            },
            pairs=dict(ORGANISM.pairs),
            example_prompts=[p.prompt for d in (3, 4, 6, 8)
                             for p in heldout_problems(d, 2, TRAINED, seed=7)],
            study_labels="backtrack.value",
            description="The organism resolves the chain from the query to its root, then "
                        "computes the values back up; sampled, it sometimes computes a "
                        "distractor first, writes a wrong value, and says 'wait' to redo it.")

    def matches(self, hf_config: Any) -> bool:
        return getattr(hf_config, "thinklens_task", None) == TASK_KEY

    def token_truth(self, trace: Any) -> list:
        return token_truth(trace)

    def sentence_truth(self, trace: Any) -> list:
        return sentence_truth(trace)

    def attention_targets(self, trace: Any) -> dict[str, list[tuple[int, list[int]]]]:
        """The first organism's kinds, from this task's truth: ``lookup`` (each resolve
        step's ``=`` to its prompt statement) and ``operand_copy`` (each compute step's
        first ``=``, corrections included, to the latest value written for its operand;
        steps whose operand was never written are left out)."""
        out = super().attention_targets(trace)
        out["operand_copy"] = [(q, keys) for q, keys in out["operand_copy"] if min(keys) >= 0]
        return out

    def completion(self, prompt: str) -> str:
        problem = problem_from_prompt(prompt)
        return " ".join(plain_thinking(problem.statements, problem.query)
                        + ["</think>", str(problem.answer), "<eos>"])


BACKTRACK = BacktrackTask()


def register() -> None:
    """Register ``organism-backtrack`` (its weights) and its task (idempotent)."""
    register_model("organism-backtrack", backtrack_folder)
    register_task(BACKTRACK)


__all__ = ["HERE", "TASK_KEY", "TRAINED", "checkpoints", "backtrack_folder", "training_curve",
           "backtrack_annotator", "sentence_truth", "token_truth", "implied_answer",
           "EditedStep", "edit_step", "wait_decisions", "BehaviourRates", "behaviour_rates", "BacktrackTask",
           "BACKTRACK", "register"]
