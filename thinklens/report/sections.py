"""The report's sections, each computed with the public thinklens APIs (see :mod:`.studies`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from thinklens import probes as P
from thinklens.circuits import atp, eap, faithfulness_curve, patch
from thinklens.errors import ConfigError
from thinklens.plots import (
    plot_attention,
    plot_attribution_scatter,
    plot_circuit,
    plot_faithfulness,
    plot_head_grid,
    plot_patching,
    plot_probe_by_layer,
    plot_sentence_attention,
    plot_trace,
)
from thinklens.report.page import Section, Table

_TEXT_CHARS = 400  # thinking shown per trace in the table; the figure has every sentence
TRACE_FIGURES = 4  # trace figures drawn at most (every trace is in the table)


def _needs_task(model: Any, what: str) -> str:
    task = f"its task ({model.task.name!r}) does not provide it" if model.task is not None \
        else "it has no registered task (thinklens.hooks.task)"
    return (f"Skipped: {what} needs ground truth from the model's task, and for "
            f"{model.name!r} {task}. Run `thinklens report` without --model to see it on "
            "the bundled organism.")


def _short(text: str, n: int = _TEXT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# ---- 1. traces ----------------------------------------------------------------------------

def traces(model: Any, trs: list, own: list | None = None, right: list | None = None,
           max_figures: int = TRACE_FIGURES) -> Section:
    """The traces table (prompt, thinking, the model's own final answer, whether it is
    correct, sentences, whether generation was cut at the token limit) and trace figures."""
    c = model.config
    tags = sum(t.meta.get("thinking") == "tags" for t in trs)
    how = ("the model writes its reasoning between <think> and </think>" if tags == len(trs)
           else "with no <think> tags, the completion up to its final answer is taken as the "
           "thinking" if tags == 0 else f"{tags} of {len(trs)} traces write <think> tags; "
           "in the others the completion up to the final answer is the thinking")
    s = Section(
        "The model and its traces",
        f"{model.name}: {c.n_layers} layers, {c.n_heads} heads, d_model {c.d_model}, "
        f"vocabulary {c.d_vocab}. Each prompt was answered greedily (or its trace given); "
        f"{how}; the thinking is cut into sentences (Thought Anchors' rule) and tagged by "
        "behaviour. 'Truncated' means generation stopped at the token limit. "
        + (model.task.description if model.task is not None else ""))
    own = own if own is not None else [None] * len(trs)
    cols = ["#", "prompt", "thinking", "answer", "own answer"]
    rows = [[k, t.prompt, _short(t.thinking_text), _short(t.answer_text.strip(), 120),
             "—" if a is None else a] for k, (t, a) in enumerate(zip(trs, own))]
    if right is not None:
        cols.append("correct")
        for r, ok in zip(rows, right):
            r.append("—" if ok is None else "yes" if ok else "no")
    cols += ["sentences", "truncated"]
    for r, t in zip(rows, trs):
        r += [len(t.sentences), "yes" if t.truncated else "no"]
    s.table = Table(cols, rows, mono=(1, 2, 3, 4))
    drawn = [k for k, t in enumerate(trs) if t.sentences][:max_figures]
    for k in drawn:
        s.figure(f"trace-{k}", plot_trace(trs[k]),
                 f"Trace {k}: thinking sentences coloured by tag.")
    notes = []
    empty = [k for k, t in enumerate(trs) if not t.sentences]
    if empty:
        notes.append(f"Traces {empty} hold no thinking sentences (nothing before the final "
                     "answer, or nothing between <think> and </think>), so they have no "
                     "trace figure.")
    more = len(trs) - len(empty) - len(drawn)
    if more > 0:
        notes.append(f"Figures of the first {len(drawn)} traces with sentences are drawn; "
                     f"{more} more are in the table.")
    if right is not None and any(ok is not None for ok in right):
        n_ok = sum(ok is True for ok in right)
        scored = sum(ok is not None for ok in right)
        notes.append(f"{n_ok} of {scored} answers are correct.")
    s.note = " ".join(notes) or None
    return s


# ---- 2. attention -------------------------------------------------------------------------

def attention(model: Any, trs: list, heads: list[tuple[int, int]],
              from_patching: bool) -> Section:

    k = next((k for k, t in enumerate(trs) if len(t.sentences) > 1),
             next((k for k, t in enumerate(trs) if t.sentences), 0))
    trace = trs[k]
    why = ("the two heads whose z activation matters most in the patching section"
           if from_patching else "two heads of the middle layer")
    s = Section(
        "Attention",
        f"Token-level attention of trace {k} for {why}: each row is a destination token, "
        "each column the source token it reads. Below, the mean attention of every head "
        "from each thinking sentence to each earlier sentence (pick the head in the "
        "dropdown); sentences that later ones attend to are candidate thought anchors.")
    cap = model.capture(trace, attention=heads, progress=False)
    for layer in sorted({lay for lay, _ in heads}):
        hs = [h for lay, h in heads if lay == layer]
        s.figure(f"attention-L{layer}", plot_attention(cap, layer=layer, heads=hs),
                 f"Layer {layer}, heads {hs}: token-level attention pattern.")
    if not trace.sentences:
        s.note = "No trace has thinking sentences, so there is no sentence-level view."
        return s
    sent = model.capture(trace, attention="sentence", progress=False)
    s.figure("sentence-attention", plot_sentence_attention(sent),
             "Sentence × sentence mean attention, every layer and head.")
    sa = sent["sentence_attention"].values[0].float()        # [layer, head, sentence, sentence]
    n = sa.shape[-1]
    if n > 1:
        below = torch.tril(torch.ones(n, n, dtype=torch.bool), -1)
        off = (sa * below).sum((-1, -2)) / below.sum()       # [layer, head]
        rows = [[lay, h, float(off[lay, h]), float(sa[lay, h].diagonal().mean())]
                for lay in range(sa.shape[0]) for h in range(sa.shape[1])]
        s.table = Table(["layer", "head", "to earlier sentences", "within sentence"], rows)
    return s


# ---- 3. probes and the logit lens ---------------------------------------------------------

def probes(model: Any, n_probe: int) -> Section:
    task = model.task
    if task is None or task.study_labels is None:
        return _skipped_probes(model)
    depths = (2, 3, 4)
    per = max(2, -(-n_probe // len(depths)))
    rows = sorted(task.problems(per * len(depths), depths=depths, seed=99),
                  key=lambda r: depths.index(r["depth"]))  # depth by depth
    prompts = [row["prompt"] for row in rows]
    trs = model.think_batch(prompts, max_new_tokens=96, progress=False)
    cap = model.capture(trs, sites="blocks.*.hook_resid_post", progress=False)
    labels = task.label_sets[task.study_labels]
    res = P.sweep(cap, "blocks.*.hook_resid_post", labels.make(trs, None), level=labels.level,
                  n_boot=100)
    s = Section(
        "Probes: where the computed value is (organism ground truth)",
        f"A logistic probe per layer reads the value a compute step is about to write "
        f"(ground truth from the task), at the '=' token before it, on {len(trs)} held-out "
        f"problems of depth 2-4 split by trace ({res.n_train} training rows, {res.n_test} test "
        f"rows from {res.n_test_traces} traces). The control probe is trained on shuffled "
        "labels; selectivity is the difference (Hewitt & Liang 2019). Intervals are 95% "
        "bootstrap intervals over test rows.")
    s.figure("probe-by-layer", plot_probe_by_layer(res),
             "Held-out accuracy per layer with the shuffled-label control.")
    acc, ci = res.metrics["accuracy"][0], res.ci["accuracy"][0]
    s.table = Table(["site", "accuracy", "95% CI low", "95% CI high", "control", "selectivity"],
                    [[site, float(acc[j]), float(ci[j, 0]), float(ci[j, 1]),
                      float(res.control["accuracy"][0, j]), float(res.selectivity[0, j])]
                     for j, site in enumerate(res.sites)], mono=(0,))
    return s


def _skipped_probes(model: Any) -> Section:
    return Section("Probes: where the computed value is",
                   "A probe sweep over layers for the value each thinking step computes.",
                   note=_needs_task(model, "this probe"))


# ---- 4. patching --------------------------------------------------------------------------

@dataclass
class Patching:
    pair: Any
    resid: Any
    z: Any
    section: Section


def patching(model: Any, prompts: list[str]) -> Patching | None:
    """Patching of the task's study pair (``model.task.study_pair``), or None without one."""
    if model.task is None:
        return None
    try:
        pair = model.task.study_pair(model, prompts)
    except ConfigError:
        return None
    resid = patch(model, pair, "resid_pre", by=("layer", "pos"), progress=False)
    z = patch(model, pair, "z", by=("layer", "head"), progress=False)
    clean = pair.clean_trace.prompt if pair.clean_trace is not None else ""
    corrupt = pair.corrupt_trace.prompt if pair.corrupt_trace is not None else ""
    s = Section(
        "Activation patching (the organism task's pair)",
        f"Clean: '{clean}'; corrupted: '{corrupt}' (each with its own correct thinking, "
        "from the task's ground truth). "
        "Each cell runs the corrupted input with one activation taken from the clean run "
        "(denoising) and reads the logit difference between the clean and the corrupted "
        "answer at the answer position, normalised so that 0 is the corrupted run and 1 the "
        f"clean one (clean {resid.clean:.2f}, corrupted {resid.corrupt:.2f}).\n\n"
        "By layer and position (resid_pre), the information moves from the changed "
        "constant through the written thinking to the answer; by layer and head (z, all "
        "positions at once), it shows which heads carry it.")
    s.figure("patching-resid-pre", plot_patching(resid), "resid_pre, layer × position.")
    s.figure("patching-z-heads", plot_head_grid(z), "z, layer × head (all positions patched).")
    zn = z.normalized()
    top = torch.topk(zn.abs().flatten(), min(5, zn.numel())).indices.tolist()
    rows = [["z", k // zn.shape[1], f"head {k % zn.shape[1]}", float(zn.flatten()[k])]
            for k in top]
    rn = resid.normalized()
    best = torch.topk(rn.abs().flatten(), min(5, rn.numel())).indices.tolist()
    rows += [["resid_pre", k // rn.shape[1], f"position {resid.labels['pos'][k % rn.shape[1]]}",
              float(rn.flatten()[k])] for k in best]
    s.table = Table(["site", "layer", "head or position", "normalised effect"], rows, mono=(2,))
    return Patching(pair, resid, z, s)


def skipped_patching(model: Any) -> Section:
    return Section("Activation patching",
                   "Patching between a clean and a corrupted organism problem.",
                   note=_needs_task(model, "patching (on the task's clean/corrupted pair)"))


# ---- 5. circuit ---------------------------------------------------------------------------

def circuit(model: Any, pair: Any, exact_z: Any = None, at_least: float = 0.8) -> Section:

    full = eap(model, pair, steps=5, progress=False)
    total = full.n_edges        # large graphs: 12 curve points instead of about 25
    sizes = None if total <= 5000 else sorted(
        {0, total, *torch.logspace(0, math.log10(total), 10).round().long().tolist()})
    curve = faithfulness_curve(model, pair, full, sizes, progress=False)
    n = curve.smallest(at_least) or min(20, full.n_edges)
    c = full.top(n=n)
    faith = c.faithfulness(model, pair)
    s = Section(
        "Circuit",
        "Every edge between components (the input, each attention head's query, key and "
        "value inputs, each MLP, the logits) scored by EAP-IG, edge attribution patching "
        "with integrated gradients over 5 points (Hanna et al. 2024), on the patching "
        f"section's pair. The circuit is the {n} highest-scoring edges of {full.n_edges}: "
        f"the fewest whose circuit reaches {at_least:.0%} faithfulness on the curve below. "
        "Faithfulness runs the clean input with every other edge fed its corrupted-run "
        "value: 1 recovers the full model's logit difference, 0 is the corrupted run; this "
        f"circuit's is {faith:.3f}.")
    s.figure("circuit-graph", plot_circuit(c),
             f"The {n}-edge circuit; width and colour by EAP-IG score.")
    s.figure("circuit-faithfulness", plot_faithfulness(curve),
             "Faithfulness of the top-n edges against n.")
    if exact_z is not None:
        layers = [int(x) for x in exact_z.labels["layer"]]
        ig = full.node_effects("z")
        ig = replace(ig, values=ig.values[layers], labels={**ig.labels, "layer": layers})
        estimates = {"AtP": atp(model, pair, "z", by=("layer", "head"), layers=layers),
                     "EAP-IG": ig}
        s.figure("attribution-vs-exact", plot_attribution_scatter(estimates, exact_z),
                 "Each head's effect estimated by AtP (one forward and one backward pass) "
                 "and by EAP-IG (its summed outgoing edge scores) against exact activation "
                 "patching of its output (the patching section's z grid).")
    s.table = Table(["sender", "receiver", "EAP-IG score"],
                    [[a, b, v] for a, b, v in c.edge_list()[:12]], mono=(0, 1))
    return s


def skipped_circuit(model: Any) -> Section:
    return Section("Circuit", "EAP-IG edge scores, a circuit and its faithfulness curve.",
                   note=_needs_task(model, "the circuit (found on the task's pair)"))


__all__ = ["Patching", "traces", "attention", "probes", "patching",
           "skipped_patching", "circuit", "skipped_circuit"]
