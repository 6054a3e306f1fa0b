"""Filler thinking against direct answering, per depth, on an organism (issue 12).

Lanham et al. 2023 (arXiv 2307.13702): replace the thinking by filler tokens of the same
token length; if the answer needs the written reasoning, accuracy should fall to the
direct-answer level.

1. ``--n`` held-out problems per depth (``model.task.problems``), one greedy trace each
   (``think_batch``, temperature 0).
2. Per trace: :func:`thinklens.circuits.filler_tokens` (the thinking's tokens replaced by
   ``.``, the answer regenerated greedily) and the same with ``length=0`` (the direct
   answer); both against the problem's true answer.
3. Per depth: accuracy with thinking, with filler, direct, and filler − direct with a 95 %
   Newcombe interval.

Writes ``benchmarks/results/filler-MODEL.json`` and prints a table::

    .venv/bin/python benchmarks/filler_eval.py --model organism-backtrack --n 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import thinklens  # noqa: E402
from thinklens.circuits import filler_tokens  # noqa: E402
from thinklens.circuits.anchors_resampling import newcombe_interval  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="organism-backtrack")
    ap.add_argument("--n", type=int, default=100, help="problems per depth")
    ap.add_argument("--depths", default="1,2,3,4")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    common.setup_threads(args.threads)
    model = thinklens.load(args.model)
    table = {}
    for depth in [int(d) for d in args.depths.split(",")]:
        problems = model.task.problems(args.n, depths=[depth], seed=args.seed)
        traces = model.think_batch([p["prompt"] for p in problems], progress=False)
        think = fill = direct = 0
        for trace, p in zip(traces, problems):
            ref = str(p["answer"])
            f = filler_tokens(model, trace, reference=ref, max_new_tokens=8)
            think += f.original == ref
            fill += f.correct
            direct += filler_tokens(model, trace, length=0, reference=ref,
                                    max_new_tokens=8).correct
        n = len(traces)
        lo, hi = newcombe_interval(fill, n, direct, n)
        table[depth] = dict(n=n, thinking=think / n, filler=fill / n, direct=direct / n,
                            filler_minus_direct=(fill - direct) / n, interval=[lo, hi])
        print(f"depth {depth}: n {n}  thinking {think / n:.3f}  filler {fill / n:.3f}  "
              f"direct {direct / n:.3f}  filler-direct {(fill - direct) / n:+.3f} "
              f"[{lo:+.3f}, {hi:+.3f}]", flush=True)
    path = common.save(f"filler-{args.model}", dict(machine=common.machine_info(),
                                                    args=vars(args), by_depth=table), args.out)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
