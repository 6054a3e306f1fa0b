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
    for kind, text in cells:
        text = text.strip("\n")
        nb.cells.append(nbformat.v4.new_markdown_cell(text) if kind == "md"
                        else nbformat.v4.new_code_cell(text))
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


def main(which: list[str]) -> None:
    books = {"04": ("04_patching.ipynb", NB04)}
    if "NB05" in globals():
        books["05"] = ("05_circuits.ipynb", globals()["NB05"])
    for key in which or list(books):
        name, cells = books[key]
        nbformat.write(build(cells), HERE / name)


if __name__ == "__main__":
    main(sys.argv[1:])
