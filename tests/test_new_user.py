"""What a new user ran into (issue 13, part 3), one test each; every one failed before its fix."""

from __future__ import annotations

import json

import pytest
import torch

from thinklens import probes
from thinklens.cli import main
from thinklens.errors import PositionError, SiteError
from thinklens.hooks.store import Store
from thinklens.hooks.wrapper import Model
from thinklens.jobs import commands
from thinklens.jobs.journal import run_capture
from thinklens.jobs.study import run_study
from thinklens.probes.data import ProbeData

PROMPTS = ["c = b + 4 ; a = 7 ; b = a - 2 ; ? c", "e = 5 ; d = e + 3 ; g = 1 ; ? d",
           "b = 4 ; ? b"]


def _prompts(tmp_path, prompts=PROMPTS):
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"id": f"p{k}", "prompt": p}) + "\n"
                            for k, p in enumerate(prompts)))
    return str(file)


def _no_model(*a, **k):
    raise AssertionError("a model was loaded before the arguments were checked")


def test_capture_refuses_a_store_made_with_other_sites_or_positions(tmp_path, capsys,
                                                                    monkeypatch):
    base = ["capture", "--model", "organism", "--prompts", _prompts(tmp_path), "--out",
            str(tmp_path / "acts"), "--max-new-tokens", "40"]
    assert main([*base, "--sites", "blocks.0.hook_resid_post", "--positions", "thinking"]) == 0
    capsys.readouterr()
    # before: both reruns returned 0 and stored nothing new (the settings were ignored)
    assert main([*base, "--sites", "blocks.1.hook_resid_post", "--positions", "thinking"]) == 1
    err = capsys.readouterr().err
    assert "sites: stored ['blocks.0.hook_resid_post'], requested " \
           "['blocks.1.hook_resid_post']" in err
    monkeypatch.setattr(commands, "load", _no_model)  # positions: refused before loading
    assert main([*base, "--sites", "blocks.0.hook_resid_post", "--positions", "all"]) == 1
    assert "positions: stored 'thinking', requested 'all'" in capsys.readouterr().err
    monkeypatch.undo()
    assert main([*base, "--sites", "blocks.0.hook_resid_post", "--positions", "thinking"]) == 0
    assert len(Store.open(tmp_path / "acts")) == 3


STUDY = """out = "out"
[prompts]
{prompts}
[generate]
max_new_tokens = 40
[capture]
sites = ["{site}"]
[[probe]]
name = "answer"
labels = "field:n"
kind = "ridge"
n_boot = 20
"""


def test_a_failed_probe_run_does_not_lock_its_out_folder(tmp_path, organism):
    rows = organism.task.problems(12, depths=[1, 2], seed=3)
    (tmp_path / "p.jsonl").write_text("".join(
        json.dumps({"id": r["id"], "prompt": r["prompt"], "n": int(r["answer"])}) + "\n"
        for r in rows))
    toml = tmp_path / "s.toml"
    good_prompts, good_site = 'file = "p.jsonl"', "blocks.*.hook_resid_post"
    toml.write_text(STUDY.format(prompts=good_prompts, site="blocks.*.hook_resid_pst"))
    with pytest.raises(SiteError, match="hook_resid_pst"):  # a site typo
        run_study(toml, progress=False)
    toml.write_text(STUDY.format(prompts='file = "missing.jsonl"', site=good_site))
    with pytest.raises(Exception, match="does not exist"):  # a missing file
        run_study(toml, progress=False)
    # before: "the output folder ... was made with other settings (changed: capture.sites)"
    toml.write_text(STUDY.format(prompts=good_prompts, site=good_site))
    summary = run_study(toml, progress=False)
    assert summary["traces"] == 12
    # integer field: labels under kind = "ridge" are regression targets (before: classes)
    res = json.loads((tmp_path / "out" / "results" / "answer.json").read_text())
    assert res["result"]["task"] == "regression" and res["result"]["classes"] is None
    s = summary["probes"]["answer"]
    assert s["selectivity"] == pytest.approx(s["r2"] - max(s["control"], 0.0), abs=1e-6)


def test_regression_selectivity_is_against_a_control_clipped_at_zero():
    g = torch.Generator().manual_seed(0)
    n, d = 48, 30  # nearly as many features as training rows (36): shuffled targets are
    # fitted exactly, with wild weights, so the control's test R² is far below 0
    X = torch.randn(1, n, d, generator=g)
    y = X[0, :, 0] * 2 + 0.1 * torch.randn(n, generator=g)
    data = ProbeData(X, y, torch.arange(n) // 2, torch.zeros(n, dtype=torch.long),
                     ["s"], None, "regression")
    res = probes.sweep(data, kind="ridge", l2=1e-3, n_boot=50, seed=1)
    r2, ctrl = float(res.grid("r2")[0, 0]), float(res.grid("control")[0, 0])
    assert ctrl < -1  # the case that made R² - control meaningless (> 1): -4.8 here
    assert float(res.selectivity[0, 0]) == pytest.approx(r2 - max(ctrl, 0.0), abs=1e-6)
    assert float(res.selectivity[0, 0]) <= r2 <= 1
    lo, hi = res.ci["selectivity"][0, 0].tolist()
    assert lo <= hi <= 1
    assert "selectivity=Tensor(1, 1, float" in repr(res) and len(repr(res)) < 1200


def test_arguments_are_checked_before_a_model_loads_or_a_token_is_generated(
        tmp_path, capsys, monkeypatch, organism):
    monkeypatch.setattr(commands, "load", _no_model)
    base = ["capture", "--prompts", _prompts(tmp_path), "--out", str(tmp_path / "a")]
    for extra, says in ((["--positions", "thinkng"], "did you mean 'thinking'"),
                        (["--dtype", "float8"], "unknown dtype 'float8'"),
                        (["--budget", "lots"], "budget 'lots' is not a size"),
                        (["--chunk", "0"], "chunk=0"),
                        (["--temperature", "-1"], "temperature=-1.0; give a number >= 0")):
        assert main([*base, *extra]) == 1, extra
        assert says in capsys.readouterr().err.lower(), extra
    monkeypatch.undo()
    # the job function too: before, positions were checked after the first round was generated
    monkeypatch.setattr(organism, "think_batch", _no_model)
    with pytest.raises(PositionError, match="thinkng"):
        run_capture(organism, [("p0", PROMPTS[0])], tmp_path / "b",
                    sites=["blocks.0.hook_resid_post"], positions="thinkng")


def test_ctrl_c_prints_one_line_with_what_was_saved_and_how_to_resume(tmp_path, capsys,
                                                                     monkeypatch):
    think_batch, calls = Model.think_batch, []

    def interrupted_second_round(self, prompts, **kw):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return think_batch(self, prompts, **kw)

    monkeypatch.setattr(Model, "think_batch", interrupted_second_round)
    argv = ["capture", "--model", "organism", "--prompts", _prompts(tmp_path), "--out",
            str(tmp_path / "acts"), "--chunk", "1", "--max-new-tokens", "40"]
    assert main(argv) == 130
    err = capsys.readouterr().err  # before: a 40-line traceback
    assert "Traceback" not in err  # (the other lines are the progress bars)
    lines = err.replace("\r", "\n").splitlines()  # progress bars redraw with "\r"
    assert [line for line in lines if line.startswith("thinklens")] == [
        f"thinklens: interrupted; 1 traces stored in {tmp_path / 'acts'}; resume with: "
        f"thinklens {' '.join(argv)}"]
    monkeypatch.undo()
    assert main(argv) == 0  # nothing lost: the resumed run stores the other two
    assert Store.open(tmp_path / "acts").trace_ids == ["p0", "p1", "p2"]


def test_stacked_flat_rows_and_compact_reprs(organism):
    traces = organism.think_batch(PROMPTS, max_new_tokens=40)
    cap = organism.capture(traces, sites="blocks.*.hook_resid_post", positions="thinking")
    rows, tr, pos = cap.stack("blocks.*.hook_resid_post").flat()  # before: IndexError
    assert rows.shape[1:] == (4, 128)
    for layer in range(4):
        one, tr1, pos1 = cap[f"blocks.{layer}.hook_resid_post"].flat()
        assert torch.equal(rows[:, layer], one) and torch.equal(tr, tr1)
        assert torch.equal(pos, pos1)
    text = repr(cap.stack("blocks.*.hook_resid_post"))  # before: every element, ~6,000 chars
    assert "values=Tensor(trace=3, layer=4, pos=" in text and len(text) < 400
    assert len(repr(traces[0])) < 1000 and "tensor(" not in text  # lists summarised too


@pytest.mark.smollm
def test_gguf_is_converted_once_into_a_cached_folder(smollm, monkeypatch):
    from gguf import GGUFReader, dequantize
    from transformers import AutoModelForCausalLM

    from thinklens.hooks.gguf import cache_root, cached_folder, file_hash

    path = smollm.source
    folder = cache_root() / "gguf" / f"{file_hash(path)}-float32"
    assert (folder / "done.json").is_file() and (folder / "model.safetensors").is_file()
    # the cached weights are the file's de-quantized tensors, bit for bit
    t = next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight")
    emb = smollm.hf.get_input_embeddings().weight.detach()
    want = torch.from_numpy(dequantize(t.data, t.tensor_type)).reshape(emb.shape)
    assert torch.equal(emb, want.float())
    def no_gguf(*a, **k):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_gguf)
    assert cached_folder(path) == folder  # a second load finds it: nothing converted again


def test_steering_strength_is_relative_to_the_residual_norm(organism):
    traces = organism.think_batch(PROMPTS, max_new_tokens=40)
    v = probes.steering_vector(organism, traces, "computation", layer=1)
    cap = organism.capture(traces, sites="blocks.1.hook_resid_post", positions="thinking")
    rows, _, _ = cap["blocks.1.hook_resid_post"].flat()  # label + rest = the whole thinking
    assert v.resid_norm == pytest.approx(float(rows.norm(dim=-1).mean()), rel=1e-5)
    site, ids = "blocks.1.hook_resid_post", torch.tensor([traces[0].token_ids])
    base = organism.bridge.run_with_cache(ids, names_filter=site)[1][site]
    with probes.steer(organism, v, strength=0.1):
        got = organism.bridge.run_with_cache(ids, names_filter=site)[1][site]
    added = (got - base)[0].norm(dim=-1)  # the same push at every position
    torch.testing.assert_close(added, torch.full_like(added, 0.1 * v.resid_norm),
                               atol=1e-4, rtol=1e-4)
    assert v.alpha_for(0.2) == pytest.approx(2 * v.alpha_for(0.1))
    with pytest.raises(Exception, match="SteeringVector"):
        with probes.steer(organism, v.vector, 1, strength=0.1):
            pass
