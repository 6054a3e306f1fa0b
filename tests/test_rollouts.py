"""Rollouts: cut points, seeds, answers, the Wilson interval, the cost refusal, the journal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from _typecheck import unchecked
from scipy.stats import binomtest

import thinklens.hooks.rollouts as rollouts_mod
from thinklens.errors import BudgetError, ConfigError
from thinklens.hooks._fileio import KILL_AT, read_jsonl
from thinklens.hooks.answers import boxed, default_extractor, generic_answer, last_number
from thinklens.hooks.engine import sample_seed
from thinklens.hooks.rollouts import _offset_seed, wilson_interval
from thinklens.hooks.task import Task
from thinklens.hooks.trace import Trace

DEPTH3 = "l = i + 2 ; c = 8 ; i = g - 3 ; g = c + 5 ; a = 3 ; ? l"  # answer 2, 7 sentences
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trace(organism):
    return organism.think(DEPTH3, max_new_tokens=64)


@pytest.fixture
def requests_seen(monkeypatch):
    """Every Request rollouts sends to the engine, in order (generation itself unchanged)."""
    seen = []
    real = rollouts_mod.generate_ids

    def spy(model, requests, sampling, **kw):
        seen.extend(requests)
        return real(model, requests, sampling, **kw)

    monkeypatch.setattr(rollouts_mod, "generate_ids", spy)
    return seen


def test_wilson_interval_matches_scipy_and_a_hand_computation():
    # k=8, n=10, z=1.959964: centre (0.8 + z²/20) / (1 + z²/10) = 0.716740,
    # half z / (1 + z²/10) * sqrt(0.016 + z²/400) = 0.226578
    assert wilson_interval(8, 10) == pytest.approx((0.490162, 0.943318), abs=1e-6)
    for k, n in [(0, 10), (10, 10), (37, 100), (1, 2000), (1999, 2000)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_prefix_is_the_tokens_before_the_sentence_even_when_it_repeats(organism,
                                                                      requests_seen):
    """Sentence 3 repeats sentence 2 ('a = 7 .'): the prefix keeps sentence 2, where the
    reference code's full_prefix.replace(chunk, '') would delete both copies."""
    tr = Trace.from_text(organism, "c = b + 4 ; a = 7 ; b = a - 2 ; ? c",
                         "c = b + 4 . b = a - 2 . a = 7 . a = 7 . b = 7 - 2 = 5 . "
                         "c = 5 + 4 = 9 . </think> 9 <eos>")
    texts = [s.text for s in tr.sentences]
    assert texts[2] == texts[3] == "a = 7 ."
    ro = organism.rollouts(tr, at="all", n=3, temperature=1.0, max_new_tokens=40)
    assert [r.prompt_ids for r in requests_seen] == [tr.token_ids[:s.start] for s in tr.sentences]
    assert ro.positions == [s.start for s in tr.sentences]
    cut = ro[3]
    prefix = tr.text[:tr.offsets[cut.position - 1][1]]
    assert prefix.count("a = 7 .") == 1  # sentence 2 (the prompt writes "a = 7 ;")
    assert " ".join(texts[:4]).replace(texts[3], "").count("a = 7 .") == 0  # the reference bug
    for k, c in enumerate(ro.cuts):
        for t in c.traces:
            assert t.token_ids[:c.position] == tr.token_ids[:c.position]
            assert [s.text for s in t.sentences[:k]] == texts[:k]
    # a token cut point at the same index is the same cut: same seed, same tokens
    tok = organism.rollouts(tr, at={"tokens": [cut.position]}, n=3, temperature=1.0,
                            max_new_tokens=40)
    assert tok[0].sentence is None and cut.sentence == 3
    assert [t.token_ids for t in tok[0].traces] == [t.token_ids for t in cut.traces]


def test_fixed_seeds_fix_the_tokens_whatever_else_is_asked(organism, trace):
    kw = dict(temperature=2.5, max_new_tokens=32)  # hot, so that samples differ
    a = organism.rollouts(trace, at=[1, 4], n=4, seed=3, **kw)
    b = organism.rollouts(trace, at=[4], n=6, seed=3, **kw)
    c = organism.rollouts(trace, at=[4], n=4, seed=4, **kw)
    ids = [t.token_ids for t in a[1].traces]
    assert [t.token_ids for t in b[0].traces][:4] == ids
    assert [t.token_ids for t in c[0].traces] != ids
    assert len(set(map(tuple, ids))) > 1  # sampled: the rollouts differ from each other


def test_the_organism_at_temperature_1_5_gives_several_answers(organism, trace):
    ro = organism.rollouts(trace, at=0, n=100, temperature=1.5, max_new_tokens=64,
                           progress=False)
    cut = ro[0]
    assert ro.reference == "2" and cut.correct == cut.counts["2"]
    assert len(cut.counts) >= 3 and max(cut.counts.values()) < 100, cut.counts
    assert sum(cut.counts.values()) == 100
    assert cut.answers == [organism.task.extract_answer(t) for t in cut.traces]


def test_the_interval_of_100_rollouts_holds_the_accuracy_of_2000(organism, trace):
    """At the last sentence (T=2.5 makes the answer uncertain there): the 95 % interval of
    100 rollouts (seed 0) contains the accuracy of 2,000 other rollouts (seed 1); the
    interval of 100 rollouts at T=2.0 does not (so the check can fail)."""
    kw = dict(at=6, max_new_tokens=16, progress=False)
    small = organism.rollouts(trace, n=100, temperature=2.5, seed=0, **kw)[0]
    large = organism.rollouts(trace, n=2000, temperature=2.5, seed=1, **kw)[0]
    cooler = organism.rollouts(trace, n=100, temperature=2.0, seed=0, **kw)[0]
    lo, hi = small.interval
    print(f"\n100 rollouts: accuracy {small.accuracy:.3f}, 95% interval [{lo:.3f}, {hi:.3f}]; "
          f"2,000 rollouts: {large.accuracy:.4f}; 100 at T=2.0: {cooler.accuracy:.3f} "
          f"[{cooler.interval[0]:.3f}, {cooler.interval[1]:.3f}]")
    assert 0.2 < large.accuracy < 0.8  # an uncertain answer, so the interval means something
    assert lo <= large.accuracy <= hi
    assert not cooler.interval[0] <= large.accuracy <= cooler.interval[1]


def test_cost_over_the_budget_is_refused_before_generating(organism, trace, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("generated despite the budget")

    monkeypatch.setattr(rollouts_mod, "generate_ids", boom)
    with pytest.raises(BudgetError) as e:
        organism.rollouts(trace, at="all", n=100, max_new_tokens=64, budget=10_000)
    msg = str(e.value)
    for part in ("44,800 tokens", "7 cut points x n=100", "max_new_tokens=64",
                 "budget=10,000", "fewer cut points", "smaller n", "raise budget="):
        assert part in msg, msg
    with pytest.raises(BudgetError):  # the default budget: 2,000,000 tokens
        organism.rollouts(trace, at="all", n=10_000, max_new_tokens=64)


def _journal_rows(path: Path) -> dict:
    rows = read_jsonl(path)
    return {(r["cut"], r["j"]): (r["ids"], r["finished"]) for r in rows[1:]}


_KILLED_RUN = """
import sys, thinklens
from thinklens.hooks.trace import Trace
model = thinklens.load("organism")
trace = Trace.load(sys.argv[1])
model.rollouts(trace, at="all", n=5, temperature=1.5, max_new_tokens=40, seed=7,
               journal=sys.argv[2], progress=False)
"""


def test_a_killed_run_resumes_to_the_uninterrupted_journal(organism, trace, tmp_path,
                                                            requests_seen):
    kw = dict(at="all", n=5, temperature=1.5, max_new_tokens=40, seed=7, progress=False)
    full = organism.rollouts(trace, journal=tmp_path / "full.jsonl", **kw)
    want = _journal_rows(tmp_path / "full.jsonl")
    assert len(want) == 35
    trace.to_json(tmp_path / "trace.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", KILL_AT: "rollouts-journaled:3"}
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(tmp_path / "trace.json"),
                             str(tmp_path / "run.jsonl")], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = _journal_rows(tmp_path / "run.jsonl")
    assert len(before) == 15 and all(want[k] == v for k, v in before.items())
    requests_seen.clear()
    resumed = organism.rollouts(trace, journal=tmp_path / "run.jsonl", **kw)
    assert sum(r.n for r in requests_seen) == 20  # the 4 unfinished cut points only
    assert _journal_rows(tmp_path / "run.jsonl") == want
    assert [[t.token_ids for t in c.traces] for c in resumed.cuts] == \
        [[t.token_ids for t in c.traces] for c in full.cuts]
    assert resumed.generated < full.generated


def test_a_torn_tail_mid_cut_point_regenerates_only_what_is_missing(organism, trace, tmp_path,
                                                                     requests_seen):
    kw = dict(at=[0, 3], n=6, temperature=1.5, max_new_tokens=40, seed=2, progress=False)
    organism.rollouts(trace, journal=tmp_path / "full.jsonl", **kw)
    want = _journal_rows(tmp_path / "full.jsonl")
    lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    # settings, cut 0's six entries, two of cut 3's, and half of its third
    (tmp_path / "torn.jsonl").write_text("".join(lines[:9]) + lines[9][: len(lines[9]) // 2])
    requests_seen.clear()
    organism.rollouts(trace, journal=tmp_path / "torn.jsonl", **kw)
    assert [(r.n, r.seed) for r in requests_seen] == \
        [(4, _offset_seed(sample_seed(2, trace.sentences[3].start), 2))]
    assert _journal_rows(tmp_path / "torn.jsonl") == want
    # a larger n adds to the journal: 4 new rollouts, the first 6 kept
    requests_seen.clear()
    more = organism.rollouts(trace, journal=tmp_path / "torn.jsonl", **{**kw, "n": 8})
    assert [r.n for r in requests_seen] == [2, 2] and more[1].n == 8


def test_offset_seed_continues_the_sample_sequence():
    for s, a in [(0, 0), (5, 3), (2**62 + 11, 1000), (sample_seed(9, 44), 7)]:
        base = _offset_seed(s, a)
        assert [sample_seed(base, i) for i in range(4)] == [sample_seed(s, a + i) for i in range(4)]


def test_a_journal_of_another_run_is_refused(organism, trace, tmp_path):
    kw = dict(at=[5], n=2, temperature=1.0, max_new_tokens=24, journal=tmp_path / "j.jsonl")
    organism.rollouts(trace, seed=0, **kw)
    with pytest.raises(ConfigError, match=r"another run \(seed: journal 0, now 1\)"):
        organism.rollouts(trace, seed=1, **kw)
    other = organism.think("b = 4 ; ? b", max_new_tokens=32)
    with pytest.raises(ConfigError, match="trace: journal"):
        organism.rollouts(other, seed=0, **{**kw, "at": [0]})
    (tmp_path / "x.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(ConfigError, match="not a rollouts journal"):
        organism.rollouts(trace, **{**kw, "journal": tmp_path / "x.jsonl"})


def test_bad_input_is_refused_with_the_valid_range(organism, trace):
    ro = organism.rollouts
    n_s, lo, hi = len(trace.sentences), trace.prompt_span.end, len(trace)
    with pytest.raises(ConfigError, match="n=0"):
        ro(trace, n=0)
    with pytest.raises(ConfigError, match="temperature=-0.5"):
        ro(trace, temperature=-0.5)
    with pytest.raises(ConfigError, match=f"cut point {n_s} is out of range.*0..{n_s - 1}"):
        ro(trace, at=[0, n_s])
    with pytest.raises(ConfigError, match="cut point -1 is out of range"):
        ro(trace, at=-1)
    with pytest.raises(ConfigError, match=f"token cut point 3 is out of range.*{lo}..{hi}"):
        ro(trace, at={"tokens": [3]})
    with pytest.raises(ConfigError, match="same cut point twice"):
        ro(trace, at=[2, 2])
    with pytest.raises(ConfigError, match="give a sentence index"):
        ro(trace, at="first")
    with unchecked():
        with pytest.raises(ConfigError, match="n=2.5"):
            ro(trace, n=2.5)
        with pytest.raises(ConfigError, match="not an integer index"):
            ro(trace, at=[1.0])
    empty = Trace.from_text(organism, "b = 4 ; ? b", "</think> 4 <eos>")
    assert empty.sentences == []
    with pytest.raises(ConfigError, match="no thinking sentences"):
        ro(empty, at=0)
    # a trace without sentences still takes token cut points
    out = ro(empty, at={"tokens": [empty.prompt_span.end]}, n=2, max_new_tokens=24)
    assert out.reference == "4" and out[0].n == 2


def test_answer_extractors():
    def fake(answer, completion=None):
        return SimpleNamespace(answer_text=answer, completion_text=completion or answer)

    assert boxed(fake(r" so \boxed{\frac{1}{2}} and \boxed{42}.")) == "42"
    assert boxed(fake("no box", r"think \boxed{7} ... no box")) == "7"
    assert boxed(fake(r"\boxed{unclosed")) is None
    assert last_number(fake("x = -3.5, or 1,250 apples")) == "1250"
    assert last_number(fake("none", "12 then 13")) == "13"
    assert last_number(fake("none")) is None
    assert generic_answer(fake(r"\boxed{5} after 6")) == "5"
    assert generic_answer(fake("after 6")) == "6"
    assert default_extractor(SimpleNamespace(task=None)) is generic_answer
    assert Task(name="plain").extract_answer(fake("it is 12")) == "12"


def test_the_organisms_answer_and_a_given_reference(organism, trace):
    assert organism.task.extract_answer(trace) == "2"
    cut_off = Trace.from_text(organism, DEPTH3, "l = i + 2 . i = g")  # no </think>: no answer
    assert organism.task.extract_answer(cut_off) is None
    ro = organism.rollouts(trace, at=6, n=20, temperature=2.5, max_new_tokens=16,
                           reference="0", answer=last_number)
    cut = ro[0]
    assert ro.reference == "0" and cut.correct == sum(a == "0" for a in cut.answers)
    assert cut.accuracy == pytest.approx(cut.correct / 20)
    assert json.loads(json.dumps(ro.settings))["seed"] == 0
