"""Blockwise attention with sentence key weights (sentence attribution without ``[T, T]``).

References: (1) the eager path itself — ``softmax(q kᵀ·scale + mask)`` with
:func:`~thinklens.circuits.anchors_attribution.interp_hooks`' own hook applied to the
pattern, then ``@ v`` — values and every gradient (1e-6, relative 1e-6 for ``u``: the hook computes its factor
in float32 even for float64 patterns; float32 inputs 1e-5);
(2) ``torch.autograd.gradcheck`` (float64 central differences) at ``u = 0``, where
attribution takes its gradient, and of ``u`` anywhere (the path is linear in ``u``);
(3) ``sentence_attribution`` through the bridge's eager patterns, on three architectures
(GQA Qwen2, QK-norm Qwen3, the organism's Llama): both modes, 1e-4 on log-odds; with
the blocks recomputed in the backward pass (``checkpoint=True``), 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from thinklens import Trace, circuits
from thinklens.circuits import anchors_attribution as att_mod
from thinklens.errors import ConfigError
from thinklens.hooks.weighted_attention import rows_for, weighted_attention

SENT = torch.tensor([3, 0, 0, 0, 1, 1, 3, 2, 2, 2, 3])  # 3 sentences, 3 tokens outside
T, S = 11, 3


def _eager(q, k, v, u, mask, below, scale=0.5):
    """The eager path: the full pattern, interp_hooks' hook on it, times v."""
    s = q @ k.transpose(-1, -2) * scale
    if mask is None:
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    elif mask.dtype == torch.bool:
        s = s.masked_fill(~mask, float("-inf"))
    else:
        s = s + mask
    p = s.softmax(-1)

    class _Cfg:
        n_layers = 1

    class _Model:
        config = _Cfg()
    (_, hook), = att_mod.interp_hooks(_Model(), u, SENT, below=below)
    return hook(p, None) @ v


def _inputs(dtype, seed=0, batch=2, heads=3, d=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, T, d, generator=g, dtype=dtype, requires_grad=True)
            for _ in range(3)]


def _masks(dtype):
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    ragged = causal[None, None].repeat(2, 1, 1, 1)
    ragged[1, :, :, :2] = False            # row 1 of the batch: two left-padded keys
    ragged[1, :, :2, 0] = True             # (its first rows still see something)
    additive = torch.zeros(1, 1, T, T, dtype=dtype).masked_fill(~causal, -1e9)
    return [None, ragged, additive]


@pytest.mark.parametrize("below", [None, 6])
@pytest.mark.parametrize("mask_kind", [0, 1, 2])
@pytest.mark.parametrize("rows", [3, 64])   # several blocks / one block
def test_values_and_gradients_equal_the_eager_path(below, mask_kind, rows):
    q, k, v = _inputs(torch.float64)
    mask = _masks(torch.float64)[mask_kind]
    for u0 in (torch.zeros(S), torch.tensor([0.3, 0.0, 0.7])):
        u = u0.double().requires_grad_(True)
        out = weighted_attention(q, k, v, u, SENT, scale=0.5, mask=mask, below=below,
                                 rows_per_block=rows)
        ref = _eager(q, k, v, u, mask, below)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        w = torch.randn_like(out)
        got = torch.autograd.grad((out * w).sum(), (q, k, v, u))
        want = torch.autograd.grad((ref * w).sum(), (q, k, v, u))
        for name, a, b in zip("qkvu", got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=f"d{name}")


def test_gradcheck_at_u_zero_and_in_u():
    q, k, v = _inputs(torch.float64, batch=1, heads=2)
    u = torch.zeros(S, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, u):
        return weighted_attention(q, k, v, u, SENT, scale=0.5, below=8, rows_per_block=4)
    assert torch.autograd.gradcheck(fn, (q, k, v, u))
    frozen = [x.detach() for x in (q, k, v)]
    u = torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: fn(*frozen, u), (u,))


def test_float32_keeps_its_dtype_and_matches():
    q, k, v = _inputs(torch.float32)
    u = torch.zeros(S, requires_grad=True)
    out = weighted_attention(q, k, v, u, SENT, scale=0.5, rows_per_block=5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _eager(q, k, v, u, None, None), atol=1e-5, rtol=0)
    (du,) = torch.autograd.grad(out.square().sum(), u)
    (ref,) = torch.autograd.grad(_eager(q, k, v, u, None, None).square().sum(), u)
    torch.testing.assert_close(du, ref, atol=1e-4, rtol=1e-4)


def test_block_rows():
    assert rows_for(1, 9, 16384) == 85          # 48 MiB / (9 heads x 16k keys x 4 bytes)
    assert rows_for(1, 9, 10**7) == 16          # at least 16 rows
    assert rows_for(2, 1, 10) > 10              # short: one block


PROMPT = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"
COMPLETION = ("c = b + 4 . b = a - 2 . a = 7 . b = 7 - 2 = 5 . c = 5 + 4 = 9 . "
              "</think> 9 <eos>")


@pytest.fixture(params=["qwen2", "qwen3", "organism"])
def arch(request):
    return request.getfixturevalue(request.param)


def test_attribution_blockwise_equals_eager(arch):
    trace = Trace.from_text(arch, PROMPT, COMPLETION)
    assert att_mod.attention_for(arch, None) == "blockwise"
    for mode in ("linear", "mixed"):
        eager = circuits.sentence_attribution(arch, trace, mode=mode, attention="eager")
        block = circuits.sentence_attribution(arch, trace, mode=mode)
        assert block.baseline == pytest.approx(eager.baseline, abs=1e-4)
        torch.testing.assert_close(block.thinking_part, eager.thinking_part, atol=1e-4,
                                   rtol=1e-3)
        torch.testing.assert_close(block.estimate, eager.estimate, atol=1e-4, rtol=1e-3)
        assert block.thinking_part.abs().max() > 1e-3   # not a vacuous comparison
        for attention, ref in (("blockwise", block), ("eager", eager)):  # blocks recomputed
            again = circuits.sentence_attribution(arch, trace, mode=mode, attention=attention,
                                                  checkpoint=True)
            torch.testing.assert_close(again.estimate, ref.estimate, atol=1e-5, rtol=0)


def test_hooks_on_the_model_select_eager(organism):
    with organism.hooks([("blocks.0.hook_resid_pre", lambda x, hook: x)]):
        assert att_mod.attention_for(organism, None) == "eager"
        with pytest.raises(ConfigError, match="no hooks attached"):
            att_mod.attention_for(organism, "blockwise")
    with pytest.raises(ConfigError, match="attention='sdpa'; valid: blockwise, eager"):
        circuits.sentence_attribution(organism, Trace.from_text(organism, PROMPT, COMPLETION),
                                      attention="sdpa")
