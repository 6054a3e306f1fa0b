"""(p) Sentence attribution on long traces: blockwise vs eager attention, memory and time.

``circuits.sentence_attribution(mode="linear")`` (one forward + one backward pass) of a
SmolLM2-135M trace (its de-quantized folder, ``.cache/smollm2-hf``, else the GGUF file;
reasoning-like sentences closed by ``</think>``) at each ``--tokens`` length, with
``attention="blockwise"`` (:mod:`thinklens.hooks.weighted_attention`, no ``[T, T]`` kept)
and ``attention="eager"`` (the bridge's patterns, hooked) where its estimate fits
``--eager-limit``, and blockwise with ``checkpoint=True`` (blocks recomputed in the
backward pass) at the ``--checkpoint`` lengths. Each measurement runs in a fresh process (``common.child``): peak RSS
above the loaded model (``VmHWM`` reset after a warm-up), wall time, the estimate
``budget.attribution_peak`` and, for the shortest length, the largest difference between
the two estimates. One plain forward pass of the same trace (SDPA, plain module tree) is
timed in the same process as the baseline.

    python benchmarks/attribution_memory.py --tokens 1024 2048 4096
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench_anchors import BODY
from common import (
    CACHE,
    SMOLLM2_GGUF,
    child,
    exact_trace,
    machine_info,
    mb,
    peak,
    reset_peak,
    save,
    setup_threads,
    table,
)


def _measure(tokens: int, attention: str, threads: int, checkpoint: bool) -> dict:
    import torch

    import thinklens
    from thinklens import circuits
    from thinklens.hooks.budget import attribution_peak
    from thinklens.hooks.generate import engine_for

    setup_threads(threads)
    src = CACHE / "smollm2-hf"
    model = thinklens.load(str(src if src.exists() else SMOLLM2_GGUF))
    trace = exact_trace(model.tokenizer, rendered_prompt=model.render_prompt("What is 12 + 7?"),
                        body=BODY, length=tokens, model_name=model.name,
                        answer="\n</think>\n\n15")
    warm = exact_trace(model.tokenizer, rendered_prompt=model.render_prompt("What is 12 + 7?"),
                       body=BODY, length=128, model_name=model.name, answer="\n</think>\n\n15")
    circuits.sentence_attribution(model, warm, mode="linear", attention=attention,
                                  checkpoint=checkpoint)
    plain = engine_for(model, "hf").plain
    ids = torch.tensor([trace.token_ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        plain(input_ids=ids, logits_to_keep=1)
    forward_s = time.perf_counter() - t0
    base = reset_peak()
    t0 = time.perf_counter()
    att = circuits.sentence_attribution(model, trace, mode="linear", attention=attention,
                                        checkpoint=checkpoint, budget="1TB")
    wall = time.perf_counter() - t0
    return {"tokens": len(trace), "sentences": len(trace.sentences), "attention": attention,
            "checkpoint": checkpoint,
            "peak_bytes": peak() - base, "wall_s": wall, "forward_s": forward_s,
            "estimate_bytes": attribution_peak(model.config, len(trace), attention,
                                               checkpoint=checkpoint),
            "estimate": att.estimate.tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="*", default=[1024, 2048, 4096])
    p.add_argument("--eager-limit", default="8GB",
                   help="measure eager attention only where its estimate is below this")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--checkpoint", type=int, nargs="*", default=[],
                   help="lengths also measured blockwise with checkpoint=True")
    p.add_argument("--child", nargs=3, metavar=("TOKENS", "ATTENTION", "CKPT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_measure(int(args.child[0]), args.child[1], args.threads,
                                  args.child[2] == "1")))
        return
    import warnings

    warnings.filterwarnings("ignore")
    import thinklens
    from thinklens.hooks.budget import attribution_peak, parse_budget

    limit = parse_budget(args.eager_limit, thinklens.load("organism").device)
    cfg = None
    rows, out = [], []
    runs = [(n, a, False) for n in args.tokens for a in ("blockwise", "eager")]
    runs += [(n, "blockwise", True) for n in args.checkpoint]
    for n, attention, ck in runs:
        if attention == "eager":
            if cfg is None:
                src = CACHE / "smollm2-hf"
                cfg = thinklens.load(str(src if src.exists() else SMOLLM2_GGUF)).config
            if attribution_peak(cfg, n, "eager") > limit:
                rows.append([n, attention, "-", "-", mb(attribution_peak(cfg, n, "eager")),
                             "-", "skipped: estimate over --eager-limit"])
                continue
        r = child([__file__, "--child", str(n), attention, str(int(ck)), "--threads",
                   str(args.threads)], timeout=3600)
        if not ck:
            out.append(r)
        rows.append([r["tokens"], attention + (" + checkpoint" if ck else ""),
                     mb(r["peak_bytes"]), f"{r['wall_s']:.1f}", mb(r["estimate_bytes"]),
                     f"{r['estimate_bytes'] / r['peak_bytes']:.2f}",
                     f"{r['wall_s'] / r['forward_s']:.1f}x forward ({r['forward_s']:.2f} s)"])
        print(rows[-1], file=sys.stderr, flush=True)
    pairs = {}
    for r in out:
        pairs.setdefault(r["tokens"], {})[r["attention"]] = r["estimate"]
    diffs = {n: max(abs(a - b) for a, b in zip(v["blockwise"], v["eager"]))
             for n, v in pairs.items() if len(v) == 2}
    print(table(rows, ["tokens", "attention", "peak RSS", "wall s", "estimate",
                       "estimate / peak", "vs one forward"]))
    print("largest |blockwise - eager| of the estimates:", diffs)
    save("attribution-memory-cpu", {"machine": machine_info(), "rows": out,
                                    "max_abs_diff": diffs}, args.out)


if __name__ == "__main__":
    main()
