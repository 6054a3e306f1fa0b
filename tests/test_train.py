"""Organism training: deterministic given the seed, and resumable after a real kill."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from thinklens.errors import ConfigError
from thinklens.zoo.train import TrainConfig, train

SMALL = dict(steps=8, ckpt_every=2, batch_size=8, eval_per_depth=8, d_model=32, n_layers=1,
             n_heads=2, d_mlp=64, threads=1)
# SIGKILL at a named step: right after the second checkpoint's weights are written, before
# its optimizer state and log (so the resume must redo steps 3-4 from the step-2 state)
SCRIPT = ("import os, signal, sys; from thinklens.zoo import train as T\n"
          "real, saved = T.save_weights, []\n"
          "def killing(*a, **k):\n    real(*a, **k); saved.append(1)\n"
          "    if len(saved) == 2:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
          "T.save_weights = killing\n"
          f"T.train(T.TrainConfig(**{SMALL!r}), sys.argv[1], progress=False)\n")


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def _log(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    train(TrainConfig(**SMALL), out, progress=False)
    return out


def test_same_seed_same_weights(reference, tmp_path):
    train(TrainConfig(**SMALL), tmp_path, progress=False)
    a, b = _weights(reference / "step-000008"), _weights(tmp_path / "step-000008")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _log(tmp_path)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in _log(reference)]


def test_killed_run_resumes_to_identical_weights(reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], timeout=300)
    assert proc.returncode == -9, "the run should have been killed at its second checkpoint"
    assert [r["step"] for r in _log(out)] == [2], "killed before step 4's state and log"
    assert (out / "step-000004" / "model.safetensors").exists()
    train(TrainConfig(**SMALL), out, progress=False)  # resume in this process
    a, b = _weights(reference / "step-000008"), _weights(out / "step-000008")
    assert all((a[k] == b[k]).all() for k in a)
    assert [r["step"] for r in _log(out)] == [2, 4, 6, 8]


def test_resume_with_other_config_refused(reference):
    with pytest.raises(ConfigError, match="another config"):
        train(TrainConfig(**{**SMALL, "seed": 1}), reference, progress=False)


def test_ship_follows_every_earlier_phase(reference, tmp_path):
    """A third phase started from a second, itself from the first: ship finds checkpoints in
    all three runs, and the curve is each phase's rows up to the next one's start."""
    from thinklens.zoo.train import ship

    two = train(TrainConfig(**{**SMALL, "steps": 4, "init_step": 8,
                               "init_from": str(reference / "step-000008")}),
                tmp_path / "two", progress=False)
    train(TrainConfig(**{**SMALL, "steps": 2, "init_step": 10, "init_from": str(
        tmp_path / "two" / "step-000010")}), tmp_path / "three", progress=False)
    assert two.name == "step-000012"
    ship(tmp_path / "three", tmp_path / "shipped", [2, 10])
    curve = json.loads((tmp_path / "shipped" / "curve.json").read_text())
    assert [r["step"] for r in curve] == [2, 4, 6, 8, 10, 12]
    assert sorted(p.name for p in (tmp_path / "shipped" / "checkpoints").iterdir()) == [
        "step-000002", "step-000010"]
    with pytest.raises(ConfigError, match="no checkpoint at steps \\[5\\]"):
        ship(tmp_path / "three", tmp_path / "other", [5])
