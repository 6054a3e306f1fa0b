"""The one hook through which a model's own task reaches the general tools.

General code (``hooks/``, ``probes/``, ``circuits/``, the report, batch jobs) knows nothing
about any particular model. What belongs to one model's task — how its thinking splits
into sentences, how a sentence is tagged, the true answer of a prompt, per-token ground
truth, clean/corrupted pair builders, named label sets, held-out problems — lives in the
zoo, as a :class:`Task`, and reaches the tools through ``model.task``:

1. The zoo registers each bundled model when :mod:`thinklens` is imported:
   :func:`register_model` maps a name (``"organism"``) to a function that gives its folder,
   and :func:`register_task` adds a :class:`Task` that recognises the model's config.
2. :func:`thinklens.load` resolves a registered name to its folder; the :class:`Model` it
   builds asks :func:`task_for` which task (if any) matches its Hugging Face config and
   keeps it as ``model.task`` (``None`` for a model with no registered task).
3. General code asks the task, never the zoo: ``model.task.answer(trace)`` (the true
   answer), ``model.task.extract_answer(trace)`` (the answer the trace wrote),
   ``model.task.label_sets["organism.value"]``, ``model.task.pairs["change_constant"]``;
   each method of the base class (but ``extract_answer``, which has a generic default)
   raises a :class:`~thinklens.errors.ConfigError` that says what the model lacks and
   what to pass instead.

Example::

    model = thinklens.load("organism")
    model.task.name                      # 'organism'
    model.task.answer(model.think("a = 7 ; b = a + 2 ; ? b"))   # '9'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinklens.errors import ConfigError, did_you_mean
from thinklens.hooks.answers import generic_answer

Segmenter = Callable[[str], list[tuple[int, int]]]
Annotator = Callable[[str], str]


@dataclass(frozen=True)
class LabelSet:
    """A named label set: ``make(traces, rows)`` returns labels for ``probes.sweep`` at ``level``.

    ``make`` returns a callable ``(trace_index, trace, token) -> label | None`` (token
    level), a list of lists (sentence level) or a list (trace level).
    """

    name: str
    level: str  # "token" | "sentence" | "trace"
    make: Callable[[Sequence[Any], Sequence[dict] | None], Any]
    doc: str = ""


@dataclass
class Task:
    """What one model's task adds to the general tools; subclass it in the zoo.

    Attributes: ``name``; ``segmenter`` / ``annotator`` (how thinking is split into
    sentences and tagged; ``None`` = thinklens's defaults); ``label_sets`` (named labels
    for probe studies); ``pairs`` (clean/corrupted pair builders ``fn(model, ...) -> Pair``);
    ``example_prompts`` (prompts a study of this model starts from); ``study_labels`` (the
    label set a report probes for, or ``None``); ``description`` (one or two sentences on
    what the model's thinking does, for reports).
    """

    name: str
    segmenter: Segmenter | None = None
    annotator: Annotator | None = None
    label_sets: dict[str, LabelSet] = field(default_factory=dict)
    pairs: dict[str, Callable[..., Any]] = field(default_factory=dict)
    example_prompts: list[str] = field(default_factory=list)
    study_labels: str | None = None
    description: str = ""

    def matches(self, hf_config: Any) -> bool:
        """Whether a model with this Hugging Face config is one of this task's models."""
        return False

    def answer(self, trace: Any) -> str:
        """The true final answer of ``trace``'s prompt, as the model should write it."""
        raise ConfigError(f"the task {self.name!r} cannot tell the true answer of a prompt; "
                          "pass answers= (one per trace)")

    def extract_answer(self, trace: Any) -> str | None:
        """The final answer ``trace`` wrote, or ``None``; by default the last ``\\boxed{}``,
        else the last number (:func:`thinklens.hooks.answers.generic_answer`)."""
        return generic_answer(trace)

    def token_truth(self, trace: Any) -> list:
        """Per-token ground truth of ``trace`` (``None`` where unknown)."""
        raise ConfigError(f"the task {self.name!r} has no per-token ground truth")

    def sentence_truth(self, trace: Any) -> list:
        """Ground truth per thinking sentence of ``trace`` (its role, whether the answer
        depends on it; e.g. :func:`thinklens.zoo.backtrack.sentence_truth`)."""
        raise ConfigError(f"the task {self.name!r} has no per-sentence ground truth; the "
                          "organism 'organism-backtrack' has one")

    def completion(self, prompt: str) -> str:
        """The correct completion of ``prompt`` (thinking, ``</think>``, answer), for
        teacher-forced traces: ``Trace.from_text(model, prompt, task.completion(prompt))``
        puts the same tokens through every checkpoint of a training run."""
        raise ConfigError(f"the task {self.name!r} cannot write the correct completion of a "
                          "prompt; pass traces= (e.g. model.think_batch(prompts))")

    def attention_targets(self, trace: Any) -> dict[str, list[tuple[int, list[int]]]]:
        """Where the ground truth says attention must look in ``trace``: for each named
        kind (the organism's ``lookup``, ``operand_copy``), ``(query position, key
        positions)`` pairs; scored per head by :func:`thinklens.circuits.head_scores`."""
        raise ConfigError(f"the task {self.name!r} has no ground truth for attention; score "
                          "the generic kinds ('previous', 'duplicate', 'induction')")

    def problems(self, n: int, *, depths: Sequence[int] = (1, 2, 3, 4),
                 seed: int = 0) -> list[dict]:
        """``n`` held-out problems as rows ``{"id", "prompt", "answer", ...}``."""
        raise ConfigError(f"the task {self.name!r} has no problem generator; give prompts")

    def study_pair(self, model: Any, prompts: Sequence[str]) -> Any:
        """The clean/corrupted pair a report patches, built from one of ``prompts``."""
        raise ConfigError(f"the task {self.name!r} builds no patching pair; make one with "
                          "thinklens.circuits.make_pair(model, clean, corrupt, answer=, wrong=)")

    def pair(self, kind: str, model: Any, *args: Any, **kwargs: Any) -> Any:
        """Build a clean/corrupted pair with the builder called ``kind``."""
        if kind not in self.pairs:
            raise ConfigError(f"the task {self.name!r} has no pair builder {kind!r}."
                              f"{did_you_mean(kind, self.pairs)} Valid: "
                              f"{', '.join(self.pairs) or 'none'}")
        return self.pairs[kind](model, *args, **kwargs)


_MODELS: dict[str, Callable[[int | None], Path]] = {}
_TASKS: list[Task] = []


def register_model(name: str, folder: Callable[[int | None], Path]) -> None:
    """Make ``thinklens.load(name, checkpoint=k)`` load the folder ``folder(k)``."""
    _MODELS[name] = folder


def register_task(task: Task) -> None:
    """Add ``task``; a later registration of the same name replaces the earlier one."""
    _TASKS[:] = [t for t in _TASKS if t.name != task.name] + [task]


def registered_models() -> list[str]:
    """Names :func:`thinklens.load` resolves without a path or the hub."""
    return sorted(_MODELS)


def model_folder(name: str, checkpoint: int | None = None) -> Path | None:
    """Folder of a registered model (``None`` when ``name`` is not registered)."""
    fn = _MODELS.get(name)
    return None if fn is None else fn(checkpoint)


def task_for(hf_config: Any) -> Task | None:
    """The registered task whose models have this config, or ``None``."""
    return next((t for t in _TASKS if t.matches(hf_config)), None)


def task_named(name: str) -> Task:
    """The registered task called ``name`` (for jobs that need it before loading a model)."""
    for t in _TASKS:
        if t.name == name:
            return t
    names = [t.name for t in _TASKS]
    raise ConfigError(f"no task {name!r}.{did_you_mean(name, names)} Registered: "
                      f"{', '.join(names) or 'none'}")


__all__ = ["LabelSet", "Task", "register_model", "register_task", "registered_models",
           "model_folder", "task_for", "task_named"]
