"""The bundled organism: where its weights live and how its thinking is segmented.

Shipped inside the package (``thinklens/zoo/organism/``): ``final/`` and
``checkpoints/step-NNNNNN/`` folders (Hugging Face format: config, safetensors in
float16, tokenizer with chat template), plus ``curve.json``: loss and held-out accuracy
per checkpoint of the training run that produced them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from thinklens.errors import ConfigError, ModelLoadError

HERE = Path(__file__).parent / "organism"


def checkpoints() -> list[int]:
    """Training steps of the shipped checkpoints, ascending."""
    folder = HERE / "checkpoints"
    if not folder.exists():
        return []
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if p.is_dir())


def organism_folder(checkpoint: int | None = None) -> Path:
    """Folder of the final organism, or of the shipped checkpoint at ``checkpoint`` steps.

    ``checkpoint`` may also be a small index: -1 is the last, 0 the first.
    """
    if checkpoint is None:
        folder = HERE / "final"
    else:
        steps = checkpoints()
        if checkpoint in steps:
            step = checkpoint
        elif -len(steps) <= checkpoint < len(steps):
            step = steps[checkpoint]
        else:
            raise ConfigError(f"organism checkpoint {checkpoint!r} not shipped; valid steps: "
                              f"{steps} (or an index 0..{len(steps) - 1})")
        folder = HERE / "checkpoints" / f"step-{step:06d}"
    if not (folder / "model.safetensors").exists():
        raise ModelLoadError(
            f"the organism's weights are missing at {folder}; reinstall thinklens, or train "
            "them with `thinklens organism train` and `thinklens organism ship`")
    return folder


def training_curve() -> list[dict]:
    """Rows of ``curve.json``: step, loss, held-out accuracy by depth (think / direct)."""
    path = HERE / "curve.json"
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
