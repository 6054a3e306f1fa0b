"""A reasoning trace as plain data: tokens, prompt/thinking/answer spans, tagged sentences.

Building one (:func:`build_trace`, or :meth:`Trace.from_text` given a model):

1. Tokenize the rendered prompt (chat template applied; it holds bos itself) with no added
   special tokens; take the completion's ids as generated, or tokenize its text likewise.
2. Give every token its characters in ``text``: the fast tokenizer's offset mapping when
   re-tokenizing the part's text gives back its ids; otherwise incremental decoding, as
   text-generation servers detokenize: each token gets the text that decoding it adds to
   a short window of the tokens before it. Tokens that end inside a UTF-8 character share
   that character's span, as fast tokenizers' offsets do.
3. Find the thinking, by the ``thinking`` mode (recorded in ``meta["thinking"]``):

   - ``"tags"``: the last ``<think>`` of the prompt (templates like DeepSeek-R1-Distill's
     open it there), else the first of the completion; then the first ``</think>`` after
     it. Without ``</think>`` the thinking runs to the end and the trace is ``truncated``:
     kept and flagged, never dropped. Without ``<think>`` the whole completion is answer
     and ``meta["no_think"]`` is True.
   - ``"answer"``, for chat models that write no tags (SmolLM2 answers step by step): the
     completion up to its final answer is the thinking, and the final answer — from the
     last ``\\boxed``, else the last non-blank line, to the end — is the answer
     (:func:`~thinklens.hooks.segment.find_answer`). A completion cut at the token limit
     without a ``\\boxed`` has no final answer: all of it is thinking. An empty thinking
     sets ``meta["no_think"]``.
   - ``"auto"`` (the default): ``"tags"`` when the rendered prompt or the completion holds
     ``<think>``, else ``"answer"``.

   Whatever the mode, a completion cut at ``max_new_tokens`` (``finished=False``, which
   the generation engine knows) is ``truncated``; ``finished`` is kept in
   ``meta["finished"]`` when given. From text alone (``finished=None``) only unclosed
   thinking marks a trace truncated.
4. Cut the thinking into sentences and tag each (Thought Anchors, Bogdan et al. 2025; see
   :mod:`thinklens.hooks.segment`). A token belongs to the sentence holding its first
   non-whitespace character; whitespace-only tokens between sentences belong to none.

``prompt_span`` is every token of the rendered prompt and ``think_span`` every token
strictly between the tags, so when the template ends with ``<think>\\n`` the two share
that newline token.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import Tensor

from thinklens.errors import (
    ConfigError,
    TokenizerMismatchError,
)
from thinklens.hooks._fileio import atomic_write_text
from thinklens.hooks.reprs import compact_repr
from thinklens.hooks.segment import (
    Annotator,
    Segmenter,
    align_tokens,
    assign_tokens,
    check_segments,
    content_end,
    find_answer,
    find_think,
    split_sentences,
    tag_sentence,
)

_FORMAT = "thinklens.trace/1"


@dataclass(frozen=True)
class Span:
    """Token indices ``[start, end)``: ``len(span)``, ``i in span``, ``span.range``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ConfigError(f"bad span [{self.start}, {self.end}): need 0 <= start <= end")

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, i: object) -> bool:
        return isinstance(i, int) and self.start <= i < self.end

    @property
    def range(self) -> range:
        return range(self.start, self.end)


@dataclass(frozen=True)
class Sentence:
    """A thinking sentence: tokens ``[start, end)``, ``text[char_start:char_end]``."""

    start: int
    end: int
    char_start: int
    char_end: int
    text: str
    tag: str

    @property
    def span(self) -> Span:
        return Span(self.start, self.end)


@dataclass
class Trace:
    """One prompt and completion, tokenized, with its thinking cut into tagged sentences.

    Example (the organism's word-level tokenizer; its template opens ``<think>``)::

        trace = Trace.from_text(model, "c=b+4 ; a=7 ; b=a-2 ; ? c", "a=7 b=5 c=9 </think> 9 <eos>")
        len(trace), trace.think_span.range, trace.answer_span.range
        # 16, range(10, 13), range(14, 15)
        trace.sentences[0].text, trace.tags              # 'a=7 b=5 c=9', ['computation']
        positions(trace, "sentence_ends")                # tensor([12]), shape (pos,)
        Trace.load(trace.to_json("t.json")) == trace     # True
    """

    __repr__ = compact_repr  # shapes, not whole tensors (hooks/reprs.py)

    model_name: str
    tokenizer_id: str
    prompt: str
    text: str
    token_ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    prompt_span: Span
    think_span: Span
    answer_span: Span
    sentences: list[Sentence]
    truncated: bool
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.tokens) != n or len(self.offsets) != n:
            raise ConfigError(f"trace has {n} token ids but {len(self.tokens)} tokens and "
                              f"{len(self.offsets)} offsets; they must be equally long")
        for name in ("prompt_span", "think_span", "answer_span"):
            if getattr(self, name).end > n:
                raise ConfigError(f"{name} {getattr(self, name)} runs past the {n} tokens")

    def __len__(self) -> int:
        return len(self.token_ids)

    def _chars(self, span: Span) -> str:
        """Text from the end of the token before ``span`` to the start of the one after."""
        if not len(span):
            return ""
        a = self.offsets[span.start - 1][1] if span.start > 0 else 0
        b = self.offsets[span.end][0] if span.end < len(self) else len(self.text)
        return self.text[a:b]

    @property
    def thinking_text(self) -> str:
        """The text between ``<think>`` and ``</think>`` (or the end, when truncated)."""
        return self._chars(self.think_span)

    @property
    def answer_text(self) -> str:
        """The text after ``</think>``, trailing special tokens left out."""
        return self._chars(self.answer_span)

    @property
    def completion_text(self) -> str:
        """Everything after the rendered prompt's last token."""
        return self._chars(Span(self.prompt_span.end, len(self)))

    @property
    def tags(self) -> list[str]:
        """The tag of each sentence of the thinking."""
        return [s.tag for s in self.sentences]

    def sentence_of_token(self) -> list[int]:
        """Sentence index of every token; -1 outside the thinking's sentences."""
        out = [-1] * len(self)
        for j, s in enumerate(self.sentences):
            out[s.start:s.end] = [j] * len(s.span)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trace:
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing or d.get("format", _FORMAT) != _FORMAT:
            raise ConfigError(f"not a {_FORMAT} trace (format {d.get('format')!r}, missing "
                              f"{missing}); save traces with Trace.to_json")
        kw = {f.name: d[f.name] for f in fields(cls)}
        kw["offsets"] = [(int(a), int(b)) for a, b in kw["offsets"]]
        for name in ("prompt_span", "think_span", "answer_span"):
            kw[name] = Span(**kw[name])
        kw["sentences"] = [Sentence(**s) for s in kw["sentences"]]
        return cls(**kw)

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The trace as JSON; also written atomically to ``path`` when given."""
        try:
            s = json.dumps(self.to_dict(), ensure_ascii=False)
        except TypeError as e:
            raise ConfigError(f"trace meta {self.meta!r} is not JSON-serializable ({e}); "
                              "keep meta values to str, numbers, bools, lists and dicts") from e
        if path is not None:
            atomic_write_text(Path(path), s)
        return s

    @classmethod
    def from_json(cls, s: str) -> Trace:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError(f"not trace JSON: {e}; make it with Trace.to_json") from e
        if not isinstance(d, dict):
            raise ConfigError(f"trace JSON must hold an object, got {type(d).__name__}")
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Trace:
        if not Path(path).is_file():
            raise ConfigError(f"no trace file at {str(path)!r}; save one with trace.to_json(path)")
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    @classmethod
    def from_text(cls, model: Any, prompt: str, completion: str, *,
                  meta: dict[str, Any] | None = None, thinking: str = "auto") -> Trace:
        """Trace of ``completion`` (text holding ``<think>...</think>``, or not) after ``prompt``.

        ``thinking`` is :func:`build_trace`'s (``"auto"``: tags when present, else the text
        up to the final answer is the thinking). ``model`` needs ``tokenizer``, ``name`` and ``render_prompt(prompt) -> str``, and may
        carry ``segmenter``, ``annotator``, ``think_open``, ``think_close``.
        """
        missing = [a for a in ("tokenizer", "name", "render_prompt") if not hasattr(model, a)]
        if missing:
            raise ConfigError(f"{type(model).__name__} has no {', '.join(missing)}; pass a "
                              "thinklens model (thinklens.load(...))")
        return build_trace(model.tokenizer, prompt=prompt, completion_text=completion,
                           rendered_prompt=model.render_prompt(prompt), model_name=model.name,
                           think_open=getattr(model, "think_open", None) or "<think>",
                           think_close=getattr(model, "think_close", None) or "</think>",
                           segmenter=getattr(model, "segmenter", None),
                           annotator=getattr(model, "annotator", None), meta=meta,
                           thinking=thinking)


_FINGERPRINTS: dict[int, tuple[weakref.ref[Any], int, str]] = {}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """16 hex chars of sha256 over the tokenizer's vocabulary (added tokens included)."""
    key, size = id(tokenizer), len(tokenizer)
    hit = _FINGERPRINTS.get(key)
    if hit is not None and hit[0]() is tokenizer and hit[1] == size:
        return hit[2]
    vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    fp = hashlib.sha256(vocab.encode("utf-8")).hexdigest()[:16]
    try:
        ref = weakref.ref(tokenizer, lambda _, k=key: _FINGERPRINTS.pop(k, None))
    except TypeError:  # not weak-referenceable: no caching
        return fp
    _FINGERPRINTS[key] = (ref, size, fp)
    return fp


def check_tokenizer(trace: Trace, tokenizer: Any) -> None:
    """Raise :class:`TokenizerMismatchError` unless ``tokenizer`` made ``trace``'s token ids."""
    fp = tokenizer_fingerprint(tokenizer)
    if trace.tokenizer_id != fp:
        raise TokenizerMismatchError(
            f"trace from model {trace.model_name!r} was tokenized by tokenizer "
            f"{trace.tokenizer_id}, but this tokenizer is {fp}, so its token ids mean other "
            "text. Rebuild the trace for this model: "
            "Trace.from_text(model, trace.prompt, trace.completion_text)")


THINKING_MODES: tuple[str, ...] = ("auto", "tags", "answer")


def build_trace(tokenizer: Any, *, prompt: str, rendered_prompt: str,
                completion_ids: Sequence[int] | Tensor | None = None,
                completion_text: str | None = None, model_name: str,
                think_open: str = "<think>", think_close: str = "</think>",
                segmenter: Segmenter | None = None, annotator: Annotator | None = None,
                meta: dict[str, Any] | None = None, thinking: str = "auto",
                finished: bool | None = None) -> Trace:
    """A :class:`Trace` from a rendered prompt and a completion given as ids or as text.

    Example::

        trace = build_trace(tok, prompt="2+3?", rendered_prompt=render("2+3?"),
                            completion_ids=generated_ids, model_name="r1-distill-1.5b",
                            finished=completion.finished)
        trace.text[slice(*trace.offsets[7])] == trace.tokens[7]  # True for every token
        trace.meta["thinking"]     # 'tags' (it wrote <think>), else 'answer'

    ``thinking`` is ``"tags"``, ``"answer"`` or ``"auto"`` (module docstring, step 3).
    ``finished``: True when generation stopped at eos (or a stop token), False when it
    was cut at ``max_new_tokens`` (then the trace is ``truncated`` in every mode), None
    when unknown (a completion given as text).
    """
    if thinking not in THINKING_MODES:
        raise ConfigError(f"thinking={thinking!r}; valid: {', '.join(map(repr, THINKING_MODES))}"
                          " ('tags': <think> ... </think>; 'answer': the completion up to its "
                          "final answer is the thinking; 'auto': tags when present)")
    if finished is not None and not isinstance(finished, bool):
        raise ConfigError(f"finished={finished!r}; give True (stopped at eos), False (cut at "
                          "max_new_tokens) or None (unknown)")
    if (completion_ids is None) == (completion_text is None):
        got = "both" if completion_text is not None else "neither"
        raise ConfigError("give exactly one of completion_ids= (generated token ids) or "
                          f"completion_text=; got {got}")
    for name, tag in (("think_open", think_open), ("think_close", think_close)):
        if not isinstance(tag, str) or not tag:
            raise ConfigError(f"{name} must be a non-empty string like '<think>', not {tag!r}")
    prompt_ids = _encode(tokenizer, rendered_prompt, "rendered_prompt")
    if completion_text is not None:
        ids = _encode(tokenizer, completion_text, "completion_text")
    else:
        ids = _check_ids(tokenizer, completion_ids)
    prompt_part, prompt_offsets = align_tokens(tokenizer, prompt_ids, rendered_prompt)
    completion_part, completion_offsets = align_tokens(tokenizer, ids, completion_text)
    text = prompt_part + completion_part
    shift = len(prompt_part)
    offsets = prompt_offsets + [(a + shift, b + shift) for a, b in completion_offsets]
    token_ids = prompt_ids + ids
    meta = dict(meta or {})
    n_prompt = len(prompt_ids)
    think, answer, state = find_think(tokenizer, token_ids, text, offsets, n_prompt,
                                      think_open, think_close)
    mode = thinking if thinking != "auto" else "answer" if state == "absent" else "tags"
    if mode == "answer":
        end = content_end(tokenizer, token_ids, n_prompt)
        think, answer = find_answer(text, offsets, n_prompt, end, finished)
        state = "closed" if think[0] < think[1] else "absent"
    if state == "absent":
        meta["no_think"] = True
    meta["thinking"] = mode
    if finished is not None:
        meta["finished"] = finished
    trace = Trace(model_name=model_name, tokenizer_id=tokenizer_fingerprint(tokenizer),
                  prompt=prompt, text=text, token_ids=token_ids,
                  tokens=[text[a:b] for a, b in offsets], offsets=offsets,
                  prompt_span=Span(0, len(prompt_ids)), think_span=Span(*think),
                  answer_span=Span(*answer), sentences=[],
                  truncated=state == "truncated" or finished is False,
                  meta=meta)
    trace.sentences = _sentences(trace, segmenter or split_sentences, annotator or tag_sentence)
    return trace


def _encode(tokenizer: Any, s: str, name: str) -> list[int]:
    if not isinstance(s, str):
        raise ConfigError(f"{name} must be a str, got {type(s).__name__}")
    return list(tokenizer(s, add_special_tokens=False)["input_ids"])


def _check_ids(tokenizer: Any, ids: Sequence[int] | Tensor) -> list[int]:
    if isinstance(ids, Tensor):
        if ids.ndim != 1:
            raise ConfigError(f"completion_ids must be 1-D, got shape {tuple(ids.shape)}; "
                              "pass one sequence (ids[0] of a batch), prompt ids left out")
        ids = ids.tolist()
    out, vocab = [int(i) for i in ids], len(tokenizer)
    bad = [(k, i) for k, i in enumerate(out) if not 0 <= i < vocab]
    if bad:
        raise ConfigError(f"completion_ids[{bad[0][0]}] = {bad[0][1]} is not a token id of this "
                          f"tokenizer (vocabulary of {vocab}); was it made by another tokenizer?")
    return out


def _sentences(trace: Trace, segmenter: Segmenter, annotator: Annotator) -> list[Sentence]:
    think = trace.think_span
    if not len(think):
        return []
    c0 = trace.offsets[think.start - 1][1] if think.start > 0 else 0
    thinking = trace.thinking_text
    spans = check_segments(segmenter(thinking), thinking, segmenter)
    out = []
    for t0, t1, a, b in assign_tokens(trace.text, trace.offsets,
                                      [(c0 + a, c0 + b) for a, b in spans], think.range):
        tag = annotator(trace.text[a:b])
        if not isinstance(tag, str):
            raise ConfigError(f"annotator returned {tag!r} for {trace.text[a:b]!r}; it must "
                              "return a str tag such as 'backtracking'")
        out.append(Sentence(t0, t1, a, b, trace.text[a:b], tag))
    return out


__all__ = ["Span", "Sentence", "Trace", "tokenizer_fingerprint", "check_tokenizer",
           "build_trace", "THINKING_MODES"]
