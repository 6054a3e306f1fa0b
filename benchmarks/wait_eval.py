"""Does organism-backtrack's ``wait`` depend on a mistake? p(wait) at each decision point.

At the ``.`` that closes a compute step the organism decides whether the next sentence
is ``wait`` (redo the step). A model that detects its mistakes puts more probability on
``wait`` after a wrong result than after a right one.

1. ``--n`` held-out problems (depths 3–6) sampled at temperature 1: p(wait) at the ``.``
   of every compute step that is not itself a ``wait`` step, split by the task's truth
   (``sentence_truth``: role ``mistake`` vs a right ``needed`` / ``irrelevant`` step).
2. Greedy traces of the first ``--n // 2`` problems with one compute step's result
   replaced by a random wrong digit (``zoo.backtrack.edit_step(consistent=False)``, the
   thinking cut after it): p(wait) at its ``.``.

Writes ``benchmarks/results/wait-MODEL.json``::

    .venv/bin/python benchmarks/wait_eval.py --n 300
    .venv/bin/python benchmarks/wait_eval.py --model runs/phase3/step-003600   # a checkpoint
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import thinklens  # noqa: E402
from thinklens.hooks import forward as fwd  # noqa: E402
from thinklens.zoo.backtrack import edit_step, sentence_truth  # noqa: E402


def _p_wait(model, trace, wait_id: int, ends: list[int]) -> list[float]:
    """p(next token = wait) at the last token of each sentence ending at ``ends``."""
    batch = fwd.pad(model, [list(trace.token_ids)], [0])
    logits = fwd.forward(model, batch, [], logits_at=[[e - 1 for e in ends]])[0]
    return logits.float().softmax(-1)[:, wait_id].tolist()


def _summary(xs: list[float]) -> dict:
    return {"n": len(xs), "mean": statistics.mean(xs) if xs else None,
            "above_half": sum(x > 0.5 for x in xs) / len(xs) if xs else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="organism-backtrack",
                    help="the organism, or a checkpoint folder of its training")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    common.setup_threads(args.threads)
    task_model = thinklens.load("organism-backtrack")
    model = task_model if args.model == "organism-backtrack" else thinklens.load(args.model)
    wait_id = model.tokenizer.convert_tokens_to_ids("wait")
    problems = task_model.task.problems(args.n, depths=[3, 4, 5, 6], seed=args.seed)
    prompts = [p["prompt"] for p in problems]
    own = {"mistake": [], "right": []}
    for t in model.think_batch(prompts, temperature=1.0, seed=args.seed, progress=False):
        if t.truncated or not t.sentences:
            continue
        truth = sentence_truth(t)
        idx = [k for k, s in enumerate(truth) if s.kind == "compute" and
               s.role in ("mistake", "needed", "irrelevant")]
        if idx:
            for k, p in zip(idx, _p_wait(model, t, wait_id, [t.sentences[k].end for k in idx])):
                own["mistake" if truth[k].role == "mistake" else "right"].append(p)
    rng, injected = random.Random(args.seed), []
    for t in model.think_batch(prompts[: args.n // 2], progress=False):
        truth = sentence_truth(t)
        idx = [k for k, s in enumerate(truth) if s.kind == "compute" and s.written is not None]
        if not idx:
            continue
        k = rng.choice(idx)
        wrong = rng.choice([d for d in range(10) if d != truth[k].written])
        edit = edit_step(t, k, wrong, consistent=False)
        text = " ".join([s.text for s in truth[:k]] + [edit.text])
        cut = thinklens.Trace.from_text(model, t.prompt, text)
        injected += _p_wait(model, cut, wait_id, [cut.sentences[k].end])
    out = {"own_mistake": _summary(own["mistake"]), "own_right": _summary(own["right"]),
           "injected_mistake": _summary(injected)}
    for k, v in out.items():
        print(f"{k}: n {v['n']}  mean p(wait) {v['mean']:.3f}  share above 0.5 "
              f"{v['above_half']:.3f}")
    path = common.save(f"wait-{Path(args.model).name}", {"machine": common.machine_info(),
                                                         "args": vars(args), **out}, args.out)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
