"""The thinklens command line: help texts, the demo, and capture that resumes after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from thinklens.cli import main
from thinklens.hooks.store import Store


def _cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "thinklens.cli", *args], capture_output=True,
                          text=True, env=env, **kw)


@pytest.mark.parametrize("cmd", [[], ["demo"], ["capture"], ["sites"], ["organism"],
                                 ["organism", "train"], ["organism", "eval"],
                                 ["organism", "ship"], ["probe"], ["report"]])
def test_help_explains_each_command(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: thinklens" in text and len(text) > 200


def test_errors_are_one_line_with_fix(tmp_path, capsys):
    assert main(["capture", "--prompts", str(tmp_path / "none.jsonl"), "--out",
                 str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "none.jsonl" in err and "JSONL" in err


def test_demo_writes_store_and_traces(tmp_path):
    out = _cli("demo", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "output:" in out.stdout
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["traces"] == 6 and summary["resid_shape"][1] == 4
    store = Store.open(tmp_path / "demo" / "store")
    assert len(store) == 6 and "sentence_attention" in store.keys
    assert len(list((tmp_path / "demo" / "traces").glob("*.json"))) == 6


def _prompts(path: Path, n: int) -> Path:
    from thinklens.zoo.evaluate import heldout_problems
    rows = [{"id": f"p{i}", "prompt": p.prompt}
            for i, p in enumerate(heldout_problems(3, n, seed=7))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_capture_resumes_after_kill(tmp_path):
    prompts = _prompts(tmp_path / "p.jsonl", 12)
    args = ["capture", "--prompts", str(prompts), "--sites", "blocks.1.hook_resid_post",
            "--max-new-tokens", "60", "--chunk", "3"]
    ref = _cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "thinklens.cli", *args, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (out / "manifest.json").exists() and len(Store.open(out, verify="none")) >= 3:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    before = len(Store.open(out))
    assert 3 <= before < 12, "the kill should land mid-run"
    again = _cli(*args, "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = Store.open(tmp_path / "ref"), Store.open(out)
    assert a.trace_ids == b.trace_ids
    torch.testing.assert_close(a["blocks.1.hook_resid_post"].values,
                               b["blocks.1.hook_resid_post"].values, atol=0, rtol=0)
    assert not (out / "pending-traces.jsonl").exists()


def test_capture_resumes_after_a_torn_journal_line(tmp_path):
    """A kill mid-write leaves half a line in pending-traces.jsonl; the rerun drops it
    (and regenerates that trace) instead of appending after it."""
    import thinklens
    from thinklens._commands import PENDING, run_capture

    model = thinklens.load("organism")
    recs = [(f"p{i}", p) for i, p in enumerate(["a = 7 ; ? a", "b = 2 ; c = b + 1 ; ? c",
                                                "d = 4 ; ? d"])]
    out = tmp_path / "s"
    out.mkdir()
    first = model.think(recs[0][1], max_new_tokens=40)
    first.meta["id"] = "p0"
    line = json.dumps(first.to_dict())
    (out / PENDING).write_text(line + "\n" + line[: len(line) // 2])
    kw = {"sites": ["blocks.0.hook_resid_post"], "max_new_tokens": 40, "chunk": 2}
    capture = model.capture

    def killed(*a, **k):  # the run dies after journaling p1, before storing anything
        raise KeyboardInterrupt
    model.capture = killed
    with pytest.raises(KeyboardInterrupt):
        run_capture(model, recs, out, **kw)
    model.capture = capture
    journal = [json.loads(x) for x in (out / PENDING).read_text().splitlines()]
    assert [t["meta"]["id"] for t in journal] == ["p0", "p1"]  # the torn half is gone
    store = run_capture(model, recs, out, **kw)
    assert store.trace_ids == ["p0", "p1", "p2"]
    assert store.traces[0].thinking_text == first.thinking_text


def test_the_readme_commands_are_the_ones_ci_and_the_tests_run():
    """The README's two commands: setup + `thinklens report` (tested in test_report.py),
    and `bash .ci/run`, which must set up, lint and run this test suite."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert blocks == ["bash .ci/setup && .venv/bin/thinklens report --out thinklens-report",
                      "bash .ci/run"]
    ci = (root / ".ci" / "run").read_text()
    assert "bash .ci/setup" in ci and "ruff check ." in ci and "python -m pytest -q" in ci
    out = _cli("report", "--help")
    assert out.returncode == 0 and "--out" in out.stdout
