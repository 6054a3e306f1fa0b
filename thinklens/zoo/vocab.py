"""The organism's tokenizer: one token per character of the task, saved as HF files.

A ``tokenizers`` WordLevel model over the task's symbols, wrapped in
``PreTrainedTokenizerFast`` with a chat template that opens ``<think>`` inside the
prompt (as DeepSeek-R1-Distill's template does), so ``Model.think`` treats the
organism exactly like any chat model.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from thinklens.zoo.task import OPS, VAR_NAMES

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<think>", "</think>"]
SYMBOLS = list(VAR_NAMES) + [str(d) for d in range(10)] + sorted(OPS) + ["=", ";", ".", "?"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %} <think> {{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} <think>{% endif %}"
)


def build_tokenizer(words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """The organism tokenizer, built from the task vocabulary (deterministic ids).

    ``words``: whole-word tokens appended after the symbols (the backtracking organism's
    ``wait``); every other character stays one token.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIALS + SYMBOLS + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # whitespace is optional in the text: every symbol is one character
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex("".join(f"{w}|" for w in words) + "."), behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=["<think>", "</think>"],
        model_max_length=512, padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _save_tokenizer(folder: str | Path) -> None:
    build_tokenizer().save_pretrained(str(folder))


__all__ = ["build_tokenizer", "SPECIALS", "SYMBOLS"]
