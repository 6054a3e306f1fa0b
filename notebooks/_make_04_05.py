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
# 05 · Circuits: attribution patching, edges, faithfulness

Notebook 04 patched activations one cell at a time. Attribution patching estimates every
cell from **one forward and one backward pass** (Nanda 2023; Kramár et al. 2024), and
edge attribution patching scores every **edge** between components the same way (Syed et
al. 2023; EAP-IG: Hanna et al. 2024). Keeping the best edges gives a **circuit**, and
running the model with every other edge ablated says how much of the behaviour it
explains (its **faithfulness**).

You will learn to:

1. compare AtP with exact patching, cell by cell (`plot_attribution_scatter`);
2. score every edge with EAP and EAP-IG, and read node effects off the edges;
3. keep the top edges and measure the **faithfulness curve**;
4. draw the circuit as a graph and look at the **attention patterns** of its heads;
5. save a circuit to JSON and load it back.
"""),
    ("code", """
import tempfile
from pathlib import Path

import torch

import thinklens
from thinklens.circuits import Circuit, atp, change_constant, eap, faithfulness_curve, patch
from thinklens.plots import (
    plot_attention,
    plot_attribution_scatter,
    plot_circuit,
    plot_faithfulness,
    plot_patching,
)
"""),
    ("md", """
## The pair

The same pair as in notebook 04: the organism resolves `c = b + 4 ; a = 7 ; b = a - 2`
to 9; the corrupted prompt sets `a = 3` (answer 5), each with its own correct thinking.
The metric is the logit difference between 9 and 5 at `</think>`.
"""),
    ("code", """
model = thinklens.load("organism")
PROMPT = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"
pair = change_constant(model, PROMPT, "a", 3)
exact = patch(model, pair, "z", by=("layer", "head"))
exact
"""),
    ("md", """
## 1. AtP against exact patching

`atp` takes the same arguments as `patch` and returns an `AttributionResult` with the
same axes and labels: the estimated metric after each patch,
`base + (a_clean - a_corrupt) · ∂metric/∂a`. `plot_attribution_scatter` puts the exact
effect (change of the metric) on x and the estimated one on y, one point per head; the
dotted line is y = x, and the title gives Spearman's ρ and Pearson's r.
"""),
    ("code", """
approx = atp(model, pair, "z", by=("layer", "head"))
plot_attribution_scatter(approx, exact, label="AtP")
"""),
    ("md", """
AtP ranks the heads almost exactly like patching does, but it underestimates the big
effect: L1H1 moves the logit difference by about 24, AtP says about 9. Attention
saturates, and a first-order estimate cannot see that (AtP*, Kramár et al. 2024).

Per head and position (4 × 53 × 4 = 848 cells) the estimate still ranks the cells well;
hover over a point to see its layer, token and head.
"""),
    ("code", """
cells = dict(by=("layer", "pos", "head"))
plot_attribution_scatter(atp(model, pair, "z", **cells), patch(model, pair, "z", **cells), label="AtP")
"""),
    ("md", """
## 2. Edges: EAP and EAP-IG

`eap(model, pair)` scores every edge of the graph (embeddings, each head, each MLP →
each head's query/key/value input, each MLP, the logits) from one backward pass and
returns the full graph as a `Circuit`. `steps=5` is EAP-IG: the gradient averaged over 5
points between the corrupted and the clean input embeddings.

Summing a sender's out-edges gives its node effect (`node_effects`), which for plain EAP
equals AtP. Several estimates go on one scatter as a dict:
"""),
    ("code", """
full = eap(model, pair)
ig = eap(model, pair, steps=5)
print(full)
print(ig)
plot_attribution_scatter({"AtP": approx, "EAP": full.node_effects("z"), "EAP-IG": ig.node_effects("z")}, exact)
"""),
    ("md", """
EAP's node effects are AtP's (the two traces overlap). EAP-IG integrates the gradient
along the way from the corrupted to the clean input, so it sees the saturation and comes
much closer to y = x on the heads that matter (about 17 for L1H1); its rank correlation
is lower only because it orders the heads that do nothing (effects near 0) differently.

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
for u, v, score in circuit.edge_list()[:8]:
    print(f"{u:>6} -> {v:<8} {score:7.2f}")
plot_circuit(circuit)
"""),
    ("md", """
Read the graph bottom-up: L0H2 reads the input through its values, L1H1 reads the input
and MLP 0 through its values and writes the answer to the logits, directly and through
the later MLPs. This is the head notebook 04 found by patching.

## 4. What the circuit's heads attend to

Capture the attention of the circuit's heads on the clean trace (`pair.clean_trace`) and
plot it: rows are the query (destination) tokens, columns the keys they read from.
"""),
    ("code", """
heads = sorted({(int(s[1]), int(s.split(".h")[1])) for s in circuit.nodes if s.startswith("a")})
print("circuit heads:", heads)
cap = model.capture(pair.clean_trace, attention=heads)
pattern = cap["blocks.1.attn.hook_pattern"].values[0]       # [head, query, key] of layer 1
row = pattern[[h for _, h in heads if _ == 1].index(1), pair.answer_pos]
top = row.topk(3)
print("L1H1 at </think> attends to", [(int(k), pair.clean_tokens[k], round(float(w), 2)) for w, k in zip(top.values, top.indices)])
plot_attention(cap, layer=1, heads=[1])
"""),
    ("md", """
At `</think>` (the bottom row) L1H1 puts 0.91 of its attention on the `9` the thinking
wrote last, at position 50: it copies the final result to where the answer is read.
L0H2, at that `9`, spreads its attention over the digit itself and the operands it was
computed from (`5` and `4` of `c = 5 + 4 = 9`).
"""),
    ("code", """
plot_attention(cap, layer=0, heads=[2])
"""),
    ("md", """
## 5. Save and load a circuit

`Circuit.to_json` writes every edge of the graph with its score and whether it is in
the circuit; `Circuit.from_json` reads it back (and checks the format).
"""),
    ("code", """
path = Path(tempfile.mkdtemp()) / "circuit.json"
circuit.to_json(path)
loaded = Circuit.from_json(path)
print(loaded)
print("same edges:", torch.equal(loaded.edges, circuit.edges), "same scores:", torch.allclose(loaded.scores, circuit.scores))
"""),
]


def main(which: list[str]) -> None:
    books = {"04": ("04_patching.ipynb", NB04), "05": ("05_circuits.ipynb", NB05)}
    for key in which or list(books):
        name, cells = books[key]
        nbformat.write(build(cells), HERE / name)


if __name__ == "__main__":
    main(sys.argv[1:])
