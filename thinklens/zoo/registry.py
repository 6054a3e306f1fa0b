"""What the zoo plugs into thinklens: the organism as a loadable name and as a :class:`Task`.

1. ``register()`` (called once when :mod:`thinklens` is imported) maps the name
   ``"organism"`` to the shipped weights (:func:`~thinklens.zoo.organism.organism_folder`)
   and registers :data:`ORGANISM`, the organism's task.
2. A model whose Hugging Face config says ``thinklens_task = "variable-binding"`` (the
   organism and every checkpoint of its training) gets :data:`ORGANISM` as ``model.task``:
   its thinking is split one step per sentence and tagged ``lookup`` / ``computation``;
   its true answers, per-token ground truth, held-out problems, named label sets and
   pair builders all come from the task generator (:mod:`thinklens.zoo.task`).

General code reaches all of this through ``model.task`` (:mod:`thinklens.hooks.task`) and
never imports the zoo.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from thinklens.errors import ConfigError
from thinklens.hooks.task import LabelSet, Task, register_model, register_task
from thinklens.zoo import pairs
from thinklens.zoo.evaluate import heldout_problems
from thinklens.zoo.organism import (
    organism_annotator,
    organism_folder,
    organism_segmenter,
    token_truth,
)
from thinklens.zoo.task import problem_from_prompt

TASK_KEY = "variable-binding"  # config.thinklens_task of every model trained on the task
STUDY_PROMPTS = [
    "c = b + 4 ; a = 7 ; b = a - 2 ; ? c",
    "e = 5 ; d = e + 3 ; g = 1 ; ? d",
    "h = f - 1 ; f = k + 6 ; k = 2 ; j = 9 ; ? h",
    "l = i + 2 ; c = 8 ; i = g - 3 ; g = c + 5 ; a = 3 ; ? l",
    "b = 4 ; ? b",
    "d = a - 3 ; a = 6 ; f = 0 ; ? d",
]
_PAIR_FALLBACK = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"


def _truth_labels(pick: Callable[[list, int, Any], Any]) -> Callable:
    """``make(traces, rows)`` for a token-level label read off the ground truth."""

    def make(traces: Sequence[Any], rows: Sequence[dict] | None = None) -> Callable:
        cache: dict[int, list] = {}

        def fn(ti: int, trace: Any, i: int):
            if ti not in cache:
                try:
                    cache[ti] = token_truth(trace)
                except ConfigError as e:  # only a prompt the task cannot parse
                    raise ConfigError(f"labels 'organism.*' need organism task prompts; trace "
                                      f"{ti} ({trace.prompt[:60]!r}) is not one ({e})") from e
            return pick(cache[ti], i, trace)

        return fn

    return make


def _value(truth: list, i: int, trace: Any):
    t, prev = truth[i], truth[i - 1] if i else None
    return t.value if t and t.role == "eq" and prev and prev.role == "const" else None


def _answer(truth: list, i: int, trace: Any):
    return problem_from_prompt(trace.prompt).answer if truth[i] else None


def _variable(truth: list, i: int, trace: Any):
    return truth[i].var if truth[i] and truth[i].var else None


class OrganismTask(Task):
    """The variable-binding task of the bundled organism (see :mod:`thinklens.zoo.task`)."""

    heldout_config: Any = None  # the generator config of held-out problems (None: default)

    def __init__(self) -> None:
        super().__init__(
            name="organism", segmenter=organism_segmenter, annotator=organism_annotator,
            label_sets={
                "organism.value": LabelSet(
                    "organism.value", "token", _truth_labels(_value),
                    "the value each compute step 'v = x op k = r' writes, at its second '='"),
                "organism.answer": LabelSet(
                    "organism.answer", "token", _truth_labels(_answer),
                    "the final answer, at every thinking token whose ground truth is known"),
                "organism.variable": LabelSet(
                    "organism.variable", "token", _truth_labels(_variable),
                    "the variable each thinking step is about, at every token of the step"),
            },
            pairs={"change_constant": pairs.change_constant,
                   "change_thinking_value": pairs.change_thinking_value,
                   "swap_names": pairs.swap_names, "lookup_step": pairs.lookup_step},
            example_prompts=list(STUDY_PROMPTS), study_labels="organism.value",
            description="The organism resolves the chain from the query to its root by "
                        "looking up statements, then computes the values back up.")

    def matches(self, hf_config: Any) -> bool:
        return getattr(hf_config, "thinklens_task", None) == TASK_KEY

    def answer(self, trace: Any) -> str:
        return str(problem_from_prompt(trace.prompt).answer)

    def extract_answer(self, trace: Any) -> str | None:
        """The first non-blank token after ``</think>`` (``None`` when there is none)."""
        for i in trace.answer_span.range:
            if trace.tokens[i].strip():
                return trace.tokens[i].strip()
        return None

    def token_truth(self, trace: Any) -> list:
        return token_truth(trace)

    def completion(self, prompt: str) -> str:
        return problem_from_prompt(prompt).completion

    def attention_targets(self, trace: Any) -> dict[str, list[tuple[int, list[int]]]]:
        """``lookup``: each resolve step's ``=`` to the tokens of the prompt statement it
        copies; ``operand_copy``: each compute step's first ``=`` to the earlier thinking
        position holding its operand's value (positions where the ground truth is known).
        A trace that backtracks (``wait`` steps, the second organism) adds the backtracking
        lookups: ``correction_copy``, the operand copy of each ``wait`` step (the step
        redone; its operand's value is also in the mistaken step it redoes, so both
        positions count), and ``corrected_copy``, that of each step whose operand was
        corrected (it must read the correction, not the mistake)."""
        truth, spans, start = self.token_truth(trace), [], trace.prompt_span.start + 1  # <bos>
        for k in trace.prompt_span.range:
            if trace.tokens[k] == ";":
                spans.append(list(range(start, k)))
                start = k + 1
        out: dict[str, list[tuple[int, list[int]]]] = {"lookup": [], "operand_copy": []}
        waits = any(t is not None and t.role == "wait" for t in truth)
        if waits:
            out |= {"correction_copy": [], "corrected_copy": []}

        def first(pos: int) -> int:  # the first token of pos's step
            while pos > 0 and truth[pos - 1] is not None and truth[pos - 1].role != "end":
                pos -= 1
            return pos

        def opener(pos: int) -> str:
            return truth[first(pos)].role if truth[pos] is not None else ""

        def redone(k: int) -> list[int]:  # the operand of the step a wait step redoes
            end = first(k) - 1
            if end < 1 or truth[end - 1] is None:
                return []
            return [j for j in range(first(end - 1), end) if truth[j].role == "operand"]

        for k, t in enumerate(truth):
            if t is None or t.role != "eq":
                continue
            if t.phase == "resolve":
                out["lookup"].append((k, spans[t.statement]))
            elif t.phase == "compute" and t.source_pos >= 0 and truth[k - 1] is not None \
                    and truth[k - 1].role == "var":
                out["operand_copy"].append((k, [t.source_pos]))
                if waits and opener(k) == "wait":
                    out["correction_copy"].append((k, sorted({t.source_pos, *redone(k)})))
                elif waits and opener(t.source_pos) == "wait":
                    out["corrected_copy"].append((k, [t.source_pos]))
        return out

    def problems(self, n: int, *, depths: Sequence[int] = (1, 2, 3, 4),
                 seed: int = 0) -> list[dict]:
        """``n`` held-out problems, depths taken in turn: ids ``organism-SEED-DEPTH-K``."""
        depths = list(depths)
        if n < 1 or not depths:
            raise ConfigError(f"problems(n={n}, depths={depths}): give n >= 1 and a depth")
        per = {d: heldout_problems(d, -(-n // len(depths)), self.heldout_config, seed=seed)
               for d in depths}
        out = []
        for k in range(n):
            d = depths[k % len(depths)]
            prob = per[d][k // len(depths)]
            out.append({"id": f"{self.name}-{seed}-{d}-{k // len(depths)}", "prompt": prob.prompt,
                        "answer": prob.answer, "depth": d})
        return out

    def study_pair(self, model: Any, prompts: Sequence[str]) -> Any:
        """``change_constant`` on the root of the first prompt of depth >= 2 that parses."""
        for prompt in [*prompts, _PAIR_FALLBACK]:
            try:
                problem = problem_from_prompt(prompt)
            except ConfigError:
                continue
            if problem.depth < 2:
                continue
            root = problem.chain[0]
            const = next(s.const for s in problem.statements if s.var == root)
            for new in [(const + d) % 10 for d in (3, 1, 2, 4, 5, 6, 7, 8, 9)]:
                try:
                    return pairs.change_constant(model, prompt, root, new)
                except ConfigError:
                    continue
        raise ConfigError("no organism prompt gave a patching pair")  # the fallback always does


ORGANISM = OrganismTask()


def register() -> None:
    """Register the organism's name and task (idempotent)."""
    register_model("organism", organism_folder)
    register_task(ORGANISM)


__all__ = ["OrganismTask", "register", "ORGANISM"]
