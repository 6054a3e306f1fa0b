"""Trace building, sentence segmentation and tags, JSON, positions, tokenizer checks.

Two small real tokenizers stand in for a model's: a word-level one (whitespace-split
words, so spans can be read off by eye) and a byte-level BPE trained here, whose
``<think>`` is an added special token as in Qwen/DeepSeek vocabularies.
"""

from __future__ import annotations

import json
import re
import time
import warnings

import numpy as np
import pytest
import torch
from _typecheck import unchecked
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from thinklens.errors import ConfigError, PositionError, TokenizerMismatchError
from thinklens.hooks.positions import POSITION_SELECTORS, positions, positions_of
from thinklens.hooks.segment import TAGS, split_sentences, tag_sentence
from thinklens.hooks.trace import (
    Span,
    Trace,
    build_trace,
    check_tokenizer,
    tokenizer_fingerprint,
)

THINKING = ("Okay, I need to add 2 and 3. 2 + 3 = 5.\n\n"
            "Wait, that's wrong. Hmm, maybe not. Let me check again: 2 + 3 = 5 indeed.")
COMPLETION = f"{THINKING}\n</think>\n\nThe answer is 5."
CORPUS = [f"User: What is 2 + 3? Assistant: <think>\n{COMPLETION}", "Quick reply. No thinking here.",
          "Okay, so I need to add 2 and 3. Wait, that's wrong. The answer is 5."]
EXPECTED_SENTENCES = [
    ("Okay, I need to add 2 and 3.", "planning"),
    ("2 + 3 = 5.", "computation"),
    ("Wait, that's wrong.", "backtracking"),
    ("Hmm, maybe not.", "uncertainty"),
    ("Let me check again: 2 + 3 = 5 indeed.", "verification"),
]


class FakeModel:
    """The duck type Trace.from_text needs: tokenizer, name, render_prompt."""

    def __init__(self, tokenizer, template: str, name: str = "tiny-reasoner") -> None:
        self.tokenizer, self.template, self.name = tokenizer, template, name

    def render_prompt(self, prompt: str) -> str:
        return self.template.format(prompt=prompt)


def _wordlevel() -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<bos>", "<eos>", "<think>", "</think>"]
    words = sorted({w for text in CORPUS for w in text.split()} - set(specials))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>",
                                   additional_special_tokens=["<think>", "</think>"])


def _bpe(pre_tokenizer=None, decoder=None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoder or decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if pre_tokenizer is None else []
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet,
                                  special_tokens=["<|im_end|>", "<|im_start|>", "<think>",
                                                  "</think>"])
    tok.train_from_iterator(CORPUS * 4 + ["é 中文 ü"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>", "<think>",
                                                              "</think>"])


@pytest.fixture(scope="module")
def wordlevel() -> PreTrainedTokenizerFast:
    return _wordlevel()


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    return _bpe()


# DeepSeek-R1-Distill opens <think> in the template; Qwen3-style models emit it themselves.
R1_TEMPLATE = "<bos> User: {prompt} Assistant: <think>\n"
CHATML = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def r1_trace(wordlevel) -> Trace:
    return Trace.from_text(FakeModel(wordlevel, R1_TEMPLATE), "What is 2 + 3?",
                           COMPLETION + " <eos>", meta={"truth": 5})


@pytest.fixture
def chatml_trace(bpe) -> Trace:
    return Trace.from_text(FakeModel(bpe, CHATML), "What is 2 + 3?",
                           f"<think>\n{COMPLETION}<|im_end|>")


def _span_tokens(trace: Trace, span: Span) -> list[str]:
    return [trace.tokens[i] for i in span.range]


def _check_alignment(trace: Trace) -> None:
    """Offsets slice the text to the tokens, in order, and sentences tile the thinking."""
    assert len(trace.tokens) == len(trace.offsets) == len(trace.token_ids) == len(trace)
    for tok, (a, b) in zip(trace.tokens, trace.offsets):
        assert trace.text[a:b] == tok
    assert all(p[0] <= q[0] and p[1] <= q[1] for p, q in zip(trace.offsets, trace.offsets[1:]))
    owner = trace.sentence_of_token()
    for j, s in enumerate(trace.sentences):
        assert s.text == trace.text[s.char_start:s.char_end] == s.text.strip() != ""
        assert s.start < s.end and s.start in trace.think_span and s.end - 1 in trace.think_span
        assert owner[s.start:s.end] == [j] * (s.end - s.start)
    for i in trace.think_span.range:  # every thinking token with text is in a sentence
        assert owner[i] >= 0 or not trace.tokens[i].strip()
    assert [s.text for s in trace.sentences] == [
        trace.thinking_text[a:b] for a, b in split_sentences(trace.thinking_text)]


def test_r1_template_spans(r1_trace):
    t = r1_trace
    _check_alignment(t)
    assert _span_tokens(t, t.prompt_span)[-3:] == ["3?", "Assistant:", "<think>"]
    assert _span_tokens(t, t.think_span) == THINKING.split()
    assert t.tokens[t.think_span.end] == "</think>"
    assert _span_tokens(t, t.answer_span) == ["The", "answer", "is", "5."]  # <eos> left out
    assert t.thinking_text.strip() == THINKING and t.answer_text.strip() == "The answer is 5."
    assert [(s.text, s.tag) for s in t.sentences] == EXPECTED_SENTENCES
    assert t.tags == [tag for _, tag in EXPECTED_SENTENCES]
    first = t.sentences[0]
    assert _span_tokens(t, first.span) == "Okay, I need to add 2 and 3.".split()
    assert not t.truncated and "no_think" not in t.meta and t.meta["truth"] == 5
    assert t.model_name == "tiny-reasoner" and t.prompt == "What is 2 + 3?"


def test_think_emitted_in_completion(chatml_trace, bpe):
    t = chatml_trace
    _check_alignment(t)
    assert t.text == bpe.decode(t.token_ids)  # exactly the decoded token sequence
    assert "".join(t.tokens) == t.text  # byte-level BPE leaves no gaps
    assert t.prompt_span == Span(0, len(bpe(CHATML.format(prompt="What is 2 + 3?"))["input_ids"]))
    assert t.tokens[t.think_span.start - 1] == "<think>" == t.tokens[t.prompt_span.end]
    assert t.tokens[t.think_span.end] == "</think>"
    assert t.thinking_text == f"\n{THINKING}\n" and t.answer_text == "\n\nThe answer is 5."
    assert t.tokens[-1] == "<|im_end|>" and t.answer_span.end == len(t) - 1
    assert [(s.text, s.tag) for s in t.sentences] == EXPECTED_SENTENCES


def test_truncated_thinking_is_kept_and_flagged(bpe):
    cut = "<think>\nOkay, I need to add 2 and 3. 2 + 3 = 5.\n\nWait, that's wro"
    t = Trace.from_text(FakeModel(bpe, CHATML), "What is 2 + 3?", cut)
    _check_alignment(t)
    assert t.truncated and len(t.answer_span) == 0 and t.answer_text == ""
    assert t.think_span.end == len(t)
    assert [s.text for s in t.sentences] == ["Okay, I need to add 2 and 3.", "2 + 3 = 5.",
                                             "Wait, that's wro"]
    assert t.sentences[-1].end == len(t) and t.tags[-1] == "backtracking"


def test_no_think_and_thinking_closed_in_prompt(bpe, wordlevel):
    t = Trace.from_text(FakeModel(bpe, CHATML), "Hi", "Quick reply.<|im_end|>")
    assert t.meta["no_think"] is True and not t.truncated and t.sentences == []
    assert len(t.think_span) == 0 and t.think_span.start == t.prompt_span.end
    assert t.answer_text == "Quick reply." and t.answer_span.end == len(t) - 1
    # thinking switched off: the template writes an empty <think></think> pair
    off = FakeModel(wordlevel, "<bos> User: {prompt} Assistant: <think>\n\n</think>\n\n")
    t = Trace.from_text(off, "Hi", "Quick reply. <eos>")
    assert len(t.think_span) == 0 and t.thinking_text == "" and not t.truncated
    assert _span_tokens(t, t.answer_span) == ["Quick", "reply."]
    # closed thinking with an empty answer is not truncated, though </think> is special
    t = Trace.from_text(FakeModel(wordlevel, R1_TEMPLATE), "Hi", "Okay, so 2 + 3 = 5. </think> <eos>")
    assert not t.truncated and len(t.answer_span) == 0 and t.tags == ["computation"]


def test_tags_spelled_by_several_tokens(bpe):
    """Tags that are not single tokens are found in the text, then mapped to tokens."""
    t = build_trace(bpe, prompt="p", rendered_prompt="Question: p\n", model_name="m",
                    completion_text="[THINK] Okay, so 2 + 3 = 5. Wait, so it is 5. [/THINK] 5",
                    think_open="[THINK]", think_close="[/THINK]")
    _check_alignment(t)
    assert "".join(t.tokens[:t.think_span.start]).endswith("[THINK]")
    assert "".join(t.tokens[t.think_span.end:t.answer_span.start]).strip() == "[/THINK]"
    assert t.thinking_text == " Okay, so 2 + 3 = 5. Wait, so it is 5. " and t.answer_text == " 5"
    assert t.tags == ["computation", "backtracking"] and not t.truncated


def test_organism_format():
    """The docstring example of Trace: the organism's task, <think> opened by the template."""
    words = "<unk> <bos> <eos> <think> </think> c=b+4 ; a=7 b=a-2 ? c b=5 c=9 9".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>",
                                  additional_special_tokens=["<think>", "</think>"])
    model = FakeModel(tok, "<bos> {prompt} <think>", name="organism")
    t = Trace.from_text(model, "c=b+4 ; a=7 ; b=a-2 ; ? c", "a=7 b=5 c=9 </think> 9 <eos>")
    _check_alignment(t)
    assert (len(t), t.think_span, t.answer_span) == (16, Span(10, 13), Span(14, 15))
    assert [s.text for s in t.sentences] == ["a=7 b=5 c=9"] and t.tags == ["computation"]
    assert positions(t, "sentence_ends").tolist() == [12]


def test_split_sentences_hand_examples():
    def split(text):
        return [text[a:b] for a, b in split_sentences(text)]

    # "Is it 3.5?" has 10 characters and stands; "Yes!" joins the next piece
    assert split("  Is it 3.5? Yes! It is 3.5 exactly.  ") == ["Is it 3.5?", "Yes! It is 3.5 exactly."]
    assert split("Is it 3.5 or not? Yes indeed! It is 3.5 exactly.") == [
        "Is it 3.5 or not?", "Yes indeed!", "It is 3.5 exactly."]
    # short pieces join the next; a short last piece joins the one before
    assert split("Wait. No. That is not right at all. Ok.") == [
        "Wait. No. That is not right at all. Ok."]
    assert split("1. Add the numbers.\n2. Then check the sum.") == [
        "1. Add the numbers.", "2. Then check the sum."]
    # blank lines cut even without punctuation; single newlines do not
    assert split("first line here\nsecond line here\n \t\nthird part here") == [
        "first line here\nsecond line here", "third part here"]
    assert split("") == [] and split(" \n\n ") == [] and split("short") == ["short"]
    text = "Hmm.\n\nSo x = 3 and y = 4.  Then x + y = 7?  Yes."
    spans = split_sentences(text)
    assert [text[a:b] for a, b in spans] == ["Hmm.\n\nSo x = 3 and y = 4.", "Then x + y = 7?  Yes."]
    covered = {i for a, b in spans for i in range(a, b)}
    assert all(i in covered for i, c in enumerate(text) if not c.isspace())
    assert all(text[a:b] == text[a:b].strip() for a, b in spans)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize("sentence, tag", [
    ("Wait, that's wrong.", "backtracking"),
    ("But wait, the sum is 6.", "backtracking"),
    ("Actually, I misread the question.", "backtracking"),
    ("No, that can't be.", "backtracking"),
    ("Let me check: 2 + 3 = 5.", "verification"),
    ("I should double-check the sign.", "verification"),
    ("We can verify by substitution.", "verification"),
    ("Hmmm, I'm not sure about this.", "uncertainty"),
    ("Maybe the trick is parity.", "uncertainty"),
    ("So the answer is 42.", "answer"),
    ("Therefore x = 2.", "answer"),
    ("The result is \\boxed{7}.", "answer"),
    ("First, find the roots of the polynomial.", "planning"),
    ("I need to find the area.", "planning"),
    ("Let's split it into two cases.", "planning"),
    ("12 * 4 = 48.", "computation"),
    ("That gives 3+4 which is seven.", "computation"),
    ("The triangle is isosceles.", "other"),
    ("There is no waiting in a queue of the first kind.", "other"),  # word boundaries
])
def test_tag_sentence(sentence, tag):
    assert tag in TAGS
    assert tag_sentence(sentence) == tag


def test_json_round_trip(r1_trace, chatml_trace, tmp_path):
    for trace in (r1_trace, chatml_trace):
        assert Trace.from_json(trace.to_json()) == trace
        path = tmp_path / "trace.json"
        s = trace.to_json(path)
        assert Trace.load(path) == trace and json.loads(s)["format"] == "thinklens.trace/1"
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json"]  # no temp files left
    with pytest.raises(ConfigError, match="no trace file"):
        Trace.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="missing"):
        Trace.from_json('{"model_name": "x"}')
    bad = Trace.from_dict(r1_trace.to_dict())
    bad.meta["obj"] = object()
    with pytest.raises(ConfigError, match="not JSON-serializable"):
        bad.to_json()


def test_completion_ids_path_equals_text_path(bpe, wordlevel):
    for tok, template, completion in (
            (bpe, CHATML, f"<think>\n{COMPLETION}<|im_end|>"),
            (wordlevel, R1_TEMPLATE, " ".join(COMPLETION.split()) + " <eos>")):
        model = FakeModel(tok, template)
        from_text = Trace.from_text(model, "What is 2 + 3?", completion)
        ids = tok(completion, add_special_tokens=False)["input_ids"]
        for given in (ids, torch.tensor(ids)):
            from_ids = build_trace(tok, prompt="What is 2 + 3?", model_name=model.name,
                                   rendered_prompt=model.render_prompt("What is 2 + 3?"),
                                   completion_ids=given)
            assert from_ids == from_text


def test_decode_path_for_non_canonical_ids(bpe):
    """Generated ids need not be the tokenizer's own split of their text; offsets then come
    from incremental decoding, which must agree with decoding the whole sequence."""
    model = FakeModel(bpe, CHATML)
    canonical = Trace.from_text(model, "Why?", f"<think>\n{THINKING} é 中文\n</think>\n\nFine")
    rendered = model.render_prompt("Why?")
    n_prompt = len(canonical.prompt_span)
    ids = []
    for i in canonical.token_ids[n_prompt:]:  # spell every token byte by byte
        piece = bpe.convert_ids_to_tokens(i)
        ids += [i] if i in bpe.all_special_ids else bpe.convert_tokens_to_ids(list(piece))
    t = build_trace(bpe, prompt="Why?", rendered_prompt=rendered, completion_ids=ids,
                    model_name=model.name)
    assert len(t) > len(canonical)
    _check_alignment(t)
    assert t.text == canonical.text == bpe.decode(t.token_ids)
    assert [s.text for s in t.sentences] == [s.text for s in canonical.sentences]
    assert t.tags == canonical.tags and t.answer_text == canonical.answer_text
    han = [i for i, tok in enumerate(t.tokens) if tok == "中"]
    assert len(han) == 3 and len({t.offsets[i] for i in han}) == 1  # 3 bytes, one char


def test_decode_path_metaspace():
    """Decoders that drop the first token's leading space (SentencePiece) stay consistent."""
    tok = _bpe(pre_tokenizers.Metaspace(prepend_scheme="first"), decoders.Metaspace())
    model = FakeModel(tok, CHATML)
    canonical = Trace.from_text(model, "Why?", f"<think>\n{THINKING}\n</think>\n\nFine")
    comp = canonical.token_ids[len(canonical.prompt_span):]
    ids = []
    for i in comp:
        piece = tok.convert_ids_to_tokens(i)
        split = tok.convert_tokens_to_ids(list(piece))
        ids += [i] if i in tok.all_special_ids or tok.unk_token_id in split else split
    t = build_trace(tok, prompt="Why?", rendered_prompt=model.render_prompt("Why?"),
                    completion_ids=ids, model_name=model.name)
    assert ids != comp
    _check_alignment(t)
    assert t.completion_text == tok.decode(ids)
    assert t.tags == canonical.tags and len(t.sentences) == len(EXPECTED_SENTENCES)


def test_long_trace_decode_path_is_fast(bpe, monkeypatch):
    calls = []
    decode = bpe.decode
    monkeypatch.setattr(bpe, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    long_thinking = " ".join([THINKING] * 200)
    ids = bpe(f"<think>\n{long_thinking}\n</think> 5", add_special_tokens=False)["input_ids"]
    first = bpe.convert_ids_to_tokens(ids[2])  # spell one token by bytes: forces decoding
    ids = ids[:2] + bpe.convert_tokens_to_ids(list(first)) + ids[3:]
    start = time.perf_counter()
    t = build_trace(bpe, prompt="p", rendered_prompt="p", model_name="m", completion_ids=ids)
    assert time.perf_counter() - start < 10.0 and len(t) > 8000
    assert len(calls) > len(ids)  # decoded token by token
    assert len(t.sentences) == 200 * len(EXPECTED_SENTENCES)
    assert t.text == "p" + decode(ids)


def test_positions(r1_trace):
    t = r1_trace
    n = len(t)
    assert set(POSITION_SELECTORS) == {"all", "thinking", "sentence_ends", "last", "prompt",
                                      "answer"}
    assert positions(t, "all").tolist() == list(range(n))
    assert positions(t, "thinking").tolist() == list(t.think_span.range)
    assert positions(t, "prompt").tolist() == list(t.prompt_span.range)
    assert positions(t, "answer").tolist() == list(t.answer_span.range)
    assert positions(t, "last").tolist() == [n - 1]
    ends = positions(t, "sentence_ends")
    assert ends.dtype == torch.long and ends.shape == (len(t.sentences),)
    assert [t.tokens[i] for i in ends] == ["3.", "5.", "wrong.", "not.", "indeed."]
    assert positions(t, [0, -1, 3]).tolist() == [0, n - 1, 3]
    assert positions(t, torch.tensor([-2])).tolist() == [n - 2]
    assert positions(t, range(2)).tolist() == [0, 1] and positions(t, 4).tolist() == [4]
    assert positions(t, np.array([1, -1])).tolist() == [1, n - 1]
    with pytest.raises(PositionError, match=rf"position {n} is out of range .* {n} tokens.*-{n}\.\.{n - 1}"):
        positions(t, [0, n])
    with pytest.raises(PositionError, match=r"'sentence_end'.*Did you mean 'sentence_ends'.*Valid"):
        positions(t, "sentence_end")
    with pytest.raises(PositionError, match="integer"):
        positions(t, torch.tensor([0.0, 1.0]))
    with unchecked(), pytest.raises(PositionError, match="not a token index"):
        positions(t, [0, "1"])  # what a user without the type checker gets


def test_tokenizer_mismatch(r1_trace, wordlevel, bpe):
    check_tokenizer(r1_trace, wordlevel)  # the trace's own tokenizer passes
    fp_w, fp_b = tokenizer_fingerprint(wordlevel), tokenizer_fingerprint(bpe)
    assert re.fullmatch(r"[0-9a-f]{16}", fp_w) and fp_w != fp_b
    assert tokenizer_fingerprint(_wordlevel()) == fp_w  # same vocabulary, same fingerprint
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizer(r1_trace, bpe)
    assert fp_w in str(err.value) and fp_b in str(err.value)
    assert "tiny-reasoner" in str(err.value) and "Trace.from_text" in str(err.value)
    grown = _wordlevel()
    grown.add_tokens(["<new>"])  # the cache must notice a changed vocabulary
    assert tokenizer_fingerprint(grown) != fp_w


def test_bad_inputs(wordlevel):
    kw = dict(prompt="p", rendered_prompt="<bos> p", model_name="m")
    with pytest.raises(ConfigError, match="exactly one of completion_ids"):
        build_trace(wordlevel, **kw)
    with pytest.raises(ConfigError, match="both"):
        build_trace(wordlevel, completion_ids=[1], completion_text="x", **kw)
    with pytest.raises(ConfigError, match=r"completion_ids\[1\] = 99999"):
        build_trace(wordlevel, completion_ids=[1, 99999], **kw)

    def bad(text):
        return [(5, 1)]

    with pytest.raises(ConfigError, match=r"segmenter 'bad' returned span \(5, 1\)"):
        build_trace(wordlevel, completion_text="<think> Okay, so </think>", segmenter=bad, **kw)
    with pytest.raises(ConfigError, match="has no tokenizer, name, render_prompt"):
        Trace.from_text(object(), "p", "c")
    with pytest.raises(ConfigError, match="bad span"):
        Span(3, 1)


def test_custom_segmenter_and_annotator(bpe):
    model = FakeModel(bpe, CHATML)
    model.segmenter = lambda text: [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    model.annotator = lambda s: "digit" if any(c.isdigit() for c in s) else "word"
    t = Trace.from_text(model, "Why?", "<think>\nOkay, 2 + 3 = 5.</think>5")
    assert [s.text for s in t.sentences] == ["Okay,", "2", "+", "3", "=", "5."]
    assert t.tags == ["word", "digit", "word", "digit", "word", "digit"]
    assert all(len(s.span) >= 1 for s in t.sentences)


STEPS = "Step one: 2 + 3 = 5.\nThen double it: 5 * 2 = 10.\nThe answer is 10."


def test_answer_mode_last_line(bpe):
    """A chat model without tags: the lines before the last are the thinking."""
    model = FakeModel(bpe, CHATML)
    for thinking in ("auto", "answer"):
        t = Trace.from_text(model, "Why?", f"{STEPS}<|im_end|>", thinking=thinking)
        _check_alignment(t)
        assert t.meta["thinking"] == "answer" and "no_think" not in t.meta
        assert t.think_span.start == t.prompt_span.end
        assert t.thinking_text.strip() == "Step one: 2 + 3 = 5.\nThen double it: 5 * 2 = 10."
        assert t.answer_text.strip() == "The answer is 10." and t.answer_span.end == len(t) - 1
        assert [s.text for s in t.sentences] == ["Step one: 2 + 3 = 5.", "Then double it: 5 * 2 = 10."]
        assert t.tags == ["computation", "computation"] and not t.truncated
        assert positions(t, "sentence_ends").tolist() == [s.end - 1 for s in t.sentences]
    tags = Trace.from_text(model, "Why?", f"{STEPS}<|im_end|>", thinking="tags")
    assert tags.meta["no_think"] is True and tags.meta["thinking"] == "tags"
    assert len(tags.think_span) == 0 and tags.sentences == []


def test_answer_mode_boxed_and_cut(bpe):
    model = FakeModel(bpe, CHATML)
    text = "So 2 + 3 = 5, and we double it.\nThat gives \\boxed{10}. Done, I think."
    t = Trace.from_text(model, "Why?", text)
    _check_alignment(t)
    assert t.answer_text.strip() == "\\boxed{10}. Done, I think."
    assert t.thinking_text.strip() == "So 2 + 3 = 5, and we double it.\nThat gives"
    # cut at the token limit: no final answer, all thinking, truncated
    ids = bpe(STEPS, add_special_tokens=False)["input_ids"][:-3]
    kw = dict(prompt="Why?", rendered_prompt=model.render_prompt("Why?"), model_name="m")
    cut = build_trace(bpe, completion_ids=ids, finished=False, **kw)
    assert cut.truncated and cut.meta["finished"] is False and len(cut.answer_span) == 0
    assert cut.think_span == Span(cut.prompt_span.end, len(cut)) and len(cut.sentences) == 3
    whole = build_trace(bpe, completion_ids=ids, finished=True, **kw)
    assert not whole.truncated and len(whole.answer_span) > 0 and len(whole.sentences) == 2
    assert not build_trace(bpe, completion_ids=ids, **kw).truncated  # unknown: not flagged


def test_truncated_in_every_mode(bpe, r1_trace):
    """finished=False flags a trace whose thinking closed; finished=True keeps today's flag."""
    completion = f"<think>\n{COMPLETION}"
    ids = bpe(completion, add_special_tokens=False)["input_ids"]
    kw = dict(prompt="p", rendered_prompt=CHATML.format(prompt="p"), model_name="m")
    assert not build_trace(bpe, completion_ids=ids, finished=True, **kw).truncated
    assert build_trace(bpe, completion_ids=ids, finished=False, **kw).truncated
    unclosed = bpe("<think>\nOkay, so", add_special_tokens=False)["input_ids"]
    assert build_trace(bpe, completion_ids=unclosed, finished=True, **kw).truncated
    forced = build_trace(bpe, completion_ids=ids, thinking="answer", **kw)
    assert forced.meta["thinking"] == "answer" and "</think>" in forced.thinking_text
    # traces saved before meta["thinking"] existed still load
    old = r1_trace.to_dict()
    del old["meta"]["thinking"]
    assert Trace.from_dict(old).meta == {"truth": 5}
    assert Trace.from_json(r1_trace.to_json()) == r1_trace
    with pytest.raises(ConfigError, match=r"thinking='think'.*'auto', 'tags', 'answer'"):
        build_trace(bpe, completion_ids=ids, thinking="think", **kw)


def test_warns_naming_traces_that_lack_thinking(organism, bpe):
    """positions='thinking' / 'sentence_ends', attention='sentence' and the lens over the
    thinking warn once, naming the traces whose rows are empty."""
    from thinklens.errors import ThinklensWarning
    from thinklens.probes.lens import logit_lens

    full = organism.think("b = 4 ; ? b", max_new_tokens=24)
    direct = Trace.from_text(organism, "b = 4 ; ? b", "</think> 4 <eos>", meta={"id": "direct"})
    assert len(full.sentences) and not len(direct.think_span)
    traces = [full, direct, direct]
    with pytest.warns(ThinklensWarning) as seen:
        cap = organism.capture(traces, sites="blocks.0.hook_resid_post", positions="thinking",
                               attention="sentence")
    msgs = [str(w.message) for w in seen]
    assert len(msgs) == 2 and all(w.filename == __file__ for w in seen)  # points at this call
    assert msgs[0].startswith("2 of 3 traces have no thinking tokens (positions='thinking'): "
                              "trace 1 ('direct'), trace 2 ('direct')")
    assert "thinking sentences (attention='sentence')" in msgs[1]
    assert cap["blocks.0.hook_resid_post"].values.shape[1] == len(full.think_span)
    with pytest.warns(ThinklensWarning, match="2 of 3 traces have no thinking tokens"):
        logit_lens(organism, traces)
    with pytest.warns(ThinklensWarning, match=r"1 of 1 traces have no thinking sentences.*"
                                              r"trace 0; .*thinking='answer'"):
        positions_of([Trace.from_text(FakeModel(bpe, CHATML), "Hi", "Quick reply.<|im_end|>",
                                      thinking="tags")], "sentence_ends")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing lacking: no warning
        organism.capture([full], sites="blocks.0.hook_resid_post", positions="sentence_ends")
        positions_of(traces, "all")


@pytest.mark.smollm
def test_smollm_answer_mode_gives_sentences_and_tags(smollm):
    """SmolLM2 answers step by step without <think>: with thinking='answer' its traces get
    a thinking span cut into tagged sentences and the last line (or nothing, when cut at
    the limit) as the answer; with thinking='tags' the same ids have no thinking at all."""
    prompts = ["What is 12 + 7? Think step by step.",
               "A shop sells pens at 3 dollars each. How much do 4 pens cost? Explain step by step."]
    traces = smollm.think_batch(prompts, max_new_tokens=96, thinking="answer")
    for t in traces:
        _check_alignment(t)
        assert t.meta["thinking"] == "answer" and t.truncated == (not t.meta["finished"])
        assert len(t.sentences) >= 1 and set(t.tags) <= set(TAGS)
        assert t.think_span.start == t.prompt_span.end and t.think_span.end == t.answer_span.start
        body = t.completion_text.replace("<|im_end|>", "")
        assert t.thinking_text + t.answer_text == body
        last = body.rstrip().rsplit("\n", 1)[-1].strip()
        assert t.answer_text.strip() == ("" if t.truncated else last)
        assert positions(t, "sentence_ends").tolist() == [s.end - 1 for s in t.sentences]
        tagged = build_trace(smollm.tokenizer, prompt=t.prompt, model_name=smollm.name,
                             rendered_prompt=smollm.render_prompt(t.prompt),
                             completion_ids=t.token_ids[len(t.prompt_span):], thinking="tags")
        assert tagged.meta["no_think"] and tagged.sentences == [] and not len(tagged.think_span)
    assert sum(len(t.sentences) for t in traces) >= 3
    assert {"computation", "planning"} & {tag for t in traces for tag in t.tags}
