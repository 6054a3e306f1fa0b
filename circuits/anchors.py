"""Forced-answer importance of thinking sentences (Thought Anchors; Bogdan et al. 2025).

"Thought Anchors: Which LLM Reasoning Steps Matter?" (arXiv 2506.19143) closes the
thinking after each sentence and reads the answer the model gives there.
:func:`forced_answer` does this for every sentence at once:

1. **Cut points.** ``cuts[0]`` is the token index of the first thinking sentence (no
   sentence kept); ``cuts[i + 1]`` is the end of sentence ``i``. The prefix of cut ``k``
   is exactly ``trace.token_ids[:cuts[k]]`` (cut by token position, never by text).
2. **Closing text.** After each prefix comes ``prefix``, which closes the thinking and
   opens the answer. Default: ``"\\n</think>\\n\\n"`` for a trace with ``<think>`` tags
   (the organisms answer right after it), ``"\\n\\n"`` for one whose thinking is its
   step-by-step answer (``thinking="answer"``); followed by ``"Therefore, the final
   answer is "`` when the trace has no tags or wrote no answer right after them, and by
   ``"\\boxed{"`` when its completion uses ``\\boxed`` (then ``suffix`` defaults to
   ``"}"``, which ends a candidate answer).
3. **Answer distribution.** When the reference answer (+ ``suffix``) is one token and no
   ``candidates`` are given, the distribution is the next-token distribution after the
   closing text, over the whole vocabulary. Otherwise each candidate answer (the
   reference first, then ``candidates``) is scored by its teacher-forced probability
   ``exp(sum log p(token))`` of ``answer + suffix``, and the rest of the mass
   (``1 - sum``, at least 0) is the column ``None`` ("any other answer"); candidates
   should be prefix-free once ``suffix`` is added so that their events are disjoint.
4. **One pass.** The plain module tree (:func:`thinklens.hooks.engine_hf.plain_model`,
   the bridge's own weights) runs the prefix up to the last cut once and keeps its KV
   cache; then the closing text and answers of every cut point go in as extra blocks of
   one sequence, with position ids continuing from their cut and a 4-D mask that lets
   block ``k`` see the cached prefix ``[:cuts[k]]`` and itself only (tree attention).
   Blocks are grouped so that no group's mask exceeds ``block_tokens`` query rows.
   With hooks attached (steering) or a model spread over devices, each cut runs as its
   own padded sequence through the bridge instead (``shared_prefix=False`` forces this;
   the two agree within float tolerance, tested).
5. **Importance.** ``accuracy[k]`` = probability of the reference answer at cut ``k``
   (the expected accuracy of an answer sampled there at temperature 1); sentence ``i``'s
   ``importance[i] = accuracy[i + 1] - accuracy[i]`` and ``kl[i] = KL(P_{i+1} || P_i)``
   of the answer distributions after and before it. Forced answers measure when the
   answer becomes readable from the thinking, not whether the answer depends on it.

Example::

    fa = forced_answer(model, trace)
    fa.accuracy.shape, fa.importance.shape     # (S + 1,), (S,)
    fa.top                                     # most probable answer at each cut
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from thinklens.errors import ConfigError
from thinklens.hooks import forward as fwd
from thinklens.hooks.answers import default_extractor
from thinklens.hooks.generate import engine_for
from thinklens.hooks.trace import Trace, check_tokenizer

_OPENER = "Therefore, the final answer is "
_EPS = 1e-12


@dataclass(frozen=True)
class ForcedAnswer:
    """Forced answers after every sentence of one trace (see the module docstring).

    ``cuts`` (token indices, S + 1), ``answers`` the labels of ``probs``' columns (``None``:
    every other answer), ``accuracy`` the reference's probability per cut, ``importance``
    and ``kl`` one score per sentence, ``top`` the most probable answer per cut, ``mode``
    ``"next_token"`` or ``"candidates"``.
    """

    trace: Trace
    cuts: list[int]
    reference: str
    answers: list[str | None]
    probs: Float[Tensor, "cut answer"]
    accuracy: Float[Tensor, " cut"]
    importance: Float[Tensor, " sentence"]
    kl: Float[Tensor, " sentence"]
    top: list[str | None]
    prefix: str
    suffix: str
    mode: str


def thinking_sentences(trace: Trace, what: str) -> int:
    """The number of thinking sentences of ``trace``; a ConfigError when it has none."""
    if not isinstance(trace, Trace):
        raise ConfigError(f"{what} takes one Trace, got {type(trace).__name__}; make one with "
                          "model.think(prompt) or Trace.from_text(model, prompt, completion)")
    if not trace.sentences:
        raise ConfigError(f"{what}: the trace has no thinking sentences (thinking_text "
                          f"{trace.thinking_text[:60]!r}, meta thinking="
                          f"{trace.meta.get('thinking')!r}); give a trace whose thinking has "
                          "sentences (for a model without <think> tags: thinking='answer')")
    return len(trace.sentences)


def reference_answer(model: Any, trace: Trace, reference: str | None,
                     answer: Callable[[Trace], str | None] | None, what: str) -> str:
    """``reference``, else the task's true answer, else the answer the trace wrote."""
    if reference is not None:
        if not isinstance(reference, str) or not reference.strip():
            raise ConfigError(f"{what}: reference={reference!r}; give the answer as a "
                              "non-empty string")
        return reference
    if getattr(model, "task", None) is not None:
        try:
            return str(model.task.answer(trace))
        except ConfigError:
            pass  # a task that cannot tell true answers: the trace's own answer
    extract = default_extractor(model) if answer is None else answer
    if not callable(extract):
        raise ConfigError(f"{what}: answer={answer!r}; give a callable trace -> str | None")
    found = extract(trace)
    if found is None:
        raise ConfigError(f"{what}: the answer extractor found no answer in the trace (answer "
                          f"text {trace.answer_text[:60]!r}); give reference='...' or an "
                          "answer= extractor that finds it")
    return found


def default_prefix(trace: Trace) -> str:
    """The closing text of step 2 of the module docstring for this trace."""
    tags = trace.meta.get("thinking") == "tags" and not trace.meta.get("no_think")
    boxed = "\\boxed" in trace.completion_text
    answer_first = tags and trace.answer_text.strip() and "\\boxed" not in trace.answer_text \
        and len(trace.answer_text.split()) <= 3
    opener = "" if answer_first else _OPENER + ("\\boxed{" if boxed else "")
    return ("\n</think>\n\n" if tags else "\n\n") + opener


def _tail(model: Any, prefix_ids: list[int], prefix: str, text: str) -> list[int]:
    """Ids of ``text`` as it tokenizes right after ``prefix`` (separately if that differs)."""
    joint = model.encode(prefix + text)
    if joint[:len(prefix_ids)] == prefix_ids and len(joint) > len(prefix_ids):
        return joint[len(prefix_ids):]
    return model.encode(text)


def forced_answer(model: Any, trace: Trace, *, reference: str | None = None,
                  candidates: Sequence[str] | None = None, prefix: str | None = None,
                  suffix: str | None = None, answer: Callable[[Trace], str | None] | None = None,
                  shared_prefix: bool = True, block_tokens: int = 512) -> ForcedAnswer:
    """Forced answers after every thinking sentence of ``trace`` (module docstring).

    Example::

        trace = organism.think("c = b + 4 ; a = 7 ; b = a - 2 ; ? c")
        fa = forced_answer(organism, trace)             # next-token mode
        fa.cuts                  # [20, 26, 32, 36, 44, 52]: before sentence 0, after each
        fa.accuracy              # tensor([0.09, 0.00, 0.01, 0.00, 0.00, 1.00]), shape (cut,)
        fa.top                   # ['5', '4', '2', '7', '5', '9']
        fa.importance            # accuracy[1:] - accuracy[:-1], shape (sentence,)
        forced_answer(smollm, t, candidates=["4", "6"])   # teacher-forced candidates
    """
    thinking_sentences(trace, "forced_answer")
    check_tokenizer(trace, model.tokenizer)
    ref = reference_answer(model, trace, reference, answer, "forced_answer")
    prefix = default_prefix(trace) if prefix is None else prefix
    suffix = ("}" if prefix.endswith("{") else "") if suffix is None else suffix
    for name, v in (("prefix", prefix), ("suffix", suffix)):
        if not isinstance(v, str):
            raise ConfigError(f"{name}={v!r}; give a string")
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise ConfigError(f"block_tokens={block_tokens!r}; give an integer >= 1")
    labels = [ref] + [c for c in dict.fromkeys(candidates or []) if c != ref]
    if any(not isinstance(c, str) or not c.strip() for c in labels):
        raise ConfigError(f"candidates={candidates!r}; give non-empty answer strings")
    close = model.encode(prefix)
    tails = [_tail(model, close, prefix, c + suffix) for c in labels]
    mode = "next_token" if candidates is None and len(tails[0]) == 1 else "candidates"
    if mode == "candidates" and not close:
        raise ConfigError(f"prefix={prefix!r} has no tokens; candidate answers need a closing "
                          "text to follow, e.g. '\\n</think>\\n\\n'")
    cuts = [trace.sentences[0].start] + [s.end for s in trace.sentences]
    # a candidate's last token is only predicted: it is not fed
    blocks = [close] if mode == "next_token" else [close + t[:-1] for t in tails]
    reads = [[len(close) - 1]] if mode == "next_token" else \
        [list(range(len(close) - 1, len(close) + len(t) - 1)) for t in tails]
    logp = _block_logprobs(model, trace.token_ids, cuts, blocks, reads, shared_prefix,
                           block_tokens)  # [cut][block] -> [n_read, d_vocab]
    if mode == "next_token":
        dist = torch.stack([lp[0][0] for lp in logp]).exp()  # [cut, d_vocab]
        kl = _kl(dist[1:], dist[:-1])
        ids = dist.argmax(-1).tolist()
        top = [model.tokenizer.decode([i]).strip() for i in ids]
        seen = dict.fromkeys([(tails[0][0], ref), *zip(ids, top)])
        labels = list(dict.fromkeys(name for _, name in seen))
        cols = [next(i for i, name in seen if name == lab) for lab in labels]
        probs = dist[:, cols]
        probs = torch.cat([probs, (1 - probs.sum(-1, keepdim=True)).clamp_min(0)], -1)
    else:
        lps = [[lp[b].gather(1, torch.tensor(tails[b])[:, None]).sum() for b in range(len(tails))]
               for lp in logp]
        scores = torch.tensor(lps).exp()  # [cut, candidate]
        probs = torch.cat([scores, (1 - scores.sum(-1, keepdim=True)).clamp_min(0)], -1)
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(1.0)
        kl = _kl(probs[1:], probs[:-1])
        top = [labels[k] if k < len(labels) else None for k in probs.argmax(-1).tolist()]
    acc = probs[:, 0]
    return ForcedAnswer(trace=trace, cuts=cuts, reference=ref, answers=[*labels, None],
                        probs=probs, accuracy=acc, importance=acc[1:] - acc[:-1], kl=kl,
                        top=top, prefix=prefix, suffix=suffix, mode=mode)


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """``KL(p || q)`` per row of two ``[n, k]`` distributions (0 log 0 = 0)."""
    p, q = p.clamp_min(0), q.clamp_min(_EPS)
    return torch.where(p > 0, p * (p.clamp_min(_EPS).log() - q.log()), 0.0).sum(-1)


def _block_logprobs(model: Any, ids: list[int], cuts: list[int], blocks: list[list[int]],
                    reads: list[list[int]], shared: bool, block_tokens: int
                    ) -> list[list[Tensor]]:
    """Per cut, per block: float32 CPU log-softmax ``[len(read), d_vocab]`` at the block's
    positions ``read`` (relative to the block), for ``ids[:cut] + block``."""
    plain = engine_for(model, "hf").plain if shared and model.n_hooks() == 0 else None
    if plain is None:
        seqs = [ids[:c] + b for c in cuts for b in blocks]
        at = [[c + r for r in rd] for c in cuts for rd in reads]
        out = fwd.run(model, seqs, logits_at=at, sort=True)
        flat = [x.log_softmax(-1) for x in out]
    else:
        flat = tree_logprobs(plain, model, ids[:max(cuts)],
                             [TreeBlock(c, b, rd) for c in cuts for b, rd in zip(blocks, reads)],
                             block_tokens)
    return [flat[k * len(blocks):(k + 1) * len(blocks)] for k in range(len(cuts))]


@dataclass
class TreeBlock:
    """One block of :func:`tree_logprobs`: ``tokens`` at positions from ``cut``, seeing the
    prefix's ``[:cut]`` (less ``hidden``) and themselves; ``reads``: block-relative rows
    whose next-token log-probs are returned (only those of ``targets``, one per read row,
    when given)."""

    cut: int
    tokens: list[int]
    reads: list[int]
    hidden: tuple[int, int] | None = None
    targets: list[int] | None = None


@torch.inference_mode()
def tree_logprobs(net: Any, model: Any, prefix: list[int], blocks: Sequence[TreeBlock],
                  block_tokens: int) -> list[Tensor]:
    """Step 4: the prefix once (KV cache), then every block, tree-masked, in few passes.

    ``net`` is a plain Hugging Face module tree (``engine_for(model, "hf").plain``). Block
    ``b`` sees ``prefix[:b.cut]`` and itself (causally), at positions continuing from
    ``b.cut``; ``b.hidden`` (absolute positions ``[start, end)``) are keys it may not see,
    in the prefix and in the block itself (positions unchanged: the same as zeros in the
    attention mask of the whole sequence for those query rows). The cache is exact
    because nothing before a block's cut is masked. Blocks are grouped so that no
    group exceeds ``block_tokens`` query rows. Returns per block float32 CPU log-softmax
    ``[len(reads), d_vocab]``, or ``[len(reads)]`` log-probs of ``targets``."""
    from transformers import DynamicCache

    dev, dtype = model.device, model.dtype
    cache = DynamicCache(config=net.config)
    p = len(prefix)
    x = torch.tensor([prefix], device=dev)
    net(input_ids=x, position_ids=torch.arange(p, device=dev)[None], past_key_values=cache,
        use_cache=True, logits_to_keep=1)
    out: list[Tensor] = []
    groups: list[list[TreeBlock]] = [[]]
    for blk in blocks:
        if groups[-1] and sum(len(g.tokens) for g in groups[-1]) + len(blk.tokens) > block_tokens:
            groups.append([])
        groups[-1].append(blk)
    low = torch.finfo(dtype).min
    for group in groups:
        q = sum(len(g.tokens) for g in group)
        mask = torch.full((q, p + q), low, dtype=dtype, device=dev)
        toks, pos, where, at = [], [], [], 0
        for blk in group:
            n, c = len(blk.tokens), blk.cut
            mask[at:at + n, :c] = 0
            mask[at:at + n, p + at:p + at + n] = torch.triu(
                torch.full((n, n), low, dtype=dtype, device=dev), 1)
            if blk.hidden is not None:
                lo, hi = blk.hidden
                mask[at:at + n, lo:min(hi, c)] = low
                own = range(max(lo, c) - c, min(hi, c + n) - c)
                if len(own):
                    mask[at:at + n, p + at + own.start:p + at + own.stop] = low
            toks += blk.tokens
            pos += range(c, c + n)
            where.append([at + r for r in blk.reads])
            at += n
        keep = torch.tensor([w for ws in where for w in ws], device=dev)
        logits = net(input_ids=torch.tensor([toks], device=dev),
                     position_ids=torch.tensor([pos], device=dev), attention_mask=mask[None, None],
                     past_key_values=cache, use_cache=True, logits_to_keep=keep).logits[0]
        cache.crop(p)
        lp = logits.float().log_softmax(-1)
        at = 0
        for blk, ws in zip(group, where):
            rows = lp[at:at + len(ws)]
            if blk.targets is not None:
                rows = rows.gather(1, torch.tensor(blk.targets, device=dev)[:, None])[:, 0]
            out.append(rows.cpu())
            at += len(ws)
    return out


__all__ = ["ForcedAnswer", "forced_answer", "thinking_sentences", "reference_answer",
           "default_prefix", "tree_logprobs", "TreeBlock"]
