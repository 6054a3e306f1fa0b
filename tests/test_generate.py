"""Model.think: template, greedy generation (with KV cache) equals step-by-step argmax."""

from __future__ import annotations

import torch

import thinklens


def _greedy_no_cache(model, prompt: str, n: int) -> list[int]:
    ids = model.encode(model.render_prompt(prompt))
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model.bridge(torch.tensor([ids + out]))  # full recompute, no cache
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt == model.tokenizer.eos_token_id:
            break
    return out


def test_think_matches_uncached_greedy(qwen2):
    # a transformers/bridge version mismatch once broke the KV cache silently
    prompt = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"
    trace = qwen2.think(prompt, max_new_tokens=12)
    n_prompt = len(qwen2.encode(qwen2.render_prompt(prompt)))
    assert trace.token_ids[n_prompt:] == _greedy_no_cache(qwen2, prompt, 12)
    assert trace.prompt == prompt and trace.meta["max_new_tokens"] == 12


def test_template_opens_think_in_prompt(qwen2):
    trace = qwen2.think("a = 1 ; ? a", max_new_tokens=5)
    assert qwen2.render_prompt("a = 1 ; ? a").endswith("<think>")
    assert trace.tokens[trace.prompt_span.end - 1] == "<think>"
    assert trace.think_span.start == trace.prompt_span.end
    assert trace.truncated  # random weights never close their thinking in 5 tokens
    assert len(trace) == trace.prompt_span.end + 5


def test_sampling_is_seeded_and_leaves_global_rng_alone(qwen2):
    state = torch.random.get_rng_state().clone()
    a = qwen2.think("a = 1 ; ? a", max_new_tokens=8, temperature=1.0, seed=3)
    b = qwen2.think("a = 1 ; ? a", max_new_tokens=8, temperature=1.0, seed=3)
    assert a.token_ids == b.token_ids
    assert torch.equal(state, torch.random.get_rng_state())


def test_batch_equals_single(qwen2):
    prompts = ["a = 1 ; ? a", "b = 2 ; ? b", "c = a + 1 ; a = 2 ; ? c"]
    batch = qwen2.think_batch(prompts, max_new_tokens=6)
    for p, t in zip(prompts, batch):
        assert t.token_ids == qwen2.think(p, max_new_tokens=6).token_ids


def test_bad_generation_args(qwen2):
    import pytest

    from thinklens.errors import ConfigError
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        qwen2.think("a = 1 ; ? a", max_new_tokens=0)
    with pytest.raises(ConfigError, match="temperature=-1"):
        qwen2.think("a = 1 ; ? a", temperature=-1)
    assert thinklens.Trace is type(qwen2.think("a = 1 ; ? a", max_new_tokens=1))
