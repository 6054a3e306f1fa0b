"""The :class:`Model` wrapper: config, tokenizer, chat template, sites, ``think``, ``capture``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from thinklens.errors import ConfigError
from thinklens.hooks.capture import capture as _capture
from thinklens.hooks.generate import generate_many
from thinklens.hooks.rollouts import rollouts as _rollouts
from thinklens.hooks.sites import canonical_sites, resolve_sites
from thinklens.hooks.task import Task, task_for
from thinklens.hooks.trace import tokenizer_fingerprint


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a model, in TransformerLens's vocabulary."""

    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int


class Model:
    """A loaded model. Build it with :func:`thinklens.load`.

    Attributes: ``name``, ``revision``, ``bridge`` (TransformerLens ``TransformerBridge``),
    ``hf`` (the Hugging Face model inside), ``tokenizer``, ``config``
    (:class:`ModelConfig`), ``device``, ``dtype``, ``site_names``, ``task`` (the model's
    own task from :mod:`thinklens.hooks.task`, or ``None``), ``segmenter`` and
    ``annotator`` (how thinking is split into sentences and tagged; the task's, else
    ``None`` = thinklens's defaults), ``source`` (the folder, ``.gguf`` file or hub name
    the weights were loaded from; ``None`` for a Model built in memory).
    """

    default_engine: str = "hf"  # the engine think/think_batch/rollouts use unless told
    engine_options: dict | None = None  # passed to the vLLM engine (tensor_parallel_size, ...)

    def __init__(self, *, name: str, bridge, tokenizer, revision: str | None = None,
                 segmenter: Callable | None = None, annotator: Callable | None = None,
                 task: Task | None = None, source: str | None = None):
        self.name = name
        self.source = source
        self.revision = revision
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.task = task if task is not None else task_for(bridge.original_model.config)
        self.segmenter = segmenter or (self.task.segmenter if self.task else None)
        self.annotator = annotator or (self.task.annotator if self.task else None)
        self.site_names, self._spelling = canonical_sites(bridge)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({self.name!r}, {c.architecture}, layers={c.n_layers}, heads={c.n_heads}"
                f"/{c.n_kv_heads} kv, d_model={c.d_model}, device={self.device}, dtype={self.dtype})")

    @property
    def hf(self):
        return self.bridge.original_model

    @cached_property
    def config(self) -> ModelConfig:
        c = self.bridge.cfg
        hf_cfg = self.hf.config
        n_kv = getattr(c, "n_key_value_heads", None) or getattr(hf_cfg, "num_key_value_heads",
                                                               None) or c.n_heads
        arch = (getattr(hf_cfg, "architectures", None) or [type(self.hf).__name__])[0]
        return ModelConfig(architecture=arch, n_layers=c.n_layers, n_heads=c.n_heads,
                           n_kv_heads=int(n_kv), d_model=c.d_model, d_head=c.d_head,
                           d_mlp=int(c.d_mlp or 0), d_vocab=c.d_vocab, n_ctx=c.n_ctx)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    @cached_property
    def tokenizer_id(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)

    def sites(self, patterns: str | Sequence[str]) -> list[str]:
        """Hook names or globs -> site names, e.g. ``model.sites("blocks.*.hook_resid_post")``."""
        return resolve_sites(patterns, self.site_names, self._spelling)

    # ---- text ---------------------------------------------------------------------------
    def render_prompt(self, prompt: str) -> str:
        """The prompt with the chat template applied and the generation prompt added."""
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be a string, got {type(prompt).__name__}")
        if not self.chat_template:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def think(self, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
              top_p: float = 1.0, seed: int | None = None, meta: dict | None = None,
              engine: str | None = None, thinking: str = "auto"):
        """Generate a reasoning trace for ``prompt`` (chat template applied).

        Example::

            trace = model.think("a = 7 ; b = a + 2 ; ? b", max_new_tokens=64)
            trace.thinking_text   # 'b = a + 2 . a = 7 . b = 7 + 2 = 9 .'
            trace.answer_text     # '9'

        ``engine``: ``"hf"`` (plain Hugging Face decoding on the model's weights) or
        ``"vllm"``; default ``model.default_engine``. Inside ``model.hooks`` (or
        ``probes.steer``) the ``"hf"`` engine decodes through the bridge, so the hooks
        apply. ``thinking``: ``"tags"``, ``"answer"`` or ``"auto"``, see
        :func:`thinklens.hooks.trace.build_trace`. Greedy at ``temperature=0``.
        """
        return self.think_batch([prompt], max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, seed=seed, meta=meta,
                                engine=engine, thinking=thinking)[0]

    def think_batch(self, prompts: Sequence[str], *, max_new_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int | Sequence[int] | None = None,
                    meta: dict | None = None, batch_size: int = 64,
                    progress: bool | None = None, engine: str | None = None,
                    thinking: str = "auto", n: int = 1):
        """:meth:`think` for several prompts, batched (left padding; mixed lengths share a
        batch). Prompt ``i`` with ``seed=s`` gives what ``think(prompts[i], seed=s + i)``
        gives, token for token. ``n`` > 1 samples each prompt ``n`` times from one prefix
        (``len(prompts) * n`` traces, prompt-major, ``meta["sample"]`` = j)::

            traces = model.think_batch(["a = 7 ; b = a + 2 ; ? b"], n=100, temperature=1.0)
        """
        return generate_many(self, list(prompts), max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, seed=seed, meta=meta,
                             batch_size=batch_size, progress=progress, engine=engine,
                             thinking=thinking, n=n)

    def rollouts(self, trace, *, at: Any = "all", n: int = 10, temperature: float = 0.7,
                 top_p: float = 1.0, max_new_tokens: int = 256, engine: str | None = None,
                 seed: int = 0, answer: Callable | None = None, reference: str | None = None,
                 journal: Any = None, budget: float | None = None,
                 progress: bool | None = None):
        """Regenerate ``trace`` ``n`` times from each cut point (``at``: sentence indices,
        ``"all"``, or ``{"tokens": [...]}``) and score the answers; see
        :func:`thinklens.hooks.rollouts.rollouts`.

        Example::

            ro = model.rollouts(trace, at=[0, 2], n=50, temperature=1.0, max_new_tokens=48)
            ro[1].counts, ro[1].accuracy, ro[1].interval   # sentence 2 resampled
        """
        return _rollouts(self, trace, at=at, n=n, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens, engine=engine, seed=seed,
                         answer=answer, reference=reference, journal=journal, budget=budget,
                         progress=progress)

    # ---- capture ------------------------------------------------------------------------
    def capture(self, traces, *, sites=(), positions: Any = "all", attention: Any = None,
                dtype: Any = None, store: Any = None, batch_size: int = 8,
                budget: Any = None, progress: bool | None = None):
        """Record activations of ``traces``; see :func:`thinklens.hooks.capture.capture`."""
        return _capture(self, traces, sites=sites, positions=positions, attention=attention,
                       dtype=dtype, store=store, batch_size=batch_size, budget=budget,
                       progress=progress)

    @contextlib.contextmanager
    def hooks(self, fwd: Sequence[tuple[str, Callable]] = (),
              bwd: Sequence[tuple[str, Callable]] = ()) -> Iterator[Model]:
        """Add hooks for the duration of a ``with`` block; removed in ``finally``.

        Example::

            with model.hooks([("blocks.1.hook_resid_post", fn)]):
                model.bridge(tokens)
        """
        fwd = [(self._spelling.get(n, n), f) for n, f in fwd]
        bwd = [(self._spelling.get(n, n), f) for n, f in bwd]
        for n, _ in [*fwd, *bwd]:
            self.sites(n)  # validates, with a did-you-mean
        try:
            with self.bridge.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
                yield self
        finally:
            # the bridge wires per-block helper hooks during a forward pass and unwires
            # them at its end; a pass cut short by an exception would leave them behind
            for block in getattr(self.bridge, "blocks", []):
                if hasattr(block, "_teardown_capture_hooks"):
                    block._teardown_capture_hooks()

    def close(self) -> None:
        """Shut down the generation engines this Model started (vLLM's processes).

        The Model stays usable; an engine asked for again starts anew. Engines are also
        shut down when the Model is garbage-collected and at interpreter exit.
        """
        for engine in self.__dict__.pop("_engines", {}).values():
            engine.close()

    def n_hooks(self) -> int:
        """Hooks attached to the model's hook points (0 outside a ``hooks`` block).

        Counts the PyTorch hooks on every TransformerLens hook point, where thinklens and
        users attach theirs; transformers' and the bridge's own internal module hooks are
        not counted.
        """
        points = {id(p): p for p in self.bridge.hook_dict.values()}.values()
        return sum(len(p._forward_hooks) + len(p._forward_pre_hooks) + len(p._backward_hooks)
                   for p in points)


__all__ = ["ModelConfig", "Model"]
