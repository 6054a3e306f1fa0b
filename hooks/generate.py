"""Generation of reasoning traces (``Model.think``): render, tokenize, decode, build Traces.

1. Render each prompt with the chat template and tokenize it (no added special tokens).
2. Send one :class:`~thinklens.hooks.engine.Request` per prompt to the engine chosen by
   name (``engine=``, else the model's ``default_engine``, ``"hf"`` unless loaded
   otherwise): ``"hf"`` is :class:`~thinklens.hooks.engine_hf.HFEngine`, ``"vllm"`` is
   :class:`~thinklens.hooks.engine_vllm.VLLMEngine`. Engines are made once per Model and
   kept on it (``model._engines``).
3. Build each Trace from the prompt's ids and the completion's ids as generated, with
   ``finished`` telling whether generation stopped at eos or was cut at the limit.

Seeds: prompt ``i`` of ``think_batch(prompts, seed=s)`` is generated with seed ``s + i``,
so it equals ``think(prompts[i], seed=s + i)`` token for token (``seed`` may also be a
list, one seed per prompt); with ``n`` samples per
prompt, sample ``j`` of prompt ``i`` is drawn with ``sample_seed(s + i, j)`` from one
Request of ``n`` (the prompt is computed once, by either engine); ``seed=None`` draws each
prompt's seed from torch's global generator (``torch.manual_seed`` makes it
reproducible). Hooks: while hooks are attached (``model.n_hooks() > 0``) only the
``"hf"`` engine can run them; it then decodes through the bridge so they fire.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from thinklens.errors import ConfigError
from thinklens.hooks.engine import Completion, Request, Sampling, check_engine
from thinklens.hooks.engine_hf import HFEngine
from thinklens.hooks.engine_vllm import VLLMEngine
from thinklens.hooks.trace import build_trace


def engine_for(model: Any, engine: str | None = None) -> HFEngine | VLLMEngine:
    """The model's engine named ``engine`` (default: ``model.default_engine``), made once."""
    name = check_engine(engine if engine is not None else getattr(model, "default_engine", "hf"))
    engines = model.__dict__.setdefault("_engines", {})
    if name not in engines:
        options = dict(getattr(model, "engine_options", None) or {})
        engines[name] = HFEngine(model) if name == "hf" else VLLMEngine(model, **options)
    return engines[name]


def generate_ids(model: Any, requests: Sequence[Request], sampling: Sampling, *,
                 engine: str | None = None, progress: bool | None = None,
                 batch_size: int | None = None) -> list[list[Completion]]:
    """``requests[k].n`` completions per request from the named engine, in request order.

    Example::

        ids = model.encode(model.render_prompt("a = 7 ; ? a"))
        [[c0, c1]] = generate_ids(model, [Request(ids, n=2, seed=0)],
                                  Sampling(max_new_tokens=32, temperature=1.0))
        c0.ids, c0.finished      # generated ids (eos included), True if it stopped at eos

    ``batch_size``: rows per forward pass of the ``"hf"`` engine (vLLM schedules itself).
    """
    name = check_engine(engine if engine is not None else getattr(model, "default_engine", "hf"))
    if name != "hf" and model.n_hooks() > 0:
        raise ConfigError(f"engine={name!r} cannot run the {model.n_hooks()} hook(s) "
                          "attached to the model (steering, model.hooks); generate inside "
                          "them with engine='hf'")
    eng = engine_for(model, name)
    if isinstance(eng, HFEngine):
        return eng.generate(requests, sampling, progress=progress, batch_size=batch_size)
    return eng.generate(requests, sampling, progress=progress)


def generate_many(model: Any, prompts: list[str], *, max_new_tokens: int, temperature: float,
                  seed: int | Sequence[int] | None, meta: dict | None, batch_size: int = 64,
                  progress: bool | None = None, top_p: float = 1.0,
                  engine: str | None = None, thinking: str = "auto", n: int = 1) -> list:
    """``n`` Traces per prompt, prompt-major (module docstring); ``think_batch`` calls this."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n={n!r}; give the number of samples per prompt, an integer >= 1")
    if n > 1 and temperature == 0:
        raise ConfigError(f"n={n} samples at temperature=0 would all be the same greedy trace; "
                          "give temperature > 0, or n=1")
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    rendered = [model.render_prompt(p) for p in prompts]
    ids = [model.encode(r) for r in rendered]
    if seed is None:
        seeds = [int(torch.randint(2**62, ())) for _ in prompts]
    elif isinstance(seed, Sequence):  # one seed per prompt (a resumed job keeps each its own)
        if len(seed) != len(prompts) or not all(isinstance(s, int) for s in seed):
            raise ConfigError(f"seed has {len(seed)} entries for {len(prompts)} prompts; give "
                              "one integer seed, or one per prompt")
        seeds = [int(s) for s in seed]
    else:
        seeds = [int(seed) + i for i in range(len(prompts))]
    requests = [Request(x, n=n, seed=s) for x, s in zip(ids, seeds)]
    done = generate_ids(model, requests, sampling, engine=engine, progress=progress,
                        batch_size=batch_size)
    name = engine if engine is not None else getattr(model, "default_engine", "hf")
    info = {"max_new_tokens": max_new_tokens, "temperature": temperature, "engine": name,
            **({"top_p": top_p} if top_p != 1.0 else {}), **(meta or {})}
    return [build_trace(model.tokenizer, prompt=p, rendered_prompt=r, completion_ids=c.ids,
                        model_name=model.name, segmenter=model.segmenter,
                        annotator=model.annotator,
                        meta={**info, "seed": s, **({"sample": j} if n > 1 else {})},
                        thinking=thinking, finished=c.finished)
            for p, r, s, row in zip(prompts, rendered, seeds, done) for j, c in enumerate(row)]


__all__ = ["engine_for", "generate_ids", "generate_many"]
