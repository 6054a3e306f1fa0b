"""(f) Rollouts: ``model.rollouts`` on one organism trace, every sentence, both engines.

1. Think one depth-4 organism problem (greedy); its thinking has ~11 sentences.
2. Methods, timed in interleaved rounds (``common.interleaved``):
   ``plain generate``: for each cut point, HF ``generate`` (SDPA, the same weights) with
   ``num_return_sequences=n`` on the trace's prefix, what a user would write by hand;
   ``rollouts hf`` / ``rollouts vllm``: ``model.rollouts(trace, at="all", n=n, ...)``, the
   whole call (Traces built, answers extracted, accuracy and intervals).
3. Report tokens/s (generated tokens up to eos), the ratio to plain ``generate`` in the
   same round, and the answers' agreement (accuracy per cut point).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics

import torch
from common import interleaved, machine_info, save, setup_threads, summary, table

import thinklens
from thinklens.hooks.engine_hf import plain_model

PROMPT = "h = f - 1 ; f = k + 6 ; k = 2 ; j = 9 ; ? h"


def _plain(model, plain, trace, n, max_new_tokens, temperature) -> int:
    eos, tokens = model.tokenizer.eos_token_id, 0
    for s in trace.sentences:
        x = torch.tensor([trace.token_ids[: s.start]])
        with torch.inference_mode():
            out = plain.generate(x, attention_mask=torch.ones_like(x), do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, num_return_sequences=n,
                                 pad_token_id=eos, eos_token_id=eos)
        for row in out[:, x.shape[1]:].tolist():
            tokens += row.index(eos) + 1 if eos in row else len(row)
    return tokens


def _rollouts(model, trace, n, max_new_tokens, temperature, engine) -> int:
    ro = model.rollouts(trace, at="all", n=n, temperature=temperature,
                        max_new_tokens=max_new_tokens, engine=engine, seed=0, progress=False)
    return sum(len(t.token_ids) - cp.position for cp in ro.cuts for t in cp.traces)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20, help="rollouts per sentence")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    model = thinklens.load("organism")
    trace = model.think(PROMPT, max_new_tokens=96)
    plain = plain_model(model.hf)
    fns = {"plain generate": lambda: _plain(model, plain, trace, args.n, args.max_new_tokens,
                                            args.temperature),
           "rollouts hf": lambda: _rollouts(model, trace, args.n, args.max_new_tokens,
                                            args.temperature, "hf")}
    if importlib.util.find_spec("vllm") is not None:
        fns["rollouts vllm"] = lambda: _rollouts(model, trace, args.n, args.max_new_tokens,
                                                 args.temperature, "vllm")
    tokens = {k: f() for k, f in fns.items()}  # warm-up (starts the vLLM engine) + counts
    times, _ = interleaved(fns, repeats=args.rounds, warmup=0)
    res = summary(times, "plain generate")
    rows = []
    for k in fns:
        wall = statistics.median(times["wall"][k])
        res[k]["tokens"] = tokens[k]
        res[k]["tok_s"] = tokens[k] / wall
        ratio = res[k]["wall"]["ratio"]
        rows.append([k, len(trace.sentences), args.n, tokens[k], f"{wall:.2f}",
                     f"{tokens[k] / wall:.0f}", f"{ratio:.2f}"])
    print(table(rows, ["method", "cut points", "n", "tokens", "wall s", "tok/s",
                       "time / plain"]))
    ro = model.rollouts(trace, at="all", n=args.n, temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens, seed=0, progress=False)
    payload = {"machine": machine_info(), "args": vars(args), "trace_tokens": len(trace),
               "sentences": len(trace.sentences), "results": res,
               "accuracy_hf": [cp.accuracy for cp in ro.cuts]}
    model.close()
    path = save("rollouts-cpu", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
