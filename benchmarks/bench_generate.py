"""(d) Generation: thinklens ``think_batch`` against plain Hugging Face ``generate``.

1. Load the model with ``thinklens.load`` and build the plain SDPA module tree on the
   bridge's own tensors (``thinklens.hooks.engine_hf.plain_model``): the baseline runs on
   the same weights. Recorded: memory the plain tree adds (RSS, or CUDA bytes) and how
   many of its parameters share storage with the bridge's.
2. Two workloads per model: ``1 sequence`` (greedy, one prompt) and ``N sampled`` (N
   continuations of one prompt at ``--temperature``).
3. Methods, from the :data:`METHODS` table (name -> function(ctx, workload) -> generated
   ids per row): ``plain generate`` (``generate`` with SDPA, ``num_return_sequences``),
   ``thinklens think_batch`` (the public call, Traces included), ``thinklens
   generate_ids`` (the engine alone: one Request with ``n`` rows, prefix computed once).
   The vLLM rows (when vllm imports): ``vllm direct`` (``LLM.generate`` with
   ``SamplingParams(n=N)`` on the same weights, started with the engine's settings),
   ``thinklens engine=vllm`` (``think_batch``, Traces included) and ``thinklens
   generate_ids vllm`` (the engine alone); engines start in the warm-up round, untimed.
   vLLM 0.32 reads no GGUF: for SmolLM2 its rows run on the same de-quantized weights
   saved once as a folder (``.cache/smollm2-hf``).
4. Interleaved rounds (order rotated, one warm-up round that also starts any engine);
   tokens are counted per row up to and including eos; a method's figure is the median
   over rounds of its tokens/s divided by plain generate's tokens/s in the same round,
   on the wall clock and on this process's CPU time (steadier on a shared machine).
5. Trace building is timed on its own (``build_trace`` over the last call's rows).

Target (issue 10): think_batch >= 0.9x plain generate on SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
from common import (
    CACHE,
    SMOLLM2_FETCH,
    SMOLLM2_GGUF,
    command_line,
    interleaved,
    machine_info,
    rss_bytes,
    save,
    setup_threads,
    table,
)

PROMPTS = {"organism": None,  # a held-out depth-3 problem, set in load()
           "smollm2": "Think step by step: what is 17 * 23?"}


# ---- methods: name -> fn(ctx, work) -> generated ids per row (eos included) -----------

def _plain_generate(ctx, work) -> list[list[int]]:
    x = torch.tensor([ctx.prompt_ids], device=ctx.model.device)
    kw = dict(max_new_tokens=work.max_new_tokens, num_return_sequences=work.n,
              attention_mask=torch.ones_like(x), pad_token_id=ctx.pad, eos_token_id=ctx.eos)
    if work.temperature > 0:
        kw.update(do_sample=True, temperature=work.temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    with torch.inference_mode():
        out = ctx.plain.generate(x, **kw)
    return [_until_eos(row, ctx.eos) for row in out[:, x.shape[1]:].tolist()]


def _think(model, ctx, work, **kw) -> list[list[int]]:
    """``think_batch``: ``n`` samples of the prompt (one prefix) when sampling, else the prompt
    ``n`` times (greedy)."""
    n = work.n if work.temperature > 0 else 1
    traces = model.think_batch([ctx.prompt] * (work.n // n), n=n,
                               max_new_tokens=work.max_new_tokens, temperature=work.temperature,
                               seed=0, progress=False, **kw)
    return [t.token_ids[t.prompt_span.end:] for t in traces]


def _think_batch(ctx, work) -> list[list[int]]:
    return _think(ctx.model, ctx, work, batch_size=max(64, work.n))


def _generate_ids(ctx, work) -> list[list[int]]:
    from thinklens.hooks.engine import Request, Sampling
    from thinklens.hooks.generate import generate_ids

    [rows] = generate_ids(ctx.model, [Request(ctx.prompt_ids, n=work.n, seed=0)],
                          Sampling(work.max_new_tokens, work.temperature), progress=False,
                          batch_size=max(64, work.n))
    return [c.ids for c in rows]


def _vllm_model(ctx):
    """The Model the vLLM rows run on: ``ctx.model`` itself, or for a GGUF file (which
    vLLM 0.32 cannot read) the same de-quantized weights saved once as a folder."""
    if "vmodel" not in ctx.__dict__:
        ctx.vmodel = ctx.model
        if str(ctx.model.source).endswith(".gguf"):
            import thinklens

            folder = CACHE / "smollm2-hf"
            if not (folder / "config.json").exists():
                ctx.plain.save_pretrained(str(folder))
                ctx.model.tokenizer.save_pretrained(str(folder))
            config = json.loads((folder / "config.json").read_text())
            if config.pop("quantization_config", None) is not None:  # the weights are float
                (folder / "config.json").write_text(json.dumps(config, indent=2))
            ctx.vmodel = thinklens.load(str(folder), device=str(ctx.model.device))
    return ctx.vmodel


def _vllm_direct(ctx, work) -> list[list[int]]:
    """vLLM's ``LLM.generate`` on the same weights, as a user of vLLM would call it."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if "llm" not in ctx.__dict__:  # the settings thinklens's engine starts vLLM with
        from vllm.platforms import current_platform

        m = _vllm_model(ctx)
        cpu = {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30} \
            if current_platform.is_cpu() else {}
        ctx.llm = LLM(model=m.source, dtype=str(m.dtype).removeprefix("torch."), seed=0,
                      enable_prefix_caching=True, **cpu)
    params = SamplingParams(n=work.n, max_tokens=work.max_new_tokens,
                            temperature=work.temperature, seed=0 if work.temperature else None,
                            detokenize=False)
    [out] = ctx.llm.generate([TokensPrompt(prompt_token_ids=ctx.prompt_ids)], params,
                             use_tqdm=False)
    return [list(c.token_ids) for c in out.outputs]


def _engine_vllm(ctx, work) -> list[list[int]]:
    """``think_batch(..., engine="vllm")``: the public call, Traces included."""
    return _think(_vllm_model(ctx), ctx, work, engine="vllm")


def _generate_ids_vllm(ctx, work) -> list[list[int]]:
    from thinklens.hooks.engine import Request, Sampling
    from thinklens.hooks.generate import generate_ids

    [rows] = generate_ids(_vllm_model(ctx), [Request(ctx.prompt_ids, n=work.n, seed=0)],
                          Sampling(work.max_new_tokens, work.temperature), engine="vllm",
                          progress=False)
    return [c.ids for c in rows]


METHODS: dict[str, Callable] = {
    "plain generate": _plain_generate,      # the baseline of every ratio: keep it first
    "thinklens think_batch": _think_batch,
    "thinklens generate_ids": _generate_ids,
    # vLLM (needs vllm importable; its engine works in other processes, so the CPU-time
    # ratio of these rows is not comparable: read the wall clock)
    "vllm direct": _vllm_direct,
    "thinklens engine=vllm": _engine_vllm,
    "thinklens generate_ids vllm": _generate_ids_vllm,
}
VLLM_METHODS = ("vllm direct", "thinklens engine=vllm", "thinklens generate_ids vllm")


def _until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


# ---- setup ----------------------------------------------------------------------------

def smollm2_path():
    found = [SMOLLM2_GGUF] if SMOLLM2_GGUF.exists() else \
        sorted(CACHE.glob("**/SmolLM2-135M-Instruct*.gguf"))
    return found[0] if found else None


def load(which: str, device: str) -> SimpleNamespace | None:
    """The context every method gets: model, plain tree, prompt, memory record."""
    import thinklens
    from thinklens.hooks.engine_hf import plain_model

    if which == "organism":
        from thinklens.zoo.evaluate import heldout_problems
        spec, prompt = "organism", heldout_problems(3, 1, seed=5)[0].prompt
    else:
        path = smollm2_path()
        if path is None:
            print(f"skipping smollm2: no GGUF file; fetch it with:\n  {SMOLLM2_FETCH}")
            return None
        spec, prompt = str(path), PROMPTS["smollm2"]
    t0 = time.perf_counter()
    model = thinklens.load(spec, device=device)
    load_s = time.perf_counter() - t0
    before = torch.cuda.memory_allocated() if device.startswith("cuda") else rss_bytes()
    plain = plain_model(model.hf)
    after = torch.cuda.memory_allocated() if device.startswith("cuda") else rss_bytes()
    ours = {n.replace("._original_component", ""): p.data_ptr()
            for n, p in model.hf.named_parameters(remove_duplicate=False)}
    theirs = dict(plain.named_parameters(remove_duplicate=False))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    tok = model.tokenizer
    return SimpleNamespace(
        name=which, model=model, plain=plain, prompt=prompt, load_s=load_s,
        prompt_ids=model.encode(model.render_prompt(prompt)), eos=tok.eos_token_id,
        pad=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        memory={"weights_bytes": weight_bytes, "plain_tree_added_bytes": after - before,
                "params_sharing_storage": sum(ours.get(n) == p.data_ptr()
                                              for n, p in theirs.items()),
                "params": len(theirs)})


def trace_build_s(ctx, rows: list[list[int]]) -> float:
    """Seconds to build one Trace per row, as think_batch does after generating."""
    from thinklens.hooks.trace import build_trace

    m, rendered = ctx.model, ctx.model.render_prompt(ctx.prompt)
    t0 = time.perf_counter()
    for ids in rows:
        build_trace(m.tokenizer, prompt=ctx.prompt, rendered_prompt=rendered,
                    completion_ids=ids, model_name=m.name, segmenter=m.segmenter,
                    annotator=m.annotator, finished=ctx.eos in ids)
    return time.perf_counter() - t0


def run(ctx, work, methods: list[str], rounds: int, device: str) -> dict:
    tokens: dict[str, list[int]] = {n: [] for n in methods}
    outputs: dict[str, list[list[int]]] = {}

    def wrap(name):
        def call():
            rows = METHODS[name](ctx, work)
            tokens[name].append(sum(map(len, rows)))
            outputs[name] = rows
        return call

    times, _ = interleaved({n: wrap(n) for n in methods}, repeats=rounds, device=device)
    base = methods[0]
    res = {}
    for n in methods:
        toks = tokens[n][-rounds:]  # the warm-up call is not timed
        res[n] = {"tokens": toks, "wall_s": times["wall"][n], "cpu_s": times["cpu"][n]}
        for clock, key in (("wall", ""), ("cpu", "_cpu")):
            rate = [k / t for k, t in zip(toks, times[clock][n])]
            base_rate = [k / t for k, t in zip(tokens[base][-rounds:], times[clock][base])]
            res[n]["tok_s" + key] = statistics.median(rate)
            res[n]["ratio" + key] = statistics.median(a / b for a, b in zip(rate, base_rate))
    res["_trace_build_s"] = trace_build_s(ctx, outputs[base])
    if work.temperature == 0:
        res["_same_tokens_as_baseline"] = {n: outputs[n] == outputs[base] for n in methods}
    return res


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="organism,smollm2", help="organism and/or smollm2")
    p.add_argument("--samples", type=int, default=100, help="rows of the sampled workload")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="of the sampled workload")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cpu")
    import importlib.util

    default = [m for m in METHODS
               if m not in VLLM_METHODS or importlib.util.find_spec("vllm") is not None]
    p.add_argument("--methods", default=",".join(default),
                   help=f"comma-separated, the first is the baseline; from: {', '.join(METHODS)}")
    p.add_argument("--out", default=None, help="JSON path (default results/generate-DEVICE.json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import warnings

    args = parse_args(argv)
    setup_threads(args.threads)
    warnings.filterwarnings("ignore")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    results = {"machine": machine_info(args.device), "command": command_line(),
               "args": vars(args), "models": {}}
    rows = []
    for which in args.models.split(","):
        ctx = load(which, args.device)
        if ctx is None:
            results["models"][which] = {"skipped": "no model file"}
            continue
        per = {"load_s": ctx.load_s, "memory": ctx.memory, "workloads": {}}
        for label, work in (("1 sequence", SimpleNamespace(n=1, temperature=0.0,
                                                           max_new_tokens=args.max_new_tokens)),
                            (f"{args.samples} sampled", SimpleNamespace(
                                n=args.samples, temperature=args.temperature,
                                max_new_tokens=args.max_new_tokens))):
            print(f"{which}, {label}:", flush=True)
            res = run(ctx, work, methods, args.rounds, args.device)
            per["workloads"][label] = res
            for n in methods:
                rows.append([which, label, n, f"{res[n]['tok_s']:.0f}", f"{res[n]['ratio']:.2f}",
                             f"{res[n]['ratio_cpu']:.2f}",
                             f"{statistics.median(res[n]['wall_s']):.3f}",
                             statistics.median(res[n]["tokens"])])
            rows.append([which, label, "(Trace building alone)", "", "", "",
                         f"{res['_trace_build_s']:.3f}", ""])
        results["models"][which] = per
        m = ctx.memory
        print(f"{which}: plain tree added {m['plain_tree_added_bytes'] / 1e6:.1f} MB for "
              f"{m['weights_bytes'] / 1e6:.1f} MB of weights; {m['params_sharing_storage']}/"
              f"{m['params']} parameters share the bridge's storage")
    print(table(rows, ["model", "workload", "method", "tok/s", "x plain", "x plain (cpu)",
                       "median s", "tokens"]))
    path = save(f"generate-{args.device}", results, args.out)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
