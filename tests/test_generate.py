"""Model.think on the default ("hf") engine: plain HF decoding on the bridge's own weights.

References: step-by-step argmax over the bridge with no cache (greedy), one-by-one calls
with the same seeds (sampling, batching, padding), softmax of the bridge's logits (the
sampled distribution), and the bridge's hooks (generation inside ``model.hooks``).
"""

from __future__ import annotations

import pytest
import torch
from _typecheck import unchecked

import thinklens
from thinklens.errors import ConfigError
from thinklens.hooks.engine import Request, Sampling
from thinklens.hooks.engine_hf import HFEngine, plain_model
from thinklens.hooks.generate import engine_for, generate_ids
from thinklens.zoo.evaluate import heldout_problems


def _greedy_no_cache(model, prompt: str, n: int, hooks=()) -> list[int]:
    ids = model.encode(model.render_prompt(prompt))
    out = []
    for _ in range(n):
        with torch.no_grad(), model.hooks(hooks):
            logits = model.bridge(torch.tensor([ids + out]))  # full recompute, no cache
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt == model.tokenizer.eos_token_id:
            break
    return out


def _mixed_prompts():
    """Organism prompts of depths 1-4 (distractors on): several prompt lengths."""
    return [p.prompt for d in (1, 2, 3, 4) for p in heldout_problems(d, 3, seed=31)]


def test_think_matches_uncached_greedy(qwen2):
    # a transformers/bridge version mismatch once broke the KV cache silently
    prompt = "c = b + 4 ; a = 7 ; b = a - 2 ; ? c"
    trace = qwen2.think(prompt, max_new_tokens=12)
    n_prompt = len(qwen2.encode(qwen2.render_prompt(prompt)))
    assert trace.token_ids[n_prompt:] == _greedy_no_cache(qwen2, prompt, 12)
    assert trace.prompt == prompt and trace.meta["max_new_tokens"] == 12
    assert trace.meta["engine"] == "hf" and engine_for(qwen2).net()[1]  # the plain tree ran


def test_organism_greedy_matches_uncached_and_stops_at_eos(organism):
    prompt = heldout_problems(3, 1, seed=5)[0].prompt
    trace = organism.think(prompt, max_new_tokens=80)
    n_prompt = trace.prompt_span.end
    ref = _greedy_no_cache(organism, prompt, 80)
    assert trace.token_ids[n_prompt:] == ref
    eos = organism.tokenizer.eos_token_id
    assert ref[-1] == eos and eos not in ref[:-1] and len(ref) < 80  # stopped at eos
    assert trace.meta["finished"] is True and not trace.truncated


def test_plain_model_shares_the_bridges_weights(organism, qwen3):
    for model in (organism, qwen3):     # qwen3: tied embeddings, q/k norms
        hf = model.hf
        plain = engine_for(model).plain
        assert plain is not None and plain is not hf
        ours: dict = {}  # the bridge's parameters under their plain HF names
        for n, p in hf.named_parameters(remove_duplicate=False):
            ours.setdefault(n.replace("._original_component", ""), p)
        theirs = dict(plain.named_parameters(remove_duplicate=False))
        assert set(theirs) <= set(ours) and len(theirs) >= 2 * model.config.n_layers
        for n, p in theirs.items():
            assert p.data_ptr() == ours[n].data_ptr() and p is ours[n], n
        kinds = {type(m).__name__ for m in plain.modules()}
        assert not any("Bridge" in k or k == "HookPoint" for k in kinds), kinds
        assert plain.config._attn_implementation == "sdpa"
        assert hf.config._attn_implementation == "eager"  # the bridge's tree is untouched
    with torch.no_grad():  # same function as the bridge: logits agree
        ids = torch.tensor([organism.encode(organism.render_prompt("a = 1 ; ? a"))])
        torch.testing.assert_close(plain_model(organism.hf)(ids).logits, organism.bridge(ids),
                                   atol=1e-4, rtol=0)


def test_batch_equals_single(qwen2):
    prompts = ["a = 1 ; ? a", "b = 2 ; ? b", "c = a + 1 ; a = 2 ; ? c"]  # two lengths
    batch = qwen2.think_batch(prompts, max_new_tokens=6)
    for p, t in zip(prompts, batch):
        assert t.token_ids == qwen2.think(p, max_new_tokens=6).token_ids


def test_left_padded_batch_of_mixed_lengths_equals_one_by_one_on_the_organism(organism):
    prompts = _mixed_prompts()
    lengths = {len(organism.encode(organism.render_prompt(p))) for p in prompts}
    assert len(lengths) >= 4  # one padded batch of several lengths
    batch = organism.think_batch(prompts, max_new_tokens=72)
    singles = [organism.think(p, max_new_tokens=72) for p in prompts]
    assert [t.token_ids for t in batch] == [t.token_ids for t in singles]
    assert sum(t.meta["finished"] for t in batch) >= len(prompts) - 1  # real, eos-ended traces


@pytest.mark.parametrize("temperature, top_p", [(3.0, 1.0), (4.0, 0.9)])  # it is confident
def test_sampled_batch_equals_one_by_one_with_the_same_seeds(organism, temperature, top_p):
    prompts = _mixed_prompts()
    kw = {"max_new_tokens": 48, "temperature": temperature, "top_p": top_p}
    batch = organism.think_batch(prompts, seed=11, batch_size=5, **kw)  # 3 mixed batches
    singles = [organism.think(p, seed=11 + i, **kw) for i, p in enumerate(prompts)]
    assert [t.token_ids for t in batch] == [t.token_ids for t in singles]
    assert len({tuple(t.token_ids) for t in batch}) == len(prompts)
    greedy = organism.think_batch(prompts, max_new_tokens=48)
    assert [t.token_ids for t in greedy] != [t.token_ids for t in batch]  # it sampled


def test_n_samples_of_one_prefix_equal_the_same_samples_alone(qwen2):
    """A request with n rows (one prefill, cache expanded) = the rows run one per batch."""
    ids = [qwen2.encode(qwen2.render_prompt(p)) for p in ("a = 1 ; ? a", "c = a + 1 ; ? c")]
    reqs = [Request(ids[0], n=5, seed=3), Request(ids[1], n=3, seed=4)]
    s = Sampling(max_new_tokens=10, temperature=1.0)
    together = generate_ids(qwen2, reqs, s)
    alone = generate_ids(qwen2, reqs, s, batch_size=1)
    assert [[c.ids for c in r] for r in together] == [[c.ids for c in r] for r in alone]
    assert len({tuple(c.ids) for c in together[0]}) > 1  # the samples differ


def test_think_batch_n_samples_equal_the_engines_samples_of_one_request(organism):
    """think_batch(prompts, n=k): prompt i's samples are Request(prefix, n=k, seed=s+i)'s."""
    prompts = ["a = 7 ; b = a + 2 ; ? b", "c = 5 ; d = c - 1 ; ? d"]
    kw = {"max_new_tokens": 24, "temperature": 3.0}
    traces = organism.think_batch(prompts, n=4, seed=5, **kw)
    assert len(traces) == 8 and [t.meta["sample"] for t in traces] == [0, 1, 2, 3] * 2
    assert [t.prompt for t in traces] == [prompts[0]] * 4 + [prompts[1]] * 4
    for i, p in enumerate(prompts):
        ids = organism.encode(organism.render_prompt(p))
        [want] = generate_ids(organism, [Request(ids, n=4, seed=5 + i)], Sampling(**kw))
        got = traces[4 * i: 4 * i + 4]
        assert [t.token_ids[len(ids):] for t in got] == [c.ids for c in want]
    assert len({tuple(t.token_ids) for t in traces[:4]}) > 1  # they are samples
    with pytest.raises(ConfigError, match="n=0; give the number of samples"):
        organism.think_batch(prompts, n=0)
    with pytest.raises(ConfigError, match="n=3 samples at temperature=0"):
        organism.think_batch(prompts, n=3)


def test_load_sets_the_default_engine_and_its_options(organism):
    m = thinklens.load("organism", engine="vllm", engine_options={"max_model_len": 512})
    assert m.default_engine == "vllm" and m.engine_options == {"max_model_len": 512}
    assert organism.default_engine == "hf" and not organism.engine_options
    with unchecked(), pytest.raises(ConfigError, match=r"engine='vlm'; valid: 'hf', 'vllm'"):
        thinklens.load("organism", engine="vlm")
    with unchecked(), pytest.raises(ConfigError, match="engine_options=3; give a dict"):
        thinklens.load("organism", engine_options=3)


def test_first_token_follows_the_models_distribution(qwen2):
    """2,000 samples of the first token vs softmax(bridge logits / T), within top-p."""
    ids = qwen2.encode(qwen2.render_prompt("a = 1 ; ? a"))
    with torch.no_grad():
        logits = qwen2.bridge(torch.tensor([ids]))[0, -1].double()
    n = 2000
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.8)):
        [got] = generate_ids(qwen2, [Request(ids, n=n, seed=0)],
                             Sampling(max_new_tokens=1, temperature=temperature, top_p=top_p))
        counts = torch.bincount(torch.tensor([c.ids[0] for c in got]),
                                minlength=len(logits)).double()
        p = torch.softmax(logits / temperature, -1)
        sp, order = p.sort(descending=True)
        keep = order[(sp.cumsum(0) - sp) < top_p]
        want = torch.zeros_like(p)
        want[keep] = p[keep] / p[keep].sum()
        assert counts[want == 0].sum() == 0  # nothing outside the nucleus
        # 4.5 binomial standard deviations per token
        sd = (want * (1 - want) / n).sqrt()
        assert ((counts / n - want).abs() <= 4.5 * sd + 1e-9).all()


def test_stop_ids_and_cut_off_thinking(qwen2, organism):
    ids = qwen2.encode(qwen2.render_prompt("a = 1 ; ? a"))
    [[free]] = generate_ids(qwen2, [Request(ids)], Sampling(max_new_tokens=8))
    assert not free.finished and len(free.ids) == 8  # cut at the limit
    k = 3
    stop = free.ids[k]
    first = free.ids.index(stop)
    [[cut]] = generate_ids(qwen2, [Request(ids)], Sampling(max_new_tokens=8, stop_ids=(stop,)))
    assert cut.ids == free.ids[:first + 1] and cut.finished
    trace = organism.think(heldout_problems(4, 1, seed=5)[0].prompt, max_new_tokens=4)
    assert trace.truncated and trace.meta["finished"] is False
    assert len(trace) == trace.prompt_span.end + 4


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
    assert a.token_ids == b.token_ids and a.meta["seed"] == 3
    assert torch.equal(state, torch.random.get_rng_state())
    torch.manual_seed(5)  # seed=None: drawn from torch's global generator
    c = qwen2.think("a = 1 ; ? a", max_new_tokens=8, temperature=1.0)
    torch.manual_seed(5)
    assert qwen2.think("a = 1 ; ? a", max_new_tokens=8, temperature=1.0).token_ids == c.token_ids


def test_generation_inside_hooks_runs_them(organism):
    """Inside model.hooks the engine decodes through the bridge: the hook fires at every
    step and the tokens equal uncached argmax over the bridge with the same hook."""
    prompt = heldout_problems(2, 1, seed=8)[0].prompt
    v = 6.0 * torch.randn(organism.config.d_model, generator=torch.Generator().manual_seed(0))
    calls = []

    def push(x, hook):
        calls.append(x.shape[1])
        return x + v

    hooks = [("blocks.1.hook_resid_post", push)]
    with organism.hooks(hooks):
        assert not engine_for(organism).net()[1]  # the bridged tree
        steered = organism.think(prompt, max_new_tokens=24)
    n_prompt = steered.prompt_span.end
    new = steered.token_ids[n_prompt:]
    assert calls[0] == n_prompt and calls[1:] == [1] * (len(new) - 1)  # KV cache, every step
    assert new == _greedy_no_cache(organism, prompt, 24, hooks)
    assert new != organism.think(prompt, max_new_tokens=24).token_ids[n_prompt:]
    assert organism.n_hooks() == 0 and engine_for(organism).net()[1]


def test_progress_bar_shows_tokens_per_second(qwen2, capsys):
    qwen2.think_batch(["a = 1 ; ? a"] * 3, max_new_tokens=4, progress=True)
    err = capsys.readouterr().err
    assert "tok/s" in err and "generate (hf)" in err


def test_bad_generation_args(qwen2):
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        qwen2.think("a = 1 ; ? a", max_new_tokens=0)
    with pytest.raises(ConfigError, match="temperature=-1"):
        qwen2.think("a = 1 ; ? a", temperature=-1)
    for top_p in (0.0, 1.5):
        with pytest.raises(ConfigError, match=rf"top_p={top_p}.*\(0, 1\]"):
            qwen2.think("a = 1 ; ? a", temperature=1.0, top_p=top_p)
    with unchecked(), pytest.raises(ConfigError, match=r"engine='sglang'; valid: 'hf', 'vllm'"):
        qwen2.think("a = 1 ; ? a", engine="sglang")
    ids = qwen2.encode(qwen2.render_prompt("a = 1 ; ? a"))
    with unchecked(), pytest.raises(ConfigError, match="n=0"):
        generate_ids(qwen2, [Request(ids, n=0)], Sampling(max_new_tokens=2))
    with pytest.raises(ConfigError, match="batch_size=0"):
        qwen2.think_batch(["a = 1 ; ? a"], batch_size=0)
    with qwen2.hooks([("blocks.0.hook_resid_post", lambda x, hook: x)]), \
            pytest.raises(ConfigError, match="engine='vllm' cannot run the 1 hook"):
        qwen2.think("a = 1 ; ? a", engine="vllm")
    assert isinstance(engine_for(qwen2), HFEngine) and engine_for(qwen2) is engine_for(qwen2)
    assert thinklens.Trace is type(qwen2.think("a = 1 ; ? a", max_new_tokens=1))


def test_smollm2_plain_path_matches_the_bridge(smollm):
    """A real GGUF chat model (tied embeddings): greedy = uncached argmax over the bridge."""
    prompt = "What is 2 + 3?"
    trace = smollm.think(prompt, max_new_tokens=6)
    assert engine_for(smollm).net()[1]  # decoded on the plain tree
    assert trace.token_ids[trace.prompt_span.end:] == _greedy_no_cache(smollm, prompt, 6)
    plain = engine_for(smollm).plain
    emb = plain.get_input_embeddings().weight
    assert emb.data_ptr() == smollm.hf.get_input_embeddings().weight.data_ptr()
