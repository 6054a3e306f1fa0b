"""The bundled organism: where its weights live and how its thinking is segmented.

Shipped inside the package (``thinklens/zoo/organism/``): ``final/`` and
``checkpoints/step-NNNNNN/`` folders (Hugging Face format: config, safetensors in
float16, tokenizer with chat template), plus ``curve.json``: loss and held-out accuracy
per checkpoint of the training run that produced them.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from thinklens.errors import ConfigError, ModelLoadError
from thinklens.zoo.task import problem_from_prompt

HERE = Path(__file__).parent / "organism"


def checkpoints(home: Path = HERE) -> list[int]:
    """Training steps of the shipped checkpoints, ascending (``home``: another organism's
    folder, e.g. :data:`thinklens.zoo.backtrack.HERE`)."""
    folder = home / "checkpoints"
    if not folder.exists():
        return []
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if p.is_dir())


def organism_folder(checkpoint: int | None = None, home: Path = HERE) -> Path:
    """Folder of the final organism, or of the shipped checkpoint at ``checkpoint`` steps.

    ``checkpoint`` may also be a small index: -1 is the last, 0 the first.
    """
    if checkpoint is None:
        folder = home / "final"
    else:
        steps = checkpoints(home)
        if checkpoint in steps:
            step = checkpoint
        elif -len(steps) <= checkpoint < len(steps):
            step = steps[checkpoint]
        else:
            raise ConfigError(f"organism checkpoint {checkpoint!r} not shipped; valid steps: "
                              f"{steps} (or an index 0..{len(steps) - 1})")
        folder = home / "checkpoints" / f"step-{step:06d}"
    if not (folder / "model.safetensors").exists():
        raise ModelLoadError(
            f"the organism's weights are missing at {folder}; reinstall thinklens, or train "
            "them with `thinklens organism train` and `thinklens organism ship`")
    return folder


def training_curve(home: Path = HERE) -> list[dict]:
    """Rows of ``curve.json``: step, loss, held-out accuracy by depth (think / direct)."""
    path = home / "curve.json"
    return json.loads(path.read_text()) if path.exists() else []


_STEP = re.compile(r"[^.]+\.")


def organism_segmenter(text: str) -> list[tuple[int, int]]:
    """One sentence per step of the chain: every piece ending with ``.``."""
    out = []
    for m in _STEP.finditer(text):
        a, b = m.span()
        while a < b and text[a].isspace():
            a += 1
        if a < b:
            out.append((a, b))
    tail = text[out[-1][1]:] if out else text
    if tail.strip():  # an unfinished last step (cut off) is still a sentence
        a = len(text) - len(tail) + (len(tail) - len(tail.lstrip()))
        out.append((a, len(text.rstrip())))
    return out


def token_truth(trace) -> list:
    """Ground truth per token of an organism trace: a ``TokenTruth`` or None.

    Thinking tokens get the task's ground truth (:class:`~thinklens.zoo.task.TokenTruth`)
    where the written thinking agrees with the correct thinking up to that token; tokens
    after the first deviation, and tokens outside the thinking, get None.
    ``source_pos`` is converted to an absolute token index of the trace.

    Example::

        truth = token_truth(model.think("c = b + 4 ; a = 7 ; b = a - 2 ; ? c"))
        [t.value for t in truth if t and t.role == "result"]    # [5, 9]
    """
    problem = problem_from_prompt(trace.prompt)
    want, truth = problem.thinking_tokens(), problem.token_truth()
    out: list = [None] * len(trace.token_ids)
    start = trace.think_span.start
    for k, tok in enumerate(trace.tokens[start: trace.think_span.end]):
        if k >= len(want) or tok.strip() != want[k]:
            break
        t = truth[k]
        out[start + k] = replace(t, source_pos=start + t.source_pos if t.source_pos >= 0 else -1)
    return out


def organism_annotator(sentence: str) -> str:
    """Behaviour tag of one organism step: ``lookup`` (resolve phase: a statement copied
    from the prompt, or the root's constant) or ``computation`` (``v = x op k = r``)."""
    n = len(sentence.replace(".", " ").split())
    return "computation" if n == 7 else "lookup" if n in (3, 5) else "other"


__all__ = ["checkpoints", "organism_folder", "training_curve", "organism_segmenter",
           "token_truth", "organism_annotator", "HERE"]
