"""Loading: the bridge agrees with plain Hugging Face; config, sites, errors."""

from __future__ import annotations

import pytest
import torch

import thinklens
from thinklens.errors import ModelLoadError, SiteError, UnsupportedArchitectureError
from thinklens.hooks import forward as fwd
from thinklens.hooks.engine_hf import plain_model

# fp32, eager attention on both sides: the bridge runs the same modules, so logits agree
# to float rounding. SmolLM2's 30 layers accumulate a little more.
LOGIT_ATOL = {"tiny": 1e-5, "smollm": 1e-4}


def _hf_logits(model, ids):
    with torch.no_grad():
        return model.hf(ids).logits


def _bridge_logits(model, ids):
    with torch.no_grad():
        return model.bridge(ids)


@pytest.mark.parametrize("fixture", ["qwen2", "qwen3_model"])
def test_bridge_matches_hf_random_models(fixture, request, qwen3_dir):
    model = request.getfixturevalue(fixture) if fixture == "qwen2" else thinklens.load(str(qwen3_dir))
    ids = torch.randint(6, 39, (2, 17))
    torch.testing.assert_close(_bridge_logits(model, ids), _hf_logits(model, ids),
                               atol=LOGIT_ATOL["tiny"], rtol=0)


@pytest.fixture
def qwen3_model(qwen3_dir):
    return thinklens.load(str(qwen3_dir))


def test_config_exposes_gqa_shape(qwen2):
    c = qwen2.config
    assert (c.architecture, c.n_layers, c.n_heads, c.n_kv_heads, c.d_model, c.d_head) == (
        "Qwen2ForCausalLM", 3, 4, 2, 64, 16)
    assert c.d_vocab == 39 and c.d_mlp == 160
    assert qwen2.device.type == "cpu" and qwen2.dtype == torch.float32
    assert "<think>" in qwen2.chat_template


def test_site_names_are_transformerlens_names(qwen2):
    names = qwen2.site_names
    for expected in ["hook_embed", "blocks.0.hook_resid_pre", "blocks.2.hook_resid_post",
                     "blocks.1.attn.hook_pattern", "blocks.1.hook_attn_out",
                     "blocks.1.hook_mlp_out", "blocks.0.attn.hook_k", "blocks.0.attn.hook_z"]:
        assert expected in names
    # one name per activation: no bridge alias of a shown name is shown too
    assert "blocks.0.hook_out" not in names and "blocks.0.hook_in" not in names
    assert len(names) == len(set(names))
    assert qwen2.sites("blocks.*.hook_resid_post") == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert qwen2.sites("blocks.0.hook_out") == ["blocks.0.hook_resid_post"]  # alias accepted


def test_unknown_site_suggests_closest(qwen2):
    with pytest.raises(SiteError, match=r"'blocks\.3\.hook_resid'.*blocks\.\d\.hook_resid_(post|pre)"):
        qwen2.sites("blocks.3.hook_resid")
    with pytest.raises(SiteError, match="blocks.9.hook_resid_post"):
        qwen2.sites("blocks.9.hook_resid_post")


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="nope.*does not exist"):
        thinklens.load(str(missing))
    with pytest.raises(ModelLoadError, match="does not exist"):
        thinklens.load(str(tmp_path / "model.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        thinklens.load(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    from transformers import BioGptConfig, BioGptForCausalLM

    from thinklens.zoo.vocab import build_tokenizer

    m = BioGptForCausalLM(BioGptConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64))
    m.config.architectures = ["BioGptForCausalLM"]
    m.save_pretrained(str(tmp_path))
    build_tokenizer().save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedArchitectureError, match="BioGptForCausalLM.*Supported"):
        thinklens.load(str(tmp_path))


def test_import_changes_nothing_global():
    import subprocess
    import sys

    code = ("import torch, sys; s = torch.random.get_rng_state().clone(); "
            "g = torch.is_grad_enabled(); d = torch.get_default_dtype(); "
            "mods = set(sys.modules); import thinklens; "
            "assert torch.equal(s, torch.random.get_rng_state()); "
            "assert g == torch.is_grad_enabled() and d == torch.get_default_dtype(); "
            "import warnings; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.smollm
def test_smollm_gguf_bridge_matches_hf(smollm):
    c = smollm.config
    assert (c.architecture, c.n_layers, c.n_heads, c.n_kv_heads, c.d_model) == (
        "LlamaForCausalLM", 30, 9, 3, 576)
    ids = torch.tensor([smollm.encode(smollm.render_prompt("What is 2+3? Think step by step."))])
    torch.testing.assert_close(_bridge_logits(smollm, ids), _hf_logits(smollm, ids),
                               atol=LOGIT_ATOL["smollm"], rtol=0)


@pytest.mark.smollm
def test_smollm_residuals_equal_hidden_states(smollm):
    ids = torch.tensor([smollm.encode("The capital of France is Paris. The capital of")])
    trace = thinklens.Trace.from_text(smollm, "x", "The capital of France is Paris.")
    cap = smollm.capture(trace, sites=["blocks.*.hook_resid_post", "blocks.0.hook_resid_pre"])
    tokens = torch.tensor([trace.token_ids])
    with torch.no_grad():  # the capture runs SDPA: compare with HF's own SDPA forward
        hs = plain_model(smollm.hf)(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cap["blocks.0.hook_resid_pre"].values[0], hs[0][0], atol=1e-5, rtol=0)
    for layer in range(smollm.config.n_layers - 1):  # HF's last entry is after the final norm
        torch.testing.assert_close(cap[f"blocks.{layer}.hook_resid_post"].values[0],
                                   hs[layer + 1][0], atol=1e-4, rtol=0)
    last = cap[f"blocks.{smollm.config.n_layers - 1}.hook_resid_post"].values[0]
    with torch.no_grad():  # HF's last entry is the last block's output after the final norm
        torch.testing.assert_close(smollm.bridge.ln_final(last), hs[-1][0], atol=1e-4, rtol=0)
    # the next-token logits of a prompt through the forward runner are HF's
    (got,) = fwd.run(smollm, [ids[0].tolist()], logits_at="last")
    torch.testing.assert_close(got, _hf_logits(smollm, ids)[0, -1:], atol=LOGIT_ATOL["smollm"],
                               rtol=0)


def test_a_misspelt_organism_is_caught_before_the_hub():
    with pytest.raises(ModelLoadError, match="no model 'organsim'. Did you mean 'organism'"):
        thinklens.load("organsim")
