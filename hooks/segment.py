"""Sentence segmentation and keyword tags for the thinking of a reasoning trace.

Thought Anchors (Bogdan et al. 2025, "Thought Anchors: Which LLM Reasoning Steps
Matter?") analyses a chain of thought sentence by sentence: each sentence is a unit that
can be resampled, ablated or attended to, and each gets a behaviour category. This module
gives the default, dependency-free version of both steps.

Segmentation (:func:`split_sentences`):

1. Cut the text into pieces at every run of whitespace that follows ``.``, ``?`` or
   ``!``, and at every blank line (a whitespace run holding two or more newlines).
2. Strip each piece: spans never start or end with whitespace, and together they cover
   every non-whitespace character.
3. Merge a piece shorter than 10 characters into the next one (``"Wait."`` joins the
   sentence it introduces; ``"1."`` joins its list item). A short last piece joins the
   one before it.

Tagging (:func:`tag_sentence`): the first of these keyword rules that matches, checked in
this order, case-insensitive and on word boundaries:

1. ``backtracking``: "wait", "actually", "hold on", "oops", a sentence opening "No,".
2. ``verification``: "let me check", "verify", "double-check", "sanity check".
3. ``uncertainty``: "hmm", "maybe", "perhaps", "not sure", "I wonder".
4. ``answer``: "so the answer", "the answer is", "final answer", "therefore", boxed.
5. ``planning``: an opening "First", "I need to", "Let's", "I should", "my plan".
6. ``computation``: an ``=``, or a digit joined to another by ``+ - * / × ÷ ^``.
7. ``other``.

Both are plain callables, so a model may carry its own :data:`Segmenter` or
:data:`Annotator` (an LLM judge with Thought Anchors' eight categories, say) instead.

Placing text in tokens, for :func:`thinklens.hooks.trace.build_trace`:
:func:`align_tokens` gives each token its characters, :func:`find_think` the token
ranges of the thinking and the answer between tags, :func:`find_answer` the same for a
completion without tags (its final answer, a ``\\boxed`` or the last line, ends the
thinking), and :func:`assign_tokens` each sentence's tokens (a token goes to the sentence
holding its first non-whitespace character).
"""

from __future__ import annotations

import os
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from typing import Any

from thinklens.errors import ConfigError

Segmenter = Callable[[str], list[tuple[int, int]]]
"""``text -> [(char_start, char_end), ...]``: sorted, disjoint, non-empty spans."""

Annotator = Callable[[str], str]
"""``sentence text -> tag``."""

TAGS: tuple[str, ...] = (
    "backtracking", "verification", "uncertainty", "planning", "answer", "computation", "other",
)

MIN_SENTENCE_CHARS = 10

_WHITESPACE = re.compile(r"\s+")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of a thinking text.

    Example::

        >>> t = "Okay. So 2 + 3 = 5. Wait, is that right?\\n\\nYes, it is right"
        >>> [t[a:b] for a, b in split_sentences(t)]
        ['Okay. So 2 + 3 = 5.', 'Wait, is that right?', 'Yes, it is right']
    """
    pieces: list[tuple[int, int]] = []
    start = 0
    for m in _WHITESPACE.finditer(text):
        a, b = m.span()
        # leading/trailing whitespace and the cut points end a piece; other runs stay inside
        if a == 0 or b == len(text) or text[a - 1] in ".?!" or m.group().count("\n") >= 2:
            if a > start:
                pieces.append((start, a))
            start = b
    if start < len(text):
        pieces.append((start, len(text)))
    return _merge_short(pieces)


def _merge_short(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pending = None
    for a, b in pieces:
        a = a if pending is None else pending
        if b - a < MIN_SENTENCE_CHARS:
            pending = a
            continue
        out.append((a, b))
        pending = None
    if pending is not None:
        end = pieces[-1][1]
        if out:
            out[-1] = (out[-1][0], end)
        else:
            out.append((pending, end))
    return out


def _rx(*phrases: str) -> re.Pattern[str]:
    """One case-insensitive pattern matching any phrase as whole words."""
    return re.compile(r"(?<!\w)(?:" + "|".join(phrases) + r")(?!\w)", re.IGNORECASE)


# A phrase starting with ^ must open the sentence (after quotes/markdown/list markers).
_OPEN = r"^[\s\"'*#>(\[-]*"
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("backtracking", _rx(r"wait", r"actually", r"hold on", r"oops", r"on second thought",
                         r"scratch that", _OPEN + r"no(?=[,.!])")),
    ("verification", _rx(r"let(?:'s| me| us) (?:check|verify|confirm|make sure)",
                         r"verif(?:y|ies|ied|ying|ication)", r"double[- ]?check(?:s|ed|ing)?",
                         r"sanity[- ]check", r"check(?:ing)? (?:that|whether|if|again)")),
    ("uncertainty", _rx(r"h+m+", r"maybe", r"perhaps", r"not (?:sure|certain)", r"unsure",
                        r"i wonder", r"possibly")),
    ("answer", _rx(r"(?:so|thus|hence) the (?:final )?answer", r"the (?:final )?answer is",
                   r"final answer", r"therefore", r"in conclusion", r"\\?boxed")),
    ("planning", _rx(_OPEN + r"first(?:ly)?", r"i need to", r"let's", r"let us", r"i should",
                     r"i(?:'ll| will) (?:start|begin|try|first)", r"my plan", r"the plan is",
                     _OPEN + r"next")),
)
_COMPUTATION = re.compile(r"=|\d\s*[-+*/×÷^]\s*[\d(.]")


def tag_sentence(text: str) -> str:
    """A behaviour tag from :data:`TAGS` by keyword rules (first match wins).

    Example::

        >>> tag_sentence("Wait, that's wrong.")
        'backtracking'
        >>> tag_sentence("So 12 * 3 = 36.")
        'computation'
    """
    for tag, pattern in _RULES:
        if pattern.search(text):
            return tag
    if _COMPUTATION.search(text):
        return "computation"
    return "other"


def assign_tokens(text: str, offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]],
                  tokens: range) -> list[tuple[int, int, int, int]]:
    """Token range of each sentence, given as sorted char spans of ``text``.

    Returns ``(token_start, token_end, char_start, char_end)`` per sentence. A token of
    ``tokens`` belongs to the sentence holding its first non-whitespace character
    (``offsets[i]`` is its char span). A sentence no token starts in joins the one before
    it (or after it, when first), so each result has a token and they never overlap.
    """
    starts = [a for a, _ in spans]
    first: list[int | None] = [None] * len(spans)
    last = [0] * len(spans)
    for i in tokens:
        a, b = offsets[i]
        body = text[a:b].lstrip()
        if not body:
            continue
        key = b - len(body)
        j = bisect_right(starts, key) - 1
        if j >= 0 and key < spans[j][1]:
            first[j] = i if first[j] is None else first[j]
            last[j] = i + 1
    out: list[tuple[int, int, int, int]] = []
    carry = None  # char start of leading sentences without tokens
    for j, (cs, ce) in enumerate(spans):
        cs = cs if carry is None else carry
        t0 = first[j]
        if t0 is not None and out:
            t0 = max(t0, out[-1][1])
        if t0 is None or t0 >= last[j]:
            if out:
                out[-1] = (*out[-1][:3], ce)
            else:
                carry = cs
            continue
        out.append((t0, last[j], cs, ce))
        carry = None
    return out


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def align_tokens(tokenizer: Any, ids: list[int],
                 source: str | None) -> tuple[str, list[tuple[int, int]]]:
    """``(text, offsets)`` of one part: offsets index ``text``, which spells ``ids``."""
    if getattr(tokenizer, "is_fast", False):
        source = _decode(tokenizer, ids) if source is None else source
        enc = tokenizer(source, add_special_tokens=False, return_offsets_mapping=True)
        offs = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
        ok = all(0 <= a <= b <= len(source) for a, b in offs) and all(
            p[0] <= q[0] and p[1] <= q[1] for p, q in zip(offs, offs[1:]))
        if list(enc["input_ids"]) == ids and ok:
            return source, offs
    # Incremental decoding; ids[window:done] are emitted tokens kept as left context, so
    # decoders that treat a sequence's first token specially (Metaspace) stay consistent.
    pieces: list[str] = []
    offs, n, window, done = [], 0, 0, 0
    for i in range(len(ids)):
        before, after = _decode(tokenizer, ids[window:done]), _decode(tokenizer, ids[window:i + 1])
        grew = after.startswith(before) and len(after) > len(before)
        ready = grew and not after.endswith("\ufffd")
        if not ready and i < len(ids) - 1:
            continue  # a partial UTF-8 character: wait for the tokens that complete it
        k = len(before) if after.startswith(before) else len(os.path.commonprefix([before, after]))
        piece = after[k:]
        pieces.append(piece)
        offs += [(n, n + len(piece))] * (i + 1 - done)
        n += len(piece)
        window, done = done, i + 1
    return "".join(pieces), offs


def _find_tag(tokenizer: Any, trace_ids: list[int], text: str, offsets: list[tuple[int, int]],
              tag: str, lo: int, hi: int, last: bool) -> tuple[int, int] | None:
    """Token range ``[t0, t1)`` of the first (or last) ``tag`` among tokens ``[lo, hi)``."""
    tag_ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
    if len(tag_ids) == 1:
        hits = [i for i in range(lo, hi) if trace_ids[i] == tag_ids[0]]
        return None if not hits else (hits[-1], hits[-1] + 1) if last else (hits[0], hits[0] + 1)
    if lo >= hi:
        return None
    find = text.rfind if last else text.find
    p = find(tag, offsets[lo][0], offsets[hi - 1][1])
    if p < 0:
        return None
    t0 = bisect_right([b for _, b in offsets], p, lo, hi)  # first token ending after p
    t1 = bisect_left([a for a, _ in offsets], p + len(tag), t0 + 1, hi)
    return t0, t1


def find_think(tokenizer: Any, ids: list[int], text: str, offsets: list[tuple[int, int]],
               n_prompt: int, think_open: str, think_close: str,
               ) -> tuple[tuple[int, int], tuple[int, int], str]:
    """``(think, answer, state)``: token ranges, and "closed", "truncated" or "absent".

    The last ``think_open`` of the prompt, else the first of the completion; then the first
    ``think_close`` after it. Special tokens (eos, pad) at the end belong to neither range.
    """
    def find(tag: str, lo: int, hi: int, last: bool = False) -> tuple[int, int] | None:
        return _find_tag(tokenizer, ids, text, offsets, tag, lo, hi, last)

    end = content_end(tokenizer, ids, n_prompt, (think_open, think_close))
    opened = find(think_open, 0, n_prompt, last=True)
    # a <think> the prompt already closed (thinking switched off, earlier turns) yields to
    # one the model opens itself
    if opened is None or find(think_close, opened[1], n_prompt) is not None:
        opened = find(think_open, n_prompt, end) or opened
    if opened is None:
        return (n_prompt, n_prompt), (n_prompt, end), "absent"
    closed = find(think_close, opened[1], end)
    if closed is None:
        return (opened[1], max(opened[1], end)), (end, end), "truncated"
    return (opened[1], closed[0]), (closed[1], max(closed[1], end)), "closed"


def content_end(tokenizer: Any, ids: list[int], n_prompt: int, keep: Sequence[str] = ()) -> int:
    """End of the completion's content: trailing special tokens (eos, pad) left out, except
    the tokens that spell a string of ``keep`` (the thinking tags) and unk."""
    keep_ids = {i for t in keep for i in tokenizer(t, add_special_tokens=False)["input_ids"]}
    special = set(getattr(tokenizer, "all_special_ids", ())) - keep_ids
    special.discard(getattr(tokenizer, "unk_token_id", None))
    end = len(ids)
    while end > n_prompt and ids[end - 1] in special:
        end -= 1
    return end


_BOXED = "\\boxed"


def find_answer(text: str, offsets: list[tuple[int, int]], n_prompt: int, end: int,
                finished: bool | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(think, answer)`` token ranges of a completion written without thinking tags.

    The completion is tokens ``[n_prompt, end)``. Its final answer starts at the last
    ``\\boxed``, else at the first non-whitespace character of its last non-blank line,
    and runs to ``end``; everything before it is the thinking. A completion cut at the
    token limit (``finished`` False) without a ``\\boxed`` never reached its final
    answer: all of it is thinking and the answer is empty. The token that holds the
    answer's first character starts the answer.
    """
    if end <= n_prompt:
        return (n_prompt, n_prompt), (n_prompt, n_prompt)
    c0, c1 = offsets[n_prompt][0], offsets[end - 1][1]
    body = text[c0:c1]
    p = body.rfind(_BOXED)
    if p < 0 and finished is False:
        return (n_prompt, end), (end, end)
    if p < 0:
        stripped = body.rstrip()
        line = stripped.rfind("\n") + 1
        p = line + len(stripped[line:]) - len(stripped[line:].lstrip())
        if p >= len(stripped):  # a completion of whitespace only
            return (n_prompt, n_prompt), (n_prompt, end)
    # the first token ending after the answer's first character holds it
    t = bisect_right([b for _, b in offsets], c0 + p, n_prompt, end)
    return (n_prompt, t), (t, end)


def check_segments(spans: Sequence[tuple[int, int]], text: str,
                   segmenter: Segmenter) -> list[tuple[int, int]]:
    """A segmenter's spans, checked to be sorted, disjoint and non-empty within ``text``."""
    out = [tuple(s) for s in spans]
    for k, s in enumerate(out):
        prev = out[k - 1][1] if k else 0
        if len(s) != 2 or not prev <= s[0] < s[1] <= len(text):
            name = getattr(segmenter, "__name__", segmenter)
            raise ConfigError(f"segmenter {name!r} returned span {s!r} at {k} for a thinking "
                              f"text of {len(text)} chars; spans must be sorted, disjoint "
                              "(start, end) pairs with start < end")
    return out  # type: ignore[return-value]


__all__ = ["split_sentences", "tag_sentence", "assign_tokens", "align_tokens", "find_think",
           "find_answer", "content_end", "check_segments", "TAGS", "Annotator", "Segmenter"]
