"""Load any causal LM into one wrapper: a TransformerLens 4.x ``TransformerBridge`` inside.

1. Resolve the spec: a registered name (``"organism"``: bundled weights, registered by the
   zoo through :mod:`thinklens.hooks.task`), a local folder, a ``.gguf`` file
   (transformers' GGUF loader de-quantizes to float, once: the result is cached as a
   safetensors folder keyed by the file's hash, :mod:`thinklens.hooks.gguf`), or a Hugging
   Face name.
2. Load the Hugging Face model and tokenizer ourselves (eager attention, so attention
   patterns exist; ``trust_remote_code`` off unless asked).
3. Check the architecture is one the bridge supports, then
   ``TransformerBridge.boot_transformers(name, hf_model=..., tokenizer=...)``.
4. Wrap it in a :class:`~thinklens.hooks.wrapper.Model`, which finds the model's task
   (``model.task``) in the registry and keeps where the weights came from
   (``model.source``: the folder, file or hub name, for engines that load them again).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from thinklens.errors import ConfigError, ModelLoadError, UnsupportedArchitectureError, did_you_mean
from thinklens.hooks.dtypes import parse_dtype
from thinklens.hooks.engine import check_engine
from thinklens.hooks.gguf import cached_folder, use_cache
from thinklens.hooks.task import model_folder, registered_models
from thinklens.hooks.wrapper import Model


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _hf_load(spec: str, *, dtype, device_map, revision, trust_remote_code):
    """(hf_model, tokenizer, name) for a folder, a .gguf file or a hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    model_kw: dict[str, Any] = {"dtype": dtype or torch.float32,
                                "attn_implementation": "eager", **common}
    if device_map is not None:
        model_kw["device_map"] = device_map
    path = Path(spec).expanduser()
    looks_local = spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist; give an existing folder "
                             "with config.json, a .gguf file, a Hugging Face name, or 'organism'")
    try:
        if spec.endswith(".gguf"):
            if use_cache():  # converted once into a safetensors folder (hooks/gguf.py)
                folder = cached_folder(path, model_kw["dtype"], before_converting=lambda:
                                       _check_arch_name(_gguf_arch(path), spec))
                tok = AutoTokenizer.from_pretrained(str(folder), **common)
                hf = AutoModelForCausalLM.from_pretrained(str(folder), **model_kw)
                return hf, tok, path.stem
            _check_arch_name(_gguf_arch(path), spec)
            folder, file = str(path.parent), path.name
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=file, **common)
            hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, **model_kw)
            return hf, tok, path.stem
        src = str(path) if path.exists() else spec
        if path.exists() and not (path / "config.json").exists():
            raise ModelLoadError(f"folder {src!r} has no config.json; it is not a Hugging Face "
                                 "model folder (save one with model.save_pretrained(folder))")
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(src, revision=revision, **common)
        _check_arch_name(_arch_of(cfg), spec)
        tok = AutoTokenizer.from_pretrained(src, revision=revision, **common)
        hf = AutoModelForCausalLM.from_pretrained(src, revision=revision, **model_kw)
        return hf, tok, spec
    except (OSError, ValueError) as err:
        if isinstance(err, ModelLoadError):
            raise
        raise ModelLoadError(
            f"could not load {spec!r}: {err}. If it is a Hugging Face name, this machine may "
            "have no access to the hub: download it elsewhere and pass the local folder."
        ) from err


def _arch_of(cfg) -> str:
    archs = getattr(cfg, "architectures", None)
    if archs:
        return archs[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.model_type, type(cfg).__name__)


def _gguf_arch(path: Path) -> str:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    info = load_gguf_checkpoint(str(path), return_tensors=False)
    arch = info["config"].get("model_type", "unknown")
    return {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}.get(arch, arch)


def supported_architectures() -> list[str]:
    from transformer_lens.factories.architecture_adapter_factory import (
        SUPPORTED_ARCHITECTURES,
    )
    return sorted(SUPPORTED_ARCHITECTURES)


def _check_arch_name(arch: str, spec: str) -> None:
    known = supported_architectures()
    if arch not in known:
        raise UnsupportedArchitectureError(
            f"{spec!r} is a {arch!r} model, which TransformerLens's bridge does not support. "
            f"Supported causal LMs include: {', '.join(a for a in known if 'CausalLM' in a)[:600]}…")


def _bridge(name: str, hf, tok, *, device, dtype, device_map):
    from transformer_lens.model_bridge import TransformerBridge

    # the bridge re-loads a tokenizer from its name unless told it already adds BOS;
    # hand it our tokenizer as it is (thinklens tokenizes with add_special_tokens=False)
    tok.init_kwargs.setdefault("name_or_path", name)
    tok.init_kwargs["add_bos_token"] = True
    kw: dict[str, Any] = {"hf_model": hf, "tokenizer": tok, "dtype": dtype}
    if device_map is None:
        kw["device"] = device
    bridge = TransformerBridge.boot_transformers(name, **kw)
    bridge.eval()
    return bridge


def load(spec: str | Path = "organism", *, device: str | None = None,
         dtype: str | torch.dtype | None = None, device_map: Any = None,
         revision: str | None = None, checkpoint: int | None = None,
         trust_remote_code: bool = False, engine: str = "hf",
         engine_options: dict | None = None):
    """Load a model: ``"organism"``, a folder, a ``.gguf`` file, or a Hugging Face name.

    Example::

        model = thinklens.load("organism")            # bundled, no download
        model.config.n_layers, model.config.d_model     # (4, 128)
        trace = model.think("a = 7 ; b = a + 2 ; ? b")

    ``engine``: the generation engine ``think``/``think_batch``/``rollouts`` use unless told
    (``"hf"`` or ``"vllm"``); ``engine_options``: passed to the vLLM engine when it starts
    (``tensor_parallel_size``, ``pipeline_parallel_size``, ``gpu_memory_utilization``,
    ``max_model_len``, ...; see :mod:`thinklens.hooks.engine_vllm`).
    """
    spec = str(spec)
    check_engine(engine)
    if engine_options is not None and not isinstance(engine_options, dict):
        raise ConfigError(f"engine_options={engine_options!r}; give a dict such as "
                          "{'tensor_parallel_size': 2}")
    names = registered_models()
    torch_dtype = parse_dtype(dtype)
    if device is not None and device_map is not None:
        raise ConfigError("give device or device_map, not both (device_map places the layers "
                          "across devices, e.g. device_map='auto')")
    device = device or (None if device_map is not None else _default_device())
    if checkpoint is not None and spec not in names:
        raise ConfigError(f"checkpoint={checkpoint} applies only to the bundled models "
                          f"({', '.join(names)}); for other models pass revision=")
    if spec not in names and "/" not in spec and not Path(spec).exists() and \
            did_you_mean(spec, names):
        raise ModelLoadError(f"no model {spec!r}.{did_you_mean(spec, names)} Give a bundled "
                             f"model ({', '.join(names)}), a Hugging Face name such as "
                             "'deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B', a folder or a .gguf")
    if spec in names:
        folder = model_folder(spec, checkpoint)
        hf, tok, _ = _hf_load(str(folder), dtype=torch_dtype, device_map=device_map,
                              revision=None, trust_remote_code=False)
        name = spec if checkpoint is None else f"{spec}@{checkpoint}"
        source = str(folder)
    else:
        hf, tok, name = _hf_load(spec, dtype=torch_dtype, device_map=device_map,
                                 revision=revision, trust_remote_code=trust_remote_code)
        path = Path(spec).expanduser()
        source = str(path.resolve()) if path.exists() else spec
    if device_map is None:
        hf = hf.to(device)
    hf.eval()
    bridge = _bridge(name, hf, tok, device=device, dtype=torch_dtype or next(hf.parameters()).dtype,
                     device_map=device_map)
    model = Model(name=name, bridge=bridge, tokenizer=tok, revision=revision, source=source)
    model.default_engine, model.engine_options = engine, dict(engine_options or {})
    return model


__all__ = ["load", "supported_architectures"]
