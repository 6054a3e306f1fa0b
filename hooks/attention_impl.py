"""Which attention a pass runs: eager (patterns exist) or SDPA (no ``[T, T]`` tensor kept).

TransformerLens's bridge does not call the Hugging Face attention module: its attention
component (``PositionEmbeddingsAttentionBridge.forward``) recomputes attention itself,
``softmax(QKᵀ·scale + mask)`` in full, so that ``hook_attn_scores`` and ``hook_pattern``
fire. Switching ``config._attn_implementation`` alone therefore changes nothing but the
mask Hugging Face builds; every pass still materialises ``heads × T²`` per layer.
What thinklens does instead, for a pass that hooks no pattern or score site:

1. **Decide** (:func:`choose`): eager if any hooked site is a pattern or score site
   (``attn.hook_pattern``, ``attn.hook_attn_scores``; ``attention="sentence"`` and chosen
   heads hook patterns), SDPA otherwise.
2. **Switch, scoped** (:func:`use`, a context manager; everything restored in ``finally``,
   also after an error): the HF config's ``_attn_implementation`` is set to ``"sdpa"``,
   so Hugging Face hands the layers its SDPA mask (``None`` when no row is padded, else a
   boolean ``[batch, 1, q, k]``), and each attention component whose features this
   module reproduces gets an instance ``forward`` (:func:`_sdpa_forward`).
3. **The SDPA forward** is the bridge's own forward, step for step, for the standard
   path (Llama, Qwen2, Qwen3, Mistral shapes: q/k/v projections, optional q/k RMS norms
   after the head reshape, full rotary, grouped-query K/V expanded with ``repeat_kv`` as
   the bridge does, output projection): the same hooks fire on the same tensors
   (``hook_in``, ``hook_q/k/v``, ``hook_cos/sin``, ``hook_rot_q/k``, ``hook_z``,
   ``hook_out``), and only the core, ``softmax(QKᵀ)V``, is one
   ``torch.nn.functional.scaled_dot_product_attention`` call (causal by flag when
   the mask is ``None``). ``hook_attn_scores`` and ``hook_pattern`` do not fire, which
   is why step 1 keeps eager for them.
4. **Observers** (:func:`observe`, a context manager around the pass): a callback
   ``fn(layer, q, k, mask, scale)`` that :func:`_sdpa_forward` calls once per layer with the
   rotated queries ``[batch, head, q_pos, d_head]``, the rotated keys before grouped-query
   expansion ``[batch, kv_head, k_pos, d_head]`` (after any KV cache) and the mask SDPA
   gets (None = causal from the bottom-right; else boolean ``True`` = attend, or additive
   float, ``[batch or 1, 1, q_pos, k_pos]``) and the softmax scale. Statistics of the attention pattern are
   computed there from q and k (:mod:`thinklens.hooks.blockwise`). An observer may
   also compute the attention output itself (``observe(..., output=True)``: it gets v
   and its result replaces the SDPA call), so that the probabilities of one pass over
   QKᵀ give both. :func:`observable` says whether every layer will call it.
5. **Falls back to eager** per component: any feature outside that path (split q/k/v
   inputs, per-head results, gated q, soft-capping, sinks, q/k clipping, partial or
   interleaved rotary, key multipliers, a subclass with its own forward, training mode)
   keeps the bridge's forward, which also accepts SDPA's masks.

Values equal the eager pass up to float reordering (fp32: about 1e-6 absolute on the
test models, checked at 1e-5 in tests/test_sdpa_capture.py). Inside a pass,
:func:`current` says which implementation is running.

Example::

    from thinklens.hooks import attention_impl

    with attention_impl.use(model, attention_impl.choose(model, ["blocks.1.hook_resid_post"])):
        model.bridge(ids)            # SDPA; attention_impl.current(model) == "sdpa"
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from thinklens.errors import ConfigError
from thinklens.hooks.sites import is_pattern_site

IMPLEMENTATIONS = ("eager", "sdpa")
_FLAGS = ("use_split_qkv_input", "use_attn_in", "use_attn_result", "gated_q_proj",
          "qk_norm_after_rope", "rotary_interleaved_cos_sin", "rotary_adjacent_pairs")


def choose(model, sites: Sequence[str], attention: str | None = None) -> str:
    """``"eager"`` if any of ``sites`` is a pattern or score site, else ``"sdpa"``.

    ``attention`` ("eager" or "sdpa") forces one; "sdpa" with a pattern site is refused.
    """
    pattern = [s for s in sites if is_pattern_site(s)
               or any(is_pattern_site(c) for c in model.sites(s))]
    if attention is None:
        return "eager" if pattern else "sdpa"
    if attention not in IMPLEMENTATIONS:
        raise ConfigError(f"attention={attention!r}; valid: {', '.join(IMPLEMENTATIONS)} or "
                          "None (SDPA unless a pattern or score site is hooked)")
    if attention == "sdpa" and pattern:
        raise ConfigError(f"attention='sdpa' with pattern site {pattern[0]!r}: SDPA computes "
                          "no pattern; use attention='eager' or None")
    return attention


def current(model) -> str:
    """The implementation the model's passes run now (``"sdpa"`` inside :func:`use`)."""
    return "sdpa" if getattr(model.bridge, "_thinklens_sdpa", False) else "eager"


@contextmanager
def use(model, implementation: str) -> Iterator[None]:
    """Run the passes of the ``with`` block with ``implementation``; restored in ``finally``."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"attention implementation {implementation!r}; valid: "
                          f"{', '.join(IMPLEMENTATIONS)}")
    bridge = model.bridge
    if implementation == "eager" or getattr(bridge, "_thinklens_sdpa", False):
        yield
        return
    configs = _hf_configs(bridge)
    before = [c._attn_implementation for c in configs]
    patched = [a for a in _attention_components(bridge) if _supported(a)]
    try:
        for c in configs:
            c._attn_implementation = "sdpa"
        for layer, a in enumerate(_attention_components(bridge)):
            if a in patched:  # the component's __setattr__ would pass "forward" on to HF's module
                object.__setattr__(a, "forward", _bound(a, layer, bridge))
        bridge._thinklens_sdpa = True
        yield
    finally:
        bridge._thinklens_sdpa = False
        for a in patched:
            a.__dict__.pop("forward", None)
        for c, b in zip(configs, before):
            c._attn_implementation = b


def observable(model) -> bool:
    """Whether an :func:`observe` callback sees every layer (every component is reproduced)."""
    comps = _attention_components(model.bridge)
    return bool(comps) and all(_supported(a) for a in comps)


@contextmanager
def observe(model, fn: Callable[..., torch.Tensor | None] | None, *,
            output: bool = False) -> Iterator[None]:
    """Call ``fn(layer, q_rot, k_rot, mask, scale)`` in each SDPA attention forward of the block.

    With ``output=True`` it is called ``fn(layer, q_rot, k_rot, mask, scale, v)`` (``v``
    ``[batch, kv_head, k_pos, d_head]``, not expanded) and returns the attention output
    ``[batch, head, q_pos, d_head]``, which replaces the SDPA call (one pass over QKᵀ
    gives both the output and the observer's statistics). Takes effect in passes run
    under :func:`use` with ``"sdpa"``; removed in ``finally``. ``fn=None`` observes nothing.
    """
    bridge = model.bridge
    before = getattr(bridge, "_thinklens_qk", None)
    object.__setattr__(bridge, "_thinklens_qk", None if fn is None else (fn, output))
    try:
        yield
    finally:
        object.__setattr__(bridge, "_thinklens_qk", before)


def _hf_configs(bridge) -> list[Any]:
    hf = bridge.original_model
    out = []
    for m in hf.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation") and all(c is not o for o in out):
            out.append(c)
    return out


def _attention_components(bridge) -> list[Any]:
    return [b.attn for b in getattr(bridge, "blocks", []) if hasattr(b, "attn")]


def _supported(attn) -> bool:
    """Whether :func:`_sdpa_forward` reproduces this component's forward exactly."""
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge as Base,
    )

    cls = type(attn)
    hf = attn.original_component
    if not isinstance(attn, Base) or hf is None or attn.training:
        return False
    if cls.forward is not Base.forward or cls._pre_output_projection is not Base._pre_output_projection:
        return False
    if any(bool(getattr(attn.config, f, False)) for f in _FLAGS):
        return False
    rope = getattr(getattr(hf, "config", None), "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
        return False
    if any(getattr(hf, n, None) is not None for n in ("key_multiplier", "attn_logit_softcapping",
                                                      "sinks")):
        return False
    if getattr(getattr(hf, "config", None), "clip_qkv", None) is not None:
        return False
    gate = attn._modules.get("gate")
    if gate is not None and gate.original_component is not None:
        return False
    return attn._qk_norm_phase in (None, "post_reshape")


def _bound(attn, layer: int, bridge):
    def forward(*args, **kwargs):
        return _sdpa_forward(attn, *args, layer=layer, owner=bridge, **kwargs)
    return forward


def _sdpa_forward(self, *args: Any, layer: int = -1, owner: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The bridge's attention forward (standard path) with SDPA at its core.

    An :func:`observe` callback gets ``(layer, q, k, mask, scale)`` before the SDPA call.
    """
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        get_rotary_pct_from_config,
    )
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    hf_attn: Any = self.original_component
    head_dim = hf_attn.head_dim
    pe = kwargs.get("position_embeddings")
    if not (isinstance(pe, tuple) and len(pe) == 2 and pe[0].shape[-1] == head_dim
            and get_rotary_pct_from_config(self.config) == 1.0):
        return type(self).forward(self, *args, **kwargs)  # not the path reproduced here
    if "hidden_states" in kwargs:
        hidden_states = kwargs.pop("hidden_states")
    else:
        hidden_states, args = args[0], args[1:]
    kwargs.pop("position_embeddings")
    attention_mask = kwargs.pop("attention_mask", None)

    hidden_states = self.hook_in(hidden_states)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, head_dim)
    q = self.q(hidden_states).view(hidden_shape).transpose(1, 2)
    k = self.k(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v(hidden_states).view(hidden_shape).transpose(1, 2)
    if "q_norm" in self.submodules and self._qk_norm_phase == "post_reshape":
        if self._qk_norm_per_head:
            q = self.hook_q_normed(self.q_norm(q.transpose(1, 2)).transpose(1, 2))
            if "k_norm" in self.submodules:
                k = self.hook_k_normed(self.k_norm(k.transpose(1, 2)).transpose(1, 2))
        else:
            q = self.hook_q_normed(self.q_norm(q))
            if "k_norm" in self.submodules:
                k = self.hook_k_normed(self.k_norm(k))
    cos, sin = self._apply_position_embedding_hooks(pe)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if hasattr(self, "hook_rot_q"):
        q = self.hook_rot_q(q)
    if hasattr(self, "hook_rot_k"):
        k = self.hook_rot_k(k)
    k, v = self._update_kv_cache(k, v, **kwargs)
    q_len, kv_len = q.shape[-2], k.shape[-2]
    mask = attention_mask
    if mask is None and 1 < q_len < kv_len:  # cached keys: causal from the bottom-right
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
    if mask is not None:
        mask = mask[..., -q_len:, :kv_len]
        if mask.is_floating_point():
            mask = mask.to(q.dtype)
    observer = getattr(owner, "_thinklens_qk", None)
    scale = getattr(hf_attn, "scaling", head_dim ** -0.5)
    out = None
    if observer is not None:
        fn, gives_output = observer
        out = fn(layer, q, k, mask, scale, v) if gives_output else fn(layer, q, k, mask, scale)
    if out is None:
        groups = getattr(hf_attn, "num_key_value_groups", 1)
        if groups > 1:  # grouped-query attention: as the bridge does, one K/V copy per head
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and q_len == kv_len and q_len > 1,
            scale=scale)
    out = out.transpose(1, 2).contiguous().reshape(*input_shape, -1)
    o_weight = getattr(getattr(getattr(self, "o", None), "original_component", None), "weight", None)
    if isinstance(o_weight, torch.Tensor) and o_weight.dtype.is_floating_point and \
            out.dtype != o_weight.dtype:
        out = out.to(o_weight.dtype)
    return self.hook_out(self.o(out)), None


__all__ = ["IMPLEMENTATIONS", "choose", "current", "use", "observe", "observable"]
