"""Clean/corrupted input pairs for patching, from text, token ids or traces.

Activation patching compares two runs position by position, so the two inputs must
tokenize to the same length with corresponding tokens at corresponding positions
(Heimersheim & Nanda 2024, "How to use and interpret activation patching"; the IOI pair
of Wang et al. 2022 swaps two names of one token each). :func:`make_pair`:

1. Tokenizes both inputs (text as it is, no special tokens added; a :class:`Trace` by
   its ids, after checking it was made by this model's tokenizer).
2. Refuses inputs of different lengths, naming the first position where they differ and
   both tokens there.
3. Resolves the answer and wrong tokens (text that must be exactly one token, or ids) and
   the answer position: the position whose next-token logits the metric reads.

Pair builders that know one model's task (the organism's ``change_constant``,
``swap_names``, …) live with that task in :mod:`thinklens.zoo` and are reached through
``model.task.pairs``; they end in :func:`make_pair` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from thinklens.errors import ConfigError
from thinklens.hooks.trace import Trace, check_tokenizer


@dataclass(frozen=True)
class Pair:
    """Aligned clean and corrupted inputs plus the answer the metric reads.

    Example::

        pair = make_pair(model, "When John and Mary went to the store, John gave a drink to",
                         "When Mary and John went to the store, Mary gave a drink to",
                         answer=" Mary", wrong=" John")
        pair.clean_ids.shape, pair.diff_positions, pair.answer_pos   # (14,), [1, 3, 9], 13
    """

    clean_ids: Int[Tensor, "pos"]  # noqa: F821
    corrupt_ids: Int[Tensor, "pos"]  # noqa: F821
    clean_tokens: list[str]
    corrupt_tokens: list[str]
    answer_pos: int
    answer: int | None = None
    wrong: int | None = None
    clean_trace: Trace | None = None
    corrupt_trace: Trace | None = None

    def __len__(self) -> int:
        return len(self.clean_tokens)

    @property
    def diff_positions(self) -> list[int]:
        """Positions where the clean and corrupted tokens differ."""
        return (self.clean_ids != self.corrupt_ids).nonzero().flatten().tolist()

    def labels(self) -> list[str]:
        """One label per position: the token, or ``clean/corrupt`` where they differ."""
        return [a if a == b else f"{a}/{b}" for a, b in zip(self.clean_tokens, self.corrupt_tokens)]


def input_tokens(model: Any, x: Any, which: str) -> tuple[list[int], list[str], Trace | None]:
    """(ids, token strings, trace or None) of one patching input: text, token ids or a Trace.

    ``which`` names the input in error messages (``"clean"``, ``"corrupted"``).
    """
    if isinstance(x, Trace):
        check_tokenizer(x, model.tokenizer)
        return list(x.token_ids), list(x.tokens), x
    if isinstance(x, str):
        ids = model.encode(x)
    elif isinstance(x, Tensor | list | tuple):
        ids = torch.as_tensor(x).reshape(-1).tolist()
    else:
        raise ConfigError(f"{which} must be text, token ids or a Trace, got {type(x).__name__}")
    if not ids:
        raise ConfigError(f"{which} input {x!r} has no tokens")
    return ids, [model.tokenizer.decode([i]) for i in ids], None


def _token_id(model: Any, tok: str | int | None, which: str) -> int | None:
    if tok is None:
        return None
    if isinstance(tok, str):
        ids = model.encode(tok)
        if len(ids) != 1:
            pieces = [model.tokenizer.decode([i]) for i in ids]
            raise ConfigError(f"{which} {tok!r} is {len(ids)} tokens {pieces}; a patching "
                              "metric reads one next-token logit, so give a single token "
                              "(e.g. its first piece) or a token id")
        return ids[0]
    vocab = len(model.tokenizer)
    if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab:
        raise ConfigError(f"{which} {tok!r} is not a token id (0..{vocab - 1}) or a string")
    return tok


def make_pair(model: Any, clean: str | Trace | Any, corrupt: str | Trace | Any, *,
              answer: str | int | None = None, wrong: str | int | None = None,
              answer_pos: int = -1) -> Pair:
    """An aligned :class:`Pair`; raises ConfigError when the token lengths differ."""
    c_ids, c_toks, c_trace = input_tokens(model, clean, "clean")
    x_ids, x_toks, x_trace = input_tokens(model, corrupt, "corrupted")
    if len(c_ids) != len(x_ids):
        i = next((k for k, (a, b) in enumerate(zip(c_ids, x_ids)) if a != b),
                 min(len(c_ids), len(x_ids)))
        a = repr(c_toks[i]) if i < len(c_toks) else "nothing (it ended)"
        b = repr(x_toks[i]) if i < len(x_toks) else "nothing (it ended)"
        raise ConfigError(
            f"clean and corrupted inputs tokenize to different lengths ({len(c_ids)} vs "
            f"{len(x_ids)} tokens); they first differ at position {i}: clean {a} vs corrupted "
            f"{b}. Patching compares positions one to one: change words for words of the same "
            "token count (e.g. swap names that are one token each)")
    if c_ids == x_ids:
        raise ConfigError("clean and corrupted inputs are the same tokens; there is nothing "
                          "to patch between them")
    n = len(c_ids)
    if not -n <= answer_pos < n:
        raise ConfigError(f"answer_pos {answer_pos} is out of range for {n} tokens "
                          f"(valid: {-n}..{n - 1})")
    return Pair(torch.tensor(c_ids), torch.tensor(x_ids), c_toks, x_toks, answer_pos % n,
                _token_id(model, answer, "answer"), _token_id(model, wrong, "wrong answer"),
                c_trace, x_trace)


__all__ = ["Pair", "input_tokens", "make_pair"]
