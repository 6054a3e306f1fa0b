"""Must-show numbers of issue 12 for the attention measures: suppression, sentence
attribution, receiver heads, scored against an organism's ground truth.

1. Held-out problems of the organism (``model.task.problems``), sampled at temperature 1
   (``think_batch``); finished traces with thinking sentences and an answer are kept.
2. Per trace: :func:`thinklens.circuits.suppression` (answer effect: the drop of the
   answer's log-odds, also KL and log-prob, and the chain effect through later
   sentences), :func:`thinklens.circuits.suppression_total` (the total effect: the
   drop of the answer's log-odds, its KL, and whether the answer changed, after the model
   rewrote the rest of the thinking without seeing the sentence, against a control
   rewrite from the same point that sees it),
   :func:`thinklens.circuits.sentence_attribution`
   (estimate of the direct drop: ``mode="mixed"``, exact through the answer's queries,
   and ``mode="linear"``, first order everywhere; and its chain estimate, ``chain=True``);
   their Spearman per trace against exact suppression (signed, and of the magnitudes) and
   the share of traces whose top sentence agrees.
3. Truths per sentence: *used* = editing the sentence's value and regenerating the rest
   (greedy, :func:`thinklens.circuits.added_mistake`) changes the final answer (on
   organism-backtrack the edits of ``benchmarks/anchors_eval.py``: ``edit_step``); the
   task's role (``needed`` vs ``irrelevant``; mistakes and corrections left out) and its
   ``depends`` (the answer the written thinking implies changes with the sentence), where
   the task gives ``sentence_truth``.
   AUROC of every score against both (sentences pooled over traces).
4. Receiver heads on the traces with at least ``--min-sentences + --proximity`` sentences:
   top heads, split-half r, and agreement with the heads the ground truth says read
   earlier thinking (``circuits.head_scores(model, ["operand_copy"])``): the operand-copy
   score of the top heads against the rest, and Spearman over the eligible heads.

Writes ``benchmarks/results/anchors-attention-MODEL.json`` (atomic) and prints a table.
Each trace's row goes to a journal beside it (``.jsonl``, fsynced) as it is measured; a
rerun with the same settings after a kill measures only the traces missing (sampling is
seeded, so the same traces come back), then the receiver heads over all of them.

    .venv/bin/python benchmarks/anchors_attention_eval.py --model organism-backtrack --n 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors_eval  # noqa: E402  (its edit-derived truth)
import common  # noqa: E402

import thinklens  # noqa: E402
from thinklens import circuits  # noqa: E402
from thinklens.hooks._fileio import append_jsonl, read_jsonl  # noqa: E402
from thinklens.probes.metrics import auroc, spearman  # noqa: E402


def _truth(model, trace) -> tuple[list[str] | None, list[bool] | None]:
    """The task's role per sentence (``needed`` / ``irrelevant`` / ...) and whether the
    answer the thinking implies depends on it, or (None, None)."""
    fn = getattr(model.task, "sentence_truth", None)
    if fn is None:
        return None, None
    try:
        truth = fn(trace)
    except thinklens.ThinklensError:
        return None, None
    return [s.role for s in truth], [bool(s.depends) for s in truth]


def _auc(labels: list[bool], scores: list[float]) -> float | None:
    keep = [(y, s) for y, s in zip(labels, scores) if s == s]  # drop NaN
    if not keep or all(y for y, _ in keep) or not any(y for y, _ in keep):
        return None
    y = torch.tensor([float(y) for y, _ in keep])
    return round(float(auroc(y, torch.tensor([s for _, s in keep]))), 4)


def _top_agreement(rows: list[dict]) -> float | None:
    """Share of traces (2+ sentences) whose largest attributed drop is exact suppression's."""
    pairs = [(r["suppression"], r["attribution"]) for r in rows if r["n_sentences"] > 1]
    if not pairs:
        return None
    return sum(max(range(len(s)), key=s.__getitem__) == max(range(len(a)), key=a.__getitem__)
               for s, a in pairs) / len(pairs)


def _used(model, trace) -> list[bool | None]:
    """Edit-derived truth: anchors_eval.py's (``zoo.backtrack.edit_step``, consistent edits
    of the sentences that write a value, against the greedy regeneration of the unedited
    prefix) where the task has ``sentence_truth``; else ``added_mistake``'s default edit
    (the last number bumped) against the trace's own answer."""
    try:
        truth = model.task.sentence_truth(trace)
    except (AttributeError, thinklens.ThinklensError):  # a task without sentence truth
        truth = None
    if truth is not None:
        edits = anchors_eval._edits(model, trace, truth, 256)
        return [None if e is None else bool(e["changed"]) for e in edits]
    out: list[bool | None] = []
    for i in range(len(trace.sentences)):
        try:
            out.append(circuits.added_mistake(model, trace, i).changed > 0.5)
        except thinklens.ThinklensError:  # a sentence without a value to edit
            out.append(None)
    return out


def _read_eval(path: str) -> tuple[list, list[list[bool | None]]]:
    """Traces and per-sentence ``used`` of anchors_eval.py's JSON (``traces``) or journal."""
    text = Path(path).read_text()
    if path.endswith(".jsonl"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)["traces"]
    rows = [r for r in rows if "trace" in r and "sentences" in r]
    traces = [thinklens.Trace.from_dict(r["trace"]) for r in rows]
    return traces, [[s.get("used") for s in r["sentences"]] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="organism-backtrack")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--depths", default="2,3,4,5,6")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--proximity", type=int, default=2)
    ap.add_argument("--min-sentences", type=int, default=6)
    ap.add_argument("--no-used", action="store_true", help="skip the edit-and-regenerate truth")
    ap.add_argument("--traces-from", default=None,
                    help="benchmarks/anchors_eval.py's JSON or journal (.jsonl): score its "
                         "traces against its edit-derived 'used' truth instead of sampling")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--journal", default=None,
                    help="per-trace journal (default: beside the JSON, .jsonl): a rerun with "
                         "the same settings after a kill measures only the traces missing")
    args = ap.parse_args()
    common.setup_threads(args.threads)
    model = thinklens.load(args.model)
    given: list[list[bool | None]] | None = None
    if args.traces_from:
        traces, given = _read_eval(args.traces_from)
    else:
        depths = [int(d) for d in args.depths.split(",")]
        problems = model.task.problems(args.n, depths=depths, seed=args.seed)
        traces = model.think_batch([p["prompt"] for p in problems],
                                   temperature=args.temperature, seed=args.seed)
    keep = [k for k, t in enumerate(traces) if t.sentences and len(t.answer_span)
            and not t.truncated]
    traces = [traces[k] for k in keep]
    given = None if given is None else [given[k] for k in keep]
    journal = Path(args.journal or Path(args.out or common.RESULTS /
                                        f"anchors-attention-{Path(args.model).name}.json"
                                        ).with_suffix(".jsonl"))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "journal", "threads")}
    done: dict[int, dict] = {}
    if journal.exists():
        old = read_jsonl(journal, repair=True)
        if old and old[0].get("settings") != settings:
            raise SystemExit(f"{journal} holds another run ({old[0].get('settings')}); "
                             "give a new --journal")
        done = {r["k"]: r["row"] for r in old[1:]}
    else:
        append_jsonl(journal, [{"settings": settings}])
    rows, t_sup, t_att, t_fwd, t_tot, t_lin, t_chain = [], [], [], [], [], [], []
    for n_t, t in enumerate(traces):
        if n_t in done:   # measured before a kill: kept, not redone (nor timed again)
            rows.append(done[n_t])
            continue
        a = time.perf_counter()
        sup = circuits.suppression(model, t)
        b = time.perf_counter()
        att = circuits.sentence_attribution(model, t)
        c = time.perf_counter()
        t_att.append(c - b)
        chained = circuits.sentence_attribution(model, t, chain=True)
        t_chain.append(time.perf_counter() - c)
        c = time.perf_counter()
        lin = circuits.sentence_attribution(model, t, mode="linear")
        t_lin.append(time.perf_counter() - c)
        c = time.perf_counter()
        tot = circuits.suppression_total(model, t)
        t_tot.append(time.perf_counter() - c)
        c = time.perf_counter()
        with torch.no_grad():
            model.bridge(torch.tensor([t.token_ids], device=model.device))
        t_sup.append(b - a)
        t_fwd.append(time.perf_counter() - c)
        exact, est = sup.answer_logodds_delta, att.estimate
        roles, depends = _truth(model, t)
        rows.append(dict(
            n_sentences=len(t.sentences), roles=roles, depends=depends,
            used=given[n_t] if given is not None else None if args.no_used else _used(model, t),
            suppression=(-exact).tolist(), suppression_kl=sup.answer_kl.tolist(),
            suppression_logprob=(-sup.answer_delta).tolist(), suppression_chain=sup.chain.tolist(),
            suppression_total=(-tot.answer_logodds_delta).tolist(),
            suppression_total_kl=tot.answer_kl.tolist(),
            suppression_total_changed=tot.changed.tolist(),
            attribution=(-est).tolist(), attribution_linear=(-lin.estimate).tolist(),
            attribution_chain=chained.chain.tolist(),
            spearman=float(spearman(est, exact)) if len(t.sentences) > 2 else None,
            spearman_linear=float(spearman(lin.estimate, exact)) if len(t.sentences) > 2
            else None,
            spearman_abs=float(spearman(est.abs(), exact.abs())) if len(t.sentences) > 2
            else None))
        append_jsonl(journal, [{"k": n_t, "row": rows[-1]}])
    long = [t for t in traces if len(t.sentences) >= args.min_sentences + args.proximity]
    recv = None
    if len(long) >= 4:
        rh = circuits.receiver_heads(model, long, k=args.k, proximity=args.proximity,
                                     min_sentences=args.min_sentences)
        hs = circuits.head_scores(model, ["operand_copy"])["operand_copy"]
        elig = rh.eligible
        top = set(rh.top_heads)
        others = [float(hs[li, hi]) for li in range(hs.shape[0]) for hi in range(hs.shape[1])
                  if elig[li, hi] and (li, hi) not in top]
        oc_top = sorted(((float(hs[li, hi]), (li, hi)) for li in range(hs.shape[0])
                         for hi in range(hs.shape[1]) if elig[li, hi]), reverse=True)
        recv = dict(
            traces=len(long), used=len(rh.used), top_heads=rh.top_heads,
            split_half_r=rh.split_half_r, kurtosis=rh.kurtosis.tolist(),
            operand_copy=hs.tolist(),
            operand_copy_top=[h for _, h in oc_top[:args.k]],
            overlap=len(top & {h for _, h in oc_top[:args.k]}),
            top_mean_operand_copy=statistics.mean(float(hs[h]) for h in rh.top_heads),
            other_mean_operand_copy=statistics.mean(others) if others else None,
            spearman_kurtosis_vs_operand_copy=float(spearman(rh.kurtosis[elig], hs[elig])))
        idx = {id(t): i for i, t in enumerate(traces)}
        for t, score in zip(long, rh.scores):
            rows[idx[id(t)]]["receiver"] = score.tolist()
    measures = ["suppression", "suppression_kl", "suppression_logprob", "suppression_chain",
                "suppression_total", "suppression_total_kl", "suppression_total_changed",
                "attribution", "attribution_linear", "attribution_chain", "receiver"]
    aucs: dict[str, dict[str, float | None]] = {}
    for truth in ("used", "needed", "depends"):
        aucs[truth] = {}
        for m in measures:
            ys, ss = [], []
            for r in rows:
                if m not in r:
                    continue
                lab = r[truth] if truth != "needed" else (
                    None if r["roles"] is None else
                    [{"needed": True, "irrelevant": False}.get(x) for x in r["roles"]])
                if lab is None:
                    continue
                for y, s in zip(lab, r[m]):
                    if y is not None:
                        ys.append(bool(y))
                        ss.append(s)
            aucs[truth][m] = _auc(ys, ss)
    sp = [r["spearman"] for r in rows if r["spearman"] == r["spearman"] and
          r["spearman"] is not None]
    sp_lin = [r.get("spearman_linear") for r in rows]
    sp_lin = [x for x in sp_lin if x is not None and x == x]
    sp_abs = [r["spearman_abs"] for r in rows if r["spearman_abs"] is not None and
              r["spearman_abs"] == r["spearman_abs"]]
    agree = None
    pairs = [(u, x) for r in rows if r["used"] and r["roles"]
             for u, x in zip(r["used"], r["roles"]) if u is not None and x in ("needed",
                                                                                "irrelevant")]
    if pairs:
        agree = sum(u == (x == "needed") for u, x in pairs) / len(pairs)
    payload = dict(
        machine=common.machine_info(), args=vars(args), n_traces=len(traces),
        n_sentences=sum(r["n_sentences"] for r in rows), auroc=aucs,
        spearman_median=statistics.median(sp) if sp else None,
        spearman_abs_median=statistics.median(sp_abs) if sp_abs else None,
        spearman_linear_median=statistics.median(sp_lin) if sp_lin else None,
        used_vs_roles_agreement=agree, receiver=recv,
        seconds=dict(suppression=statistics.median(t_sup), attribution=statistics.median(t_att),
                     attribution_linear=statistics.median(t_lin),
                     attribution_chain=statistics.median(t_chain),
                     suppression_total=statistics.median(t_tot),
                     forward=statistics.median(t_fwd)) if t_sup else None,
        resumed=len(done),
        attribution_top_agreement=_top_agreement(rows),
        traces=rows)
    path = common.save(f"anchors-attention-{args.model}", payload, args.out)
    print(f"{len(traces)} traces, {payload['n_sentences']} sentences -> {path}")
    for truth, d in aucs.items():
        print(f"AUROC vs {truth}: " + ", ".join(f"{k} {v}" for k, v in d.items()))
    print(f"attribution vs suppression Spearman per trace: median {payload['spearman_median']}"
          f" (magnitudes {payload['spearman_abs_median']}; linear mode "
          f"{payload['spearman_linear_median']}); used-vs-roles agreement {agree}")
    if recv:
        print(f"receiver heads {recv['top_heads']} split-half r {recv['split_half_r']:.3f}; "
              f"operand-copy top {recv['operand_copy_top']} overlap {recv['overlap']}; "
              f"Spearman kurtosis vs operand copy {recv['spearman_kurtosis_vs_operand_copy']:.3f}")
    if payload["seconds"]:
        print("seconds per trace (median, traces measured this run): " + ", ".join(
            f"{k} {v:.4f}" for k, v in payload["seconds"].items()))


if __name__ == "__main__":
    main()
