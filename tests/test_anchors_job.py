"""``thinklens anchors``: sentence measures over a traces file, checked before the model
loads, equal to the circuits functions called directly, and resumed after a real kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import thinklens
from thinklens import circuits
from thinklens.cli import main
from thinklens.errors import ConfigError
from thinklens.hooks._fileio import KILL_AT
from thinklens.hooks.trace import Trace
from thinklens.jobs.anchors import read_anchors, run_anchors

PROMPTS = ["h = g + 9 ; c = b + 4 ; g = 3 ; a = 7 ; b = a - 2 ; ? c",
           "f = 2 ; k = f + 3 ; j = 1 ; m = k - 4 ; ? m"]
ALL = ["forced", "suppression", "total", "attribution", "resampling"]


@pytest.fixture(scope="module")
def backtrack():
    return thinklens.load("organism-backtrack")


@pytest.fixture(scope="module")
def traces_file(backtrack, tmp_path_factory):
    trs = backtrack.think_batch(PROMPTS, temperature=1.0, seed=3, progress=False)
    trs = [Trace.from_dict({**t.to_dict(), "meta": {**t.meta, "id": f"p{k}"}})
           for k, t in enumerate(trs)]
    empty = Trace.from_text(backtrack, "a = 3 ; ? a", "</think> 3 <eos>", meta={"id": "empty"})
    path = tmp_path_factory.mktemp("anchors") / "traces.jsonl"
    path.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in [*trs, empty]))
    return path, trs


def test_bad_input_is_refused_before_the_model_loads(traces_file, tmp_path):
    path, _ = traces_file
    out = tmp_path / "a.jsonl"
    for kw, msg in (({"measures": ["supression"]}, "unknown measure 'supression'.*suppression"),
                    ({"measures": []}, "no measures given"),
                    ({"n": 0}, "n=0; give an integer >= 1"),
                    ({"max_new_tokens": -1}, "max_new_tokens=-1"),
                    ({"temperature": float("nan")}, "temperature=nan"),
                    ({"comparator": "cosine"}, "comparator='cosine'; valid: exact, embedding")):
        with pytest.raises(ConfigError, match=msg):   # "no-such-model" is never loaded
            run_anchors("no-such-model", path, out, **kw)
    with pytest.raises(ConfigError, match="no folder"):
        run_anchors("no-such-model", path, tmp_path / "nowhere" / "a.jsonl")
    with pytest.raises(ConfigError):
        run_anchors("no-such-model", tmp_path / "missing.jsonl", out)
    assert not out.exists()


def test_scores_equal_the_circuits_functions(backtrack, traces_file, tmp_path):
    path, trs = traces_file
    out = tmp_path / "a.jsonl"
    res = run_anchors(backtrack, path, out, measures=ALL, n=4, max_new_tokens=48,
                      progress=False)
    assert res.written == 3 and [r["id"] for r in res.rows] == ["p0", "p1", "empty"]
    assert "no thinking sentences" in res.rows[2]["skipped"]
    t, row = trs[0], res.rows[0]
    assert row["sentences"] == [s.text for s in t.sentences]
    sc = {k: torch.tensor([float("nan") if v is None else v for v in x])
          for k, x in row["scores"].items()}
    close = dict(atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(sc["forced"], circuits.forced_answer(backtrack, t).importance
                               .float(), **close)
    sup = circuits.suppression(backtrack, t)
    torch.testing.assert_close(sc["suppression"], -sup.answer_logodds_delta.float(), **close)
    torch.testing.assert_close(sc["suppression_chain"], sup.chain.float(), **close)
    tot = circuits.suppression_total(backtrack, t, max_new_tokens=48)
    torch.testing.assert_close(sc["total_kl"], tot.answer_kl.float(), **close)
    att = circuits.sentence_attribution(backtrack, t, chain=True)
    torch.testing.assert_close(sc["attribution"], -att.estimate.float(), **close)
    torch.testing.assert_close(sc["attribution_chain"], att.chain.float(), **close)
    ri = circuits.resampling(backtrack, t, n=4, max_new_tokens=48, comparator="exact",
                             progress=False)
    torch.testing.assert_close(sc["resampling"], ri.resampling.float(), **close)
    torch.testing.assert_close(sc["counterfactual_kl"], ri.counterfactual_kl.float(), **close)
    settings, rows = read_anchors(out)
    assert settings["measures"] == sorted(ALL) and rows == res.rows
    again = run_anchors("no-such-model", path, out, measures=ALL, n=4, max_new_tokens=48)
    assert again.written == 0 and again.rows == res.rows      # nothing left: no model loaded
    with pytest.raises(ConfigError, match="other settings"):
        run_anchors("no-such-model", path, out, measures=ALL, n=5, max_new_tokens=48)


def test_killed_run_resumes_without_rescoring(traces_file, tmp_path, capsys):
    path, _ = traces_file
    out = tmp_path / "killed.jsonl"
    args = ["anchors", "--model", "organism-backtrack", "--traces", str(path), "--out",
            str(out), "--measures", "forced,suppression", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", KILL_AT: "anchors.trace:1"}
    killed = subprocess.run([sys.executable, "-m", "thinklens.cli", *args], capture_output=True,
                            text=True, env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    first = out.read_text().splitlines()
    assert len(first) == 2 and json.loads(first[1])["id"] == "p0"   # settings + one trace
    assert main(args) == 0
    assert "3 traces in" in capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert lines[:2] == first and [json.loads(x)["id"] for x in lines[1:]] == [
        "p0", "p1", "empty"]                                        # p0 kept, not redone


def test_traces_of_another_model_fail_before_any_is_scored(organism, traces_file, tmp_path):
    """organism-backtrack's vocabulary has ``wait``; the first organism's does not."""
    from thinklens.errors import TokenizerMismatchError

    path, _ = traces_file
    out = tmp_path / "a.jsonl"
    with pytest.raises(TokenizerMismatchError):
        run_anchors(organism, path, out, measures=["forced"], progress=False)
    assert len(out.read_text().splitlines()) == 1      # the settings line, no trace
