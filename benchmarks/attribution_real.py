"""Sentence attribution on a real model: its estimate against exact suppression, per trace.

The organisms' numbers (RESULTS (o)) come from 4-layer models whose answer copies one
step. This checks the same comparison on SmolLM2-135M-Instruct (the de-quantized folder
``.cache/smollm2-hf``, else the GGUF file):

1. The first ``--n`` bundled problems (:func:`thinklens.report.problems.bundled_problems`),
   answered greedily step by step (``think_batch``, ``thinking="auto"``: SmolLM2 has no
   tags, so its answer's sentences are the thinking); traces with at least 3 sentences
   and an answer are kept.
2. Per trace: exact :func:`thinklens.circuits.suppression` (answer effects only,
   ``matrix=False``) and :func:`thinklens.circuits.sentence_attribution` in both modes
   (``"mixed"``, the default, and ``"linear"``). Spearman of each estimate against the
   exact change of the answer's log-odds, and whether the top sentence agrees.

Writes ``benchmarks/results/attribution-real.json`` and prints the medians.

    .venv/bin/python benchmarks/attribution_real.py --n 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import thinklens  # noqa: E402
from thinklens import circuits  # noqa: E402
from thinklens.probes.metrics import spearman  # noqa: E402
from thinklens.report.problems import bundled_problems  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    common.setup_threads(args.threads)
    src = common.CACHE / "smollm2-hf"
    model = thinklens.load(str(src if src.exists() else common.SMOLLM2_GGUF))
    rows = bundled_problems(args.n)
    traces = model.think_batch([r["prompt"] for r in rows], max_new_tokens=args.max_new_tokens,
                               progress=False)
    keep = [t for t in traces if len(t.sentences) >= 3 and len(t.answer_span)
            and not t.truncated]
    out, seconds = [], {"suppression": [], "mixed": [], "linear": []}
    for t in keep:
        a = time.perf_counter()
        exact = circuits.suppression(model, t, matrix=False).answer_logodds_delta
        b = time.perf_counter()
        mixed = circuits.sentence_attribution(model, t).estimate
        c = time.perf_counter()
        linear = circuits.sentence_attribution(model, t, mode="linear").estimate
        d = time.perf_counter()
        for k, v in zip(seconds, (b - a, c - b, d - c)):
            seconds[k].append(v)
        out.append(dict(
            n_sentences=len(t.sentences), tokens=len(t.token_ids),
            exact=exact.tolist(), mixed=mixed.tolist(), linear=linear.tolist(),
            spearman_mixed=float(spearman(mixed, exact)),
            spearman_linear=float(spearman(linear, exact)),
            top_mixed=int(mixed.argmin()) == int(exact.argmin()),
            top_linear=int(linear.argmin()) == int(exact.argmin())))
    summary = {
        "traces": len(out),
        "spearman_median": {m: statistics.median(r[f"spearman_{m}"] for r in out)
                            for m in ("mixed", "linear")} if out else None,
        "top_agreement": {m: sum(r[f"top_{m}"] for r in out) / len(out)
                          for m in ("mixed", "linear")} if out else None,
        "seconds_median": {k: statistics.median(v) for k, v in seconds.items()} if out else None}
    payload = dict(machine=common.machine_info(), args=vars(args), model=model.name,
                   **summary, rows=out)
    path = common.save("attribution-real", payload, args.out)
    print(f"{len(out)} of {len(traces)} traces kept -> {path}")
    print({k: v for k, v in summary.items()})


if __name__ == "__main__":
    main()
