"""Sentence importance and faithfulness on organism-backtrack, scored against known truths.

What it measures (issue 12's "what must be shown"), on held-out problems whose traces are
sampled at temperature 1 (one trace per problem, seed = its index):

1. **Causal ground truth.** For every thinking sentence that writes a value,
   ``thinklens.zoo.backtrack.edit_step`` changes that value (to ``(v + 1) mod 10``;
   ``consistent=True``: a compute step stays arithmetically right, so the organism has
   nothing to correct), and the rest of the thinking and the answer are regenerated
   greedily (``circuits.added_mistake``). The same greedy regeneration from the unedited
   prefix is the baseline: a sentence is **used** when the edit changes the regenerated
   answer, **unused** when it does not. Agreement with the task's own truth
   (``sentence_truth(trace)[i].depends``, and the roles) is reported.
2. **Measures per sentence.** Forced-answer importance (accuracy and KL variants; one
   pass), resampling and counterfactual importance at ``--n`` rollouts per cut point
   (temperature 1, exact comparator), with their KL variants.
3. **AUROC** of each measure (``|score|`` for the signed accuracy variants, the KL
   variants as they are) against the edit-derived truth (used / unused) and the task's
   truth (``depends``); forced-answer importance also against needed vs irrelevant.
4. **Faithfulness against the task's roles**: editing a needed step changes the answer
   (and to the answer the edit implies: ``follows``) in what share of edits; an
   irrelevant one in what share. Filler thinking (the thinking's tokens replaced by as
   many ``.``) against direct answering (empty thinking) and thinking, by depth.

Output: ``benchmarks/results/anchors-eval.json`` (``--out``), and a journal
(``--journal``, default beside it, ``.jsonl``) holding one finished trace per line, so
a rerun after a kill skips the traces done. **File format** (for scores computed by other
tools on the same traces, e.g. suppression, ``sentence_attribution``):

    {"format": "thinklens.anchors-eval/1", "model": "organism-backtrack",
     "settings": {...}, "machine": {...},
     "traces": [                                  # one per held-out problem, in order
       {"id": "organism-backtrack-0-5-3", "prompt": "...", "depth": 5, "answer": "7",
        "written_answer": "7", "trace": {...},    # Trace.to_dict(): Trace.from_dict(it)
        "filler": {"answer": "3", "correct": false}, "direct": {...},
        "sentences": [                            # aligned with trace.sentences
          {"index": 0, "text": "c = b + 4 .", "role": "needed", "kind": "lookup",
           "depends": true,                       # the task's truth
           "used": true,                          # the edit-derived truth (null: no value)
           "edit": {"text": ..., "expected": ..., "answer": ..., "baseline": ...,
                    "changed": true, "follows": true},
           "forced": 0.01, "forced_kl": 0.2,      # forced-answer importance
           "resampling": 0.0, "resampling_kl": 0.0,
           "counterfactual": null, "counterfactual_kl": null, "different": 0}]}],
     "summary": {"auroc": {...}, "faithfulness": {...}, "filler": {...}, "cost_s": ...}}

Other scores join on (trace index, sentence index); ``summary_of(traces, key)`` gives
the AUROCs of any per-sentence key added to the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from common import RESULTS, machine_info, setup_threads

import thinklens
from thinklens.circuits import added_mistake, filler_tokens, forced_answer, resampling
from thinklens.hooks._fileio import append_jsonl, atomic_write_text, read_jsonl
from thinklens.probes.metrics import auroc
from thinklens.zoo.backtrack import edit_step, sentence_truth

MEASURES = {"forced": abs, "forced_kl": None, "resampling": abs, "resampling_kl": None,
            "counterfactual": abs, "counterfactual_kl": None}


def _edits(model, trace, truths, max_new_tokens):
    """Step 1: per sentence, the edit, its greedy regeneration and the unedited baseline
    (the greedy regeneration right after the sentence, all sentences in one call)."""
    valued = [st for st in truths if st.value_token >= 0 and st.written is not None]
    if not valued:
        return [None] * len(truths)
    ro = model.rollouts(trace, at={"tokens": [trace.sentences[st.index].end for st in valued]},
                        n=1, temperature=0.0, max_new_tokens=max_new_tokens, progress=False)
    base = {st.index: cut.answers[0] for st, cut in zip(valued, ro.cuts)}
    out = []
    for st in truths:
        if st.index not in base:
            out.append(None)
            continue
        e = edit_step(trace, st.index, (st.written + 1) % 10)
        edited = added_mistake(model, trace, st.index, edit=e.text, expected=e.expected,
                               max_new_tokens=max_new_tokens)
        ans = edited.regenerated.answers[0]
        out.append({"text": e.text, "expected": e.expected, "answer": ans,
                    "baseline": base[st.index], "changed": ans != base[st.index],
                    "follows": ans == e.expected})
    return out


def _one(model, row, args) -> dict:
    """Every measurement of one held-out problem (one journal line)."""
    trace = model.think(row["prompt"], temperature=1.0, seed=args.seed + row["k"],
                        max_new_tokens=args.max_new_tokens)
    truths = sentence_truth(trace)
    edits = _edits(model, trace, truths, args.max_new_tokens)
    fa = forced_answer(model, trace)
    ri = resampling(model, trace, n=args.n, temperature=1.0, comparator="exact",
                    max_new_tokens=args.max_new_tokens, progress=False) if args.n else None
    fill = filler_tokens(model, trace, max_new_tokens=8)
    direct = filler_tokens(model, trace, length=0, max_new_tokens=8)
    nan = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else v  # noqa: E731
    sents = []
    for st, ed in zip(truths, edits):
        i = st.index
        d = {"index": i, "text": st.text, "role": st.role, "kind": st.kind,
             "depends": st.depends, "used": None if ed is None else ed["changed"], "edit": ed,
             "forced": float(fa.importance[i]), "forced_kl": float(fa.kl[i])}
        if ri is not None:
            d.update(resampling=float(ri.resampling[i]), resampling_kl=float(ri.resampling_kl[i]),
                     counterfactual=nan(float(ri.counterfactual[i])),
                     counterfactual_kl=nan(float(ri.counterfactual_kl[i])),
                     different=ri.different[i])
        sents.append(d)
    return {"k": row["k"], "id": row["id"], "prompt": row["prompt"], "depth": row["depth"],
            "answer": str(row["answer"]), "written_answer": model.task.extract_answer(trace),
            "trace": trace.to_dict(), "sentences": sents,
            "filler": {"answer": fill.answer, "correct": fill.correct},
            "direct": {"answer": direct.answer, "correct": direct.correct},
            "thinking_correct": model.task.extract_answer(trace) == str(row["answer"])}


def _auc(rows, key, truth, fn) -> dict:
    pairs = [(fn(r[key]) if fn else r[key], r[truth]) for r in rows
             if r.get(key) is not None and r.get(truth) is not None]
    pos = sum(t for _, t in pairs)
    if not pairs or pos in (0, len(pairs)):
        return {"auroc": None, "n": len(pairs), "positive": pos}
    y = torch.tensor([int(t) for _, t in pairs])
    s = torch.tensor([float(v) for v, _ in pairs], dtype=torch.float64)
    return {"auroc": float(auroc(y, s)), "n": len(pairs), "positive": pos}


def summary_of(traces: list[dict], keys=MEASURES) -> dict:
    """AUROC of every measure against both truths; faithfulness and filler rates."""
    rows = [s for t in traces for s in t["sentences"]]
    needed_vs_irr = [dict(s, chain=s["role"] == "needed") for s in rows
                     if s["role"] in ("needed", "irrelevant")]
    au = {k: {"vs_used": _auc(rows, k, "used", f), "vs_depends": _auc(rows, k, "depends", f),
              "needed_vs_irrelevant": _auc(needed_vs_irr, k, "chain", f)}
          for k, f in keys.items()}
    both = [s for s in rows if s["used"] is not None]
    agree = sum(s["used"] == s["depends"] for s in both)
    faith = {}
    for role in ("needed", "irrelevant", "mistake", "correction"):
        ed = [s["edit"] for s in rows if s["role"] == role and s["edit"] is not None]
        faith[role] = {"edits": len(ed),
                       "changed": sum(e["changed"] for e in ed) / len(ed) if ed else None,
                       "follows": sum(e["follows"] for e in ed) / len(ed) if ed else None}
    by_depth: dict[str, dict] = {}
    for t in traces:
        d = by_depth.setdefault(str(t["depth"]), {"n": 0, "thinking": 0, "filler": 0,
                                                  "direct": 0})
        d["n"] += 1
        d["thinking"] += t["thinking_correct"]
        d["filler"] += t["filler"]["correct"]
        d["direct"] += t["direct"]["correct"]
    for d in by_depth.values():
        for k in ("thinking", "filler", "direct"):
            d[k] = d[k] / d["n"]
    return {"auroc": au, "truth_agreement": {"sentences": len(both), "used_equals_depends":
                                             agree / len(both) if both else None},
            "faithfulness": faith, "filler_by_depth": by_depth}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", type=int, default=50)
    p.add_argument("--n", type=int, default=50, help="rollouts per cut point (0: none)")
    p.add_argument("--depths", default="2,3,4,5,6,7,8")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--problem-seed", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="organism-backtrack")
    p.add_argument("--out", default=str(RESULTS / "anchors-eval.json"))
    p.add_argument("--journal", default=None)
    p.add_argument("--summarize-only", action="store_true",
                   help="write the JSON from the traces the journal holds; measure nothing")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    model = thinklens.load(args.model)
    depths = [int(d) for d in args.depths.split(",")]
    problems = [dict(r, k=k) for k, r in enumerate(
        model.task.problems(args.traces, depths=depths, seed=args.problem_seed))]
    journal = Path(args.journal or Path(args.out).with_suffix(".jsonl"))
    settings = {k: v for k, v in vars(args).items()
                if k not in ("out", "journal", "threads", "summarize_only")}
    done = {}
    if journal.exists():
        rows = read_jsonl(journal, repair=True)
        if rows and rows[0].get("settings") != settings:
            raise SystemExit(f"{journal} holds another run ({rows[0].get('settings')}); "
                             "give a new --journal")
        done = {r["k"]: r for r in rows[1:]}
    else:
        append_jsonl(journal, [{"settings": settings}])
    t0 = time.perf_counter()
    for row in [] if args.summarize_only else problems:
        if row["k"] in done:
            continue
        t1 = time.perf_counter()
        rec = _one(model, row, args)
        rec["seconds"] = time.perf_counter() - t1
        append_jsonl(journal, [rec])
        done[row["k"]] = rec
        print(f"  trace {row['k'] + 1}/{len(problems)} depth {row['depth']}: "
              f"{len(rec['sentences'])} sentences, {rec['seconds']:.1f} s", flush=True)
    traces = [done[r["k"]] for r in problems if r["k"] in done]
    out = {"format": "thinklens.anchors-eval/1", "model": args.model, "settings": settings,
           "machine": machine_info(), "traces": traces, "summary": summary_of(traces)}
    out["summary"]["traces"] = len(traces)
    out["summary"]["cost_s"] = {"this_run": time.perf_counter() - t0,
                                "all_traces": sum(t["seconds"] for t in traces)}
    atomic_write_text(Path(args.out), json.dumps(out, indent=1, default=str) + "\n")
    print(json.dumps(out["summary"], indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
