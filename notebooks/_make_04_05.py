"""Write notebooks 04 (patching) and 05 (circuits) without outputs.

    .venv/bin/python notebooks/_make_04_05.py          # both
    .venv/bin/python notebooks/_make_04_05.py 04       # one
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
META = {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                       "name": "python3"}, "language_info": {"name": "python"}}


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(metadata=META)
    for k, (kind, text) in enumerate(cells):
        text = text.strip("\n")
        cell = (nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell)(text)
        cell.id = f"cell-{k:02d}"  # stable ids: rebuilding changes nothing but the text
        nb.cells.append(cell)
    return nb


NB04 = [
    ("md", """
# 04 · Activation patching: which activations carry the answer

Activation patching (causal tracing; Meng et al. 2022, Wang et al. 2022) runs the model on
two inputs that differ in one fact, copies an activation from one run into the other, and
measures how much of the answer moves with it. On the **bundled model organism** every
sweep below takes well under a second on a CPU.

You will learn to:

1. build an aligned **clean/corrupted pair** from an organism prompt;
2. patch the **residual stream by layer × position** and read the heatmap;
3. patch **attention heads** by layer × head, and per position with a **per-head grid**;
4. tell **denoising** (is it sufficient?) from **noising** (is it necessary?);
5. follow a head's effect along chosen paths with **path patching**;
6. choose a **metric**: logit difference, normalised, probability, KL, or your own.
"""),
    ("code", """
import torch

import thinklens
from thinklens.circuits import change_constant, change_thinking_value, patch, path_patch
from thinklens.plots import plot_head_grid, plot_patching
"""),
    ("md", """
## The organism and its thinking

The organism (4 layers, 4 heads, d_model 128) resolves a chain of variable bindings and
writes its chain of thought before the answer. For the prompt below it looks `c` up, then
`b`, then `a`, and computes back: `b = 7 - 2 = 5`, `c = 5 + 4 = 9`.
"""),
    ("code", """
model = thinklens.load("organism")
PROMPT = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"
trace = model.think(PROMPT)
print(trace.thinking_text)
print("answer:", trace.answer_text)
"""),
    ("md", """
## 1. A clean/corrupted pair

Patching compares the two runs position by position, so both inputs must tokenise to the
same length with corresponding tokens in place. `change_constant` changes one constant of
the prompt (`a = 7` becomes `a = 3`); by default each input carries the correct thinking
for its own prompt, so the thinking's digits change too and the answer becomes 5 instead
of 9. The metric reads the next-token logits at `pair.answer_pos`, the `</think>` token
after which the model writes its answer.

`pair.labels()` names each position by its token, `clean/corrupted` where they differ.
"""),
    ("code", """
pair = change_constant(model, PROMPT, "a", 3)
labels = pair.labels()
print(len(pair), "tokens; answer read at position", pair.answer_pos, repr(labels[pair.answer_pos]))
print("answer", model.tokenizer.decode([pair.answer]), "vs", model.tokenizer.decode([pair.wrong]))
print("differ at", [f"{i}:{labels[i]}" for i in pair.diff_positions])
"""),
    ("md", """
## 2. The residual stream, layer × position

`patch(model, pair, "resid_pre", by=("layer", "pos"))` runs one patched forward pass per
cell, all cells batched together. By default it **denoises**: it runs the *corrupted*
input and copies the *clean* residual stream at one (layer, position) into it. The metric
is the logit difference `logit(9) - logit(5)`; `r.clean` and `r.corrupt` are its values on
the unpatched runs.
"""),
    ("code", """
resid = patch(model, pair, "resid_pre", by=("layer", "pos"))
resid
"""),
    ("md", """
`plot_patching` draws the normalised value `(m - m_corrupt) / (m_clean - m_corrupt)`:
0 (white) where the patch changes nothing, 1 (red) where it restores the clean answer
completely. Hover over a cell for the layer, the token, the raw logit difference and the
normalised value; the position labels on the x axis are the pair's tokens.
"""),
    ("code", """
plot_patching(resid)
"""),
    ("md", """
Only two places matter. Before layers 0 and 1 the answer lives at position 50, the last
value the thinking wrote (`9` in the clean run, `5` in the corrupted one); from layer 2 on
it lives at `</think>`, where it is read out. The prompt's `7/3` at position 9 does nothing
alone: the corrupted thinking already says `5`, and the model copies its answer from the
thinking, not from the prompt. Something between layer 1 and layer 2 moves the value from
position 50 to position 52: an attention head.

`normalized=False` colours by the raw metric instead (still centred at 0).
"""),
    ("code", """
plot_patching(resid, normalized=False)
"""),
    ("md", """
## 3. Attention heads

Site `"z"` is each head's output before the output projection. `by=("layer", "head")`
patches one head at all positions at once.
"""),
    ("code", """
heads = patch(model, pair, "z", by=("layer", "head"))
plot_patching(heads)
"""),
    ("md", """
Head **L1H1** alone restores 90% of the logit difference; L0H2 adds a little. Adding
`"pos"` to the sweep says *where* each head acts: `plot_head_grid` draws one
layer × position panel per head on one shared colour scale. We sweep the end of the
thinking only (positions 40 to 52) to keep the panels readable.
"""),
    ("code", """
per_head = patch(model, pair, "z", by=("layer", "pos", "head"), positions=range(40, 53))
plot_head_grid(per_head)
"""),
    ("md", """
L1H1 acts at `</think>` (it moves the answer there); L0H2 acts at position 50, on the
written result itself.

## 4. Denoising vs noising

*Denoising* (clean into corrupted) asks which activations **suffice** to restore the clean
answer. *Noising* (corrupted into clean) asks which are **necessary**: it runs the clean
input and breaks one activation. Normalised values keep their meaning, 1 = clean
behaviour, so in noising a *drop* below 1 marks an important head.
"""),
    ("code", """
noised = patch(model, pair, "z", by=("layer", "head"), direction="noising")
plot_patching(noised)
"""),
    ("code", """
print("denoising (1 = restored):\\n", heads.normalized().round(decimals=2))
print("noising (1 = unaffected, 0 = destroyed):\\n", noised.normalized().round(decimals=2))
"""),
    ("md", """
Both agree here: corrupting L1H1 leaves 7% of the clean logit difference, so it is
necessary, and restoring it alone gives back 90%, so it is nearly sufficient; L0H2 and
L1H0 each matter a little (0.18 and 0.07 restored, 0.84 and 0.90 left). They need not
agree: a circuit with backups (Wang et al. 2022's name movers) shows up in denoising but
hides from noising.

## 5. Path patching

Activation patching of a head measures its *total* effect, through every later layer.
`path_patch` (Wang et al. 2022) lets a sender's change reach only chosen receivers: every
other head is frozen at its base activation. Receivers are head inputs
`(layer, head, "q" | "k" | "v")` or residual sites; the last `hook_resid_post` gives each
head's *direct* effect on the logits. Path patching defaults to noising, the paper's
setting.
"""),
    ("code", """
direct = path_patch(model, pair, "heads", ["blocks.3.hook_resid_post"])
plot_patching(direct)
"""),
    ("md", """
L1H1's effect is direct: breaking only its path to the logits removes 93% of the logit
difference. Which heads does it read from? Send every head's change into L1H1's value
input only:
"""),
    ("code", """
into_v = path_patch(model, pair, "heads", [(1, 1, "v")])
plot_patching(into_v)
"""),
    ("md", """
No head acts through L1H1's queries or keys (try `(1, 1, "q")`), and only L0H2 through
its values (0.89: an 11% drop). Most of what L1H1 moves is the embedding of the written
digit itself, which is not a head and so not in this grid. A list of senders patches each one (or each group, as a nested
list) in its own row; the result has a `sender` axis and is drawn as bars.
"""),
    ("code", """
groups = path_patch(model, pair, [(0, 2), (1, 1), [(0, 2), (1, 1)]], ["blocks.3.hook_resid_post"])
plot_patching(groups)
"""),
    ("md", """
## 6. Metrics

`metric=` takes `"logit_diff"` (default), `"normalized_logit_diff"` (0 corrupted,
1 clean), `"prob"` (the answer's probability), `"kl"` (KL divergence from the clean run's
next-token distribution: 0 when the patched run matches it) or any callable that maps the
answer-position logits `[batch, d_vocab]` to one number per row. Here is each attention
layer's output patched whole:
"""),
    ("code", """
for metric in ("logit_diff", "normalized_logit_diff", "prob", "kl"):
    r = patch(model, pair, "attn_out", by="layer", metric=metric)
    print(f"{metric:22s} clean {r.clean:8.3f}  corrupt {r.corrupt:8.3f}  by layer {[round(v, 3) for v in r.values.tolist()]}")
"""),
    ("md", """
Every metric points to layer 1's attention. A callable metric, the log-probability of the
clean answer:
"""),
    ("code", """
def answer_logprob(logits):
    return logits.log_softmax(-1)[:, pair.answer]


logprob = patch(model, pair, "attn_out", by="layer", metric=answer_logprob)
plot_patching(logprob, normalized=False)
"""),
    ("md", """
## 7. A corrupted thought

`change_thinking_value` keeps the prompt and changes a value the thinking writes: here
`b = 7 - 2 = 1` instead of 5, and with `propagate=True` (default) the later steps follow
(`c = 1 + 4 = 5`). The model must trust its own thinking over the prompt for the answer to
change, and the same two cells carry it.
"""),
    ("code", """
thought = change_thinking_value(model, PROMPT, "b", 1)
print("differ at", [f"{i}:{thought.labels()[i]}" for i in thought.diff_positions])
plot_patching(patch(model, thought, "resid_pre", by=("layer", "pos")))
"""),
    ("md", """
## 8. Figures for a paper

Every figure takes `size="one"` or `size="two"` (one or two paper columns) and
`thinklens.export(fig, "fig.pdf")` writes a byte-reproducible PDF, SVG or PNG (it needs
a Chromium; see `thinklens.figures`).

Next: notebook 05 estimates all these effects at once with attribution patching and
builds a circuit from them.
"""),
    ("code", """
plot_patching(heads, size="two", title="head outputs, denoising")
"""),
]


NB05 = [
    ("md", """
# 05 · Circuits: the organism's lookup step

Notebook 04 patched activations one cell at a time. Attribution patching estimates every
cell from **one forward and one backward pass** (Nanda 2023; Kramár et al. 2024), and
edge attribution patching scores every **edge** between components the same way (Syed et
al. 2023; EAP-IG: Hanna et al. 2024). Keeping the best edges gives a **circuit**, and
running the model with every other edge ablated says how much of the behaviour it
explains (its **faithfulness**).

The behaviour studied here is the organism's **lookup step**. For the prompt
`c = b + 4 ; a = 7 ; b = a - 2 ; ? c` the thinking first walks the chain back to its root
(`c = b + 4 . b = a - 2 . a = 7 .`) and then computes forward. When it has written
`a =`, the next token is a's value, and that value is written nowhere in the thinking
so far: the model must **look it up** in the prompt statement `a = 7 ;`. Which heads
find the right statement, and how does its constant reach the thinking?

You will learn to:

1. build a pair that isolates one thinking step, and compare AtP with exact patching;
2. score every edge with EAP and EAP-IG, and read node effects off the edges;
3. keep the top edges and measure the **faithfulness curve**;
4. draw the circuit as a graph and check the **attention patterns** of its heads;
5. see that another step (copying the final answer) uses a different circuit;
6. save a circuit to JSON and load it back.
"""),
    ("code", """
import tempfile
from pathlib import Path

import torch

import thinklens
from thinklens.circuits import (Circuit, atp, change_constant, eap, faithfulness_curve, lookup_step,
                                patch, swap_names)
from thinklens.hooks.trace import Trace
from thinklens.plots import plot_attention, plot_attribution_scatter, plot_circuit, plot_faithfulness
"""),
    ("md", """
## The pair: one thinking step, only the prompt's constant differs

`change_constant(..., thinking="clean")` changes the prompt's `a = 7` to `a = 3` but
gives **both** runs the clean thinking, so the prompt's constant (position 9) is the only
token that differs. `lookup_step` finds the lookup step from the ground truth of each
thinking token (`thinklens.zoo.organism.token_truth`): the resolve-phase `=` of `a`. It
cuts both inputs right after it and reads the next-token logits there: the metric is
`logit(7) - logit(3)` at the thinking's `a =`.
"""),
    ("code", """
model = thinklens.load("organism")
PROMPT = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"


def lookup_pair(prompt, var, new):
    \"\"\"The step writing var's constant: predict it after the thinking's 'var ='.\"\"\"
    return lookup_step(model, change_constant(model, prompt, var, new, thinking="clean"), var)


pair = lookup_pair(PROMPT, "a", 3)
labels = pair.labels()
print(len(pair), "tokens:", " ".join(labels))
print("differ at", [f"{i}:{labels[i]}" for i in pair.diff_positions],
      "| answer read at", pair.answer_pos, repr(" ".join(labels[pair.answer_pos - 1:pair.answer_pos + 1])))
exact = patch(model, pair, "z", by=("layer", "head"))
print(exact)
print("normalised (1 = patching this head alone restores the clean answer):")
print(exact.normalized().round(decimals=2) + 0.0)  # + 0.0 turns -0. into 0.
"""),
    ("md", """
The clean run puts 7 ahead of 3 by about 13 logits, the corrupted run 3 ahead of 7 by
about 13. Two heads each restore the whole difference on their own: **a0.h2** (layer 0,
head 2) and **a1.h1** (layer 1, head 1). They sit on one path, so patching either one
carries the clean constant all the way.

## 1. AtP against exact patching

`atp` takes the same arguments as `patch` and returns an `AttributionResult` with the
same axes: the estimated metric after each patch,
`base + (a_clean - a_corrupt) · ∂metric/∂a`. `plot_attribution_scatter` puts the exact
effect (change of the metric) on x and the estimate on y, one point per head; the dotted
line is y = x. Each trace's `meta` holds Spearman's ρ and Pearson's r.
"""),
    ("code", """
approx = atp(model, pair, "z", by=("layer", "head"))
fig = plot_attribution_scatter(approx, exact, label="AtP")
print(f"AtP vs exact, 16 heads: Spearman {fig.data[0].meta['spearman']:.3f}, Pearson {fig.data[0].meta['pearson']:.3f}")
fig
"""),
    ("md", """
AtP ranks the heads like patching does but underestimates the two that matter (each
moves the logit difference by about 26; AtP says 9 and 10). Their attention is saturated
and a first-order estimate cannot see past that (AtP*, Kramár et al. 2024).

Per head and position (4 layers × 34 positions × 4 heads = 544 cells) the ranking holds;
hover over a point for its layer, token and head.
"""),
    ("code", """
cells = dict(by=("layer", "pos", "head"))
fig = plot_attribution_scatter(atp(model, pair, "z", **cells), patch(model, pair, "z", **cells), label="AtP")
print(f"AtP vs exact, {fig.data[0].meta['n']} cells: Spearman {fig.data[0].meta['spearman']:.3f}")
fig
"""),
    ("md", """
## 2. Edges: EAP and EAP-IG

`eap(model, pair)` scores every edge of the graph (the input embeddings, each head and
each MLP → each head's query/key/value input, each later MLP, and the logits) from one
backward pass and returns the full graph as a `Circuit`. `steps=5` is EAP-IG: the
gradient averaged over 5 points between the corrupted and the clean input embeddings.

Summing a sender's out-edges gives its node effect (`node_effects`), which for plain EAP
equals AtP. Several estimates go on one scatter as a dict:
"""),
    ("code", """
full = eap(model, pair)
ig = eap(model, pair, steps=5)
print(full)
print(ig)
fig = plot_attribution_scatter({"AtP": approx, "EAP": full.node_effects("z"), "EAP-IG": ig.node_effects("z")}, exact)
for t in fig.data:
    if t.meta:
        print(f"{t.name:16s} Spearman {t.meta['spearman']:.3f}  Pearson {t.meta['pearson']:.4f}")
for name, r in [("exact", exact), ("AtP", approx), ("EAP-IG", ig.node_effects("z"))]:
    d = r.values - r.corrupt   # the change of the metric, [layer, head]
    print(f"{name:7s} effect of a0.h2 {float(d[0, 2]):6.2f}, of a1.h1 {float(d[1, 1]):6.2f}")
fig
"""),
    ("md", """
EAP's node effects are AtP's (the two traces overlap). EAP-IG integrates the gradient
along the way from the corrupted to the clean input, so it sees the saturation and comes
much closer to y = x on the two heads that matter (Pearson near 1). Its Spearman ρ is
lower only because it orders the 14 heads that do nothing (exact effects within ±0.1)
differently; ranking noise among zeros does not matter for picking a circuit.

## 3. Circuits and faithfulness

`ig.top(n=...)` keeps the n edges of largest |score|. Its faithfulness runs the clean
input with every edge *outside* the circuit ablated to its corrupted value:
1 = the circuit recovers the full model's logit difference, 0 = no better than the
corrupted run. `faithfulness_curve` does this for many sizes in one batched pass.
"""),
    ("code", """
curve = faithfulness_curve(model, pair, ig)
n = curve.smallest(0.8)
print(f"{n} of {curve.total_edges} edges ({n / curve.total_edges:.1%}) recover at least 80%")
plot_faithfulness(curve)
"""),
    ("code", """
circuit = ig.top(n=n)
print(circuit, "faithfulness", round(circuit.faithfulness(model, pair), 3))
print("nodes:", circuit.nodes)
for u, v, score in circuit.edge_list():
    print(f"{u:>6} -> {v:<8} {score:7.2f}")
plot_circuit(circuit)
"""),
    ("md", """
Read the graph bottom-up. The strongest edge is **input → a0.h2.v**: head a0.h2 reads
the prompt's tokens through its values. Its output feeds **a1.h1.v** (directly, and
through MLP 0), and a1.h1 writes the constant to the logits, directly and through
MLPs 1-3. No edge enters a query or a key: *where* the heads look does not depend on the
constant, only *what* they carry does. A two-head path: a0.h2 moves the constant within
the prompt, a1.h1 fetches it into the thinking.

## 4. What the circuit's heads attend to

What to look for: in **a1.h1**, the row of the query at the thinking's `a =` (position
33, the bottom row) should put most of its weight on the key **`;` closing the statement
`a = 7`** (position 10), not on the `7` itself. In **a0.h2**, the row of that `;`
should look one token back, at the constant `7` (position 9): a previous-token head that
copies each statement's value onto its closing `;`. Together: the `;` holds the value,
and the lookup head reads it from there. How a1.h1 picks the right `;` is not measured by
this pair: queries and keys see the same tokens in both runs, which is why no circuit
edge enters a query or a key. The next section measures it with another pair.

We capture both heads on a trace made of exactly the pair's clean tokens
(`Trace.from_text` with the thinking cut after `a =`).
"""),
    ("code", """
trace = Trace.from_text(model, PROMPT, "c = b + 4 . b = a - 2 . a =")
assert trace.token_ids == pair.clean_ids.tolist()
cap = model.capture(trace, attention=[(0, 2), (1, 1)])
const = pair.diff_positions[0]   # the prompt's constant; the statement is const-2 .. const+1
semi = const + 1
mover = cap["blocks.0.attn.hook_pattern"].values[0][0]   # [query, key] of a0.h2
reader = cap["blocks.1.attn.hook_pattern"].values[0][0]  # [query, key] of a1.h1
q = pair.answer_pos
top = reader[q].topk(3)
print(f"a1.h1 at {q} {trace.tokens[q]!r} attends to",
      [(int(k), trace.tokens[k], round(float(w), 3)) for w, k in zip(top.values, top.indices)])
print(f"  on the statement 'a = 7 ;' ({const - 2}..{semi}): {float(reader[q, const - 2:semi + 1].sum()):.3f}")
print(f"a0.h2 at {semi} {trace.tokens[semi]!r} attends to {const} {trace.tokens[const]!r}: {float(mover[semi, const]):.3f}")
plot_attention(cap, layer=1, heads=[1])
"""),
    ("code", """
plot_attention(cap, layer=0, heads=[2])
"""),
    ("md", """
The same two heads do the lookup in another prompt: here the thinking's `d =` must find
`d = 5 ;` at the start of the prompt.
"""),
    ("code", """
for prompt, var, new in [(PROMPT, "a", 3), ("d = 5 ; e = d + 1 ; ? e", "d", 2)]:
    p = lookup_pair(prompt, var, new)
    semi = p.diff_positions[0] + 1
    _, cache = model.bridge.run_with_cache(p.clean_ids[None])
    w_read = float(cache["blocks.1.attn.hook_pattern"][0, 1, p.answer_pos, semi])
    w_move = float(cache["blocks.0.attn.hook_pattern"][0, 2, semi, semi - 1])
    print(f"{prompt!r}: a1.h1 {p.answer_pos} -> ';' {semi}: {w_read:.2f};  a0.h2 ';' {semi} -> constant {semi - 1}: {w_move:.2f}")
"""),
    ("md", """
## 5. How a1.h1 finds the statement: swap the names

To make *which* statement defines `a` the only difference, swap two variable names in
the prompt and keep every value in place: clean `… ; a = 7 ; … ; g = 3 ; ? c`, corrupted
`… ; g = 7 ; … ; a = 3 ; ? c`, both with the clean thinking up to `a =`. Now the
corrupted run should look up the *other* statement and write 3. Whatever carries the
difference must go through how the lookup head chooses where to look: its query or key.
"""),
    ("code", """
names = swap_names(model, "c = b + 4 ; a = 7 ; b = a - 2 ; g = 3 ; ? c", "a", "g")
print("corrupted prompt:", names.corrupt_trace.prompt)
swap = lookup_step(model, names, "a")     # cut at the thinking's 'a =': 7 (clean) vs 3
clean_trace = names.clean_trace
print("differ at", [f"{i}:{swap.labels()[i]}" for i in swap.diff_positions])
swap_ig = eap(model, swap, steps=5)
swap_curve = faithfulness_curve(model, swap, swap_ig)
k = swap_curve.smallest(0.8)
swap_circuit = swap_ig.top(n=k)
print(f"{k} of {swap_curve.total_edges} edges, faithfulness {swap_circuit.faithfulness(model, swap):.3f}")
for u, v, score in swap_circuit.edge_list()[:6]:
    print(f"{u:>6} -> {v:<8} {score:7.2f}")
plot_circuit(swap_circuit)
"""),
    ("md", """
The strongest edges now run **input → a0.h3.v → a1.h1.k**: a *key* path through another
layer-0 head. At the `;` closing `a = 7`, head a0.h3 looks three tokens back, at the
variable's **name**, while a0.h2 (section 4) looks one token back, at its **value**. So
each statement's `;` holds a key (the name, written by a0.h3) and a value (the constant,
written by a0.h2), and a1.h1 at the thinking's `a =` matches its query against those
keys and reads the value: a key-value lookup built from two layer-0 heads and one
layer-1 head.
"""),
    ("code", """
cap3 = model.capture(clean_trace, attention=[(0, 2), (0, 3)])
p0 = cap3["blocks.0.attn.hook_pattern"].values[0]      # [head (2, 3), query, key]
semi = 10   # the ';' closing 'a = 7'
print(f"a0.h3 at ';' {semi} attends {float(p0[1, semi, 7]):.3f} to the name {clean_trace.tokens[7]!r} (7)")
print(f"a0.h2 at ';' {semi} attends {float(p0[0, semi, 9]):.3f} to the value {clean_trace.tokens[9]!r} (9)")
plot_attention(cap3, layer=0, heads=[3])
"""),
    ("md", """
## 6. Aside: copying the answer is a different circuit

Notebook 04's pair (each run with its own thinking, the metric at `</think>`) measures a
different step: **copying** the last value the thinking wrote (`9` at position 50) to the
answer. Its EAP-IG circuit is larger and routed differently: a1.h1's values are fed
mostly by MLP 0 (m0 → a1.h1.v, input → m0) rather than directly by a0.h2, head a1.h0
joins, and a1.h1 attends from `</think>` to the written `9`, not to a prompt statement.
The same head a1.h1 serves both steps; where it looks changes.
"""),
    ("code", """
copy_pair = change_constant(model, PROMPT, "a", 3)   # own thinking; answer 9 vs 5 at </think>
copy_ig = eap(model, copy_pair, steps=5)
copy_curve = faithfulness_curve(model, copy_pair, copy_ig)
m = copy_curve.smallest(0.8)
copy_circuit = copy_ig.top(n=m)
print(f"answer copying: {m} of {copy_curve.total_edges} edges, faithfulness {copy_circuit.faithfulness(model, copy_pair):.3f}")
print("nodes:", copy_circuit.nodes)
print("top edges:", [f"{u}->{v} {s:.1f}" for u, v, s in copy_circuit.edge_list()[:5]])
row = model.capture(copy_pair.clean_trace, attention=[(1, 1)])["blocks.1.attn.hook_pattern"].values[0][0, copy_pair.answer_pos]
k = int(row.argmax())
print(f"a1.h1 at </think> attends {float(row[k]):.2f} to position {k} {copy_pair.clean_tokens[k]!r}")
"""),
    ("md", """
## 7. Save and load a circuit

`Circuit.to_json` writes every edge of the graph with its score and whether it is in
the circuit; `Circuit.from_json` reads it back (and checks the format).
"""),
    ("code", """
path = Path(tempfile.mkdtemp()) / "lookup_circuit.json"
circuit.to_json(path)
loaded = Circuit.from_json(path)
print(loaded)
print("same edges:", torch.equal(loaded.edges, circuit.edges), "same scores:", torch.allclose(loaded.scores, circuit.scores))
print("same faithfulness:", round(loaded.faithfulness(model, pair), 3))
"""),
]


def main(which: list[str]) -> None:
    books = {"04": ("04_patching.ipynb", NB04), "05": ("05_circuits.ipynb", NB05)}
    for key in which or list(books):
        name, cells = books[key]
        nbformat.write(build(cells), HERE / name)


if __name__ == "__main__":
    main(sys.argv[1:])
