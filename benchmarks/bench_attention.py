"""(b) Sentence-level attention of every head on a long trace: memory and time.

1. Build (once, cached under ``.cache/bench-models/``) a random-weight Qwen2 model of the
   chosen shape with the organism's tokenizer, and one trace per length in ``--tokens``
   (symbol text like ``a = 7 ; b = a + 2 .``, cut into sentences at ``.`` by the
   organism's segmenter: one sentence per ~10 tokens).
2. Methods, each a no-grad pass over the same tokens:
   ``sdpa``      Hugging Face's own forward with SDPA attention, no hooks, on the
                 bridge's weights (``engine_hf.plain_model``: ``model.hf`` itself runs the
                 bridge's eager attention components): the floor of every ratio;
   ``forward``   the bridge's (eager) forward pass, no hooks;
   ``residual``  ``model.capture(trace, sites="blocks.*.hook_resid_post")`` (SDPA);
   ``sentence``  ``model.capture(trace, attention="sentence")``: every head's sentence x
                 sentence means, blockwise from q/k in the attention pass;
   ``vertical``  ``model.capture(trace, attention=["vertical", "columns"])``: vertical
                 scores and token column sums, no S x S kept;
   ``tl_cache``  ``bridge.run_with_cache(ids, names_filter=...hook_pattern)``: every
                 layer's full ``[head, T, T]`` pattern kept.
   Eager methods (``forward``, ``tl_cache``) run only up to ``--eager-max`` tokens: one
   layer's eager scores and probabilities are ``2 x heads x T^2`` (2 x 12.9 GB at 16k).
3. Peak memory: on CPU, each (method, length) runs in a fresh subprocess that loads the
   model, warms up on a short trace, trims the C heap, resets the kernel's peak-RSS
   counter and reads it after one pass (``common.reset_peak``); on CUDA, in this process
   with ``torch.cuda.max_memory_allocated``. "added" is the peak minus the memory in use
   just before the pass (model weights).
4. Time: all methods in this process, interleaved rounds, per length (each warmed up on
   a 64-token trace first); with ``--time-tokens none`` the single pass of each memory
   child is the time (one round, not interleaved: for 32k, where a round takes tens of
   minutes).
5. Check: at the shortest length, thinklens's sentence means equal the means computed
   from TransformerLens's cached patterns.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import time
import warnings
from pathlib import Path

import torch
from common import (
    CACHE,
    child,
    command_line,
    exact_trace,
    interleaved,
    machine_info,
    mb,
    peak,
    reset_peak,
    save,
    setup_threads,
    summary,
    table,
)

PRESETS = {  # shapes; R1-Distill-Qwen-1.5B's from its config.json
    "small": {"layers": 8, "d_model": 768, "heads": 12, "kv_heads": 2, "d_mlp": 2048,
              "vocab": 64, "tokens": "512,1024,2048"},
    "r1-1.5b": {"layers": 28, "d_model": 1536, "heads": 12, "kv_heads": 2, "d_mlp": 8960,
                "vocab": 151936, "tokens": "2048,4096,8192"},
}
METHODS = ("sdpa", "forward", "residual", "sentence", "vertical", "tl_cache")
EAGER = ("forward", "tl_cache")
PROMPT = "a = 7 ; ? b"
BODY = "a = 7 ; b = a + 2 . c = b - 4 ; d = c + 1 . "


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="model shape; the options below override it")
    for k in ("layers", "d_model", "heads", "kv_heads", "d_mlp", "vocab"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None,
                       help="(default: the preset's)")
    p.add_argument("--tokens", default=None,
                   help="comma-separated trace lengths (default: the preset's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per length")
    p.add_argument("--time-tokens", default=None,
                   help="lengths to time (default: all of --tokens; 'none' skips timing)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset; the first is the base of the ratios")
    p.add_argument("--eager-max", type=int, default=8192,
                   help="longest trace the eager methods (forward, tl_cache) run on")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--build-only", action="store_true",
                   help="build the random model folder, print its path and stop")
    p.add_argument("--in-process", action="store_true",
                   help="measure CPU memory in this process (not isolated; for smoke tests)")
    p.add_argument("--out", default=None, help="JSON path (default results/attention-DEVICE.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.tokens = [int(t) for t in str(args.tokens).split(",")]
    args.methods = args.methods.split(",")
    return args


def model_folder(args) -> Path:
    """A saved random-weight Qwen2 model of the requested shape (built once, seeded)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from thinklens.zoo.vocab import build_tokenizer

    name = (f"qwen2-L{args.layers}-d{args.d_model}-h{args.heads}-kv{args.kv_heads}"
            f"-mlp{args.d_mlp}-v{args.vocab}-{args.dtype}")
    folder = CACHE / "bench-models" / name
    if (folder / "config.json").exists():
        return folder
    tok = build_tokenizer()
    if args.vocab < len(tok):
        raise SystemExit(f"--vocab {args.vocab} < the organism tokenizer's {len(tok)} tokens")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.d_model,
                      intermediate_size=args.d_mlp, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=max(32768, max(args.tokens)),
                      tie_word_embeddings=False)
    hf = Qwen2ForCausalLM(cfg).to(getattr(torch, args.dtype))
    hf.config.architectures = ["Qwen2ForCausalLM"]
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load(args):
    import thinklens
    return thinklens.load(str(model_folder(args)), device=args.device, dtype=args.dtype)


def make_trace(model, tokens: int):
    # the organism's segmenter (a sentence ends at "."): once saved next to a Qwen2 config,
    # the organism tokenizer reloads as a Qwen2Tokenizer that decodes without spaces, and
    # the default segmenter, which wants whitespace after ".", would find one sentence
    from thinklens.zoo.organism import organism_segmenter

    return exact_trace(model.tokenizer, rendered_prompt=model.render_prompt(PROMPT),
                       prompt=PROMPT, body=BODY, length=tokens, model_name=model.name,
                       trace_id=f"attn-{tokens}", segmenter=organism_segmenter)


def runner(model, trace, method: str):
    from thinklens.hooks.engine_hf import plain_model

    ids = torch.tensor([trace.token_ids], device=model.device)

    def sdpa():  # Hugging Face's own SDPA modules on the bridge's weights (no bridge)
        plain = model.__dict__.get("_bench_plain")
        if plain is None:
            plain = model.__dict__["_bench_plain"] = plain_model(model.hf)
        with torch.no_grad():
            return plain(ids).logits

    def forward():
        with torch.no_grad():
            return model.bridge(ids)

    def residual():
        return model.capture(trace, sites="blocks.*.hook_resid_post", progress=False)

    def vertical():
        return model.capture(trace, attention=["vertical", "columns"], progress=False)

    def sentence():
        return model.capture(trace, attention="sentence", progress=False)

    def tl_cache():
        with torch.no_grad():
            return model.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))

    return {"sdpa": sdpa, "forward": forward, "residual": residual, "sentence": sentence,
            "vertical": vertical, "tl_cache": tl_cache}[method]


def _trim_heap() -> None:
    gc.collect()
    try:  # give freed small blocks back to the OS so that the peak starts clean
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(model, trace, method: str, device: str) -> dict:
    """Peak memory and time of one pass (after a warm-up on a 64-token trace)."""
    runner(model, make_trace(model, 64), method)()
    fn = runner(model, trace, method)
    _trim_heap()
    base = reset_peak(device)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        out = fn()
    except torch.OutOfMemoryError as e:
        return {"oom": True, "error": str(e).split("\n")[0], "base_bytes": base}
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    top = peak(device)
    kept = 0
    if method in ("sentence", "vertical", "residual"):
        kept = sum(out[k].values.nbytes for k in out.keys)
    elif method == "tl_cache":
        kept = sum(v.nbytes for v in out[1].values())
    del out
    return {"peak_bytes": top, "base_bytes": base, "added_bytes": top - base,
            "kept_bytes": kept, "seconds": seconds, "cpu_seconds": cpu,
            "sentences": len(trace.sentences)}


def check_agreement(model, trace) -> float:
    """Max |thinklens sentence means - means of TL's cached patterns| over all heads."""
    got = runner(model, trace, "sentence")()["sentence_attention"].values[0]  # [L, H, S, S]
    _, cache = runner(model, trace, "tl_cache")()
    avg = torch.zeros(len(trace.sentences), len(trace))
    for i, s in enumerate(trace.sentences):
        avg[i, s.start:s.end] = 1.0 / (s.end - s.start)
    ref = torch.stack([avg @ cache[f"blocks.{layer}.attn.hook_pattern"][0].float().cpu() @ avg.T
                       for layer in range(model.config.n_layers)])
    return float((got - ref).abs().max())


def theory(cfg, tokens: int, sentences: int) -> dict:
    return {"patterns_all_layers_fp32": cfg.n_layers * cfg.n_heads * tokens ** 2 * 4,
            "one_layer_pattern_fp32": cfg.n_heads * tokens ** 2 * 4,
            "sentence_means": cfg.n_layers * cfg.n_heads * sentences ** 2 * 4}


def run_child(args) -> None:
    method, tokens = args.child.split(":")
    model = load(args)
    print(json.dumps(measure(model, make_trace(model, int(tokens)), method, args.device)))


def memory(args, model) -> dict[str, dict[str, dict]]:
    """``{tokens: {method: measurement}}``."""
    out: dict[str, dict[str, dict]] = {}
    isolated = args.device == "cpu" and not args.in_process
    for tokens in args.tokens:
        for method in args.methods:
            if method in EAGER and tokens > args.eager_max:
                out.setdefault(str(tokens), {})[method] = {"skipped": "T > --eager-max"}
                continue
            print(f"  memory: {method} at T={tokens} ...", flush=True)
            if isolated:
                argv = [__file__, "--child", f"{method}:{tokens}", "--device", args.device,
                        "--eager-max", str(args.eager_max),
                        "--dtype", args.dtype, "--threads", str(args.threads),
                        "--tokens", ",".join(map(str, args.tokens)),
                        *[x for k in ("layers", "d_model", "heads", "kv_heads", "d_mlp", "vocab")
                          for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]]
                try:
                    got = child(argv)
                except RuntimeError as e:  # e.g. killed for memory
                    got = {"error": str(e)[-500:]}
            else:
                got = measure(model, make_trace(model, tokens), method, args.device)
            out.setdefault(str(tokens), {})[method] = got
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.child:
        return run_child(args)
    if args.build_only:
        return print(model_folder(args))
    model = load(args)
    cfg = model.config
    print(f"{model}\nlengths {args.tokens}", flush=True)
    mem = memory(args, model)
    if args.time_tokens is None:
        time_tokens = args.tokens
    elif args.time_tokens == "none":
        time_tokens = []
    else:
        time_tokens = [int(t) for t in args.time_tokens.split(",")]
    timing = {}
    for tokens in time_tokens:
        print(f"  timing at T={tokens} ...", flush=True)
        trace = make_trace(model, tokens)
        ok = [m for m in args.methods if "peak_bytes" in mem.get(str(tokens), {}).get(m, {})
              or (str(tokens) not in mem and not (m in EAGER and tokens > args.eager_max))]
        for m in ok:  # warm-up on a short trace (a warm-up round at 16k costs minutes)
            runner(model, make_trace(model, 64), m)()
        fns = {m: runner(model, trace, m) for m in ok}
        times, _ = interleaved(fns, repeats=args.repeats, warmup=0, device=args.device)
        timing[str(tokens)] = summary(times, ok[0])
    for tokens in args.tokens:  # untimed lengths: the memory children's single passes
        got = mem.get(str(tokens), {})
        base = got.get(args.methods[0], {}).get("seconds")
        if str(tokens) not in timing and base:
            cpu = got.get(args.methods[0], {}).get("cpu_seconds")
            timing[str(tokens)] = {m: {"wall": {"median_s": g["seconds"], "runs_s": [g["seconds"]],
                                                "ratio": g["seconds"] / base},
                                       "cpu": {"median_s": g["cpu_seconds"],
                                               "runs_s": [g["cpu_seconds"]],
                                               "ratio": g["cpu_seconds"] / cpu},
                                       "from": "memory child (one pass, not interleaved)"}
                                   for m, g in got.items() if "seconds" in g}
    diff = None
    if {"sentence", "tl_cache"} <= set(args.methods):
        diff = check_agreement(model, make_trace(model, min(args.tokens)))
    rows = []
    for tokens in args.tokens:
        for method in args.methods:
            m = mem[str(tokens)][method]
            t = timing.get(str(tokens), {}).get(method, {}).get("wall", {})
            rows.append([tokens, method, m.get("sentences", ""),
                         "OOM" if m.get("oom") else mb(m["peak_bytes"]) if "peak_bytes" in m
                         else "skipped" if "skipped" in m else "failed",
                         mb(m["added_bytes"]) if "added_bytes" in m else "",
                         mb(m["kept_bytes"]) if "kept_bytes" in m else "",
                         f"{t['median_s']:.2f}" if t else "",
                         f"{t['ratio']:.2f}x" if t else ""])
    print(table(rows, ["T", "method", "sentences", "peak MB", "added MB (peak - before)",
                       "kept MB (result)", "wall s (median)", f"time / {args.methods[0]}"]))
    if diff is not None:
        print(f"max |sentence means - TL patterns averaged| at T={min(args.tokens)}: {diff:.1e}")
    path = save(f"attention-{args.device.split(':')[0]}", {
        "benchmark": "attention", "command": command_line(),
        "machine": machine_info(args.device), "model": str(model),
        "shape": {k: getattr(args, k) for k in ("layers", "d_model", "heads", "kv_heads",
                                                 "d_mlp", "vocab", "dtype")},
        "memory_isolated": args.device == "cpu" and not args.in_process,
        "load_average": os.getloadavg(),
        "memory": mem, "timing": timing, "max_abs_diff_sentence_vs_tl": diff,
        "theory_bytes": {str(t): theory(cfg, t, mem[str(t)].get("sentence", {}).get(
            "sentences", 0)) for t in args.tokens}}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
