"""(a) Capture every layer's ``hook_resid_post``: thinklens against three references.

1. Load the model twice: through ``thinklens.load`` (a TransformerBridge around an HF
   model; the bridge swaps the HF model's blocks for its own components) and as a plain
   HF model with eager attention, untouched, for the baseline. nnsight wraps a third,
   deep-copied plain model so that its module patching cannot touch the baseline.
2. Build ``--batch`` traces of exactly ``--tokens`` tokens each (no padding), and the
   same token ids as one ``[batch, tokens]`` tensor for the references.
3. Time, in interleaved rounds (order rotated each round), under ``torch.no_grad``:
   ``plain`` HF forward; ``bridge`` forward without hooks (how much the bridge itself
   costs); ``thinklens`` ``model.capture(traces, sites="blocks.*.hook_resid_post")``;
   ``tl`` ``bridge.run_with_cache(ids, names_filter=...hook_resid_post)``; ``nnsight``
   ``.trace(ids)`` saving ``model.layers[i].output`` (a tensor in transformers 5).
4. Report the median of each method's time divided by the plain forward's time in the
   same round, on the wall clock and on this process's CPU time (steadier on a shared
   CPU); check that every method captured the same residual stream.
5. With ``--profile``, cProfile one thinklens capture and list what it spends time on.

Target: thinklens <= 1.10x the plain forward.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import (
    SMOLLM2_FETCH,
    SMOLLM2_GGUF,
    command_line,
    exact_trace,
    interleaved,
    machine_info,
    print_profile,
    profile,
    save,
    start,
    summary,
    table,
)

SITES = "blocks.*.hook_resid_post"
PROMPT = "Think step by step: what is 17 * 23?"
BODY = ("First, 17 * 20 = 340. Then 17 * 3 = 51. So the total is 340 + 51 = 391. "
        "Let me check: 23 * 17 = 23 * 10 + 23 * 7 = 230 + 161 = 391. ")
SYMBOL_BODY = "a = 7 ; b = a + 2 . c = b - 4 ; d = c + 1 . "  # for the organism's tokenizer
METHODS = ("plain", "bridge", "thinklens", "tl", "nnsight")
# diagnostics (with --methods): where thinklens's time over the bridge goes
PARTS = ("hooks_noop", "hooks_copy", "dry_run")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(SMOLLM2_GGUF),
                   help="a .gguf file or HF model folder (e.g. one made by bench_attention.py "
                   f"--build-only); SmolLM2 by default, fetched with: {SMOLLM2_FETCH}")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16, ...)")
    p.add_argument("--batch", type=int, default=8, help="traces per forward pass")
    p.add_argument("--tokens", type=int, default=256, help="tokens per trace")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated, the first is the baseline of the ratios; besides "
                   f"{', '.join(METHODS)}: {PARTS[0]} (bridge forward with a no-op hook on each "
                   f"site), {PARTS[1]} (hooks that copy each trace's rows to CPU as capture "
                   f"does), {PARTS[2]} (capture's 2-token shape probe alone)")
    p.add_argument("--profile", action="store_true", help="cProfile one thinklens capture")
    p.add_argument("--out", default=None, help="JSON path (default results/capture-DEVICE.json)")
    return p.parse_args(argv)


def load(args):
    """(thinklens Model, plain HF model, plain HF model for nnsight, load seconds)."""
    from transformers import AutoModelForCausalLM

    import thinklens

    t0 = time.perf_counter()
    model = thinklens.load(args.model, device=args.device, dtype=args.dtype)
    t_tl = time.perf_counter() - t0
    kw = {"dtype": model.dtype, "attn_implementation": "eager"}
    if args.model.endswith(".gguf"):
        folder, name = args.model.rsplit("/", 1)
        plain = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kw)
    else:
        plain = AutoModelForCausalLM.from_pretrained(args.model, **kw)
    plain = plain.to(args.device).eval()
    return model, plain, copy.deepcopy(plain), t_tl


def inputs(model, batch: int, tokens: int):
    rendered = model.render_prompt(PROMPT)
    body = BODY if len(model.tokenizer) > 1000 else SYMBOL_BODY
    traces = [exact_trace(model.tokenizer, rendered_prompt=rendered, prompt=PROMPT,
                          body=body[i % 7:], length=tokens, model_name=model.name,
                          trace_id=f"bench-{i}") for i in range(batch)]
    ids = torch.tensor([t.token_ids for t in traces], device=model.device)
    return traces, ids, torch.ones_like(ids)


def methods(model, plain, nn_model, traces, ids, mask, wanted):
    n_layers = model.config.n_layers

    def run_plain():
        with torch.no_grad():
            return plain(input_ids=ids, attention_mask=mask).logits

    def run_bridge():
        with torch.no_grad():
            return model.bridge(ids, attention_mask=mask)

    def run_thinklens():
        return model.capture(traces, sites=SITES, positions="all", batch_size=len(traces),
                             progress=False)

    def run_tl():
        with torch.no_grad():
            return model.bridge.run_with_cache(
                ids, names_filter=lambda n: n.endswith("hook_resid_post"))

    def run_nnsight():
        saved = []
        with torch.no_grad(), nn_model.trace(ids):
            for i in range(n_layers):
                saved.append(nn_model.model.layers[i].output.save())
        return saved

    sites = model.sites(SITES)
    rows = torch.arange(ids.shape[1], device=ids.device)

    def run_hooks(copy_rows: bool):
        got = {}

        def hook(name):
            def fn(x, hook):
                if copy_rows:  # what hooks/capture.py's site hook does
                    got[name] = [x[j, rows].detach().to("cpu", model.dtype).clone()
                                 for j in range(x.shape[0])]
                return x
            return fn

        with torch.no_grad(), model.hooks([(s, hook(s)) for s in sites]):
            model.bridge(ids, attention_mask=mask)
        return got

    def run_dry():
        from thinklens.hooks.capture import _site_shapes
        return _site_shapes(model, sites)

    every = {"plain": run_plain, "bridge": run_bridge, "thinklens": run_thinklens,
             "tl": run_tl, "nnsight": run_nnsight, "hooks_noop": lambda: run_hooks(False),
             "hooks_copy": lambda: run_hooks(True), "dry_run": run_dry}
    unknown = [k for k in wanted if k not in every]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; valid: {', '.join(every)}")
    return {k: every[k] for k in wanted}


def agreement(last, model) -> dict[str, float]:
    """Max |difference| from thinklens's capture, per method, over every layer."""
    ref = last["thinklens"].stack(SITES).values  # [trace, layer, pos, d_model]
    out = {}
    if "tl" in last:
        _, cache = last["tl"]
        got = torch.stack([cache[f"blocks.{i}.hook_resid_post"]
                           for i in range(model.config.n_layers)], 1)
        out["tl"] = float((got.cpu() - ref).abs().max())
    if "nnsight" in last:
        got = torch.stack([t if isinstance(t, torch.Tensor) else t[0] for t in last["nnsight"]],
                          1)
        out["nnsight"] = float((got.cpu() - ref).abs().max())
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    start(args)
    import nnsight

    print(f"loading {args.model} ...", flush=True)
    model, plain, nn_plain, t_load = load(args)
    nn_model = nnsight.TransformersModel(nn_plain, tokenizer=copy.deepcopy(model.tokenizer))
    traces, ids, mask = inputs(model, args.batch, args.tokens)
    print(f"{model}\n{args.batch} traces x {args.tokens} tokens; timing "
          f"{args.repeats} rounds ...", flush=True)
    fns = methods(model, plain, nn_model, traces, ids, mask, args.methods.split(","))
    times, last = interleaved(fns, repeats=args.repeats, warmup=args.warmup,
                              device=args.device, keep=("thinklens", "tl", "nnsight"))
    base = next(iter(fns))
    res = summary(times, base)
    diff = agreement(last, model) if "thinklens" in last else {}
    del last
    rows = [[n, f"{r['wall']['median_s']:.3f}", f"{r['wall']['ratio']:.3f}x",
             f"{r['cpu']['median_s']:.3f}", f"{r['cpu']['ratio']:.3f}x",
             f"{diff[n]:.1e}" if n in diff else ""] for n, r in res.items()]
    print(table(rows, ["method", "wall s (median)", f"wall / {base}", "CPU s (median)",
                       f"CPU / {base}", "max abs diff vs thinklens"]))
    prof = profile(fns["thinklens"]) if args.profile and "thinklens" in fns else None
    if prof:
        print_profile(prof, "one capture")
    path = save(f"capture-{args.device.split(':')[0]}", {
        "benchmark": "capture", "command": command_line(), "machine": machine_info(args.device),
        "model": str(model), "batch": args.batch, "tokens": args.tokens, "sites": SITES,
        "thinklens_load_s": t_load, "baseline": base, "results": res, "max_abs_diff_vs_thinklens": diff,
        "target_ratio": 1.10, "profile": prof}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
