"""SDPA capture: the same sites and values as the eager bridge pass; eager kept for patterns.

Tolerance: fp32, ``atol=1e-5, rtol=1e-5`` (measured worst differences: Qwen2/Qwen3 about
1e-6, the organism 1.1e-5 absolute on ``mlp.hook_post`` values of order 1).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from thinklens import Trace
from thinklens.errors import ConfigError
from thinklens.hooks import attention_impl
from thinklens.hooks import forward as fwd
from thinklens.hooks.sites import is_pattern_site

impl_mod = importlib.import_module("thinklens.hooks.attention_impl")
TOL = {"atol": 1e-5, "rtol": 1e-5}
PROMPTS = [
    ("c = b + 4 ; a = 7 ; b = a - 2 ; ? c",
     "c = b + 4 ; b = a - 2 . a = 7 ; b = 7 - 2 = 5 . c = 5 + 4 = 9 ; c = 9 . </think> 9 <eos>"),
    ("a = 3 ; ? a", "a = 3 ; a = 3 . </think> 3 <eos>"),
]


def _non_pattern_sites(model) -> list[str]:
    return [s for s in model.site_names if not is_pattern_site(s)]


def _spy_sdpa(monkeypatch) -> list[int]:
    calls: list[int] = []
    orig = impl_mod._sdpa_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)
    monkeypatch.setattr(impl_mod, "_sdpa_forward", spy)
    return calls


def test_every_attention_component_is_reproduced(model):
    comps = impl_mod._attention_components(model.bridge)
    assert len(comps) == model.config.n_layers
    assert all(impl_mod._supported(a) for a in comps)


def test_sdpa_pass_equals_eager_on_every_non_pattern_site(model, monkeypatch):
    """A ragged, right-padded batch: every site's real positions, and the logits."""
    seqs = [[1, 5, 6, 7, 8, 9, 10, 11, 12, 3, 4, 5], [1, 5, 6, 7, 8, 9]]
    batch = fwd.pad(model, seqs, [0, 1])
    sites = _non_pattern_sites(model)
    assert any(s.endswith("attn.hook_rot_q") for s in sites)  # q/k/v/z sites included
    res: dict[str, dict[str, torch.Tensor]] = {}
    calls = _spy_sdpa(monkeypatch)
    for impl in ("eager", None):
        got: dict[str, torch.Tensor] = {}
        ran: set[str] = set()

        def keep(name, got=got, ran=ran):
            def f(x, hook):
                got[name] = x.detach().clone()
                ran.add(attention_impl.current(model))
                return x
            return f
        got["logits"] = fwd.forward(model, batch, [(s, keep(s)) for s in sites], attention=impl)
        assert ran == {"eager" if impl else "sdpa"}
        res[impl or "sdpa"] = got
    assert len(calls) == model.config.n_layers  # the SDPA forward ran once per layer
    assert set(res["eager"]) == set(res["sdpa"]) == {*sites, "logits"}
    for name, ref in res["eager"].items():
        for j, n in enumerate(map(int, batch.lengths)):
            torch.testing.assert_close(res["sdpa"][name][j, :n], ref[j, :n], **TOL,
                                       msg=lambda m, name=name: f"{name}: {m}")
    assert attention_impl.current(model) == "eager"
    assert model.bridge.original_model.config._attn_implementation == "eager"


def test_capture_runs_sdpa_and_equals_eager(qwen2, monkeypatch):
    traces = [Trace.from_text(qwen2, p, c) for p, c in PROMPTS]
    sites = ["blocks.*.hook_resid_post", "blocks.1.attn.hook_z", "blocks.0.hook_attn_out"]
    calls = _spy_sdpa(monkeypatch)
    cap = qwen2.capture(traces, sites=sites)
    assert calls  # SDPA ran
    names = qwen2.sites(sites)
    ref: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for t in traces:
        batch = fwd.pad(qwen2, [t.token_ids], [0])
        hooks = [(n, lambda x, hook, n=n: ref[n].append(x[0].detach().clone())) for n in names]
        fwd.forward(qwen2, batch, hooks, attention="eager")
    for n in names:
        for i in range(len(traces)):
            torch.testing.assert_close(cap[n].unpadded(i), ref[n][i], **TOL)


def test_pattern_captures_run_eager(qwen2, monkeypatch):
    traces = [Trace.from_text(qwen2, p, c) for p, c in PROMPTS]
    calls = _spy_sdpa(monkeypatch)
    pat = qwen2.capture(traces, sites=["blocks.1.attn.hook_pattern", "blocks.1.hook_resid_post"])
    heads = qwen2.capture(traces, attention=[(0, 1)])
    assert not calls  # the switch was never applied
    sent = qwen2.capture(traces, attention="sentence")  # blockwise from q/k: SDPA
    assert len(calls) == qwen2.config.n_layers * 1  # one batch: once per layer
    for i, t in enumerate(traces):  # the pattern equals the eager bridge's, computed here
        seen = {}
        with qwen2.hooks([("blocks.1.attn.hook_pattern",
                           lambda x, hook, seen=seen: seen.setdefault("p", x[0].detach().clone()))]):
            with torch.no_grad():
                qwen2.bridge(torch.tensor([t.token_ids]))
        torch.testing.assert_close(pat["blocks.1.attn.hook_pattern"].unpadded(i), seen["p"],
                                   atol=1e-6, rtol=0)
    assert sent is not None and heads is not None
    assert attention_impl.choose(qwen2, ["blocks.*.attn.hook_pattern"]) == "eager"
    assert attention_impl.choose(qwen2, ["blocks.0.attn.hook_attn_scores"]) == "eager"
    assert attention_impl.choose(qwen2, ["blocks.*.hook_resid_post"]) == "sdpa"
    with pytest.raises(ConfigError, match="no pattern"):
        attention_impl.choose(qwen2, ["blocks.0.attn.hook_pattern"], "sdpa")
    with pytest.raises(ConfigError, match="valid: eager, sdpa"):
        attention_impl.choose(qwen2, [], "flash")


def test_switch_is_scoped_after_an_error(qwen2):
    hf_cfg = qwen2.bridge.original_model.config
    attn = qwen2.bridge.blocks[0].attn

    def boom(x, hook):
        assert attention_impl.current(qwen2) == "sdpa" and "forward" in attn.__dict__
        raise RuntimeError("boom")
    batch = fwd.pad(qwen2, [[1, 5, 6, 7]], [0])
    with pytest.raises(RuntimeError, match="boom"):
        fwd.forward(qwen2, batch, [("blocks.1.hook_resid_post", boom)])
    assert attention_impl.current(qwen2) == "eager"
    assert hf_cfg._attn_implementation == "eager"
    assert all("forward" not in b.attn.__dict__ for b in qwen2.bridge.blocks)
    assert all("forward" not in vars(b.attn.original_component) for b in qwen2.bridge.blocks)
    fired = []  # the eager pass afterwards still computes patterns
    fwd.forward(qwen2, batch, [("blocks.0.attn.hook_pattern",
                                lambda x, hook: fired.append(x.shape))])
    assert fired == [(1, 4, 4, 4)]
