"""What every generation engine takes and returns: token ids in, token ids out.

thinklens generates with one of several engines behind the same calls (``think``,
``think_batch``, ``rollouts``): ``"hf"`` (:mod:`thinklens.hooks.engine_hf`, plain
Hugging Face decoding on the model's own weights) and ``"vllm"``
(:mod:`thinklens.hooks.engine_vllm`, the engine for scale). An engine never sees text:

1. The caller renders and tokenizes each prompt (or takes a trace's prefix) and sends one
   :class:`Request` per prefix: its token ids, how many samples, and a seed.
2. The engine returns, per request, ``n`` :class:`Completion`\\ s: the generated ids
   (the eos token included when it was generated) and whether generation stopped at eos.
3. The caller builds Traces from ``prefix + completion`` ids (never by re-tokenizing
   decoded text: decoding with ``skip_special_tokens`` would drop ``</think>``).

Seeds: sample ``j`` of a request with seed ``s`` is drawn from its own generator seeded
with :func:`sample_seed` ``(s, j)``, so a batch gives exactly what one-by-one calls give.
A request with ``seed=None`` draws from a fresh random seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from thinklens.errors import ConfigError

ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class Request:
    """One prefix to continue ``n`` times; ``prompt_ids`` holds every token before the first
    generated one (chat template, prompt, and any given part of the thinking).

    ``hidden``: positions of ``prompt_ids`` whose keys no query may attend to, in the
    prefix or while generating (attention suppression of a sentence, then continuing;
    the ``"hf"`` engine only). Positions are not renumbered: a hidden token keeps its
    position id, as with a key mask in the scores.
    """

    prompt_ids: list[int]
    n: int = 1
    seed: int | None = None
    hidden: tuple[int, ...] = ()


@dataclass(frozen=True)
class Completion:
    """Generated ids (eos included if generated); ``finished`` is False when cut at the limit."""

    ids: list[int]
    finished: bool


@dataclass(frozen=True)
class Sampling:
    """How to sample: ``temperature`` 0 is greedy; ``top_p`` 1.0 keeps every token."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r}; give an integer >= 1")
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature!r}; give a number >= 0 "
                              "(0 = greedy)")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p!r}; give a number in (0, 1]")


class Engine(Protocol):
    """A generation engine (see the module docstring)."""

    name: str

    def generate(self, requests: Sequence[Request], sampling: Sampling, *,
                 progress: bool | None = None) -> list[list[Completion]]:
        """``n`` completions per request, in request order."""
        ...

    def close(self) -> None:
        """Release what the engine holds (processes, caches)."""
        ...


def sample_seed(seed: int, j: int) -> int:
    """The seed of sample ``j`` of a request seeded ``seed`` (distinct for every (seed, j))."""
    return (int(seed) * 1_000_003 + int(j)) % (2**63 - 1)


def check_engine(name: Any) -> str:
    """``name`` if it is a known engine, else a ConfigError listing them."""
    if name not in ENGINES:
        raise ConfigError(f"engine={name!r}; valid: {', '.join(map(repr, ENGINES))}")
    return name


__all__ = ["ENGINES", "Request", "Completion", "Sampling", "Engine", "sample_seed",
           "check_engine"]
