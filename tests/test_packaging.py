"""A built wheel installs and imports outside the source tree, organism weights included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(ROOT)], check=True, cwd=out)
    (wheel,) = out.glob("thinklens-*.whl")
    site = out / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, cwd=out)
    return site


def _run(site: Path, code: str, cwd: Path) -> str:
    import os
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_wheel_imports_subpackages_and_ships_organism(wheel_site, tmp_path):
    code = ("import thinklens, thinklens.hooks, thinklens.probes, thinklens.circuits, "
            "thinklens.zoo.organism as o; "
            "print(thinklens.__file__); print(thinklens.hooks.__file__); "
            "print(o.organism_folder()); print(o.checkpoints())")
    lines = _run(wheel_site, code, tmp_path).splitlines()
    assert lines[0].startswith(str(wheel_site)) and lines[1].startswith(str(wheel_site))
    assert lines[2].startswith(str(wheel_site))
    assert len(eval(lines[3])) >= 4
    for folder in [Path(lines[2])]:
        assert (folder / "model.safetensors").stat().st_size > 100_000
        assert (folder / "tokenizer.json").exists() and (folder / "config.json").exists()
    code = ("import thinklens.zoo.backtrack as b; print(b.backtrack_folder()); "
            "print(b.checkpoints())")  # the second organism ships too
    folder, steps = _run(wheel_site, code, tmp_path).splitlines()
    assert folder.startswith(str(wheel_site)) and len(eval(steps)) >= 4
    assert (Path(folder) / "model.safetensors").stat().st_size > 100_000


def test_wheel_loads_organism(wheel_site, tmp_path):
    code = ("import thinklens; m = thinklens.load('organism'); "
            "t = m.think('c = b + 4 ; a = 7 ; b = a - 2 ; ? c', max_new_tokens=40); "
            "print(t.answer_text)")
    assert _run(wheel_site, code, tmp_path).split()[-1] == "9"
