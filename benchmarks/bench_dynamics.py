"""(h) Dynamics: peak memory of a measurement over 5 checkpoints against one model.

1. Save one random-weight Qwen2 (``--layers`` x ``--d-model``, fp32, ~400 MB by default)
   and point ``--checkpoints`` folders ``step-N`` at it (symlinks: every load still
   allocates its own weights).
2. In a fresh process each (peak RSS reset after imports, ``common.reset_peak``):
   ``one``  — load one checkpoint and run the measure (head scores: previous-token and
   induction on ``--n`` repeated random sequences of ``--length`` tokens);
   ``run_dynamics`` — the same measure over every checkpoint, journaled;
   ``keep_all`` — the naive loop that keeps each loaded model (a list of models), the
   reference a careless script is.
3. Report each peak above the process after imports, and its ratio to ``one``.
   Time is the wall clock of each process's measured part (not interleaved: memory is
   what this benchmark is for).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

from common import child, command_line, machine_info, mb, peak, reset_peak, save, table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoints", type=int, default=5)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--n", type=int, default=2, help="repeated random sequences scored")
    p.add_argument("--length", type=int, default=30, help="tokens per copy")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _make(folder: Path, args) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from thinklens.zoo.vocab import build_tokenizer

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=39, hidden_size=args.d_model, intermediate_size=args.d_model * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=16,
                      num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    model.config.architectures = ["Qwen2ForCausalLM"]
    weights = folder / "weights"
    model.save_pretrained(str(weights))
    build_tokenizer().save_pretrained(str(weights))
    for k in range(args.checkpoints):
        (folder / f"step-{(k + 1) * 1000:06d}").symlink_to(weights)


def _child(args) -> dict:
    import torch
    torch.set_num_threads(1)
    from thinklens.jobs import dynamics as D

    folder = Path(args.folder)
    ckpts, _ = D.checkpoints(folder)
    measure = D.heads_measure(["previous", "induction"], n=args.n, length=args.length)
    gc.collect()
    base = reset_peak()
    t0 = time.perf_counter()
    if args.child == "one":
        m = ckpts[0].load(device="cpu")
        measure.fn(m)
    elif args.child == "run_dynamics":
        D.run_dynamics(ckpts, measure, out=folder / f"journal-{time.time_ns()}.jsonl",
                       progress=False, device="cpu")
    else:  # keep_all
        kept = []
        for c in ckpts:
            kept.append(c.load(device="cpu"))
            measure.fn(kept[-1])
    return {"peak": peak() - base, "seconds": time.perf_counter() - t0}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _make(folder, args)
        size = sum(p.stat().st_size for p in (folder / "weights").glob("*.safetensors"))
        runs = {}
        for what in ("one", "run_dynamics", "keep_all"):
            runs[what] = child([str(Path(__file__).resolve()), "--child", what, "--folder", str(folder),
                                "--n", str(args.n), "--length", str(args.length)])
    one = runs["one"]["peak"]
    rows = [[what, args.checkpoints if what != "one" else 1, mb(r["peak"]),
             f"{r['peak'] / one:.2f}", f"{r['seconds']:.1f}"] for what, r in runs.items()]
    print(f"weights per checkpoint: {mb(size)} MB (fp32)")
    print(table(rows, ["method", "checkpoints", "peak RSS above imports, MB", "/ one model",
                       "wall s"]))
    save("dynamics", {"machine": info, "command": command_line(), "weights_bytes": size,
                      "runs": runs})


if __name__ == "__main__":
    main()
