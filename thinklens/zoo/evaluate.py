"""Evaluate the organism: answer accuracy with and without thinking, and step accuracy.

1. Draw ``n`` held-out problems per depth (a seed stream training never uses).
2. With thinking: ``Model.think`` (greedy) from the chat template; the answer is the
   first token after ``</think>``. Every value the thinking writes (the root's constant
   in the resolve phase, each compute step's result) is compared with the ground truth,
   position by position; a missing or misplaced step counts as wrong.
3. Direct: the prompt is followed by ``</think>`` at once (empty thinking) and the
   answer is the greedy next token.

Both organisms: for ``organism-backtrack`` the held-out problems come from its own
generator (:mod:`thinklens.zoo.backtrack_task`, the model task's ``heldout_config``);
greedy thinking should be the plain chain (no detour, no mistake).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from thinklens.zoo import backtrack_task
from thinklens.zoo.backtrack_task import BacktrackConfig, BacktrackProblem
from thinklens.zoo.task import Problem, TaskConfig, generate


@dataclass
class DepthResult:
    depth: int
    n: int
    think_accuracy: float
    direct_accuracy: float
    step_accuracy: float
    n_steps: int
    truncated: int


def heldout_problems(depth: int, n: int, cfg: TaskConfig | BacktrackConfig | None = None,
                     seed: int = 12345) -> list[Problem | BacktrackProblem]:
    """Held-out problems; a :class:`BacktrackConfig` gives the second organism's (with no
    thinking: their ``answer`` is the true one)."""
    rng = random.Random(f"heldout-{seed}-{depth}")  # str seeds: disjoint from training's ints
    if isinstance(cfg, BacktrackConfig):
        return [backtrack_task.generate(rng, cfg, depth=depth, direct=True) for _ in range(n)]
    return [generate(rng, cfg or TaskConfig(), depth=depth) for _ in range(n)]


def written_values(thinking: str) -> list[tuple[str, int | None]]:
    """(variable, value) of each value the thinking writes, in order.

    The resolve phase writes the root's constant (``g = 7 .``); each compute step writes
    ``v = x op k = r``. Unparseable steps give ``None`` values.
    """
    out: list[tuple[str, int | None]] = []
    for step in thinking.split("."):
        t = step.split()
        if len(t) == 3 and t[1] == "=":
            out.append((t[0], int(t[2]) if t[2].isdigit() else None))
        elif len(t) == 7 and t[1] == "=" and t[5] == "=":
            out.append((t[0], int(t[6]) if t[6].isdigit() else None))
        elif len(t) not in (0, 5):
            out.append(("?", None))
    return out


def _direct_answers(model, problems: list) -> list[str]:
    texts = [model.render_prompt(p.prompt) + " </think>" for p in problems]
    ids = [model.encode(t) for t in texts]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, seq in enumerate(ids):
        groups[len(seq)].append(i)
    answers = [""] * len(problems)
    for idx in groups.values():
        for j in range(0, len(idx), 256):
            chunk = idx[j: j + 256]
            x = torch.tensor([ids[i] for i in chunk], device=model.device)
            with torch.no_grad():
                nxt = model.hf(x).logits[:, -1].argmax(-1).tolist()
            for i, tok in zip(chunk, nxt):
                answers[i] = model.tokenizer.convert_ids_to_tokens(tok)
    return answers


def evaluate(model, *, depths=(1, 2, 3, 4), n: int = 1000, seed: int = 12345,
             cfg: TaskConfig | BacktrackConfig | None = None,
             progress: bool = True) -> list[DepthResult]:
    """Accuracy by depth on ``n`` held-out problems each (see the module docstring);
    ``cfg`` defaults to the model's task's (the second organism's generator for it)."""
    cfg = cfg if cfg is not None else getattr(model.task, "heldout_config", None)
    results = []
    for depth in depths:
        problems = heldout_problems(depth, n, cfg, seed)
        traces = model.think_batch([p.prompt for p in problems], max_new_tokens=16 * depth + 16,
                                   progress=progress)
        hits = steps_ok = steps = truncated = 0
        for p, tr in zip(problems, traces):
            truncated += tr.truncated
            hits += tr.answer_text.strip().split(" ")[0] == str(p.answer)
            truth = p.step_values()
            got = written_values(tr.thinking_text)
            steps += len(truth)
            steps_ok += sum(1 for k, tv in enumerate(truth) if k < len(got) and got[k] == tv)
        direct = _direct_answers(model, problems)
        d_hits = sum(a == str(p.answer) for a, p in zip(direct, problems))
        results.append(DepthResult(depth, n, hits / n, d_hits / n, steps_ok / max(1, steps),
                                   steps, truncated))
    return results


def table(results: list[DepthResult]) -> str:
    """A Markdown table of :func:`evaluate`'s results."""
    rows = ["| depth | n | answer acc. (thinking) | answer acc. (direct) | step values acc. | truncated |",
            "|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r.depth} | {r.n} | {r.think_accuracy:.1%} | {r.direct_accuracy:.1%} | "
                    f"{r.step_accuracy:.1%} ({r.n_steps} steps) | {r.truncated} |")
    return "\n".join(rows)


def as_json(results: list[DepthResult]) -> list[dict]:
    return [asdict(r) for r in results]


__all__ = ["DepthResult", "heldout_problems", "written_values", "evaluate", "table", "as_json"]
