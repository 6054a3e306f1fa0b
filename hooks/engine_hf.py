"""The ``"hf"`` engine: plain Hugging Face decoding on the model's own weight tensors.

The TransformerLens bridge replaces the Hugging Face model's modules with bridge
components full of hook points and forces eager attention, so decoding through it pays
for every hook point at every step. This engine decodes with a second module tree
instead, built without bridge components and holding the *same* weight tensors:

1. **Plain model.** Build the architecture from ``model.hf.config`` on the meta device
   (no memory), with ``attn_implementation="sdpa"``, then point every parameter and
   buffer at the bridge's own tensor of the same name (the bridge's names with
   ``._original_component`` removed). No weight is copied: ``data_ptr`` agrees.
2. **Batches.** Requests sorted by length are packed into batches of at most
   ``batch_size`` rows; prompts of different lengths are left-padded, with an attention
   mask and position ids counted from each row's first real token.
3. **Prefill once per prefix.** Each distinct prefix of a batch runs once (requests
   with equal ids share it); its KV cache is then expanded to its rows (a request with
   more rows than a batch holds keeps its prefill and expands it chunk by chunk), so
   rollouts from one cut point share it.
4. **Decode loop.** Each step feeds the last token of every live row through the cache.
   Greedy at temperature 0; otherwise softmax(logits / T), cut to the top-p nucleus,
   and inverse-CDF sampling with one uniform per row and step from that row's own CPU
   ``torch.Generator`` seeded :func:`~thinklens.hooks.engine.sample_seed` ``(seed, j)``:
   a row's tokens do not depend on which other rows share its batch.
5. **Stops.** A row stops at eos or a ``Sampling.stop_ids`` token (kept in its ids,
   ``finished=True``) or at ``max_new_tokens`` (``finished=False``); finished rows leave
   the batch (their cache rows are dropped).

**Hooks.** While hooks are attached to the model (``model.n_hooks() > 0``: a
``model.hooks`` block, :func:`thinklens.probes.steer`) the same loop runs on the bridged
module tree (``model.hf``), so the hooks fire at every step exactly as in a bridge
forward pass (eager attention; on a padded batch they also see the padding positions).
Models split over several devices (``device_map``) decode on the bridged tree too: the
plain tree has no device-moving hooks.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from thinklens.errors import ConfigError
from thinklens.hooks.engine import Completion, Request, Sampling, sample_seed

_BRIDGE_PART = "._original_component"
_SHOW_AFTER_S = 3.0  # progress=None: the bar appears once a call has run this long


def plain_model(hf: nn.Module) -> nn.Module:
    """A module tree of ``hf``'s architecture without bridge components, on ``hf``'s tensors.

    Example::

        plain = plain_model(model.hf)
        next(plain.parameters()).data_ptr() == next(model.hf.parameters()).data_ptr()  # True
    """
    from transformers import AutoModelForCausalLM

    dtype = next(hf.parameters()).dtype
    with torch.device("meta"):
        try:
            plain = AutoModelForCausalLM.from_config(copy.deepcopy(hf.config), dtype=dtype,
                                                     attn_implementation="sdpa")
        except ValueError:  # an architecture transformers has no SDPA attention for
            plain = AutoModelForCausalLM.from_config(copy.deepcopy(hf.config), dtype=dtype,
                                                     attn_implementation="eager")
    source: dict[str, Tensor] = {}
    for name, t in itertools.chain(hf.named_parameters(remove_duplicate=False),
                                   hf.named_buffers(remove_duplicate=False)):
        source.setdefault(name.replace(_BRIDGE_PART, ""), t)
    missing = []
    for name, _ in list(itertools.chain(plain.named_parameters(remove_duplicate=False),
                                        plain.named_buffers(remove_duplicate=False))):
        owner, _, attr = name.rpartition(".")
        module = plain.get_submodule(owner)
        if name not in source:
            missing.append(name)
        elif attr in module._parameters:
            module._parameters[attr] = source[name]
        else:
            module._buffers[attr] = source[name]
    meta = [f"{n}.{k}" for n, m in plain.named_modules() for k, v in vars(m).items()
            if isinstance(v, Tensor) and v.is_meta]
    if missing or meta:
        raise ConfigError(f"cannot rebuild {type(hf).__name__} without its bridge components: "
                          f"no bridge tensor for {(missing + meta)[:5]}; generation falls back "
                          "to the bridged model")
    plain.generation_config = hf.generation_config
    return plain.eval()


def _shares_weights(plain: nn.Module, hf: nn.Module) -> bool:
    theirs = {name.replace(_BRIDGE_PART, ""): p
              for name, p in hf.named_parameters(remove_duplicate=False)}
    return all(theirs.get(n) is p for n, p in plain.named_parameters(remove_duplicate=False))


class HFEngine:
    """Batched KV-cache decoding with per-sample generators (see the module docstring).

    Example::

        engine = HFEngine(model)
        [[c]] = engine.generate([Request(model.encode(model.render_prompt("a=1 ; ? a")))],
                                Sampling(max_new_tokens=16))
        c.ids, c.finished      # [..., eos id], True
    """

    name = "hf"

    def __init__(self, model: Any, *, batch_size: int = 64):
        self.model = model
        self.batch_size = batch_size
        self._plain: nn.Module | None = None
        self.fallback: str | None = None  # why the plain tree is not used, if it is not

    @property
    def plain(self) -> nn.Module | None:
        """The plain module tree (rebuilt if the bridge's parameters were replaced)."""
        hf = self.model.hf
        if len({p.device for p in hf.parameters()}) > 1:
            self.fallback = "the model spans several devices"
            return None
        if self._plain is None or not _shares_weights(self._plain, hf):
            try:
                self._plain, self.fallback = plain_model(hf), None
            except ConfigError as err:
                self._plain, self.fallback = None, str(err)
        return self._plain

    def net(self) -> tuple[nn.Module, bool]:
        """(module tree to decode with, whether it is the plain one)."""
        if self.model.n_hooks() == 0:
            plain = self.plain
            if plain is not None:
                return plain, True
        return self.model.hf, False

    def generate(self, requests: Sequence[Request], sampling: Sampling, *,
                 progress: bool | None = None, batch_size: int | None = None,
                 ) -> list[list[Completion]]:
        """``n`` completions per request, in request order."""
        rows = self.batch_size if batch_size is None else batch_size
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ConfigError(f"batch_size={rows!r}; give an integer >= 1")
        for k, r in enumerate(requests):
            if isinstance(r.n, bool) or not isinstance(r.n, int) or r.n < 1:
                raise ConfigError(f"request {k}: n={r.n!r}; give an integer >= 1")
            if not r.prompt_ids:
                raise ConfigError(f"request {k} has no prompt ids; give at least one token")
            bad = [h for h in r.hidden if not 0 <= h < len(r.prompt_ids)]
            if bad:
                raise ConfigError(f"request {k}: hidden position {bad[0]} is outside its "
                                  f"{len(r.prompt_ids)} prompt ids (valid 0..{len(r.prompt_ids) - 1})")
        seeds = [r.seed if r.seed is not None else int(torch.randint(2**62, ()))
                 for r in requests]
        net, plain = self.net()
        tok = self.model.tokenizer
        stops = {tok.eos_token_id, *sampling.stop_ids} - {None}
        out: list[list[Completion | None]] = [[None] * r.n for r in requests]
        bar = tqdm(total=sum(r.n for r in requests) * sampling.max_new_tokens, unit="tok",
                   desc=f"generate ({'hf' if plain else 'bridge, hooks'})", leave=False,
                   disable=progress is False, delay=0 if progress else _SHOW_AFTER_S)
        t0 = time.perf_counter()
        ctx = torch.inference_mode() if plain else torch.no_grad()
        try:
            with ctx:
                for group in _pack(requests, rows):
                    # requests with the same prefix share one prefill row
                    row_of: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
                    for i in group:
                        row_of.setdefault(_key(requests[i]), len(row_of))
                    pre = _prefill(net, [list(k) for k, _ in row_of],
                                   [list(h) for _, h in row_of], self.model)
                    units = [(i, j) for i in group for j in range(requests[i].n)]
                    for a in range(0, len(units), rows):
                        chunk = units[a:a + rows]
                        gens = [torch.Generator().manual_seed(sample_seed(seeds[i], j))
                                for i, j in chunk]
                        owner = [row_of[_key(requests[i])] for i, _ in chunk]
                        done = _decode(net, pre, owner, gens, sampling, stops, bar, t0)
                        for (i, j), c in zip(chunk, done):
                            out[i][j] = c
        finally:
            bar.close()
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Drop the plain module tree (the weights stay: they are the bridge's)."""
        self._plain = None


def _key(r: Request) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Requests with equal prefixes and equal hidden keys share one prefill row."""
    return tuple(r.prompt_ids), tuple(sorted(set(r.hidden)))


def _pack(requests: Sequence[Request], rows: int) -> list[list[int]]:
    """Request indices in batches of at most ``rows`` rows, longest prompts first."""
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids))
    groups: list[list[int]] = []
    used = rows  # forces a new group at the start
    for i in order:
        n = requests[i].n
        if used + n > rows:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def _forward(net: nn.Module, ids: Tensor, mask: Tensor, pos: Tensor, cache: Any) -> Tensor:
    """Next-token logits (float32) of the last position of every row."""
    logits = net(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                 use_cache=True, logits_to_keep=1).logits
    return logits[:, -1].float()


def _prefill(net: nn.Module, prompts: list[list[int]], hidden: list[list[int]],
             model: Any) -> dict[str, Any]:
    """One left-padded forward pass over ``prompts``: cache, last logits, mask, next position.

    ``hidden[r]``: positions of prompt ``r`` whose keys are masked (0 in the attention
    mask, which every later step keeps); position ids count the padding only."""
    from transformers import DynamicCache

    device, width = model.device, max(map(len, prompts))
    pad = model.tokenizer.pad_token_id or 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    for r, (p, h) in enumerate(zip(prompts, hidden)):
        if h:
            mask[r, torch.tensor(h, device=device) + (width - len(p))] = 0
    cache = DynamicCache(config=net.config)
    logits = _forward(net, ids, mask, pos, cache)
    return {"cache": cache, "logits": logits, "mask": mask, "next": pos[:, -1] + 1,
            "config": net.config}


def _select(pre: dict[str, Any], rows: Tensor) -> Any:
    """A new cache holding rows ``rows`` of the prefill's (the prefill's stays intact)."""
    from transformers import DynamicCache

    data = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v, *_ in pre["cache"]]
    return DynamicCache(data, config=pre["config"])


def _pick(logits: Tensor, sampling: Sampling, gens: list[torch.Generator]) -> Tensor:
    """One token per row: argmax at temperature 0, else a top-p sample from its generator."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    order = None
    if sampling.top_p < 1:
        probs, order = probs.sort(-1, descending=True)
        probs = probs * (probs.cumsum(-1) - probs < sampling.top_p)  # keeps the top token
    cdf = probs.double().cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
    u = u.to(cdf.device) * cdf[:, -1]
    k = torch.searchsorted(cdf, u[:, None], right=True).clamp_max(cdf.shape[-1] - 1)
    return (k if order is None else order.gather(-1, k))[:, 0]


def _decode(net: nn.Module, pre: dict[str, Any], owner: list[int], gens: list[torch.Generator],
            sampling: Sampling, stops: set[int], bar: Any, t0: float) -> list[Completion]:
    """Decode one chunk of rows; ``owner[r]`` is row ``r``'s index in the prefill batch."""
    idx = torch.tensor(owner, device=pre["logits"].device)
    cache, logits = _select(pre, idx), pre["logits"][idx]
    mask, nxt = pre["mask"][idx], pre["next"][idx]
    ids: list[list[int]] = [[] for _ in owner]
    finished = [False] * len(owner)
    live = list(range(len(owner)))  # chunk rows still in the batch, in batch order
    for step in range(sampling.max_new_tokens):
        new = _pick(logits, sampling, [gens[r] for r in live])
        for r, t in zip(live, new.tolist()):
            ids[r].append(t)
            finished[r] = t in stops
        bar.update(len(live))
        bar.set_postfix({"tok/s": f"{bar.n / max(time.perf_counter() - t0, 1e-9):.0f}"},
                        refresh=False)
        keep = [b for b, r in enumerate(live) if not finished[r]]
        if not keep or step == sampling.max_new_tokens - 1:
            break
        if len(keep) < len(live):
            sel = torch.tensor(keep, device=mask.device)
            cache.reorder_cache(sel)
            mask, nxt, new = mask[sel], nxt[sel], new[sel]
            live = [live[b] for b in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
        logits = _forward(net, new[:, None], mask, nxt[:, None], cache)
        nxt = nxt + 1
    return [Completion(i, f) for i, f in zip(ids, finished)]


__all__ = ["HFEngine", "plain_model"]
