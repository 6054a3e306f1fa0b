"""The report's sections for any model: behaviour probes, the lens toward the model's own
answer, and patching on a pair built from its own trace (no ground truth needed).

1. **Behaviour probes.** The residual stream of every layer, read at the last token of
   each thinking sentence, probed for the sentence's behaviour tag (Thought Anchors'
   tags: planning, computation, verification, ...) and, where the prompts carry an
   answer, for whether the trace's final answer will be correct (read at its last
   sentence). Split by trace, shuffled-label control (Hewitt & Liang 2019), 95% bootstrap
   intervals over test traces (:func:`thinklens.probes.sweep`). Tags seen on fewer than
   :data:`MIN_ROWS` sentences are left out; a label set with fewer than :data:`MIN_TRACES`
   traces or one class only is not fitted, and the section says so.
2. **Logit lens toward the own answer** (nostalgebraist 2020): the model's final answer
   is extracted as rollouts extract it (the task's extractor, else the last
   ``\\boxed{}``, else the last number) and located in the completion; the lens follows
   that token, the one the model wrote, at every thinking token before it (completion
   tokens where the trace has no thinking), and the axis is labelled with those tokens.
3. **Patching on a counterfactual pair** (:func:`thinklens.circuits.counterfactual_pair`):
   one number or name of the prompt changed with the tokens aligned, the metric read
   where the model's prediction changes (its final answer when the change reaches it),
   shortest traces tried first. ``resid_pre`` by layer × position (the changed tokens,
   two after each and the last six before the read-out, when the pair is long)
   and ``z`` by layer × head, on at most :data:`MAX_LAYERS` layers spread evenly.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from thinklens import probes as P
from thinklens.circuits import counterfactual_pair, patch
from thinklens.circuits.pairs import AT_ANSWER, own_answer_token
from thinklens.errors import ConfigError, ThinklensError
from thinklens.hooks.answers import default_extractor
from thinklens.plots import plot_head_grid, plot_logit_lens, plot_patching, plot_probe_by_layer
from thinklens.report.page import Section, Table
from thinklens.report.sections import Patching

MIN_ROWS = 6       # sentences a tag needs to be a class of the tag probe
MIN_TRACES = 8     # traces a probe needs (split by trace: about 2 test traces per 8)
MIN_CLASS_TRACES = 3
MAX_LAYERS = 8     # layers patched at most (spread evenly, first and last kept)
MAX_POSITIONS = 16
LENS_TRACES = 4    # traces the lens runs on (2 drawn)
SITES = "blocks.*.hook_resid_post"


# ---- 1. behaviour probes ------------------------------------------------------------------

def behaviour_probes(model: Any, trs: list, correct: list | None, cap: Any = None) -> Section:
    """Tag and correctness probes with controls and intervals, or why there are none.

    ``cap``: a capture of ``[t for t in trs if t.sentences]`` holding :data:`SITES` at
    ``"sentence_ends"`` (made here when not given)."""
    s = Section(
        "Probes: behaviour and correctness",
        "A logistic probe per layer reads, at the last token of each thinking sentence, the "
        "sentence's behaviour tag; a second one reads, at the last sentence, whether the "
        "model's final answer will be correct (where the prompts carry answers). Labels "
        "any model has, no ground truth of a task. Traces are split into train and test "
        "(never sentences of one trace on both sides); the control probe is trained on "
        "shuffled labels and selectivity is accuracy minus control (Hewitt & Liang 2019); "
        "intervals are 95% bootstrap intervals over test traces.")
    notes, todo = [], {}
    counts = Counter(tag for t in trs for tag in t.tags)
    keep = {tag for tag, c in counts.items() if c >= MIN_ROWS}
    tags = [[tag if tag in keep else None for tag in t.tags] for t in trs]
    n_tag = sum(any(x is not None for x in row) for row in tags)
    if len(keep) >= 2 and n_tag >= MIN_TRACES:
        todo["behaviour tag"] = (tags, "sentence")
    else:
        notes.append(f"Tag probe not fitted, too little data: {dict(counts) or 'no sentences'} "
                     f"over {n_tag} traces (needs 2 tags with >= {MIN_ROWS} sentences each, "
                     f"in >= {MIN_TRACES} traces).")
    if correct is None or all(c is None for c in correct):
        notes.append("Correctness probe not fitted: the prompts carry no answers.")
    else:
        lab = [c if t.sentences else None for c, t in zip(correct, trs)]
        yes, no = sum(c is True for c in lab), sum(c is False for c in lab)
        if yes >= MIN_CLASS_TRACES and no >= MIN_CLASS_TRACES and yes + no >= MIN_TRACES:
            todo["correct answer"] = (lab, "trace")
        else:
            notes.append(f"Correctness probe not fitted, too little data: {yes} correct and "
                         f"{no} wrong traces with thinking sentences (needs >= "
                         f"{MIN_CLASS_TRACES} of each and >= {MIN_TRACES} in all).")
    if todo:
        has = [k for k, t in enumerate(trs) if t.sentences]
        if cap is None:
            cap = model.capture([trs[k] for k in has], sites=SITES, positions="sentence_ends",
                                progress=False)
        rows = []
        for name, (labels, level) in todo.items():
            res = P.sweep(cap, SITES, [labels[k] for k in has], level=level, n_boot=100)
            slug = name.replace(" ", "-")
            s.figure(f"probe-{slug}", plot_probe_by_layer(res),
                     f"{name}: held-out accuracy per layer with the shuffled-label control "
                     f"({res.n_test} test rows from {res.n_test_traces} traces; classes "
                     f"{res.classes}).")
            _, site = res.best()
            j = res.sites.index(site)
            acc, ci = float(res.metrics["accuracy"][0, j]), res.ci["accuracy"][0, j]
            rows.append([name, site, acc, float(ci[0]), float(ci[1]),
                         float(res.control["accuracy"][0, j]), float(res.selectivity[0, j]),
                         res.n_train, res.n_test, res.n_test_traces])
        s.table = Table(["probe", "best site (chosen on test)", "accuracy", "95% CI low",
                         "95% CI high", "control", "selectivity", "train rows", "test rows",
                         "test traces"], rows, mono=(1,))
    s.note = " ".join(notes) or None
    return s


# ---- 2. logit lens toward the model's own answer ------------------------------------------

def own_answer_lens(model: Any, trs: list) -> Section:
    """The lens of :data:`LENS_TRACES` traces toward the answer each wrote (module docstring)."""
    s = Section(
        "Logit lens toward the model's own answer",
        "Each layer's residual stream decoded through the final norm and unembedding "
        "(nostalgebraist 2020): the probability of the token where the model's own final "
        "answer starts (extracted as rollouts do: the last \\boxed{}, else the last number), "
        "at every thinking token before it. Where it lights up early, the answer is written "
        "in the residual stream before the thinking reaches it. The x axis shows the tokens "
        "the lens really ran over.")
    extract = default_extractor(model)
    picks, left = [], []
    for k, t in enumerate(trs):
        a = own_answer_token(t, extract)
        think = [i for i in t.think_span.range if a is not None and i < a]
        pos = think or ([] if a is None else list(range(t.prompt_span.end, a)))
        if a is None or not pos:
            left.append(k)
            continue
        if len(picks) < LENS_TRACES:
            picks.append((k, a, pos, "thinking" if think else "completion"))
    if not picks:
        s.note = ("Skipped: no trace wrote a final answer the extractor finds (no \\boxed{} "
                  "or number after some thinking), so there is no answer token to follow.")
        return s
    lenses = []
    for k, a, pos, where in picks:
        try:
            lens = P.logit_lens(model, [trs[k]], answer=[trs[k].token_ids[a]], positions=pos)
        except ThinklensError as e:
            left.append(k)
            s.note = f"Trace {k} skipped: {e}"
            continue
        lenses.append((k, a, where, lens))
    for k, a, where, lens in lenses[:2]:
        fig = plot_logit_lens(lens, 0)
        fig.update_xaxes(title_text=f"{where} token before the answer (token {a})")
        s.figure(f"logit-lens-{k}", fig,
                 f"Trace {k}: probability of its answer token {trs[k].tokens[a]!r} by layer, "
                 f"at each {where} token before it.")
    layers = lenses[0][3].layers
    top1 = torch.stack([(x.rank[0] == 0).float().mean(-1) for *_, x in lenses]).mean(0)
    prob = torch.stack([x.prob[0].mean(-1) for *_, x in lenses]).mean(0)
    s.table = Table(["layer", "answer top-1 (fraction of tokens)", "mean answer prob"],
                    [[name, float(top1[j]), float(prob[j])] for j, name in enumerate(layers)],
                    mono=(0,))
    shown = [k for k, *_ in lenses]
    s.note = " ".join(filter(None, [s.note, f"Traces {shown} shown in the table"
                                    + (f"; no answer found after thinking in traces {left}"
                                       if left else "") + "."]))
    return s


# ---- 3. patching on a counterfactual pair -------------------------------------------------

def spread(n: int, limit: int = MAX_LAYERS) -> list[int]:
    """At most ``limit`` indices of ``range(n)``, evenly spaced, first and last kept."""
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def _positions(pair: Any) -> list[int]:
    n = len(pair)
    if n <= MAX_POSITIONS:
        return list(range(n))
    diff = pair.diff_positions
    near = {p + d for p in diff for d in (0, 1, 2)}
    tail = set(range(n - 6, n))
    keep = sorted(p for p in near - tail if 0 <= p < n)[: MAX_POSITIONS - 6]
    return sorted(set(keep) | tail)


def build_pair(model: Any, trs: list) -> tuple[Any, int]:
    """(pair, trace index): the shortest traces tried first (at most 3), the first pair
    whose change reaches the model's final answer preferred."""
    order = sorted(range(len(trs)), key=lambda k: len(trs[k]))[:3]
    why, found = [], None
    for k in order:
        try:
            pair = counterfactual_pair(model, trs[k])
        except ConfigError as e:
            why.append(f"trace {k}: {e}")
            continue
        if AT_ANSWER in pair.why:
            return pair, k
        found = found or (pair, k)
    if found is None:
        raise ConfigError("no counterfactual pair: " + "; ".join(why))
    return found


def pair_patching(model: Any, trs: list) -> tuple[Patching | None, Section]:
    """Patching of an automatically built pair (module docstring), or a note why none."""
    title = "Activation patching"
    try:
        pair, k = build_pair(model, trs)
    except ConfigError as e:
        return None, Section(title, "Patching on a pair built from the model's own trace.",
                             note=f"Skipped: {e}")
    layers = spread(model.config.n_layers)
    pos = _positions(pair)
    resid = patch(model, pair, "resid_pre", by=("layer", "pos"), layers=layers,
                  positions=pos, progress=False)
    z = patch(model, pair, "z", by=("layer", "head"), layers=layers, progress=False)
    some = (f" Layers {layers} of {model.config.n_layers} are patched"
            if len(layers) < model.config.n_layers else "")
    some += (f"; positions: the changed tokens, two after each, and the last 6 ({len(pos)} "
             f"of {len(pair)})" if len(pos) < len(pair) else "")
    s = Section(
        title,
        f"The pair is built from trace {k} (its prompt: '{trs[k].prompt}'): {pair.why}. "
        "Only the changed tokens differ, so positions correspond one to one; the thinking is "
        "the clean trace's own in both runs. Each cell runs the corrupted input with one "
        "activation taken from the clean run (denoising) and reads the logit difference "
        "between the clean and the corrupted prediction at that position, normalised so "
        f"that 0 is the corrupted run and 1 the clean one (clean {resid.clean:.2f}, "
        f"corrupted {resid.corrupt:.2f}).{some + '.' if some else ''}\n\n"
        "By layer and position (resid_pre), where the changed information sits on its way "
        "to the prediction; by layer and head (z), which heads carry it.")
    s.figure("patching-resid-pre", plot_patching(resid), "resid_pre, layer × position.")
    s.figure("patching-z-heads", plot_head_grid(z), "z, layer × head (all positions patched).")
    zn, rn = z.normalized(), resid.normalized()
    lay_z, lay_r = z.labels["layer"], resid.labels["layer"]
    top = torch.topk(zn.abs().flatten(), min(5, zn.numel())).indices.tolist()
    rows = [["z", lay_z[i // zn.shape[1]], f"head {i % zn.shape[1]}", float(zn.flatten()[i])]
            for i in top]
    best = torch.topk(rn.abs().flatten(), min(5, rn.numel())).indices.tolist()
    rows += [["resid_pre", lay_r[i // rn.shape[1]],
              f"position {resid.labels['pos'][i % rn.shape[1]]}", float(rn.flatten()[i])]
             for i in best]
    s.table = Table(["site", "layer", "head or position", "normalised effect"], rows, mono=(2,))
    return Patching(pair, resid, z, s), s


__all__ = ["behaviour_probes", "own_answer_lens", "pair_patching", "build_pair", "spread",
           "SITES",
           "MIN_ROWS", "MIN_TRACES", "MAX_LAYERS"]
