"""Activation patching: thinklens's batched engine vs ``transformer_lens.patching``.

1. Load SmolLM2-135M-Instruct (GGUF) and make an IOI-style pair of ``--clean`` and
   ``--corrupt`` (names swapped, so the token lengths match; 15 tokens by default).
2. Sweep ``hook_resid_pre`` over every layer x position, denoising, metric = logit
   difference of ``--answer`` and ``--wrong`` at the last position:
   ``transformer_lens`` = ``get_act_patch_resid_pre`` on the TransformerBridge, one forward
   pass per cell (30 x 15 = 450); ``thinklens`` = ``thinklens.circuits.patching.patch``,
   the cells as rows of batched passes (its clean and corrupted runs included).
3. Interleaved rounds (``--repeats``), the ratio of the medians over rounds of the paired
   times, and the largest difference between the two result grids.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import (
    SMOLLM2_FETCH,
    SMOLLM2_GGUF,
    command_line,
    interleaved,
    machine_info,
    print_profile,
    profile,
    save,
    start,
    summary,
    table,
)

CLEAN = "When John and Mary went to the store, John gave a cold drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a cold drink to"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(SMOLLM2_GGUF),
                   help=f"a .gguf file, HF folder or name; SmolLM2 fetched with: {SMOLLM2_FETCH}")
    p.add_argument("--clean", default=CLEAN)
    p.add_argument("--corrupt", default=CORRUPT)
    p.add_argument("--answer", default=" Mary")
    p.add_argument("--wrong", default=" John")
    p.add_argument("--repeats", type=int, default=1, help="interleaved timing rounds")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per thinklens pass (default: from the memory budget, <= 128)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--profile", action="store_true", help="cProfile one thinklens sweep")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/"
                                               "patching-DEVICE.json)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    start(args)
    from transformer_lens import patching as tlp

    import thinklens
    from thinklens.circuits.pairs import make_pair
    from thinklens.circuits.patching import patch

    print(f"loading {args.model} ...", flush=True)
    t0 = time.perf_counter()
    model = thinklens.load(args.model, device=args.device, dtype=args.dtype)
    t_load = time.perf_counter() - t0
    pair = make_pair(model, args.clean, args.corrupt, answer=args.answer, wrong=args.wrong)
    ids_clean, ids_corrupt = pair.clean_ids[None].to(model.device), pair.corrupt_ids[None]
    a, w = pair.answer, pair.wrong

    def metric(logits):
        return logits[0, -1, a] - logits[0, -1, w]

    def reference():
        _, cache = model.bridge.run_with_cache(ids_clean)
        return tlp.get_act_patch_resid_pre(model.bridge, ids_corrupt.to(model.device), cache,
                                           metric).cpu()

    def ours():
        return patch(model, pair, "resid_pre", by=("layer", "pos"),
                     batch_size=args.batch_size, progress=False).values

    n_cells = model.config.n_layers * len(pair)
    print(f"{model}\n{len(pair)} tokens, {n_cells} cells; timing {args.repeats} round(s) ...",
          flush=True)
    with torch.no_grad():
        model.bridge(ids_clean)  # warm-up: first-call allocations
    times, last = interleaved({"transformer_lens": reference, "thinklens": ours},
                              repeats=args.repeats, warmup=0, device=args.device,
                              keep=("transformer_lens", "thinklens"))
    res = summary(times, "transformer_lens")
    diff = float((last["thinklens"] - last["transformer_lens"]).abs().max())
    speedup = 1 / res["thinklens"]["wall"]["ratio"]
    rows = [[n, f"{r['wall']['median_s']:.2f}", f"{1 / r['wall']['ratio']:.2f}x",
             f"{r['cpu']['median_s']:.2f}", f"{1 / r['cpu']['ratio']:.2f}x"]
            for n, r in res.items()]
    print(table(rows, ["method", "wall s (median)", "speed-up (wall)", "CPU s (median)",
                       "speed-up (CPU)"]))
    print(f"max |thinklens - transformer_lens| over the {n_cells} cells: {diff:.2e}")
    prof = profile(ours) if args.profile else None
    if prof:
        print_profile(prof, "one thinklens sweep")
    path = save(f"patching-{args.device.split(':')[0]}", {
        "benchmark": "patching", "command": command_line(), "machine": machine_info(args.device),
        "model": str(model), "tokens": len(pair), "cells": n_cells,
        "reference_forward_passes": n_cells, "clean": args.clean, "corrupt": args.corrupt,
        "thinklens_load_s": t_load, "baseline": "transformer_lens", "results": res,
        "speedup_wall": speedup, "speedup_cpu": 1 / res["thinklens"]["cpu"]["ratio"],
        "max_abs_diff": diff, "target_speedup": 5.0, "profile": prof}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
