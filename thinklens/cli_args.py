"""The ``thinklens`` command line's argument definitions: one subcommand per job.

:func:`parser` builds the ``argparse`` tree that :func:`thinklens.cli.main` parses; each
subcommand's ``--help`` explains its job, its inputs and where its output goes.
"""

from __future__ import annotations

import argparse

from thinklens.jobs.config import EXAMPLE as study_example


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="thinklens",
        description="Mechanistic-interpretability workbench for reasoning models: generate "
                    "reasoning traces, capture activations and attention, train and evaluate "
                    "the bundled model organism.",
        epilog="Models: 'organism' (bundled, default), a Hugging Face name, a local folder, "
               "or a .gguf file.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    d = sub.add_parser("demo", help="the main job: think on a few organism problems, "
                       "capture every layer and sentence attention into a store",
                       description="Load a model (the bundled organism by default), think on a "
                       "few problems, capture every layer's residual stream and per-head "
                       "sentence×sentence attention into an on-disk store, and print a summary "
                       "and where the output went.")
    d.add_argument("--model", default="organism", help="model spec (default: organism)")
    d.add_argument("--out", default="thinklens-demo", help="output folder (default: %(default)s)")

    t = sub.add_parser(
        "think", help="generate reasoning traces for prompts into a JSONL traces file "
        "(resumable; no capture)",
        description="Read prompts (JSONL: one {\"prompt\": ..., \"id\": ...} per line, id "
        "optional), generate --samples traces of each with the chosen engine, and append them "
        "to --out as JSON lines (one trace per line; meta holds id, prompt_id, sample and the "
        "run's settings). Rerunning resumes: (prompt, sample) pairs already in --out are "
        "skipped, and a last line cut by a kill is dropped and regenerated. Sample j of the "
        "prompt on line k (from 0) is seeded SEED + k*SAMPLES + j, so with --samples 1 the file "
        "equals model.think_batch(prompts, seed=SEED). The files are checked before the model "
        "loads. Capture the traces later, anywhere, with: thinklens capture --traces OUT ...",
        epilog="Models that write no <think> tags (chat models such as SmolLM2): --thinking "
        "answer makes the completion up to its final answer (a \\boxed{...}, else the last "
        "line) the thinking; auto (default) does so when no tags are present.")
    t.add_argument("--model", default="organism", help="model spec (default: organism)")
    t.add_argument("--prompts", required=True, help="JSONL file of prompts")
    t.add_argument("--out", required=True, help="JSONL traces file (created or resumed)")
    t.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="hf: Hugging Face decoding on the model's weights (default); vllm: "
                        "the vLLM engine (pip install 'thinklens[vllm]')")
    t.add_argument("--samples", type=int, default=1,
                   help="traces per prompt, each with its own seed (default: 1; >1 needs "
                        "--temperature > 0)")
    t.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    t.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    t.add_argument("--max-new-tokens", type=int, default=256,
                   help="generation limit; a trace cut there is flagged truncated (default: 256)")
    t.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    t.add_argument("--thinking", choices=["auto", "tags", "answer"], default="auto",
                   help="where the thinking is: tags = <think>...</think>; answer = the "
                        "completion up to its final answer; auto = tags when present (default)")
    t.add_argument("--batch-size", type=int, default=64, help="sequences generated at once")
    t.add_argument("--chunk", type=int, default=64,
                   help="traces per saved round; a kill loses at most one round (default: 64)")
    t.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: auto)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser("capture", help="capture activations of prompts (generating traces) or "
                       "of a traces file into a store",
                       description="Either read prompts (--prompts, JSONL: one "
                       "{\"prompt\": ..., \"id\": ...} per line, id optional), generate a "
                       "reasoning trace for each and capture the chosen sites into the store at "
                       "--out; or read the traces `thinklens think` wrote (--traces) and capture "
                       "them as they are, without generating (no generation engine starts). "
                       "Rerunning resumes: traces already generated or stored are not "
                       "recomputed. The input file is checked before the model loads.")
    c.add_argument("--model", default="organism", help="model spec (default: organism)")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="JSONL file of prompts (generate, then capture)")
    src.add_argument("--traces", help="JSONL traces file from `thinklens think` (capture only)")
    c.add_argument("--sites", nargs="+", default=["blocks.*.hook_resid_post"],
                   help="hook names or globs (default: blocks.*.hook_resid_post)")
    c.add_argument("--out", required=True, help="store folder (created or resumed)")
    c.add_argument("--positions", default="all",
                   help="all | thinking | sentence_ends | last | prompt | answer")
    c.add_argument("--attention", choices=["none", "sentence"], default="none",
                   help="also store per-head sentence×sentence mean attention")
    c.add_argument("--max-new-tokens", type=int, default=None,
                   help="with --prompts: generation limit (default: 256)")
    c.add_argument("--temperature", type=float, default=None,
                   help="with --prompts: 0 = greedy (default)")
    c.add_argument("--seed", type=int, default=None, help="with --prompts: seed (default: 0)")
    c.add_argument("--thinking", choices=["auto", "tags", "answer"], default=None,
                   help="with --prompts: where the thinking is (see `thinklens think --help`; "
                        "default: auto)")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--dtype", default=None, help="stored dtype: float32 | float16 | bfloat16")
    c.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: auto)")
    c.add_argument("--budget", default=None, help="memory budget, e.g. 8GB (default: 60%% of free)")
    c.add_argument("--chunk", type=int, default=32,
                   help="with --prompts: prompts per round of generation + capture; each round "
                        "is saved before the next starts (default: 32)")

    pr = sub.add_parser(
        "probe", help="run a probing study from a TOML file: prompts -> traces -> store -> "
        "probes -> results JSON + figures",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run (or resume) the probing study described in CONFIG.toml: think on the "
        "prompts, capture the sites into OUT/store, fit every [[probe]] (all layers at once, "
        "with a shuffled-label control and bootstrap intervals) and write OUT/results.json, "
        "OUT/results/NAME.json and OUT/figures/. Rerunning after an interruption redoes "
        "nothing finished. Sharded: torchrun --nproc-per-node N -m thinklens probe CONFIG.toml",
        epilog=study_example)
    pr.add_argument("config", help="study file (TOML); keys: see the example below")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")

    r = sub.add_parser(
        "report", help="a full study of a model as one self-contained HTML page",
        description="Run a study on a model (the bundled organism by default) and write "
        "OUT/report.html: traces with their own answers, token- and sentence-level attention, "
        "thought anchors, probes with shuffled-label controls, the logit lens toward the "
        "model's own answer, activation patching by layer x position and by head on a "
        "counterfactual pair built from the model's own trace, an EAP-IG circuit with its "
        "faithfulness curve. The page holds plotly.js and works offline from disk; every "
        "figure is also written to OUT/figures/ as PDF and SVG. Any model gets every part "
        "that needs no ground truth, on --prompts, on --traces, or on the bundled "
        "grade-school problems; the organism keeps its ground-truth parts. About a minute "
        "on 2 CPU cores for the organism.")
    r.add_argument("--model", default="organism", help="model spec (default: organism)")
    r.add_argument("--out", default="thinklens-report", help="output folder (default: %(default)s)")
    rsrc = r.add_mutually_exclusive_group()
    rsrc.add_argument("--prompts", help="JSONL file of prompts to think on (one "
                      "{\"prompt\": ..., \"answer\": ...} per line, answer optional)")
    rsrc.add_argument("--traces", help="JSONL traces file (`thinklens think` writes one): "
                      "study these completions as they are, generating nothing")
    r.add_argument("--n-problems", type=int, default=None,
                   help="problems thought about (or traces studied); default 24 of the 40 "
                        "bundled problems (4 example prompts for the organism)")
    r.add_argument("--max-new-tokens", type=int, default=None,
                   help="thinking budget per problem (default: 96 organism, 160 others)")
    r.add_argument("--formats", default="pdf,svg",
                   help="figure files beside the page: comma-separated pdf, svg, png, or '' "
                        "for none (default: %(default)s)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")

    an = sub.add_parser(
        "anchors", help="thought anchors over a traces file: one score per thinking sentence "
        "and measure, one JSON line per trace (resumable)",
        description="Score every trace of --traces (a file `thinklens think` wrote) with the "
        "chosen sentence-importance measures of thinklens.circuits (Bogdan et al. 2025): "
        "forced answer, attention suppression (direct and chain effects), its total effect "
        "(the rest rewritten greedily without the sentence, against an unmasked rewrite), "
        "sentence attribution (its estimate from one cached pass, and a chain estimate from "
        "local masks), resampling and counterfactual "
        "importance (--n rollouts per cut point). Each trace's line is appended to --out "
        "and fsynced before the next starts; rerunning with the same settings scores only "
        "the traces not yet there. A trace that cannot be scored (no thinking sentences, "
        "no answer found) gets a line saying why.",
        epilog="Example: thinklens think --prompts p.jsonl --out t.jsonl --temperature 1 && "
        "thinklens anchors --model organism-backtrack --traces t.jsonl --out a.jsonl "
        "--measures forced,total,resampling --n 50")
    an.add_argument("--model", default="organism", help="model spec (default: organism)")
    an.add_argument("--traces", required=True, help="JSONL traces file (`thinklens think`)")
    an.add_argument("--out", required=True, help="JSONL scores file (created or resumed)")
    an.add_argument("--measures", default="forced,suppression,total,attribution",
                    help="comma-separated: forced, suppression, total, attribution, "
                         "resampling (default: %(default)s)")
    an.add_argument("--n", type=int, default=50,
                    help="resampling: rollouts per cut point (default: %(default)s)")
    an.add_argument("--temperature", type=float, default=1.0,
                    help="resampling: rollout temperature (default: %(default)s)")
    an.add_argument("--comparator", choices=["exact", "embedding"], default="exact",
                    help="resampling: when is a resampled sentence different: exact text, or "
                         "all-MiniLM-L6-v2 cosine < 0.8 (pip install 'thinklens[embeddings]')")
    an.add_argument("--max-new-tokens", type=int, default=256,
                    help="limit of each rollout and each total-effect rewrite (default: "
                         "%(default)s)")
    an.add_argument("--seed", type=int, default=0, help="resampling seed (default: 0)")
    an.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: auto)")
    an.add_argument("--no-progress", action="store_true", help="no progress bars")

    dy = sub.add_parser(
        "dynamics", help="one measurement (head scores, ICL score, a probe) across a model's "
        "training checkpoints: table + figures",
        description="Load each checkpoint of --model in turn (the bundled organism's shipped "
        "checkpoints and final weights, a folder of step-N checkpoints, or a hub model with "
        "--revisions), run --measure on it, and append the row to OUT/journal.jsonl; then write "
        "OUT/dynamics.json (the table by checkpoint) and OUT/figures/ (head scores as small "
        "multiples per checkpoint; chosen heads against the training step beside loss and "
        "accuracy). One model is in memory at a time; rerunning resumes the journal.")
    dy.add_argument("--model", default="organism",
                    help="bundled model, checkpoints folder, or hub name (default: organism)")
    dy.add_argument("--revisions", default=None,
                    help="comma-separated hub revisions, e.g. step1000,step2000 (Pythia)")
    dy.add_argument("--measure", default="heads",
                    help="heads | heads:KIND,KIND (previous, duplicate, induction, lookup, "
                         "operand_copy) | icl | icl:EARLY,LATE | probe:LABELS (default: heads)")
    dy.add_argument("--heads", default=None,
                    help="heads to follow in the step figure, e.g. 1.0,1.3 (default: the best "
                         "head at the last checkpoint)")
    dy.add_argument("--out", default="thinklens-dynamics", help="output folder (default: %(default)s)")
    dy.add_argument("--formats", default="html,svg",
                    help="figure files: comma-separated html, svg, pdf, png (default: %(default)s)")
    dy.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: auto)")
    dy.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sites", help="list a model's site (hook) names",
                       description="Print every site name of a model, one per line; --match "
                       "filters with a glob.")
    s.add_argument("--model", default="organism")
    s.add_argument("--match", default="*")

    o = sub.add_parser("organism", help="train, ship and evaluate the bundled organism",
                       description="The organism: a small Llama trained on variable-binding "
                       "chains with a written chain of thought (see thinklens.zoo.task).")
    osub = o.add_subparsers(dest="ocmd", metavar="ACTION")
    t = osub.add_parser("train", help="train (or resume) the organism",
                        description="Deterministic given --seed; resumable: rerun the same "
                        "command after an interruption. Writes a checkpoint every "
                        "--ckpt-every steps and log.jsonl (loss, held-out accuracy).")
    t.add_argument("--out", default="runs/organism")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=None, help="default: 2500")
    t.add_argument("--batch-size", type=int, default=None, help="default: 64")
    t.add_argument("--ckpt-every", type=int, default=None, help="default: 250")
    sh = osub.add_parser("ship", help="copy a run's final weights and checkpoints into the package",
                         description="Copy the final weights and the chosen checkpoints of a "
                         "training run into thinklens/zoo/organism/ as float16 safetensors, "
                         "with the training curve (curve.json).")
    sh.add_argument("--run", default="runs/organism")
    sh.add_argument("--checkpoints", default="250,750,1000,1500",
                    help="comma-separated steps to ship beside the final weights")
    sh.add_argument("--final", type=int, default=None,
                    help="step to ship as the final weights (default: the run's last step)")
    e = osub.add_parser("eval", help="accuracy by depth, with and without thinking",
                        description="Answer accuracy with thinking and direct (empty thinking), "
                        "by chain depth, and the accuracy of every value the thinking writes, on "
                        "held-out problems.")
    e.add_argument("--model", default="organism",
                   help="model spec(s), comma-separated (default: organism; the second "
                   "organism: organism-backtrack; both: organism,organism-backtrack)")
    e.add_argument("--checkpoint", type=int, default=None, help="a shipped checkpoint's step")
    e.add_argument("--n", type=int, default=1000, help="problems per depth (default: 1000)")
    e.add_argument("--depths", default="1,2,3,4")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


__all__ = ["parser"]
