"""Generation of reasoning traces (``Model.think``): template, sample, build a Trace.

Prompts whose rendered token length is equal run as one batch, so no padding enters
generation and every trace is exactly what a one-by-one call gives.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm

from thinklens.errors import ConfigError
from thinklens.hooks.trace import build_trace


def generate_many(model, prompts: list[str], *, max_new_tokens: int, temperature: float,
                  seed: int | None, meta: dict | None, batch_size: int = 64,
                  progress: bool | None = None) -> list:
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}; must be >= 1")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature}; must be >= 0 (0 = greedy)")
    rendered = [model.render_prompt(p) for p in prompts]
    ids = [model.encode(r) for r in rendered]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, seq in enumerate(ids):
        groups[len(seq)].append(i)
    tok = model.tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    completions: dict[int, list[int]] = {}
    chunks = [g[j: j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]
    show = progress if progress is not None else len(prompts) > 8
    hf = model.hf
    with torch.random.fork_rng(devices=[] if model.device.type == "cpu" else [model.device]):
        if seed is not None:
            torch.manual_seed(seed)
        for chunk in tqdm(chunks, desc="think", disable=not show):
            x = torch.tensor([ids[i] for i in chunk], device=model.device)
            kw = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens,
                  "pad_token_id": pad, "eos_token_id": eos,
                  "attention_mask": torch.ones_like(x)}
            if temperature > 0:
                kw.update(temperature=temperature, top_k=0, top_p=1.0)
            else:
                kw.update(temperature=None, top_k=None, top_p=None)
            with torch.no_grad():
                out = hf.generate(x, **kw)
            for row, i in zip(out[:, x.shape[1]:].tolist(), chunk):
                if eos in row:
                    row = row[: row.index(eos) + 1]
                completions[i] = row
    info = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
            **(meta or {})}
    return [build_trace(tok, prompt=p, rendered_prompt=r, completion_ids=completions[i],
                        model_name=model.name, segmenter=model.segmenter,
                        annotator=model.annotator, meta=dict(info))
            for i, (p, r) in enumerate(zip(prompts, rendered))]


__all__ = ["generate_many"]
