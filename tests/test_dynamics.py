"""Measurements across checkpoints: the organism's phase change, resuming, checkpoint sources."""

from __future__ import annotations

import json

import pytest
import torch
from _typecheck import unchecked

from thinklens.errors import ConfigError
from thinklens.jobs import dynamics as D
from thinklens.plots import plot_checkpoint_heads, plot_dynamics, plot_head_scores
from thinklens.zoo.organism import HERE, training_curve


@pytest.fixture(scope="module")
def organism_heads():
    return D.run_dynamics("organism", D.heads_measure(["lookup", "operand_copy"], n_task=32),
                          progress=False)


def _largest_rise(labels, values):
    rises = [(b - a, (labels[k], labels[k + 1])) for k, (a, b) in
             enumerate(zip(values, values[1:]))]
    return max(rises)[1], sorted(r for r, _ in rises)


def test_the_lookup_head_rises_with_depth_two_accuracy(organism_heads):
    dyn = organism_heads
    assert dyn.labels == ["step-000250", "step-000750", "step-001000", "step-001500", "final"]
    assert dyn.steps == [250, 750, 1000, 1500, 2500]
    final = dyn.values("heads.lookup")[-1]                       # [layer, head]
    head = divmod(int(final.argmax()), final.shape[1])
    assert head == (1, 0)                                        # the lookup head of notebook 02
    score = dyn.series("heads.lookup", head)
    by_step = {r["step"]: r for r in training_curve()}
    acc2 = [by_step[s]["acc_think"]["2"] for s in dyn.steps]     # 3.5 % -> 57.5 % -> 98.5 % ...
    interval, rises = _largest_rise(dyn.labels, score)
    acc_interval, _ = _largest_rise(dyn.labels, acc2)
    assert interval == acc_interval == ("step-000250", "step-000750")
    # seen: +0.30 there, then +0.05, -0.01, +0.03
    assert rises[-1] > 0.2 and rises[-1] > 3 * rises[-2]
    assert [r[:2] for r in dyn.rises("heads.lookup", head)] == list(zip(dyn.labels, dyn.labels[1:]))


def test_figures(organism_heads):
    dyn = organism_heads
    fig = plot_checkpoint_heads(dyn, "lookup")
    assert len(fig.data) == 5 and {d.coloraxis for d in fig.data} == {"coloraxis"}
    fig = plot_dynamics(dyn, "heads.lookup", [(1, 0), (1, 3)], curve=training_curve())
    names = [d.name for d in fig.data]
    assert "L1H0" in names and "loss" in names
    assert list(fig.data[names.index("L1H0")].x) == dyn.steps
    from thinklens.circuits import HeadScores
    one = HeadScores({k[6:]: torch.tensor(v) for k, v in dyn.rows[-1].items()
                      if k.startswith("heads.")}, {"lookup": 1, "operand_copy": 1})
    assert len(plot_head_scores(one).data) == 2


def test_resumes_after_an_interruption(tmp_path):
    """Stopped during the second checkpoint: the rerun loads only the second."""
    journal = tmp_path / "icl.jsonl"
    ck, _ = D.checkpoints("organism")
    icl = D.icl_measure(10, 40, n=16)
    calls = []

    def failing(model):
        calls.append(model.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill) does to the second checkpoint
        return icl.fn(model)

    with pytest.raises(KeyboardInterrupt):
        D.run_dynamics(ck[:2], D.Measure(icl.name, failing, icl.settings), out=journal,
                       progress=False)
    assert [json.loads(r)["label"] for r in journal.read_text().splitlines()] == ["step-000250"]
    with open(journal, "a") as f:
        f.write('{"key": "torn')                                # what a kill mid-write leaves
    loaded = []
    original = D.Checkpoint.load

    def counting(self, **kw):
        loaded.append(self.label)
        return original(self, **kw)

    D.Checkpoint.load = counting
    try:
        dyn = D.run_dynamics(ck[:2], icl, out=journal, progress=False)
        fresh = D.run_dynamics(ck[:1], icl, progress=False)
    finally:
        D.Checkpoint.load = original
    assert loaded == ["step-000750", "step-000250"]
    assert dyn.table()[:1] == fresh.table()                     # resumed = uninterrupted
    assert len(journal.read_text().splitlines()) == 2           # the torn line was cut off
    assert all(r["icl"] < 0 for r in dyn.table())
    with pytest.raises(ConfigError, match="another measure or settings"):
        D.run_dynamics(ck[:2], D.icl_measure(10, 30, n=16), out=journal, progress=False)


def test_checkpoint_sources(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for step in (250, 1000):
        (run / f"step-{step:06d}").symlink_to(HERE / "checkpoints" / f"step-{step:06d}")
    (run / "notes").mkdir()
    ck, curve = D.checkpoints(run)
    assert [(c.label, c.step) for c in ck] == [("step-000250", 250), ("step-001000", 1000)]
    assert curve == []
    ck, _ = D.checkpoints("EleutherAI/pythia-70m", revisions=["step1000", "step143000"])
    assert [(c.step, c.revision, c.spec) for c in ck] == [
        (1000, "step1000", "EleutherAI/pythia-70m"), (143000, "step143000", "EleutherAI/pythia-70m")]
    with pytest.raises(ConfigError, match="no checkpoints in"):
        D.checkpoints(tmp_path / "run" / "notes")
    with pytest.raises(ConfigError, match="neither a bundled model"):
        D.checkpoints("no/such-model")
    with unchecked(), pytest.raises(ConfigError, match="give a Measure"):
        D.run_dynamics("organism", lambda m: {})


def test_the_command(tmp_path, capsys):
    from thinklens.cli import main

    run = tmp_path / "run"                                      # a folder of training checkpoints
    run.mkdir()
    for step in (250, 1000):
        (run / f"step-{step:06d}").symlink_to(HERE / "checkpoints" / f"step-{step:06d}")
    out = tmp_path / "dyn"
    argv = ["dynamics", "--model", str(run), "--measure", "icl:10,40", "--out", str(out),
            "--formats", "html", "--no-progress"]
    assert main(argv) == 0
    doc = json.loads((out / "dynamics.json").read_text())
    assert doc["steps"] == [250, 1000] and len(doc["rows"]) == 2
    assert doc["rows"][1]["icl"] < doc["rows"][0]["icl"] < 0    # context helps more later
    assert (out / "figures" / "dynamics-icl.html").stat().st_size > 1e5
    assert "checkpoint=step-001000" in capsys.readouterr().out
    assert main(argv) == 0                                      # resumed: nothing to add
    assert len((out / "journal.jsonl").read_text().splitlines()) == 2
    assert main([*argv[:4], "bogus", *argv[5:]]) == 1


def test_the_report_section(organism_heads, organism, qwen2):
    from thinklens.report.phase import phase_change

    s = phase_change(organism, dynamics=organism_heads)
    assert [f.name for f in s.figures] == ["phase-lookup-by-checkpoint", "phase-lookup-by-step"]
    rows = s.table.rows
    assert rows[0][0] == "step-000250 → step-000750"
    assert rows[0][1] == max(r[1] for r in rows) and rows[0][3] == pytest.approx(0.54)
    assert "L1H0" in s.text and s.note is None
    assert "ships no training checkpoints" in phase_change(qwen2).note


def test_the_second_organism_has_the_same_phase_change():
    """On organism-backtrack's training run (not yet shipped at the time of writing) the lookup
    head L2H1 went 0.27 -> 0.88 over steps 750 -> 1,000, where the mean accuracy over depths
    went 0.08 -> 0.88: the largest rise of both."""
    ck, curve = D.checkpoints("organism-backtrack")
    if len(ck) < 3 or not curve:
        pytest.skip(f"organism-backtrack ships {len(ck)} checkpoint(s); need 3 and a curve")
    dyn = D.run_dynamics(ck, D.heads_measure(["lookup"], n_task=24), progress=False)
    final = dyn.values("heads.lookup")[-1]
    head = divmod(int(final.argmax()), final.shape[1])
    by_step = {r["step"]: r["acc_think"] for r in curve}
    mean = [sum(by_step[s].values()) / len(by_step[s]) for s in dyn.steps]
    assert _largest_rise(dyn.labels, dyn.series("heads.lookup", head))[0] == \
        _largest_rise(dyn.labels, mean)[0]


def test_probe_measure_equals_a_sweep_at_each_checkpoint():
    """The probe measure at two checkpoints is the sweep run by hand on each, and the
    value probe gets better with training (step 250 -> final)."""
    from thinklens import probes
    from thinklens.circuits import reference_traces

    ck, _ = D.checkpoints("organism")
    pick = [ck[0], ck[-1]]
    sites = "blocks.*.hook_resid_post"
    dyn = D.run_dynamics(pick, D.probe_measure("organism.value", sites, n=24, n_boot=10),
                         progress=False)
    for c, got in zip(pick, dyn.rows):
        model = c.load()
        trs = reference_traces(model, 24, 0)
        cap = model.capture(trs, sites=sites, progress=False)
        ls = model.task.label_sets["organism.value"]
        ref = probes.sweep(cap, sites, ls.make(trs, None), level=ls.level, n_boot=10, seed=0)
        assert got["probe.accuracy"] == pytest.approx(ref.metrics["accuracy"][0].tolist(),
                                                      abs=1e-9)
        assert got["probe.selectivity"] == pytest.approx(ref.selectivity[0].tolist(), abs=1e-9)
    first, last = (max(v["probe.accuracy"]) for v in dyn.rows)
    assert last > first + 0.1
    with pytest.raises(ConfigError, match="no label set 'organism.nope'.*organism.value"):
        D.run_dynamics(pick[:1], D.probe_measure("organism.nope"), progress=False)


def test_faithfulness_measure_equals_the_circuit_at_each_checkpoint(organism):
    """A circuit found on the final organism, measured at two checkpoints, is its own
    faithfulness computed on each checkpoint's study pair."""
    from thinklens import circuits

    pair_of = lambda m: m.task.study_pair(m, m.task.example_prompts)  # noqa: E731
    circuit = circuits.eap(organism, pair_of(organism), steps=2).top(n=30)
    ck, _ = D.checkpoints("organism")
    pick = [ck[1], ck[-1]]
    dyn = D.run_dynamics(pick, D.faithfulness_measure(circuit), progress=False)
    for c, got in zip(pick, dyn.rows):
        model = c.load()
        assert got["faithfulness"] == pytest.approx(circuit.faithfulness(model, pair_of(model)),
                                                    abs=1e-6)
        assert got["edges"] == circuit.n_edges
    assert dyn.rows[-1]["faithfulness"] == pytest.approx(
        circuit.faithfulness(organism, pair_of(organism)), abs=1e-6)
