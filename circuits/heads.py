"""Head scores: how much of each head's attention goes where a head type must look.

Every kind of score is a set of *targets*: query rows, each with the key positions a
head of that type attends to. A head's score is the mean, over the scored rows, of the
attention mass its pattern puts on the row's targets (1 = all of it, always).

1. **Inputs.** The token kinds run on ``n`` repeated random sequences (Olsson et al.
   2022, "In-context learning and induction heads"): BOS (when the tokenizer has one),
   then ``length`` distinct non-special token ids drawn at random, then the same ids
   again. The task kinds run on the task's held-out problems, teacher-forced
   (``Trace.from_text(model, prompt, model.task.completion(prompt))``), so every
   checkpoint of a training run is scored on the same tokens; ``traces=`` overrides.
2. **Targets** (``previous``, ``duplicate``, ``induction``: TransformerLens's
   ``head_detector`` patterns, on any tokens): ``previous`` — row q, key q − 1;
   ``duplicate`` — row q, the earlier keys holding the same token; ``induction`` — row q,
   the keys j ≤ q whose previous token is q's token (the token after an earlier
   occurrence). On a repeated sequence of distinct tokens only the second copy's rows
   have duplicate or induction targets, one each: exactly Olsson et al.'s scores. The
   task's kinds come from ``model.task.attention_targets(trace)`` (the organism's
   ``lookup``: a resolve step's ``=`` to the prompt statement it copies;
   ``operand_copy``: a compute step's first ``=`` to the position holding its operand).
3. **One eager pass per batch** (:mod:`thinklens.hooks.forward`); each layer's pattern is
   reduced in its hook (``einsum`` with the 0/1 target masks), never kept.
4. **Versus** ``transformer_lens.head_detector.detect_head`` (``error_measure="mul"``): it
   divides the same attention mass by *all* of a head's attention on the sequence — T
   rows for T tokens, the first copy's rows included — so on one sequence its score is
   ours × ``counts[kind] / T`` (about half ours for induction on a repeated sequence).
   It also re-tokenises strings (BOS prepended), where ours takes token ids; and it
   averages a list of prompts per prompt, where ours pools rows. ``tests/test_heads.py``
   checks the identity on SmolLM2 and on a random model.
5. **In-context learning** (:func:`icl_score`, Olsson et al.): mean loss at token 500
   minus at token 50 of long inputs; on the organisms, whose context is 256 and whose
   traces are ~20-100 tokens, positions that exist there (``early``/``late``).

Example::

    s = circuits.head_scores(model)              # every kind the model has
    s["induction"].shape                         # (layer, head)
    s.top("lookup", 1)                           # [(1, 0, 0.63)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from thinklens.errors import ConfigError, did_you_mean
from thinklens.hooks import forward as fwd
from thinklens.hooks.trace import Trace

TOKEN_KINDS = ("previous", "duplicate", "induction")
Targets = list[tuple[int, list[int]]]  # (query position, key positions)


@dataclass
class HeadScores:
    """Scores of every head, one ``[layer, head]`` tensor per kind (NaN: no row to score).

    ``counts[kind]``: query rows scored; ``lengths[kind]``: tokens of each input scored
    (what ``detect_head``'s normalisation needs); ``settings``: how the inputs were made.
    """

    scores: dict[str, Float[Tensor, "layer head"]]
    counts: dict[str, int]
    lengths: dict[str, list[int]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        return list(self.scores)

    def __getitem__(self, kind: str) -> Float[Tensor, "layer head"]:
        if kind not in self.scores:
            raise ConfigError(f"no head score {kind!r}.{did_you_mean(kind, self.scores)} "
                              f"Valid: {', '.join(self.scores)}")
        return self.scores[kind]

    def top(self, kind: str, k: int = 3) -> list[tuple[int, int, float]]:
        """The ``k`` best heads of ``kind`` as ``(layer, head, score)``, best first."""
        s = self[kind]
        idx = torch.topk(s.flatten(), min(k, s.numel())).indices.tolist()
        return [(i // s.shape[1], i % s.shape[1], float(s.flatten()[i])) for i in idx]

    def above(self, kind: str, threshold: float) -> list[tuple[int, int, float]]:
        """Every head of ``kind`` scoring above ``threshold``, best first."""
        return [t for t in self.top(kind, self[kind].numel()) if t[2] > threshold]

    def to_dict(self) -> dict[str, Any]:
        return {"scores": {k: v.tolist() for k, v in self.scores.items()},
                "counts": dict(self.counts), "lengths": dict(self.lengths),
                "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadScores:
        return cls({k: torch.tensor(v, dtype=torch.float32) for k, v in d["scores"].items()},
                   dict(d["counts"]), dict(d.get("lengths", {})), dict(d.get("settings", {})))


def repeated_random_tokens(model: Any, n: int = 8, length: int = 50,
                           seed: int = 0) -> list[list[int]]:
    """``n`` sequences: BOS (if any), ``length`` distinct random non-special ids, the same again.

    ``length`` is cut to the non-special vocabulary (the organism has 33 such tokens) and
    to the context (``2 * length + 1 <= n_ctx``).
    """
    for name, v in (("n", n), ("length", length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}={v!r}; give a positive integer")
    special = set(model.tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(model.config.d_vocab) if i not in special])
    length = min(length, len(pool), (model.config.n_ctx - 1) // 2)
    if length < 2:
        raise ConfigError(f"{model.name!r} has {len(pool)} non-special tokens and context "
                          f"{model.config.n_ctx}: too few for a repeated sequence")
    gen = torch.Generator().manual_seed(seed)
    bos = model.tokenizer.bos_token_id
    out = []
    for _ in range(n):
        r = pool[torch.randperm(len(pool), generator=gen)[:length]].tolist()
        out.append(([bos] if bos is not None else []) + r + r)
    return out


def token_targets(ids: Sequence[int], kind: str) -> Targets:
    """The targets of a token kind on one sequence (see the module docstring, step 2)."""
    ids = list(ids)
    if kind == "previous":
        return [(q, [q - 1]) for q in range(1, len(ids))]
    out = []
    for q in range(len(ids)):
        if kind == "duplicate":
            keys = [j for j in range(q) if ids[j] == ids[q]]
        elif kind == "induction":
            keys = [j for j in range(1, q + 1) if ids[j - 1] == ids[q]]
        else:
            raise ConfigError(f"unknown token kind {kind!r}; valid: {', '.join(TOKEN_KINDS)}")
        if keys:
            out.append((q, keys))
    return out


def reference_traces(model: Any, n: int = 32, seed: int = 0) -> list[Trace]:
    """``n`` of the task's held-out problems with their correct thinking, teacher-forced
    (``model.task.completion``); the greedy thinking for a task that has no completions."""
    if model.task is None:
        raise ConfigError(f"{model.name!r} has no task to draw problems from; pass traces=")
    rows = model.task.problems(n, seed=seed)
    try:
        return [Trace.from_text(model, r["prompt"], model.task.completion(r["prompt"]))
                for r in rows]
    except ConfigError:  # a task without reference completions: its greedy thinking
        return model.think_batch([r["prompt"] for r in rows], progress=False)


def _score(model: Any, inputs: list, targets: dict[str, list[Targets]],
           batch_size: int) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Mean attention mass on the targets, per kind and head, over every scored row."""
    n_layers, n_heads = model.config.n_layers, model.config.n_heads
    mass = {k: torch.zeros(n_layers, n_heads, dtype=torch.float64) for k in targets}
    counts = {k: sum(len(t) for t in ts) for k, ts in targets.items()}

    def hooks(batch: fwd.Batch) -> list:
        width = batch.ids.shape[1]
        masks = {}
        for kind, per_input in targets.items():
            m = torch.zeros(len(batch), width, width, dtype=torch.float32)
            for j, i in enumerate(batch.rows):
                for q, keys in per_input[i]:
                    m[j, q, keys] = 1.0
            masks[kind] = m.to(model.device)

        def at(layer: int):
            def f(pattern, hook):  # [batch, head, query_pos, key_pos]
                p = pattern.detach().float()
                for kind, m in masks.items():
                    mass[kind][layer] += torch.einsum("bhqk,bqk->h", p, m).double().cpu()
                return pattern
            return f
        return [(f"blocks.{layer}.attn.hook_pattern", at(layer)) for layer in range(n_layers)]

    fwd.run(model, inputs, hooks, batch_size=batch_size, stop_early=True)
    return ({k: (mass[k] / counts[k] if counts[k] else mass[k] * float("nan")).float()
             for k in targets}, counts)


def head_scores(model: Any, kinds: Sequence[str] | None = None, *,
                inputs: Sequence[Sequence[int]] | None = None,
                traces: Sequence[Trace] | None = None, n: int = 8, length: int = 50,
                n_task: int = 32, seed: int = 0, batch_size: int = 8) -> HeadScores:
    """Score every head of ``model`` for each of ``kinds`` in one call.

    ``kinds``: any of ``previous``, ``duplicate``, ``induction`` and the task's kinds
    (``model.task.attention_targets``); default all the model has. ``inputs``: token-id
    lists for the token kinds (default :func:`repeated_random_tokens` ``(n, length,
    seed)``); ``traces``: traces for the task kinds (default ``n_task`` of the task's
    held-out problems, teacher-forced). Scores are ``[layer, head]`` in [0, 1].

    Example::

        s = head_scores(model, ["induction"], n=4, length=100)
        s.above("induction", 0.4)      # [(layer, head, score), ...]
    """
    task_kinds: list[str] = []
    given = {"inputs": inputs is not None, "traces": traces is not None}
    if traces is None and model.task is not None and (kinds is None or
                                                       set(kinds) - set(TOKEN_KINDS)):
        try:
            traces = reference_traces(model, n_task, seed)
        except ConfigError:
            traces = None
    task_targets: dict[str, list[Targets]] = {}
    if traces is not None:
        traces = fwd.as_traces(model, traces)
        try:
            per = [model.task.attention_targets(t) for t in traces] if model.task else None
        except ConfigError:
            per = None
        if per:  # a kind some traces lack (a backtracking lookup) scores none of theirs
            task_kinds = list(dict.fromkeys(k for p in per for k in p))
            task_targets = {k: [p.get(k, []) for p in per] for k in task_kinds}
    valid = [*TOKEN_KINDS, *task_kinds]
    kinds = list(valid if kinds is None else kinds)
    bad = [k for k in kinds if k not in valid]
    if bad or not kinds:
        hint = did_you_mean(bad[0], valid) if bad else ""
        raise ConfigError(f"unknown head-score kinds {bad or kinds}.{hint} Valid for {model.name!r}: {', '.join(valid)} (task kinds need a "
                          "task with attention_targets and its traces)")
    scores: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    lengths: dict[str, list[int]] = {}
    tok = [k for k in kinds if k in TOKEN_KINDS]
    if tok:
        seqs = [list(x) for x in inputs] if inputs is not None else \
            repeated_random_tokens(model, n, length, seed)
        s, c = _score(model, seqs, {k: [token_targets(x, k) for x in seqs] for k in tok},
                      batch_size)
        scores |= s
        counts |= c
        lengths |= {k: [len(x) for x in seqs] for k in tok}
    own = [k for k in kinds if k not in TOKEN_KINDS]
    if own:
        s, c = _score(model, traces, {k: task_targets[k] for k in own}, batch_size)
        scores |= s
        counts |= c
        lengths |= {k: [len(t.token_ids) for t in traces] for k in own}
    settings = {"n": n, "length": length, "seed": seed, "n_task": n_task,
                "inputs": "given" if given["inputs"] else "repeated random",
                "traces": "given" if given["traces"] else "task, teacher-forced"}
    return HeadScores({k: scores[k] for k in kinds}, {k: counts[k] for k in kinds},
                      {k: lengths[k] for k in kinds}, settings)


@dataclass
class ICLScore:
    """Olsson et al.'s in-context-learning score: mean loss at token ``late`` minus at ``early``.

    Negative when later tokens are predicted better thanks to the context; ``n`` inputs
    long enough for both positions were averaged.
    """

    early: int
    late: int
    loss_early: float
    loss_late: float
    n: int

    @property
    def score(self) -> float:
        return self.loss_late - self.loss_early


def icl_score(model: Any, inputs: Sequence[Trace] | Sequence[Sequence[int]], *,
              early: int = 50, late: int = 500, batch_size: int = 8) -> ICLScore:
    """Loss at token ``late`` − loss at token ``early`` (Olsson et al. 2022: 500 and 50),
    averaged over the ``inputs`` (traces or token-id lists) longer than ``late``.

    Example::

        icl_score(model, reference_traces(model, 64), early=8, late=40).score   # e.g. -2.1
    """
    if not 0 < early < late:
        raise ConfigError(f"early={early}, late={late}; need 0 < early < late (token indices)")
    seqs = [list(t.token_ids) if isinstance(t, Trace) else [int(i) for i in t] for t in inputs]
    keep = [s for s in seqs if len(s) > late]
    if not keep:
        longest = max((len(s) for s in seqs), default=0)
        raise ConfigError(f"no input is longer than late={late} tokens (longest: {longest}); "
                          "give longer inputs or a smaller late=")
    logits = fwd.run(model, keep, logits_at=[[early - 1, late - 1]] * len(keep),
                     batch_size=batch_size)
    loss = torch.stack([torch.nn.functional.cross_entropy(x, torch.tensor([s[early], s[late]]),
                                                          reduction="none")
                        for x, s in zip(logits, keep)])                 # [input, 2]
    return ICLScore(early, late, float(loss[:, 0].mean()), float(loss[:, 1].mean()), len(keep))


__all__ = ["HeadScores", "head_scores", "repeated_random_tokens", "token_targets",
           "reference_traces", "ICLScore", "icl_score", "TOKEN_KINDS"]
