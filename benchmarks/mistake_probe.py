"""Does organism-backtrack *know* when a step it wrote is wrong? A probe at the decision point.

``benchmarks/wait_eval.py`` shows that p(wait) at the ``.`` closing a compute step is the
same after a mistake and after a right step: the organism's output does not detect
mistakes. This asks whether its residual stream does (a probe, Alain & Bengio 2016; with
a shuffled-label control, Hewitt & Liang 2019):

1. ``--n`` held-out problems (depths 3–6), one trace each sampled at temperature 1.
2. Rows: the ``.`` closing every compute step that is not a ``wait`` step; label 1 where
   the step wrote a wrong result (``sentence_truth`` role ``mistake``), else 0.
3. ``probes.sweep`` over every layer's ``hook_resid_post`` at the ``.`` and at the
   result token before it (logistic, balanced class weights, traces split into train /
   test, bootstrap intervals over test traces), and the same rows' p(wait) as a
   one-number score (its AUROC against the label).
4. On the same rows: a probe for the value the step wrote (10 classes), and a positive
   control, the token that follows the ``.`` (what the model must predict there), so a
   failing probe is not a broken pipeline.

Writes ``benchmarks/results/mistake-probe-MODEL.json`` and prints the table::

    .venv/bin/python benchmarks/mistake_probe.py --n 400
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import thinklens  # noqa: E402
from thinklens import probes  # noqa: E402
from thinklens.probes.metrics import auroc  # noqa: E402


def decision_labels(model, traces, field: str = "mistake") -> list[list]:
    """Per trace, per token, at the '.' closing a (non-wait) compute step: 1 / 0 where it
    wrote a wrong / right result (``field="mistake"``), the value it wrote
    (``"written"``) or the id of the token after the '.' (``"next"``); None elsewhere."""
    out = []
    for t in traces:
        row: list = [None] * len(t.token_ids)
        for s in model.task.sentence_truth(t):
            if s.kind == "compute" and not s.text.startswith("wait") and s.written is not None:
                row[s.end - 1] = (int(s.role == "mistake") if field == "mistake" else
                                  s.written if field == "written" else int(t.token_ids[s.end]))
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="organism-backtrack")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    common.setup_threads(args.threads)
    model = thinklens.load(args.model)
    rows = model.task.problems(args.n, depths=[3, 4, 5, 6], seed=args.seed)
    traces = [t for t in model.think_batch([r["prompt"] for r in rows], temperature=1.0,
                                           seed=args.seed, progress=False) if not t.truncated]
    labels = decision_labels(model, traces)
    cap = model.capture(traces, sites="blocks.*.hook_resid_post", progress=False)
    res = probes.sweep(cap, "blocks.*.hook_resid_post", lambda i, tr, k: labels[i][k],
                       class_weight="balanced", positions=(0, -1))
    values = decision_labels(model, traces, "written")
    written = probes.sweep(cap, "blocks.*.hook_resid_post", lambda i, tr, k: values[i][k],
                           positions=(0, -1))
    nxt = decision_labels(model, traces, "next")
    control = probes.sweep(cap, "blocks.*.hook_resid_post", lambda i, tr, k: nxt[i][k])
    wait_id = model.tokenizer.convert_tokens_to_ids("wait")
    ys, ps = [], []
    for t, lab in zip(traces, labels):
        keep = [k for k, y in enumerate(lab) if y is not None]
        if not keep:
            continue
        with torch.no_grad():
            logits = model.bridge(torch.tensor([t.token_ids], device=model.device))[0]
        p = logits[keep].float().softmax(-1)[:, wait_id]
        ys += [lab[k] for k in keep]
        ps += p.tolist()
    y = torch.tensor(ys, dtype=torch.float)
    p_auc = float(auroc(y, torch.tensor(ps)))
    print(f"{len(traces)} traces, {len(ys)} decision points, {int(y.sum())} after a mistake")
    print("mistake, at the '.':")
    print(res.table(0))
    print("mistake, at the result token:")
    print(res.table(1))
    print(f"p(wait) as a mistake detector: AUROC {p_auc:.3f}")
    print("the written value (10 classes), at the '.' and at the result token:")
    print(written.table(0))
    print(written.table(1))
    print("positive control, the token after the '.', at the '.':")
    print(control.table(0))
    common.save(f"mistake-probe-{Path(args.model).name}", {
        "machine": common.machine_info(), "args": vars(args), "traces": len(traces),
        "rows": len(ys), "mistakes": int(y.sum()), "p_wait_auroc": p_auc,
        "sweep": res.to_dict(), "written_value_sweep": written.to_dict(),
        "next_token_sweep": control.to_dict()}, args.out)


if __name__ == "__main__":
    main()
