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

:func:`counterfactual_pair` builds a pair from any model's own trace, with no ground truth
(the generic pair of ``thinklens report``):

1. Candidates: every number of the user's prompt changed by +1, -1, +2, … and every name
   of :data:`NAMES` in it swapped for another; a candidate is kept only when the rendered
   prompt then tokenizes to as many tokens, differing only inside the changed characters.
2. The corrupted input is the corrupted prompt followed by the clean trace's own
   completion, token for token (the thinking is held fixed, as in ``thinking="clean"``
   pairs), so every position corresponds.
3. The answer position is the token before the model's own final answer
   (:func:`thinklens.hooks.answers.default_extractor`, located in the completion). One
   batched pass reads the clean and every corrupted run's next-token prediction at each
   completion position. The first candidate whose prediction at the answer position
   differs from the clean answer token is taken; when no change reaches the answer (the
   thinking already wrote it), the first completion position whose prediction the change
   flips is used instead. Both inputs are cut after that position; ``Pair.why`` says
   which change, which position and why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from thinklens.errors import ConfigError
from thinklens.hooks import forward as fwd
from thinklens.hooks.answers import default_extractor, generic_answer
from thinklens.hooks.trace import Trace, check_tokenizer

#: Names :func:`counterfactual_pair` swaps (short, common, mostly one token in BPE vocabularies).
NAMES = ("Tom", "Sam", "Ben", "Max", "Leo", "Jack", "Paul", "Ryan", "Omar", "Tim", "Anna",
         "Mia", "Lily", "Sara", "Kate", "Emma", "Amy", "Zoe", "Ella", "Nina", "Grace", "Mary",
         "John")
#: How :attr:`Pair.why` of a :func:`counterfactual_pair` read at the final answer says so.
AT_ANSWER = "at the model's final answer"
_NUMBER = re.compile(r"(?<![\d.])\d+(?![\d.])")


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
    why: str = ""   # how the pair was built (counterfactual_pair says which change and why)

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


def _changes(prompt: str) -> list[tuple[str, str]]:
    """``(old, new)`` of the same length: numbers +1, -1, +2, …, then names (step 1)."""
    out = []
    for old in dict.fromkeys(m.group() for m in _NUMBER.finditer(prompt)):
        n = int(old)
        out += [(old, str(n + d)) for d in (1, -1, 2, -2, 3, 4)
                if n + d >= 0 and len(str(n + d)) == len(old)]
    for old in (x for x in NAMES if re.search(rf"\b{x}\b", prompt)):
        out += [(old, x) for x in NAMES if len(x) == len(old) and x != old
                and not re.search(rf"\b{x}\b", prompt)][:2]
    return out


def _spans(text: str, old: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """Character spans of ``old`` as a whole number or word inside ``text[lo:hi]``."""
    pat = _NUMBER if old.isdigit() else re.compile(r"\b\w+\b")
    return [(lo + m.start(), lo + m.end()) for m in pat.finditer(text[lo:hi]) if m.group() == old]


def _corrupted(model: Any, trace: Trace, old: str, new: str, reach: int,
               completion_ok: bool) -> tuple[list[int], set[int]] | None:
    """Ids with ``old`` replaced by ``new`` in the prompt (and, when the completion
    re-tokenizes to its own ids, in the completion's first ``reach`` characters), and the
    changed token positions; None when the tokens would not align."""
    n = trace.prompt_span.end
    end_prompt = trace.offsets[n - 1][1]
    base = trace.text.rfind(trace.prompt, 0, end_prompt)
    spans = _spans(trace.text, old, base, base + len(trace.prompt))
    if completion_ok:
        spans += _spans(trace.text, old, end_prompt, reach)
    text = list(trace.text)
    for a, b in spans:
        text[a:b] = list(new)          # same length: every offset stays where it was
    text = "".join(text)
    ids = model.encode(text[:end_prompt])
    if completion_ok:
        ids += model.encode(text[end_prompt:])
    else:
        ids += list(trace.token_ids[n:])
    if len(ids) != len(trace) or ids == list(trace.token_ids):
        return None
    changed = {k for k, (x, y) in enumerate(zip(ids, trace.token_ids)) if x != y}
    inside = [any(trace.offsets[k][0] < b and a < trace.offsets[k][1] for a, b in spans)
              for k in sorted(changed)]
    return (ids, changed) if all(inside) else None


def own_answer_token(trace: Trace, extract: Any = None) -> int | None:
    """Index of the completion token where the trace's own final answer starts (``extract``:
    a final-answer extractor, default :func:`~thinklens.hooks.answers.generic_answer`), or None.

    Example::

        k = own_answer_token(trace)      # trace.tokens[k] == '7' for '... 3 + 4 = 7 apples.'
    """
    found = (extract or generic_answer)(trace)
    n = trace.prompt_span.end
    if not found or n >= len(trace):
        return None
    start = trace.offsets[n][0]
    at = trace.text.rfind(found, start)
    return next((k for k in range(n, len(trace)) if trace.offsets[k][1] > at), None) \
        if at >= 0 else None


def counterfactual_pair(model: Any, trace: Trace, *, extract: Any = None,
                        answer_only: bool = False, max_candidates: int = 8,
                        batch_size: int | None = 4) -> Pair:
    """A clean/corrupted pair from one of the model's own traces, with no ground truth.

    Example::

        pair = counterfactual_pair(model, model.think("Tom has 3 apples and buys 4 more. ..."))
        pair.why      # "changed '3' to '4' (prompt and thinking); at the final answer
                      #  (position 61) the model's prediction changes from '7' to '8'"
        patch(model, pair, "resid_pre")

    See the module docstring for the steps. ``extract``: the final-answer extractor
    (default: the model's task's, else the last ``\\boxed{}`` or number).
    ``answer_only``: accept only a change that moves the prediction of the final answer.
    Raises ConfigError when no change of a number or name moves any prediction (or, with
    ``answer_only``, the final answer's).
    """
    if not isinstance(trace, Trace):
        raise ConfigError(f"counterfactual_pair needs a Trace (model.think(prompt)), got "
                          f"{type(trace).__name__}")
    check_tokenizer(trace, model.tokenizer)
    n = trace.prompt_span.end
    if n == 0 or n >= len(trace) or trace.prompt not in trace.text[: trace.offsets[n - 1][1]]:
        raise ConfigError("the trace has no completion after its prompt, or its rendered "
                          "prompt does not hold the prompt text; give a trace from model.think")
    a = own_answer_token(trace, extract or default_extractor(model))
    reach = trace.offsets[a][0] if a is not None else len(trace.text)
    tail = trace.text[trace.offsets[n - 1][1]:]
    completion_ok = model.encode(tail) == list(trace.token_ids[n:])
    cands = []
    for old, new in _changes(trace.prompt):
        got = _corrupted(model, trace, old, new, reach, completion_ok)
        if got is not None:
            cands.append((old, new, *got))
        if len(cands) == max_candidates:
            break
    if not cands:
        raise ConfigError(f"no number or name of the prompt {trace.prompt!r} can be changed "
                          "with its tokens staying aligned; build a pair by hand with make_pair")
    where = list(range(n - 1, len(trace) - 1))            # predictions of completion tokens
    logits = fwd.run(model, [list(trace.token_ids)] + [c[2] for c in cands],
                     logits_at=[where] * (len(cands) + 1), batch_size=batch_size)
    top = torch.stack([x.argmax(-1) for x in logits])     # [1 + candidate, completion]
    written = torch.tensor(trace.token_ids[n:])
    best = None
    for k, (old, _, _, changed) in enumerate(cands):
        flips = [j for j, p in enumerate(where)
                 if p + 1 not in changed and top[k + 1, j] != top[0, j]]
        if not flips:
            continue
        own = [j for j in flips if top[0, j] == written[j]]
        at = [j for j in flips if a is not None and where[j] == a - 1]
        kind, j = (0, at[0]) if at else (1, own[0]) if own else (2, flips[0])
        if answer_only and kind:
            continue
        rank = (kind, not old.isdigit(), where[j])
        if best is None or rank < best[0]:
            best = (rank, k, j)
    if best is None:
        what = "the prediction of its final answer" if answer_only else "any prediction"
        raise ConfigError(f"none of {len(cands)} changes of a number or name in the prompt "
                          f"{trace.prompt!r} changes {what}; build a pair by hand with make_pair")
    (kind, _, pos), k, j = best
    old, new, ids, _ = cands[k]
    ans, wrong = int(top[0, j]), int(top[k + 1, j])
    pair = make_pair(model, list(trace.token_ids[: pos + 1]), ids[: pos + 1], answer=ans,
                     wrong=wrong, answer_pos=-1)
    dec = model.tokenizer.decode
    where_txt = (AT_ANSWER if kind == 0 else
                 "the change does not reach the final answer; at the first token of the "
                 "model's own completion it changes" if kind == 1 else
                 "at the first position whose prediction it changes")
    what = "prompt and completion" if completion_ok and old.isdigit() else "prompt"
    why = (f"changed {old!r} to {new!r} ({what}); {where_txt} (position {pos}, predicting "
           f"token {pos + 1}) the model's prediction changes from {dec([ans])!r} to "
           f"{dec([wrong])!r}")
    return replace(pair, why=why)


__all__ = ["Pair", "input_tokens", "make_pair", "counterfactual_pair", "own_answer_token", "NAMES",
           "AT_ANSWER"]
