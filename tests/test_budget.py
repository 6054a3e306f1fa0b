"""The capture budget is honest: its estimate is the peak memory really measured, and a
refusal offers only changes that lower it.

Reference: the peak resident memory (``VmHWM`` of ``/proc/self/status``, reset through
``/proc/self/clear_refs``) of a fresh Python process, minus its resident memory just
before the capture (the model loaded, one warm-up capture run, the C heap trimmed).
The model is shaped so the large tensors (MLP activations, eager patterns) are above
glibc's 32 MB mmap threshold, where freed memory goes back to the kernel at once; below
it the heap's fragmentation adds up to ~1.6x on an 8-layer model (not modelled).
Tolerance: 25 % of the measured peak (seen: 4-12 %).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thinklens.errors import BudgetError

HEADER = r'''
import ctypes, gc, json, sys, warnings
from pathlib import Path
import torch
torch.set_num_threads(1)
warnings.filterwarnings("ignore")
import thinklens
from thinklens import Trace, circuits
from thinklens.circuits.anchors_attention import suppression_peak
from thinklens.hooks import budget as budget_mod
from thinklens.hooks import capture as capture_mod
from thinklens.hooks.budget import attribution_peak
from thinklens.hooks.positions import positions_of

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

model = thinklens.load(sys.argv[1])
'''

CHILD = HEADER + r'''
out = []
for case in json.loads(sys.argv[2]):
    tr = [Trace.from_text(model, "a = 7 ; ? b", "a = 7 ; b = a + 2 . " * case["repeat"])]
    kw = dict(sites=case.get("sites", ()), attention=case.get("attention"))
    model.capture([Trace.from_text(model, "a = 7 ; ? b", "a = 7 ;")], progress=False, **kw)
    sites = model.sites(kw["sites"]) if kw["sites"] else []
    stats, heads = capture_mod._parse_attention(kw["attention"], model.config)
    shapes = capture_mod._site_shapes(model, sites) if sites else {}
    est = budget_mod.estimate(model, tr, sites, shapes, positions_of(tr, "all"), stats,
                               heads, model.dtype, 1)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = status("VmRSS")
    cap = model.capture(tr, progress=False, **kw)
    out.append({"case": case, "tokens": len(tr[0]), "measured": status("VmHWM") - base,
                "estimate": est.in_memory()})
    del cap
print(json.dumps(out))
'''

CASES = [  # two lengths of each attention implementation
    {"attention": "sentence", "repeat": 200},                        # blockwise, ~2k tokens
    {"attention": "sentence", "repeat": 400},                        # ~4k
    # SDPA, ~3k and ~6k: at 2k the MLP's [pos, d_mlp] fp32 activation is 32 MB, at glibc's
    # mmap threshold, and the heap's reuse made the peak 1.6x the estimate in one CI run
    {"sites": "blocks.*.hook_resid_post", "repeat": 300},
    {"sites": "blocks.*.hook_resid_post", "repeat": 600},
    {"attention": [[0, 0]], "repeat": 150},                          # eager, ~1.5k
    {"attention": [[0, 0]], "repeat": 250},                          # ~2.5k
]


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> Path:
    """Random Qwen2 (2 layers, d_model 256, d_mlp 4096, 4 heads / 2 KV heads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from thinklens.zoo.vocab import build_tokenizer

    cfg = Qwen2Config(vocab_size=64, hidden_size=256, intermediate_size=4096,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=8192, tie_word_embeddings=False)
    return _saved(tmp_path_factory.mktemp("wide-qwen2"), Qwen2ForCausalLM, cfg,
                  build_tokenizer())


def _saved(folder: Path, cls, cfg, tok) -> Path:
    """A seeded random ``cls(cfg)`` saved with ``tok`` under ``folder``."""
    torch.manual_seed(0)
    hf = cls(cfg)
    hf.config.architectures = [cls.__name__]
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_estimate_within_25_percent_of_the_measured_peak(wide_dir):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(wide_dir), json.dumps(CASES)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    seen = {}
    for r in rows:
        ratio = r["estimate"] / r["measured"]
        seen[(json.dumps(r["case"]), r["tokens"])] = round(ratio, 2)
        assert r["measured"] > 50e6  # large enough that the process's own noise is small
    bad = {k: v for k, v in seen.items() if not 0.75 <= v <= 1.25}
    assert not bad, f"estimate / measured outside [0.75, 1.25]: {bad} (all: {seen})"
    kinds = {json.dumps(r["case"].get("attention") or r["case"]["sites"]) for r in rows}
    assert len(kinds) == 3 and len(rows) == 6  # every implementation at two lengths


def _refusal(model, traces, **kw) -> tuple[str, int, list[tuple[str, int]]]:
    """The refusal's message, the refused estimate and the alternatives, exactly."""
    from thinklens.hooks import budget as budget_mod
    from thinklens.hooks import capture as capture_mod
    from thinklens.hooks.positions import positions_of

    with pytest.raises(BudgetError) as err:
        model.capture(traces, budget=1000, **kw)
    sites = model.sites(kw["sites"])
    stats, heads = capture_mod._parse_attention(kw.get("attention"), model.config)
    shapes = capture_mod._site_shapes(model, sites)
    pos = positions_of(traces, "all")
    args = (model, traces, sites, shapes, pos, stats, heads, model.dtype, kw["batch_size"],
            torch.float32)
    need = budget_mod.estimate(*args).in_memory()
    return str(err.value), need, budget_mod.alternatives(*args, None)


def test_refusal_lists_only_alternatives_that_lower_the_estimate(qwen2, monkeypatch):
    from thinklens import Trace
    from thinklens.hooks import capture as capture_mod
    from thinklens.hooks.budget import fmt

    monkeypatch.setattr(capture_mod, "_batch_hooks", lambda *a, **k: pytest.fail("ran"))
    traces = [Trace.from_text(qwen2, "a = 7 ; ? b", "a = 7 ; b = a + 2 . " * n)
              for n in (3, 6, 9, 12)]
    kw = dict(sites="blocks.*.hook_resid_post", attention=["sentence", (1, 0)], batch_size=4)
    msg, need, ways = _refusal(qwen2, traces, **kw)
    applied = {"batch_size=1": dict(batch_size=1),
               "positions='last' (or 'sentence_ends')": dict(positions="last"),
               "attention='vertical' instead of 'sentence' (no S x S kept)":
                   dict(attention=["vertical", (1, 0)]),
               "attention='sentence' instead of full patterns (SDPA, blockwise)":
                   dict(attention="sentence"),
               "dtype='bfloat16' (statistics and activations kept in bf16)":
                   dict(dtype="bfloat16")}
    lower = [(w, n) for w, n in ways if n < need]
    assert {w for w, _ in lower} == set(applied)
    for way, n in ways:
        assert (f"{way} (about {fmt(n)}" in msg) == (n < need)  # listed iff it lowers
    for way, n in lower:  # applied, each is estimated at what the refusal said: it fits
        with pytest.raises(pytest.fail.Exception, match="ran"):
            qwen2.capture(traces, budget=n, **(kw | applied[way]))
        with pytest.raises(BudgetError):
            qwen2.capture(traces, budget=n - 1, **(kw | applied[way]))
    # a store does not lower a capture whose traces fit in one batch: not offered
    assert "write to a store" not in msg
    msg1, need1, ways1 = _refusal(qwen2, traces, sites="blocks.*.hook_resid_post",
                                  batch_size=1)
    store = [n for w, n in ways1 if w.startswith("write to a store")]
    assert store and store[0] < need1 and "write to a store" in msg1


ANCHORS_CHILD = HEADER + r'''
warm = Trace.from_text(model, "a = 7 ; ? b", "a = 7 . b = a + 2 . </think> 9 <eos>")
circuits.sentence_attribution(model, warm, mode="linear", attention="eager")
circuits.sentence_attribution(model, warm, mode="linear")
circuits.suppression(model, warm, matrix=False)
out = []
plan = json.loads(sys.argv[2])  # what -> the repeats it is measured at
for repeat in sorted({r for rs in plan.values() for r in rs}):
    tr = Trace.from_text(model, "a = 7 ; ? b", "a = 7 . b = a + 2 . " * repeat + "</think> 9 <eos>")
    for what in [w for w in ("attribution", "suppression", "attribution_blockwise",
                             "attribution_checkpoint") if repeat in plan[w]]:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        base = status("VmRSS")
        if what.startswith("attribution"):
            impl = "eager" if what == "attribution" else "blockwise"
            ck = what == "attribution_checkpoint"
            circuits.sentence_attribution(model, tr, mode="linear", attention=impl,
                                          checkpoint=ck, budget="1TB")  # measured
            est = attribution_peak(model.config, len(tr), impl, checkpoint=ck)
        else:
            circuits.suppression(model, tr, matrix=False, batch_size=2, sentences=[0, 1],
                                 budget="1TB")
            est = suppression_peak(model, tr, 2, False)
        out.append({"what": what, "tokens": len(tr), "measured": status("VmHWM") - base,
                    "estimate": est})
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory) -> Path:
    """Random Llama (6 layers, d_model 192, d_mlp 512, 6 heads): attention-dominated."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from thinklens.zoo.vocab import build_tokenizer

    cfg = LlamaConfig(vocab_size=64, hidden_size=192, intermediate_size=512,
                      num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                      max_position_embeddings=8192, tie_word_embeddings=False)
    return _saved(tmp_path_factory.mktemp("deep-llama"), LlamaForCausalLM, cfg,
                  build_tokenizer())


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_anchor_estimates_within_30_percent_of_the_measured_peak(wide_dir, deep_dir):
    """sentence_attribution's forward + backward (eager and blockwise attention) and
    suppression's batch, two shapes and two lengths each (~1.5k and ~2.5k tokens; two
    suppressed sentences: one batch). Blockwise at ~2.5k and ~6k: what it keeps is
    ``[T, d_mlp]``-sized, under glibc's 32 MB mmap threshold at 1.5k on the wide shape,
    where the heap's reuse after the eager runs added up to 1.45x (not modelled). With
    ``checkpoint=True`` (blocks recomputed) at ~6k."""
    seen, bad = {}, {}
    plans = [{"attribution": [150, 250], "suppression": [150, 250]},
             {"attribution_blockwise": [250, 600]}, {"attribution_checkpoint": [600]}]
    names = ("attribution", "suppression", "attribution_blockwise", "attribution_checkpoint")
    runs = [(folder, {w: p.get(w, []) for w in names}) for folder in (wide_dir, deep_dir)
            for p in plans]  # each in a fresh process: the heap's state after one run
    for folder, plan in runs:  # moved the next one's peak by up to 1.5x on the deep shape
        proc = subprocess.run([sys.executable, "-c", ANCHORS_CHILD, str(folder), json.dumps(plan)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        for r in json.loads(proc.stdout.strip().splitlines()[-1]):
            assert r["measured"] > 50e6
            key = (folder.name, r["what"], r["tokens"])
            seen[key] = round(r["estimate"] / r["measured"], 2)
            if not 0.7 <= seen[key] <= 1.3:
                bad[key] = seen[key]
    assert not bad, f"estimate / measured outside [0.7, 1.3]: {bad} (all: {seen})"
    assert len(seen) == 14


def test_long_traces_are_refused_before_any_pass(organism, monkeypatch):
    from thinklens import Trace, circuits
    from thinklens.hooks import forward as fwd_mod

    trace = Trace.from_text(organism, "c = b + 4 ; a = 7 ; b = a - 2 ; ? c",
                            "c = b + 4 . b = a - 2 . a = 7 . b = 7 - 2 = 5 . c = 5 + 4 = 9 . "
                            "</think> 9 <eos>")
    with pytest.raises(BudgetError, match=r"suppression of a 55-token trace needs about .* "
                       r"Alternatives: batch_size=1 \(about .*\); matrix=False"):
        circuits.suppression(organism, trace, budget=1000)
    with pytest.raises(BudgetError, match=r"sentence_attribution of a 55-token trace "
                       r"\(blockwise attention, blocks recomputed\) needs about .*"
                       r"Alternatives: exact suppression\(model, trace, matrix=False, "
                       r"batch_size=1\) instead"):
        circuits.sentence_attribution(organism, trace, budget=1000)
    # eager attention: blockwise is offered, with its estimate, and fits where it says
    from thinklens.hooks.budget import attribution_peak

    long = Trace.from_text(organism, "c = b + 4 ; a = 7 ; b = a - 2 ; ? c",
                           "a = 7 . b = 7 - 2 = 5 . " * 40 + "</think> 5 <eos>")

    def need(attention, checkpoint=False):
        return attribution_peak(organism.config, len(long), attention, checkpoint=checkpoint)
    block = need("blockwise")
    assert need("blockwise", True) < block < need("eager")
    with pytest.raises(BudgetError, match=r"\(eager attention\).*attention='blockwise' "
                       r"\(with no hooks attached to the model\) \(about .*, fits\).*"
                       r"checkpoint=True \(each block recomputed in the backward pass\)"):
        circuits.sentence_attribution(organism, long, attention="eager", checkpoint=False,
                                      budget=block)
    assert circuits.sentence_attribution(organism, long, budget=block).estimate.isfinite().all()
    # checkpoint=None recomputes the blocks only when the trace would not fit otherwise
    seen = []
    real = fwd_mod.recompute_blocks

    def spy(model, **kw):
        seen.append(len(long))
        return real(model, **kw)
    monkeypatch.setattr(fwd_mod, "recompute_blocks", spy)
    circuits.sentence_attribution(organism, long, mode="linear", budget=block)
    assert seen == []
    small = circuits.sentence_attribution(organism, long, mode="linear", budget=block - 1)
    assert seen == [len(long)]
    with pytest.raises(BudgetError, match=r"blocks recomputed\) needs"):
        circuits.sentence_attribution(organism, long, budget=need("blockwise", True) - 1)
    plain = circuits.sentence_attribution(organism, long, mode="linear", checkpoint=False,
                                          budget="1GB")
    torch.testing.assert_close(small.estimate, plain.estimate, atol=1e-5, rtol=0)
    # at 55 tokens blockwise would not lower the eager estimate: not offered
    assert attribution_peak(organism.config, len(trace), "blockwise") >= \
        attribution_peak(organism.config, len(trace), "eager")
    with pytest.raises(BudgetError) as err:
        circuits.sentence_attribution(organism, trace, attention="eager", budget=1000)
    assert "attention='blockwise'" not in str(err.value)
    with pytest.raises(BudgetError, match="No other setting lowers it"):
        circuits.suppression(organism, trace, batch_size=1, matrix=False, budget=1000)
    assert circuits.suppression(organism, trace, budget="1GB").answer_kl.isfinite().all()
