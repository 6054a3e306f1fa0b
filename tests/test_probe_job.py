"""`thinklens probe STUDY.toml`: config errors, results, resumption after a real kill,
torchrun sharding (2 processes, gloo, CPU), and store merging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thinklens.errors import ConfigError, StoreError
from thinklens.hooks.merge import merge_stores
from thinklens.hooks.store import Store
from thinklens.jobs.config import load_config, parse
from thinklens.jobs.journal import KILL_AT
from thinklens.jobs.study import run_study
from thinklens.probes import SweepResult

STUDY = """
out = "{out}"
[prompts]
organism = {{n = 32, depths = [2, 3, 4], seed = 5}}
[generate]
max_new_tokens = 72
{generate}
[capture]
sites = ["blocks.*.hook_resid_post"]
positions = "thinking"
chunk = {chunk}
[[probe]]
name = "value"
labels = "organism.value"
n_boot = 50
[[probe]]
name = "tag"
labels = "tag"
n_boot = 20
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _study(tmp: Path, out: str, chunk: int = 8, generate: str = "") -> Path:
    file = tmp / f"{out}.toml"
    file.write_text(STUDY.format(out=out, chunk=chunk, generate=generate))
    return file


def _probe_cli(cfg: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thinklens", "probe", str(cfg), "--no-progress"],
                          env=env or ENV, capture_output=True, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run."""
    tmp = tmp_path_factory.mktemp("study")
    summary = run_study(_study(tmp, "ref"), progress=False)
    return tmp / "ref", summary


def _stored(folder: Path) -> tuple[list[str], list[torch.Tensor]]:
    store = Store.open(folder / "store")
    return store.trace_ids, store.read("blocks.2.hook_resid_post")


def test_results_on_the_organism(reference):
    """The value probe's reported accuracy is scikit-learn's on the same rows and split, and
    the summary says the reported cell was chosen on the test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from thinklens.hooks.task import task_named
    from thinklens.jobs.labels import resolve
    from thinklens.probes import group_split, probe_data

    out, summary = reference
    value = summary["probes"]["value"]
    # the value being computed is linearly decodable at its thinking position
    assert value["accuracy"] >= 0.95 and value["control"] < 0.5
    assert summary["traces"] == 32 and summary["world_size"] == 1
    assert value["selected_on"] == "test" and value["n_cells"] == 4  # 4 layers x 1 position
    record = json.loads((out / "results" / "value.json").read_text())
    res = SweepResult.from_dict(record["result"])
    assert res.sites == [f"blocks.{i}.hook_resid_post" for i in range(4)]
    assert float(res.grid().max()) == pytest.approx(value["accuracy"])  # the best cell
    store = Store.open(out / "store")
    lab = resolve("organism.value", store.traces, task=task_named("organism"))
    data = probe_data(store, value["best_site"], lab.labels, level=lab.level)
    train, test = group_split(data, test_frac=0.25, seed=0)
    assert (len(train), len(test)) == (value["n_train"], value["n_test"])
    X, y = data.X[0].numpy(), data.y.numpy()
    sc = StandardScaler().fit(X[train])
    ref = LogisticRegression(C=1.0, tol=1e-8, max_iter=5000).fit(sc.transform(X[train]), y[train])
    acc = float((ref.predict(sc.transform(X[test])) == y[test]).mean())
    assert value["accuracy"] == pytest.approx(acc, abs=1.5 / len(test))  # at most one row apart
    for f in value["figures"] + summary["probes"]["tag"]["figures"]:
        assert (out / f).stat().st_size > 1000
    assert (out / "figures" / "plotly.min.js").exists()  # figures open offline
    assert not list(out.rglob("*.tmp*"))


def test_rerun_skips_finished_work_and_redoes_changed_probes(reference, tmp_path):
    out, summary = reference
    cfg = load_config(out.parent / "ref.toml")
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    again = run_study(cfg, progress=False)
    assert again["probes"] == summary["probes"]
    assert {p: p.stat().st_mtime_ns for p in (out / "results").iterdir()} == mtimes
    cfg["probe"][1]["n_boot"] = 30  # only the changed probe is recomputed
    run_study(cfg, progress=False)
    assert (out / "results" / "value.json").stat().st_mtime_ns == \
        mtimes[out / "results" / "value.json"]
    assert (out / "results" / "tag.json").stat().st_mtime_ns != mtimes[out / "results" / "tag.json"]
    cfg["capture"]["positions"] = "all"  # capture settings cannot change under a store
    with pytest.raises(ConfigError, match=r"changed: capture\.positions"):
        run_study(cfg, progress=False)


def test_a_killed_run_resumes_without_redoing_finished_rounds(reference, tmp_path):
    """SIGKILL right after the 3rd capture round (the journal's test hook), then a rerun
    with another generation batch size: it resumes (batch size does not change greedy
    traces, so it does not block a resume), keeps the 3 stored rounds, and ends with the
    uninterrupted run's activations."""
    ref_out, ref_summary = reference
    cfg = _study(tmp_path, "killed", chunk=4)
    manifest = tmp_path / "killed" / "store" / "manifest.json"
    killed = _probe_cli(cfg, env={**ENV, KILL_AT: "capture-chunk:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    before = json.loads(manifest.read_text())
    assert len(before["traces"]) == 12 and len(before["shards"]) == 3
    cfg.write_text(cfg.read_text().replace("max_new_tokens = 72\n", "max_new_tokens = 72\n"
                                           "batch_size = 3\n"))
    done = _probe_cli(cfg)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "traces: 12 of 32 already captured" in done.stdout
    assert "best of 4 cells, chosen on the test split" in done.stdout
    after = json.loads(manifest.read_text())
    assert after["shards"][:3] == before["shards"]  # kept, not redone
    ids, acts = _stored(tmp_path / "killed")
    ref_ids, ref_acts = _stored(ref_out)
    assert ids == ref_ids
    for a, b in zip(acts, ref_acts):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    summary = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert summary["probes"]["value"]["accuracy"] == pytest.approx(
        ref_summary["probes"]["value"]["accuracy"], abs=1e-6)


def test_torchrun_two_processes_give_the_single_process_result(reference, tmp_path):
    ref_out, ref_summary = reference
    cfg = _study(tmp_path, "sharded")
    torchrun = Path(sys.executable).parent / "torchrun"
    run = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m",
                          "thinklens", "probe", str(cfg), "--no-progress"], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[rank 1/2] traces: 0 of 32 already captured; 16 to do here" in run.stdout
    summary = json.loads((tmp_path / "sharded" / "results.json").read_text())
    assert summary["world_size"] == 2
    ids, acts = _stored(tmp_path / "sharded")
    ref_ids, ref_acts = _stored(ref_out)
    assert ids == ref_ids  # merged in the prompts' order
    for a, b in zip(acts, ref_acts):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for name, probe in ref_summary["probes"].items():
        assert summary["probes"][name]["accuracy"] == pytest.approx(probe["accuracy"], abs=1e-6)
    assert not (tmp_path / "sharded" / "shards").exists()


def test_merge_stores_is_exact_ordered_and_resumable(reference, tmp_path):
    src = Store.open(reference[0] / "store")
    ids = src.trace_ids
    merged = merge_stores([src], tmp_path / "m", order=ids[::-1][:5], batch_bytes=1)
    assert merged.trace_ids == ids[::-1][:5]
    merged = merge_stores([src], tmp_path / "m", order=ids[::-1])  # resumes after the 5
    assert merged.trace_ids == ids[::-1]
    for key in src.keys:
        for a, b in zip(merged.read(key), src.read(key)[::-1]):
            assert torch.equal(a, b)
    with pytest.raises(StoreError, match="in neither the sources"):
        merge_stores([src], tmp_path / "m2", order=["nope"])


@pytest.mark.parametrize("text, match", [
    ('out = "x"\n[[probe]]\nname = "a"\nlabels = "tag"\nkind = "logstic"',
     r"key 'kind' is 'logstic'\. Did you mean 'logistic'\?.*Allowed values: logistic, ridge, mlp"),
    ('out = "x"\n[capture]\nsitse = []\n[[probe]]\nname = "a"\nlabels = "tag"',
     r"\[capture\]: unknown key 'sitse'\. Did you mean 'sites'.*Allowed keys: sites,"),
    ('out = "x"\n[prompts]\norganism = {n = 3}\n[[probe]]\nname = "a"\nlabels = "organism.valeu"',
     r"key 'labels': unknown labels 'organism.valeu'\. Did you mean 'organism.value'.*Valid: "
     r"organism.value, organism.answer, organism.variable, answer, tag, field:KEY"),
    ('out = "x"\n[model]\nspec = "some/hub-model"\n[[probe]]\nname = "a"\nlabels = "valu"',
     r"unknown labels 'valu'.*Valid: answer, tag, field:KEY"),
    ('out = "x"\n[prompts]\norganism = {n = 3}', r"no \[\[probe\]\] table"),
    ('out = "x"\n[prompts]\nfile = "p.jsonl"\norganism = {n = 3}\n[[probe]]\nname = "a"\n'
     'labels = "tag"', "exactly one of 'file'"),
    ('out = "x"\n[generate]\nmax_new_tokens = "many"\n[[probe]]\nname = "a"\nlabels = "tag"',
     r"\[generate\]: key 'max_new_tokens' must be an integer, got 'many'"),
    ('out = "x"\n[capture]\npositions = "thinkng"\n[[probe]]\nname = "a"\nlabels = "tag"',
     r"key 'positions' is 'thinkng'\. Did you mean 'thinking'"),
    ('[[probe]]\nname = "a"\nlabels = "tag"', "required key 'out' is missing"),
    ('out = "x"\n[[probe]]\nname = "a"\nlabels = "tag"\n[[probe]]\nname = "a"\nlabels = "tag"',
     "name 'a' is repeated"),
])
def test_config_errors_name_the_key_and_the_allowed_values(text, match):
    import tomllib
    raw = tomllib.loads(text)
    raw.setdefault("prompts", {"organism": {"n": 3}})
    with pytest.raises(ConfigError, match=match):
        parse(raw, Path("."))


def test_cli_reports_config_errors_and_a_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('out = "x"\n[prompts]\norganism = {n = 2}\n[output]\nfigures = ["gif"]\n'
                   '[[probe]]\nname = "a"\nlabels = "tag"')
    run = subprocess.run([sys.executable, "-m", "thinklens", "probe", str(bad)], env=ENV,
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert "'figures' has 'gif'" in run.stderr and "html, svg, pdf, png" in run.stderr
    run = subprocess.run([sys.executable, "-m", "thinklens", "probe", str(tmp_path / "no.toml")],
                         env=ENV, capture_output=True, text=True)
    assert run.returncode == 1 and "does not exist" in run.stderr
    helptext = subprocess.run([sys.executable, "-m", "thinklens", "probe", "--help"], env=ENV,
                              capture_output=True, text=True).stdout
    assert "torchrun" in helptext and "organism.value" in helptext


def test_a_prompts_file_with_field_labels(tmp_path, monkeypatch):
    """Prompts from JSONL (any extra keys), trace-level labels read from one of them;
    [generate] batch_size reaches generation."""
    from thinklens.hooks.wrapper import Model
    from thinklens.zoo.evaluate import heldout_problems

    batch_sizes = []
    think_batch = Model.think_batch

    def recorded(self, prompts, **kw):
        batch_sizes.append(kw.get("batch_size"))
        return think_batch(self, prompts, **kw)

    monkeypatch.setattr(Model, "think_batch", recorded)

    rows = [{"prompt": p.prompt, "id": f"q{d}-{k}", "depth": d}
            for d in (1, 3) for k, p in enumerate(heldout_problems(d, 8, seed=9))]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "s.toml").write_text(
        'out = "out"\n[prompts]\nfile = "prompts.jsonl"\n[generate]\nmax_new_tokens = 72\n'
        'batch_size = 5\n'
        '[[probe]]\nname = "depth"\nlabels = "field:depth"\nn_boot = 20\n'
        '[[probe]]\nname = "answer"\nlabels = "answer"\nn_boot = 20\ncontrol = false\n'
        '[[probe]]\nname = "missing"\nlabels = "field:nope"\n')
    with pytest.raises(ConfigError, match=r"field:nope.*no key 'nope'.*keys present: "
                                          r"\['depth', 'id', 'prompt'\]"):
        run_study(tmp_path / "s.toml", progress=False)
    assert not (tmp_path / "out" / "store").exists() and batch_sizes == []  # refused first
    cfg = load_config(tmp_path / "s.toml")
    cfg["probe"] = cfg["probe"][:2]
    summary = run_study(cfg, progress=False)
    assert Store.open(tmp_path / "out" / "store").trace_ids == [r["id"] for r in rows]
    assert batch_sizes == [5]  # 16 prompts: one round (chunk 32), generated 5 at a time
    depth = json.loads((tmp_path / "out" / "results" / "depth.json").read_text())
    assert depth["level"] == "trace"
    assert depth["summary"]["n_train"] + depth["summary"]["n_test"] == 16  # one row per trace
    assert depth["result"]["classes"] == [1, 3]
    balance = depth["summary"]["class_balance"]  # [class, rows] on each side of the split
    assert sum(n for _, n in balance["train"] + balance["test"]) == 16
    assert {c for c, _ in balance["train"]} == {1, 3}
    per_class = {c: 0 for c in (1, 3)}
    for c, n in balance["train"] + balance["test"]:
        per_class[c] += n
    assert per_class == {1: 8, 3: 8}  # the prompts file: 8 problems of each depth
    assert sum(n for _, n in balance["test"]) == depth["summary"]["n_test_traces"] == 4  # 25 %
    assert summary["probes"]["answer"]["control"] is None


def test_task_labels_of_another_model_are_checked_once_it_is_loaded():
    """For a model with no registered task a ``TASK.KEY`` name passes parsing (its task is
    unknown until loading), and is refused against the loaded model's task, naming the
    valid labels."""
    from thinklens.hooks.task import task_named
    from thinklens.jobs import labels

    raw = {"out": "x", "model": {"spec": "some/hub-model"}, "prompts": {"organism": {"n": 3}},
           "probe": [{"name": "a", "labels": "organism.value"}]}
    assert parse(raw, Path("."))["probe"][0]["labels"] == "organism.value"
    with pytest.raises(ConfigError, match=r"unknown labels 'organism.value' \(a task's label "
                                          r"set, and this model has no registered task\)\. "
                                          r"Valid: answer, tag, field:KEY"):
        labels.check("organism.value", None)
    labels.check("organism.value", task_named("organism"))  # the organism has it
    with pytest.raises(ConfigError, match="Did you mean 'organism.variable'"):
        labels.check("organism.variabel", task_named("organism"))
