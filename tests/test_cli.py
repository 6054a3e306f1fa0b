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
from thinklens.errors import ConfigError
from thinklens.hooks.store import Store


def _cli(*args, env=None, **kw):
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "thinklens.cli", *args], capture_output=True,
                          text=True, env=env, **kw)


@pytest.mark.parametrize("cmd", [[], ["demo"], ["think"], ["capture"], ["sites"], ["organism"],
                                 ["organism", "train"], ["organism", "eval"],
                                 ["organism", "ship"], ["probe"], ["report"], ["anchors"],
                                 ["dynamics"]])
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


def test_think_and_capture_traces_help_explain_themselves(capsys):
    with pytest.raises(SystemExit):
        main(["think", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--samples", "--engine {hf,vllm}", "--thinking {auto,tags,answer}",
                  "SEED + k*SAMPLES + j", "skipped", "thinklens capture --traces", "\\boxed"):
        assert words in text, words
    with pytest.raises(SystemExit):
        main(["capture", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--traces TRACES" in text and "without generating" in text


THINK = ["think", "--samples", "2", "--temperature", "2.0", "--max-new-tokens", "40",
         "--chunk", "4", "--no-progress"]


@pytest.fixture(scope="module")
def thought(tmp_path_factory):
    """An uninterrupted `think` run: 5 prompts x 2 samples."""
    tmp = tmp_path_factory.mktemp("think")
    prompts = _prompts(tmp / "p.jsonl", 5)
    ref = _cli(*THINK, "--prompts", str(prompts), "--out", str(tmp / "ref.jsonl"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert "10 traces in" in ref.stdout and "10 written this run" in ref.stdout
    return prompts, (tmp / "ref.jsonl").read_text()


def test_think_writes_what_think_batch_gives(thought, organism):
    """Sample j of the prompt on line k is think_batch's trace with seed k*N + j; the meta
    names its prompt and sample."""
    from thinklens.jobs.journal import read_prompts

    prompts, text = thought
    traces = read_traces_from_text(text)
    rows = read_prompts(prompts)
    assert [(t.meta["prompt_id"], t.meta["sample"]) for t in traces] == [
        (pid, j) for pid, _, _ in rows for j in range(2)]
    assert [t.meta["id"] for t in traces[:2]] == ["p0#0", "p0#1"]
    api = organism.think_batch([p for _, p, _ in rows for _ in range(2)], max_new_tokens=40,
                               temperature=2.0, seed=0)
    assert [t.token_ids for t in traces] == [t.token_ids for t in api]
    assert len({tuple(t.token_ids) for t in traces}) > 5  # sampled: not all alike


def read_traces_from_text(text):
    from thinklens.hooks.trace import Trace
    return [Trace.from_json(line) for line in text.splitlines()]


@pytest.mark.parametrize("tear", [False, True], ids=["killed", "killed-mid-line"])
def test_think_resumes_after_kill(thought, tmp_path, tear):
    """SIGKILL after the 2nd saved round (8 of 10 traces); optionally a torn half line
    after them, as a kill mid-write leaves. The rerun cuts the torn line, generates only
    the missing pairs, and the file ends byte for byte as the uninterrupted run's."""
    from thinklens.jobs.journal import KILL_AT

    prompts, ref = thought
    out = tmp_path / "t.jsonl"
    args = [*THINK, "--prompts", str(prompts), "--out", str(out)]
    killed = _cli(*args, env={**os.environ, "OMP_NUM_THREADS": "1", KILL_AT: "think-round:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    lines = out.read_text().splitlines(keepends=True)
    assert len(lines) == 8 and "".join(lines) == "".join(ref.splitlines(keepends=True)[:8])
    if tear:
        with open(out, "a") as f:
            f.write(ref.splitlines()[8][:300])
    again = _cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 written this run" in again.stdout
    assert out.read_text() == ref
    third = _cli(*args)
    assert "0 written this run" in third.stdout and out.read_text() == ref


def test_think_refuses_another_setting_before_loading(thought, tmp_path, capsys):
    prompts, ref = thought
    out = tmp_path / "t.jsonl"
    out.write_text(ref)
    bad = ["--model", str(tmp_path / "no-such-model"), "--prompts", str(prompts), "--out", str(out)]
    assert main([*THINK[:4], "0.5", *THINK[5:], *bad]) == 1
    err = capsys.readouterr().err
    assert "temperature=2.0 (now 0.5)" in err and "new --out" in err
    assert main(["think", "--samples", "3", *bad]) == 1
    assert "identical greedy traces" in capsys.readouterr().err


def _capture_cli(*args):
    return main(["capture", "--model", "/no/such/model", "--out", "/tmp/never", *args])


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("\n  \n", "is empty"),
    ('{"prompt": "a = 7 ; ? a"}\n{"prompt": "b = 2 ; ? b"\n', "line 2 is not JSON"),
    ('{"prompt": "a = 7 ; ? a"}\n["b = 2 ; ? b"]\n', "line 2 has no string 'prompt'"),
    ('{"prompt": "a = 7 ; ? a"}\n{"prompt": 3}', "line 2 has no string 'prompt'"),
])
def test_bad_prompts_files_are_refused_before_loading(tmp_path, capsys, content, message):
    """The model path does not exist: the file is refused before any model loads."""
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    for cmd in (["think", "--model", "/no/such/model", "--out", str(tmp_path / "t.jsonl")],
                ["capture", "--model", "/no/such/model", "--out", str(tmp_path / "s")]):
        assert main([*cmd, "--prompts", str(path)]) == 1
        err = capsys.readouterr().err
        assert message in err and "p.jsonl" in err and "no/such/model" not in err


def test_bad_traces_files_are_refused_before_loading(thought, tmp_path, capsys):
    _, ref = thought
    lines = ref.splitlines()
    path = tmp_path / "t.jsonl"
    for content, message in [
            ("", "is empty"),
            (f"{lines[0]}\n{{not json\n{lines[1]}\n", "line 2 is not a trace"),
            (f"{lines[0]}\n{{\"prompt\": \"x\"}}\n", "line 2 is not a trace"),
            (f"{lines[0]}\n{lines[0]}\n", "line 2 repeats trace id 'p0#0' of line 1")]:
        path.write_text(content)
        assert _capture_cli("--traces", str(path)) == 1
        err = capsys.readouterr().err
        assert message in err and "t.jsonl" in err, err
    assert _capture_cli("--traces", str(tmp_path / "missing.jsonl")) == 1
    assert "thinklens think" in capsys.readouterr().err
    path.write_text(ref)
    assert _capture_cli("--traces", str(path), "--temperature", "0.5") == 1
    assert "--temperature" in capsys.readouterr().err


def test_capture_traces_equals_the_api_and_generates_nothing(thought, organism, tmp_path,
                                                             monkeypatch):
    """`capture --traces` stores what model.capture gives for the same traces, and never
    calls generation (think_batch and the engines are made to fail)."""
    from thinklens.hooks import generate
    from thinklens.hooks.wrapper import Model

    _, ref = thought
    path = tmp_path / "t.jsonl"
    path.write_text(ref)
    traces = read_traces_from_text(ref)
    api = organism.capture(traces, sites="blocks.1.hook_resid_post", positions="thinking",
                           attention="sentence")

    def boom(*a, **k):
        raise AssertionError("capture --traces generated")
    monkeypatch.setattr(Model, "think_batch", boom)
    monkeypatch.setattr(generate, "engine_for", boom)
    args = ["capture", "--traces", str(path), "--out", str(tmp_path / "s"), "--sites",
            "blocks.1.hook_resid_post", "--positions", "thinking", "--attention", "sentence"]
    assert main(args) == 0
    got = Store.open(tmp_path / "s")
    assert got.trace_ids == [t.meta["id"] for t in traces]
    assert [t.to_dict() for t in got.traces] == [t.to_dict() for t in traces]
    for key in ("blocks.1.hook_resid_post", "sentence_attention"):
        torch.testing.assert_close(got[key].values, api[key].values, atol=1e-5, rtol=1e-5)
    assert main(args) == 0 and len(Store.open(tmp_path / "s")) == len(traces)  # resumes


def test_sampled_capture_seeds_each_prompt_by_its_line_whatever_the_rounds(organism, tmp_path):
    """A resumed (or differently chunked) sampled run generates what one uninterrupted
    think_batch does: prompt k is seeded seed + k, not by its place in a round."""
    from thinklens.jobs.journal import run_capture

    prompts = ["a = 7 ; b = a + 2 ; ? b", "c = 5 ; d = c - 1 ; ? d", "e = 3 ; ? e"]
    records = [(f"p{k}", p) for k, p in enumerate(prompts)]
    kw = dict(sites=["blocks.0.hook_resid_post"], max_new_tokens=24, temperature=3.0, seed=4,
              progress=False)
    one = run_capture(organism, records, tmp_path / "one", chunk=3, **kw)
    rounds = run_capture(organism, records, tmp_path / "rounds", chunk=1, **kw)
    want = organism.think_batch(prompts, max_new_tokens=24, temperature=3.0, seed=4)
    got_one = {t.meta["id"]: t.token_ids for t in one.traces}
    got_rounds = {t.meta["id"]: t.token_ids for t in rounds.traces}
    assert got_one == got_rounds == {f"p{k}": t.token_ids for k, t in enumerate(want)}
    greedy = organism.think_batch(prompts, max_new_tokens=24)
    assert [t.token_ids for t in want] != [t.token_ids for t in greedy]  # it sampled
    with pytest.raises(ConfigError, match="seed has 2 entries for 3 prompts"):
        organism.think_batch(prompts, seed=[1, 2])
