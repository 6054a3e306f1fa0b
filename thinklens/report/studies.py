"""The study behind ``thinklens report``: traces, attention, thought anchors, probes,
the logit lens, patching and a circuit, on any model.

1. **Traces.** Think (greedy) on the prompts given, or on the first ``n_problems`` of the
   bundled grade-school math problems (:mod:`thinklens.report.problems`; the organism:
   its task's example prompts), or study given traces as they are (``traces=``, e.g. a
   traces file from ``thinklens think``: completions made on a GPU cluster, or R1-style
   completions for a random-weight model of that interface). Each trace is shown with
   its sentences and tags, its own final answer and whether it was cut at the token limit.
2. **Patching.** The organism patches its task's pair (``model.task.study_pair``: change
   the root constant of the asked chain); any other model a pair built from its own
   trace (:func:`thinklens.circuits.counterfactual_pair`: one number or name changed, the
   tokens aligned, the metric read where the model's prediction changes, its final
   answer when the change reaches it). ``resid_pre`` by layer × position and ``z`` by
   layer × head (denoising, logit difference; Meng et al. 2022, Heimersheim & Nanda 2024).
3. **Attention.** Token-level patterns of the two heads with the largest z-patching
   effect (else two heads of the middle layer) and the sentence × sentence mean
   attention of every head.
4. **Thought anchors** (:mod:`thinklens.report.anchors`; Bogdan et al. 2025): forced
   answer, attention suppression and its attribution, receiver heads; resampling when
   asked (``resample=True``).
5. **Probes.** The organism: the value a compute step writes, read at the ``=`` before
   it, on its task's held-out problems (ground truth of the task). Any model: behaviour
   tags of sentences and, where the prompts carry answers, correctness
   (:mod:`thinklens.report.generic`). Shuffled-label controls and bootstrap intervals.
6. **Logit lens** (nostalgebraist 2020) toward the model's own final answer, over the
   thinking tokens before it.
7. **Circuit.** EAP-IG (Hanna et al. 2024) on the pair of step 2: the fewest top edges
   that recover 80% of the logit difference, the faithfulness curve, and AtP / EAP-IG
   against exact patching of each head.

Each part becomes a :class:`~thinklens.report.page.Section`; a part whose data is too
small says so in its note instead of drawing noise.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import thinklens
from thinklens.errors import ConfigError
from thinklens.hooks.answers import default_extractor
from thinklens.hooks.trace import Trace
from thinklens.report import generic as G
from thinklens.report import sections as S
from thinklens.report.anchors import anchors
from thinklens.report.page import FORMATS, Report
from thinklens.report.phase import phase_change
from thinklens.report.problems import as_rows, bundled_problems, correct

_SMALL_D_MODEL = 256  # below this, one torch thread is faster (see _one_thread)
_STEPS = ("load", "think", "patching", "attention", "anchors", "probes", "logit lens",
          "circuit")
N_PROBLEMS = 24       # default problems for a model without a task: the probes' split by trace
N_ORGANISM = 4        # default problems shown for the organism (its probes use held-out ones)


def report(model: Any = "organism", out: str | Path = "thinklens-report", *,
           prompts: Sequence[Any] | None = None, traces: Sequence[Trace] | None = None,
           n_problems: int | None = None, n_probe: int = 60, max_new_tokens: int | None = None,
           resample: bool = False, total: bool | None = None,
           formats: Sequence[str] = FORMATS, progress: bool = True) -> Path:
    """Run the study on ``model`` and write ``out/report.html`` (returned) and ``out/figures/``.

    Example::

        path = report("organism", "thinklens-report")   # about a minute on 2 CPU cores
        report("model.gguf", "out", prompts=[{"prompt": "2 + 3?", "answer": "5"}])
        report(model, "out", traces=thinklens.jobs.read_traces("traces.jsonl"))

    ``model``: a spec for :func:`thinklens.load` or a loaded Model. ``prompts``: strings
    or rows ``{"prompt", "answer"?}`` (an answer enables the correctness probe); default
    the bundled problems (:func:`~thinklens.report.problems.bundled_problems`), the
    organism's example prompts for the organism. ``traces``: given completions (Traces of
    this model) studied instead of thinking (their ``meta["answer"]``, if any, is the
    true answer). ``n_problems``: how many prompts (default 24; 4 for the organism).
    ``n_probe``: the organism's held-out problems for its value probe. ``resample``: add
    resampling importance (rollouts; costly). ``total``: the total effect of suppression
    (two greedy rewrites per thinking sentence; default on for the organisms only, where
    it takes a second). ``formats``: figure files beside the page
    (``()`` for none).
    """
    rep = study(model, prompts=prompts, traces=traces, n_problems=n_problems, n_probe=n_probe,
                max_new_tokens=max_new_tokens, resample=resample, total=total,
                progress=progress)
    return rep.write(out, formats=formats, progress=progress)


@contextmanager
def _one_thread(on: bool) -> Iterator[None]:
    """torch on one intra-op thread inside the block, restored after it.

    Small models' matrices (the organism's d_model is 128) are too small for threads to
    pay: on a busy 2-core machine two threads made the study 3x slower (probe fits, mostly).
    """
    before = torch.get_num_threads()
    if on:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def study(model: Any = "organism", *, prompts: Sequence[Any] | None = None,
          traces: Sequence[Trace] | None = None, n_problems: int | None = None,
          n_probe: int = 60, max_new_tokens: int | None = None, resample: bool = False,
          total: bool | None = None, progress: bool = True) -> Report:
    """The :class:`Report` of :func:`report`, computed but not written (see its arguments)."""
    for name, v, least in (("n_problems", n_problems, 1), ("n_probe", n_probe, 6)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise ConfigError(f"{name}={v!r}; give an integer >= {least}")
    if prompts is not None and traces is not None:
        raise ConfigError("give prompts= (thought on here) or traces= (studied as they are), "
                          "not both")
    rows = None
    if prompts is not None:
        if isinstance(prompts, str) or not list(prompts):
            raise ConfigError(f"prompts={prompts!r}; give a list of non-empty strings or rows")
        rows = as_rows(prompts)[:n_problems]
    if traces is not None:
        traces = list(traces)
        if not traces or not all(isinstance(t, Trace) for t in traces):
            raise ConfigError("traces= must be a non-empty list of Traces "
                              "(thinklens.jobs.read_traces(file))")
        traces = traces[:n_problems]
    t0 = time.time()
    bar = tqdm(total=len(_STEPS), desc="report", unit="step", disable=not progress)
    if isinstance(model, str | Path):
        model = thinklens.load(str(model))
    bar.update()
    with _one_thread(model.config.d_model <= _SMALL_D_MODEL):
        rep = _run(model, rows, traces, n_problems, n_probe, max_new_tokens, resample, total,
                   bar)
    rep.meta["study time"] = f"{time.time() - t0:.1f} s (before figure export)"
    bar.close()
    return rep


def _inputs(model, rows, given, n_problems, max_new_tokens, organism):
    """(traces, true answers or None per trace, where they came from)."""
    if given is not None:  # completions made elsewhere: studied as they are
        return given, [t.meta.get("answer") for t in given], "given traces"
    if rows is None:
        task = model.task
        if organism and task.example_prompts:
            rows = [{"prompt": p} for p in task.example_prompts[: n_problems or N_ORGANISM]]
            source = "the task's example prompts"
        else:
            rows = bundled_problems(n_problems or N_PROBLEMS)
            source = "bundled grade-school problems"
    else:
        source = "given prompts"
    small = model.config.d_model <= _SMALL_D_MODEL
    budget = max_new_tokens or (96 if small else 160)
    trs = model.think_batch([r["prompt"] for r in rows], max_new_tokens=budget, progress=False)
    for t, r in zip(trs, rows):
        if "id" in r:
            t.meta.setdefault("id", str(r["id"]))
    return trs, [r.get("answer") for r in rows], source


def _run(model, rows, given, n_problems, n_probe, max_new_tokens, resample, total,
         bar) -> Report:
    times: dict[str, float] = {}
    clock = [time.time()]

    def step(name: str) -> None:
        now = time.time()
        if times:
            times[next(reversed(times))] = now - clock[0]
        clock[0] = now
        bar.set_postfix_str(name)
        times[name] = 0.0

    task = model.task
    organism = task is not None and task.study_labels is not None
    step("think")
    trs, answers, source = _inputs(model, rows, given, n_problems, max_new_tokens, organism)
    has_answers = any(a is not None for a in answers)
    right = correct(model, trs, answers) if has_answers else None
    extract = default_extractor(model)
    bar.update()
    step("patching")
    if organism:
        patching = S.patching(model, [t.prompt for t in trs])
        patch_section = patching.section if patching is not None else S.skipped_patching(model)
    else:
        patching, patch_section = G.pair_patching(model, trs)
    bar.update()
    step("attention")
    attention = S.attention(model, trs, _heads(model, patching),
                            from_patching=patching is not None)
    bar.update()
    step("anchors")
    cap = None
    if not organism and any(t.sentences for t in trs):  # one pass for probes and receivers
        cap = model.capture([t for t in trs if t.sentences], sites=G.SITES,
                            positions="sentence_ends", attention="sentence", progress=False)
    anchor = anchors(model, trs, cap=cap, resample=resample,
                     total=organism if total is None else total)
    bar.update()
    step("probes")
    probe = (S.probes(model, n_probe) if organism
             else G.behaviour_probes(model, trs, right, cap))
    bar.update()
    step("logit lens")
    lens = G.own_answer_lens(model, trs)
    bar.update()
    step("circuit")
    circuit = (S.circuit(model, patching.pair, patching.z) if patching is not None
               else S.skipped_circuit(model))
    bar.update()
    step("tables")
    rep = Report(f"thinklens report: {model.name}", meta={
        "model": repr(model), "problems": f"{len(trs)} ({source})", "study time": "",
        "time per part": "", "thinklens": thinklens.__version__})
    own = [extract(t) for t in trs]
    for section in (S.traces(model, trs, own, right), attention, anchor, probe, lens,
                    patch_section, circuit):
        rep.add(section)
    rep.add(phase_change(model))  # the model's training checkpoints, where it has them
    rep.traces = list(trs)
    rep.meta["time per part"] = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    return rep


def _heads(model: Any, patching: Any) -> list[tuple[int, int]]:
    """Two (layer, head) pairs: the largest |z-patching effect|, else the middle layer's first two."""
    n_layers, n_heads = model.config.n_layers, model.config.n_heads
    if patching is not None:
        z = patching.z.normalized().abs()
        layers = patching.z.labels["layer"]
        top = torch.topk(z.flatten(), min(2, z.numel())).indices.tolist()
        return [(int(layers[k // z.shape[1]]), k % z.shape[1]) for k in top]
    return [(n_layers // 2, h) for h in range(min(2, n_heads))]


__all__ = ["report", "study", "N_PROBLEMS"]
