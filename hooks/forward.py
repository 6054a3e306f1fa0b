"""The one padded-batch forward runner: capture, lens, correctness and patching use it.

1. **Inputs** are traces or token-id lists (:func:`token_lists`); traces are checked
   against the model's tokenizer.
2. **Batches** (:func:`batches`): inputs are ordered shortest first (less padding; pass
   ``sort=False`` to keep input order) and cut into batches of ``batch_size``, or, with
   ``batch_size=None``, of as many sequences as fit the memory ``budget`` by
   :func:`thinklens.hooks.budget.forward_peak` (at least one per batch). Each
   :class:`Batch` records which input each row is (``batch.rows``), so results map back
   to input order.
3. **Right padding.** Row ``j`` holds its tokens at ``0 .. len_j - 1`` and pad ids after,
   with ``attention_mask`` 0 there. The bridge keeps position ids ``0, 1, 2, …`` for a row
   whose mask has no zero before a one (TransformerBridge.forward derives positions from
   the mask only for left padding or gaps), so every row counts positions from 0; with
   causal attention its real tokens never attend to the padding. A padded batch therefore
   computes what one-by-one runs do, up to float reordering in batched matmuls.
4. **One pass** (:func:`forward`): hooks are added for the pass only (``model.hooks``,
   removed in ``finally``, also after an error), under ``torch.no_grad()`` unless
   ``grad=True``. With ``stop_early=True`` the pass ends as soon as every hooked site has
   fired, so later layers and the ``[batch, pos, d_vocab]`` logits are never computed.
5. **Attention implementation** (:mod:`thinklens.hooks.attention_impl`): a pass that
   hooks no pattern or score site runs SDPA (no ``[heads, T, T]`` per layer), with the
   same site names and values as eager; hooking ``attn.hook_pattern`` or
   ``attn.hook_attn_scores`` runs the bridge's eager attention. ``attention=`` forces one.
6. **Recomputed blocks** (:func:`recompute_blocks`, a context manager for ``grad=True``
   passes): every block but the last runs under non-reentrant
   ``torch.utils.checkpoint``, so a backward pass keeps only each block's inputs and
   recomputes one block at a time (hooks inside fire again during the recomputation).
7. **Logits at chosen positions only** (``logits_at=``): the last block's output
   (``blocks.{L-1}.hook_resid_post``, after any user hook there) is read at the chosen
   rows, put through the model's own final norm and unembedding there (``[n, d_vocab]``
   per row instead of ``[pos, d_vocab]``), and the pass stops. (Not
   ``ln_final.hook_normalized``: for RMSNorm that hook fires before the norm's weight.)

Example::

    from thinklens.hooks import forward as fwd

    def hooks(batch):                       # hooks for one batch; batch.rows = input indices
        return [("blocks.1.hook_resid_post", lambda x, hook: keep(x, batch.rows))]

    fwd.run(model, traces, hooks, stop_early=True)             # layers 2.. never run
    fwd.read(model, traces, ["blocks.1.hook_resid_post"], fn)  # fn(site, x, rows) in the hook
    last = fwd.run(model, [[5, 6, 7], [5, 6]], logits_at="last")
    last[0].shape                                               # (1, d_vocab), input order
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from thinklens.errors import ConfigError
from thinklens.hooks import attention_impl
from thinklens.hooks import budget as _budget
from thinklens.hooks.trace import Trace, check_tokenizer

Hook = tuple[str, Callable[..., Any]]


@dataclass(frozen=True)
class Batch:
    """One right-padded batch: ``ids`` and ``mask`` are ``[batch, pos]`` on the model's device.

    ``rows[j]`` is the input index of row ``j``; ``lengths[j]`` (CPU) its real tokens.
    """

    rows: list[int]
    ids: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]

    def __len__(self) -> int:
        return len(self.rows)


class _Stop(Exception):
    """Raised by the last hook needed: the rest of the pass is not computed."""


def as_traces(model, traces: Trace | Sequence[Trace]) -> list[Trace]:
    """A list of traces, each checked against ``model``'s tokenizer (a single trace is listed)."""
    traces = [traces] if isinstance(traces, Trace) else list(traces)
    if not traces:
        raise ConfigError("no traces; make some with model.think_batch(prompts) or "
                          "Trace.from_text(model, prompt, completion)")
    for t in traces:
        check_tokenizer(t, model.tokenizer)
    return traces


def _token_lists(model, inputs: Sequence[Trace] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Token ids of each input: a trace's ``token_ids`` (tokenizer checked) or the list itself."""
    out = []
    for k, x in enumerate(inputs):
        if isinstance(x, Trace):
            check_tokenizer(x, model.tokenizer)
            out.append(list(x.token_ids))
        elif isinstance(x, str):
            raise ConfigError(f"input {k} is a string; pass traces or token-id lists "
                              "(model.encode(text))")
        else:
            out.append([int(t) for t in x])
        if not out[-1]:
            raise ConfigError(f"input {k} has no tokens; every sequence needs at least one")
    return out


def plan(model, lengths: Sequence[int], *, batch_size: int | None = 8, budget: Any = None,
         sort: bool = True) -> list[list[int]]:
    """Input indices per batch: shortest first (``sort``), ``batch_size`` each or fit to ``budget``.

    Example: ``plan(model, [5, 2, 9], batch_size=2) == [[1, 0], [2]]``.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if sort else list(range(len(lengths)))
    if batch_size is not None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r}; must be a positive integer or None "
                              "(as many as fit the memory budget)")
        return [order[a: a + batch_size] for a in range(0, len(order), batch_size)]
    limit = _budget.parse_budget(budget, model.device)
    bytes_per = torch.finfo(model.dtype).bits // 8
    out: list[list[int]] = []
    for i in order:
        if out:
            cur = out[-1]
            longest = max(lengths[k] for k in [*cur, i])
            if _budget.forward_peak(model.config, len(cur) + 1, longest, bytes_per) <= limit:
                cur.append(i)
                continue
        out.append([i])
    return out


def pad(model, seqs: Sequence[Sequence[int]], rows: Sequence[int]) -> Batch:
    """Right-pad ``seqs[i] for i in rows`` into one :class:`Batch` (pad id: the tokenizer's, else 0)."""
    lengths = torch.tensor([len(seqs[i]) for i in rows], dtype=torch.long)
    pad_id = model.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for j, i in enumerate(rows):
        ids[j, : len(seqs[i])] = torch.as_tensor(seqs[i], dtype=torch.long)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    return Batch(list(rows), ids.to(model.device), mask.to(model.device), lengths)


def _batches(model, inputs: Sequence[Trace] | Sequence[Sequence[int]], *,
            batch_size: int | None = 8, budget: Any = None, sort: bool = True) -> Iterator[Batch]:
    """Padded batches of ``inputs`` (see :func:`plan`); ``batch.rows`` maps rows to inputs."""
    seqs = _token_lists(model, inputs)
    for rows in plan(model, [len(s) for s in seqs], batch_size=batch_size, budget=budget,
                     sort=sort):
        yield pad(model, seqs, rows)


def forward(model, batch: Batch, hooks: Sequence[Hook] = (), *, stop_early: bool = False,
            logits_at: str | Sequence[Sequence[int]] | None = None,
            grad: bool = False, attention: str | None = None,
            within: Callable[[Any], Any] | None = None,
            ) -> list[Float[Tensor, "n d_vocab"]] | Tensor | None:
    """Run one batch with ``hooks`` (scoped to this pass).

    ``attention``: None (SDPA unless a pattern or score site is hooked), "eager" or "sdpa".

    Returns the full logits ``[batch, pos, d_vocab]`` when neither ``stop_early`` nor
    ``logits_at`` is given; with ``logits_at`` ("last", or per row a list of positions)
    a list, per row, of ``[n, d_vocab]`` logits at those positions (on the model's
    device); None when the pass stopped early. ``within``: called with that result while
    the pass's hooks and attention implementation are still in place (a backward pass
    through :func:`recompute_blocks` reruns the blocks and needs them).
    """
    hooks = list(hooks)
    impl = attention_impl.choose(model, [n for n, _ in hooks], attention)
    pending = set(range(len(hooks)))  # per hook, not per name: a site may carry two
    logits: list[Tensor] = []

    def counted(k: int, fn: Callable) -> Callable:
        def f(x, hook):
            out = fn(x, hook)
            pending.discard(k)
            if stop_early and not pending and logits_at is None:
                raise _Stop
            return out
        return f

    wrapped = [(n, counted(k, f)) for k, (n, f) in enumerate(hooks)]
    if logits_at is not None:
        where = _logit_rows(batch, logits_at)

        def read_logits(x, hook):
            bridge = model.bridge
            logits.extend(bridge.unembed(bridge.ln_final(x[j, w])) for j, w in enumerate(where))
            raise _Stop

        wrapped.append((f"blocks.{model.config.n_layers - 1}.hook_resid_post", read_logits))
    with torch.set_grad_enabled(grad), attention_impl.use(model, impl), model.hooks(wrapped):
        try:
            out = model.bridge(batch.ids, attention_mask=batch.mask, use_cache=False)
        except _Stop:
            out = logits if logits_at is not None else None
        if within is not None:
            within(out)
    return out


@contextmanager
def recompute_blocks(model, *, keep_last: int = 1) -> Iterator[None]:
    """Run the blocks but the last ``keep_last`` under activation checkpointing (step 6).

    The last block stays as it is: :func:`forward`'s ``logits_at`` reads it in a hook that
    ends the pass. Restored in ``finally``. The same numbers as without, one more forward
    of the recomputed blocks in the backward pass, which must run while the pass's hooks
    and attention implementation are in place (:func:`forward`'s ``within``).
    """
    from torch.utils.checkpoint import checkpoint

    blocks = list(model.bridge.blocks)
    chosen = blocks[: max(0, len(blocks) - keep_last)]
    def recomputed(run: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any):
            return checkpoint(run, *args, use_reentrant=False, **kwargs)
        return forward

    for b in chosen:
        object.__setattr__(b, "forward", recomputed(type(b).forward.__get__(b)))
    try:
        yield
    finally:
        for b in chosen:
            b.__dict__.pop("forward", None)


def _logit_rows(batch: Batch, logits_at: str | Sequence[Sequence[int]]) -> list[Tensor]:
    if isinstance(logits_at, str):
        if logits_at != "last":
            raise ConfigError(f"logits_at={logits_at!r}; valid: 'last', or one list of "
                              "positions per input")
        return [torch.tensor([int(n) - 1], device=batch.ids.device) for n in batch.lengths]
    if len(logits_at) != len(batch):
        raise ConfigError(f"logits_at has {len(logits_at)} position lists for {len(batch)} "
                          "rows; give one per row")
    out = []
    for j, w in enumerate(logits_at):
        w = torch.as_tensor(list(w), dtype=torch.long)
        n = int(batch.lengths[j])
        if len(w) and (int(w.min()) < -n or int(w.max()) >= n):
            raise ConfigError(f"logits_at positions {w.tolist()} outside input {batch.rows[j]} "
                              f"of {n} tokens (valid {-n}..{n - 1})")
        out.append((w % n).to(batch.ids.device))
    return out


def run(model, inputs: Sequence[Trace] | Sequence[Sequence[int]],
        hooks: Callable[[Batch], Sequence[Hook]] | None = None, *,
        batch_size: int | None = 8, budget: Any = None, sort: bool = True,
        stop_early: bool = True, logits_at: str | Sequence[Sequence[int]] | None = None,
        after: Callable[[Batch], None] | None = None,
        attention: str | None = None) -> list[Tensor] | None:
    """Run every input through the model in padded batches.

    ``hooks(batch)`` builds the hooks of one batch (they read ``batch.rows`` to know
    which inputs they see); ``after(batch)`` is called once the batch's pass is done.
    ``stop_early`` (default True): the pass ends after the last hooked site fired;
    ``attention`` as in :func:`forward`. With ``logits_at`` ("last" or one position list per input) returns, in input order,
    ``[n, d_vocab]`` float32 CPU logits per input; otherwise None.

    Example::

        nxt = run(model, prefixes, logits_at="last")      # greedy next tokens:
        [int(x[0].argmax()) for x in nxt]
    """
    seqs = _token_lists(model, inputs)
    if not isinstance(logits_at, str | None) and len(logits_at) != len(seqs):
        raise ConfigError(f"logits_at has {len(logits_at)} position lists for {len(seqs)} "
                          "inputs; give one per input")
    got: list[Tensor | None] = [None] * len(seqs)
    for rows in plan(model, [len(s) for s in seqs], batch_size=batch_size, budget=budget,
                     sort=sort):
        batch = pad(model, seqs, rows)
        at = logits_at if isinstance(logits_at, str | None) else [logits_at[i] for i in rows]
        out = forward(model, batch, hooks(batch) if hooks is not None else (),
                      stop_early=stop_early, logits_at=at, attention=attention)
        if logits_at is not None:
            for i, x in zip(rows, out):
                got[i] = x.detach().float().cpu()
        if after is not None:
            after(batch)
    return got if logits_at is not None else None  # type: ignore[return-value]


def read(model, inputs: Sequence[Trace] | Sequence[Sequence[int]], sites: Sequence[str],
         fn: Callable[[str, Tensor, list[int]], None], *, batch_size: int | None = 8,
         budget: Any = None) -> None:
    """Call ``fn(site, x [batch, pos, ...], rows)`` inside each site's hook; stop after the last.

    ``rows[j]`` is the input index of batch row ``j`` (rows past its length are padding).
    Nothing is modified; later layers and the logits are never computed.

    Example::

        read(model, traces, ["blocks.1.hook_resid_post"],
             lambda site, x, rows: sums.add_(x[:, -1].sum(0)))
    """
    names = model.sites(list(sites))

    def hooks(batch: Batch) -> list[Hook]:
        def at(site: str) -> Callable:
            def f(x, hook):
                fn(site, x.detach(), batch.rows)
                return x
            return f
        return [(s, at(s)) for s in names]

    run(model, inputs, hooks, batch_size=batch_size, budget=budget, stop_early=True)


__all__ = ["recompute_blocks", "Batch", "as_traces", "plan", "pad", "forward", "run", "read"]
