"""The study behind ``thinklens report``: traces, attention, probes, patching on one model.

1. Think on a handful of prompts (greedy) and show each trace, sentence by sentence.
2. Models with a task that builds a pair (``model.task.study_pair``; the organism:
   change the root constant of the asked chain, ``change_constant``) patch it: ``resid_pre`` by layer × position and ``z`` by layer × head (denoising,
   logit difference; Meng et al. 2022, Heimersheim & Nanda 2024).
3. Attention of the first trace: token-level patterns of two heads (the two with the
   largest z-patching effect on the organism, else two heads of the middle layer) and
   the sentence × sentence mean attention of every head (Thought Anchors, Bogdan et al.
   2025).
4. Models whose task names a label set to study (``model.task.study_labels``; the
   organism: the value a compute step writes, read at the ``=`` before it) probe every
   layer's residual stream for it on the task's held-out problems, with a shuffled-label
   control (Hewitt & Liang 2019). Every model: the logit lens (nostalgebraist 2020) of
   the model's own first answer token over the thinking.
5. With the pair of step 2: score every edge of the pair's computation graph with EAP-IG (Hanna et
   al. 2024), keep the fewest top edges that recover 80% of the logit difference, and
   draw that circuit and the faithfulness curve.

Each part becomes a :class:`~thinklens.report.page.Section`; parts that need what a
model's task provides (:mod:`thinklens.hooks.task`) are replaced by a note on models
without one.
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
from thinklens.report import sections as S
from thinklens.report.page import FORMATS, Report
from thinklens.report.phase import phase_change

GENERIC_PROMPTS = [
    "What is 17 + 25? Answer with the number only.",
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Is 91 a prime number? Answer yes or no.",
    "x = 7 and y = x - 2. What is y?",
]
_SMALL_D_MODEL = 256  # below this, one torch thread is faster (see _one_thread)
_STEPS = ("load", "think", "patching", "attention", "probes", "logit lens", "circuit")


def report(model: Any = "organism", out: str | Path = "thinklens-report", *,
           prompts: Sequence[str] | None = None, n_problems: int = 4,
           n_probe: int = 60, max_new_tokens: int | None = None,
           formats: Sequence[str] = FORMATS, progress: bool = True) -> Path:
    """Run the study on ``model`` and write ``out/report.html`` (returned) and ``out/figures/``.

    Example::

        path = report("organism", "thinklens-report")   # about half a minute on 2 CPU cores
        path.name                                       # 'report.html'

    ``model``: a spec for :func:`thinklens.load` or a loaded Model. ``prompts``: the
    problems shown (default: ``n_problems`` of the task's example prompts, else built-in
    ones). ``n_probe``: held-out problems of the task the probes are trained and tested on. ``formats``: figure files beside the
    page (``()`` for none).
    """
    rep = study(model, prompts=prompts, n_problems=n_problems, n_probe=n_probe,
                max_new_tokens=max_new_tokens, progress=progress)
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


def study(model: Any = "organism", *, prompts: Sequence[str] | None = None,
          n_problems: int = 4, n_probe: int = 60, max_new_tokens: int | None = None,
          progress: bool = True) -> Report:
    """The :class:`Report` of :func:`report`, computed but not written (see its arguments)."""
    for name, v, least in (("n_problems", n_problems, 1), ("n_probe", n_probe, 6)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ConfigError(f"{name}={v!r}; give an integer >= {least}")
    if prompts is not None:
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError(f"prompts={prompts!r}; give a list of non-empty strings")
    t0 = time.time()
    bar = tqdm(total=len(_STEPS), desc="report", unit="step", disable=not progress)

    def step(name: str) -> None:
        bar.set_postfix_str(name)

    step("load")
    if isinstance(model, str | Path):
        model = thinklens.load(str(model))
    bar.update()
    with _one_thread(model.config.d_model <= _SMALL_D_MODEL):
        rep = _run(model, prompts, n_problems, n_probe, max_new_tokens, bar, step)
    rep.meta["study time"] = f"{time.time() - t0:.1f} s (before figure export)"
    bar.close()
    return rep


def _run(model, prompts, n_problems, n_probe, max_new_tokens, bar, step) -> Report:
    step("think")
    task = model.task
    default = task.example_prompts if task is not None and task.example_prompts \
        else GENERIC_PROMPTS
    prompts = prompts if prompts is not None else default[:n_problems]
    small = model.config.d_model <= _SMALL_D_MODEL
    budget = max_new_tokens or (96 if small else 160)
    traces = model.think_batch(prompts, max_new_tokens=budget, progress=False)
    bar.update()
    step("patching")
    patching = S.patching(model, prompts)
    bar.update()
    step("attention")
    attention = S.attention(model, traces, _heads(model, patching),
                            from_patching=patching is not None)
    bar.update()
    step("probes")
    probe = S.probes(model, n_probe)
    bar.update()
    step("logit lens")
    lens = S.logit_lens(model, traces)
    bar.update()
    step("circuit")
    circuit = (S.circuit(model, patching.pair, patching.z) if patching is not None
               else S.skipped_circuit(model))
    bar.update()
    rep = Report(f"thinklens report: {model.name}", meta={
        "model": repr(model), "problems": len(traces), "study time": "",
        "thinklens": thinklens.__version__})
    for section in (S.traces(model, traces), attention, probe, lens,
                    patching.section if patching is not None else S.skipped_patching(model),
                    circuit):
        rep.add(section)
    rep.add(phase_change(model))  # the model's training checkpoints, where it has them
    return rep


def _heads(model: Any, patching: Any) -> list[tuple[int, int]]:
    """Two (layer, head) pairs: the largest |z-patching effect|, else the middle layer's first two."""
    n_layers, n_heads = model.config.n_layers, model.config.n_heads
    if patching is not None:
        z = patching.z.normalized().abs()
        top = torch.topk(z.flatten(), min(2, z.numel())).indices.tolist()
        return [(k // z.shape[1], k % z.shape[1]) for k in top]
    return [(n_layers // 2, h) for h in range(min(2, n_heads))]


__all__ = ["report", "study"]
