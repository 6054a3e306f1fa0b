"""The thinklens command line: help texts, the demo, and capture that resumes after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thinklens.cli import main
from thinklens.hooks.store import Store


def _cli(*args, env=None, **kw):
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
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
    from thinklens.jobs.commands import DEMO_PROMPTS

    out = _cli("demo", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "output:" in out.stdout
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    store = Store.open(tmp_path / "demo" / "store")
    assert [t.prompt for t in store.traces] == DEMO_PROMPTS
    longest = max(len(t.tokens) for t in store.traces)
    # 6 traces x 4 layers (the organism's) x the longest trace x d_model 128
    assert summary["resid_shape"] == [6, 4, longest, 128]
    most = max(len(t.sentences) for t in store.traces)  # 4 layers x 4 heads, sentence x sentence
    assert summary["sentence_attention_shape"] == [6, 4, 4, most, most]
    assert "sentence_attention" in store.keys
    assert sorted(p.name for p in (tmp_path / "demo" / "traces").glob("*.json")) == \
        [f"demo-{i}.json" for i in range(6)]


def _prompts(path: Path, n: int) -> Path:
    from thinklens.zoo.evaluate import heldout_problems
    rows = [{"id": f"p{i}", "prompt": p.prompt}
            for i, p in enumerate(heldout_problems(3, n, seed=7))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CAPTURE = ["capture", "--sites", "blocks.1.hook_resid_post", "--max-new-tokens", "60",
           "--chunk", "3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("capture")
    prompts = _prompts(tmp / "p.jsonl", 12)
    ref = _cli(*CAPTURE, "--prompts", str(prompts), "--out", str(tmp / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    return prompts, Store.open(tmp / "ref")


@pytest.mark.parametrize("step, stored, journaled", [
    ("capture-chunk:2", 6, 6),   # killed right after the 2nd round's store append
    ("journaled:3", 6, 9),       # killed after journaling round 3, before storing it
])
def test_capture_resumes_after_kill(uninterrupted, tmp_path, step, stored, journaled):
    """SIGKILL at a named step of the journal (the test hook THINKLENS_TEST_KILL_AT), then
    a rerun: the store ends equal, bit for bit, to an uninterrupted run's."""
    from thinklens.jobs.journal import KILL_AT, PENDING

    prompts, ref = uninterrupted
    out = tmp_path / "killed"
    args = [*CAPTURE, "--prompts", str(prompts), "--out", str(out)]
    killed = _cli(*args, env={**os.environ, "OMP_NUM_THREADS": "1", KILL_AT: step})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(Store.open(out)) == stored
    assert len((out / PENDING).read_text().splitlines()) == journaled
    again = _cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    got = Store.open(out)
    assert got.trace_ids == ref.trace_ids == [f"p{i}" for i in range(12)]
    torch.testing.assert_close(ref["blocks.1.hook_resid_post"].values,
                               got["blocks.1.hook_resid_post"].values, atol=0, rtol=0)
    assert not (out / PENDING).exists()


def test_capture_resumes_after_a_torn_journal_line(tmp_path):
    """A kill mid-write leaves half a line in pending-traces.jsonl; the rerun drops it
    (and regenerates that trace) instead of appending after it."""
    import thinklens
    from thinklens.jobs.journal import PENDING, run_capture

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
