"""GGUF files: converted once into a cached safetensors folder; a tokenizer from a header alone.

**Cached conversion** (:func:`cached_folder`). transformers reads a ``.gguf`` file by
de-quantizing every tensor to float, which costs tens of seconds on each load (25-39 s for
SmolLM2-135M on 2 CPU cores). So :func:`thinklens.load` converts a file once:

1. Hash the file (SHA-256, first 16 hex digits), so a changed file is never served stale.
2. If ``CACHE/gguf/<hash>-<dtype>/`` holds a finished conversion (its ``done.json``), use
   it: an ordinary Hugging Face folder (``config.json``, ``model.safetensors``, the
   tokenizer and its chat template) that loads in seconds.
3. Else load the file with transformers' GGUF reader, ``save_pretrained`` the model (in
   the requested dtype) and tokenizer into a temporary folder and rename it into place
   (a killed conversion leaves no half folder).

``CACHE`` is ``$THINKLENS_CACHE`` if set, else ``~/.cache/thinklens``; clear it with
``rm -rf ~/.cache/thinklens/gguf`` (each entry is about the de-quantized model's size:
540 MB for SmolLM2-135M in float32). ``THINKLENS_GGUF_CACHE=0`` loads the file directly.

**Tokenizer from a header** (:func:`header_tokenizer`). A GGUF file starts with a
key/value header that holds the whole tokenizer (``tokenizer.ggml.*``) and the chat
template; the head of a split or partly downloaded file is enough. The ``gguf`` package's
reader refuses a truncated file, so:

1. Parse the key/value section by hand (:func:`read_header`; GGUF v2/v3 layout).
2. Write those keys into a new GGUF file with no tensors (``gguf.GGUFWriter``) and let
   transformers convert it (``AutoTokenizer.from_pretrained(folder, gguf_file=...)``).
3. Make it faithful: that conversion keeps some control tokens under a byte-level
   spelling (``<ï½ľUserï½ľ>`` for ``<｜User｜>``) and does not register them as special, so
   ``<｜User｜>`` would be split into pieces and BOS would get a new id. Every token that
   ``tokenizer.ggml.token_type`` marks as control (3) or user-defined (4) gets its real
   text back at its own id in the vocabulary and is listed as an added token with that id
   (special, except ``<think>``/``</think>``, which stay ordinary text the model writes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from thinklens.errors import ModelLoadError

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
_STRING, _ARRAY = 8, 9
_CONTROL, _USER = 3, 4  # tokenizer.ggml.token_type values of tokens that need their own id
_PLAIN_TEXT = ("<think>", "</think>")  # added tokens the model writes as ordinary text


def cache_root() -> Path:
    """``$THINKLENS_CACHE`` or ``~/.cache/thinklens``: where converted GGUF folders live."""
    return Path(os.environ.get("THINKLENS_CACHE") or Path.home() / ".cache" / "thinklens")


def file_hash(path: str | os.PathLike[str]) -> str:
    """First 16 hex digits of the file's SHA-256 (read in 8 MB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()[:16]


def cached_folder(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, *,
                  before_converting: Callable[[], None] | None = None) -> Path:
    """The Hugging Face folder converted from the ``.gguf`` at ``path`` (made on first use).

    Example::

        folder = cached_folder("SmolLM2-135M-Instruct.Q4_1.gguf")
        folder.name              # 'a3f1...-float32': the file's hash and the dtype
        # a second call returns at once; thinklens.load(gguf) loads this folder

    ``before_converting`` runs only when the file is not converted yet (e.g. a check of
    its architecture, which costs seconds of header parsing).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    dt = str(dtype).removeprefix("torch.")
    target = _target(path, dtype)
    if (target / "done.json").is_file():
        return target
    if before_converting is not None:
        before_converting()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        folder, name = str(path.parent), path.name
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        # the weights are de-quantized floats: saved as such, not as a "GGUF-quantized" model
        hf.hf_quantizer = None
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "done.json").write_text(json.dumps({"source": str(path.resolve()),
                                                   "dtype": dt}))
        if target.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _target(path: Path, dtype: torch.dtype) -> Path:
    return cache_root() / "gguf" / f"{file_hash(path)}-{str(dtype).removeprefix('torch.')}"


def converted_folder(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
                     ) -> Path | None:
    """The folder :func:`cached_folder` made from ``path`` in ``dtype``, or None (nothing is
    converted here): what an engine that reads no GGUF (vLLM) loads instead."""
    target = _target(Path(path), dtype)
    return target if (target / "done.json").is_file() else None


def use_cache() -> bool:
    """False when ``THINKLENS_GGUF_CACHE=0``: load ``.gguf`` files directly."""
    return os.environ.get("THINKLENS_GGUF_CACHE", "1") not in ("0", "false", "no")


def read_header(path: str | os.PathLike[str]) -> dict[str, tuple[int, Any, int | None]]:
    """``{key: (value type, value, array item type or None)}`` of a GGUF file's header.

    Reads only the key/value section, so the head of a file is enough.
    """
    with open(path, "rb") as f:
        def take(fmt: str, n: int = 1) -> Any:
            size = struct.calcsize(fmt) * n
            raw = f.read(size)
            if len(raw) < size:
                raise ModelLoadError(f"{str(path)!r} ends inside its GGUF header; give a "
                                     "larger part of the file")
            out = struct.unpack(f"<{n}{fmt}", raw)
            return out[0] if n == 1 else list(out)

        def text() -> str:
            return f.read(take("Q")).decode("utf-8")

        def value(kind: int) -> Any:
            if kind == _STRING:
                return text()
            if kind in _SCALAR:
                return take(_SCALAR[kind])
            raise ModelLoadError(f"{str(path)!r}: GGUF value type {kind} is not known")

        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{str(path)!r} is not a GGUF file (no 'GGUF' magic)")
        version = take("I")
        if version not in (2, 3):
            raise ModelLoadError(f"{str(path)!r}: GGUF version {version}; versions 2 and 3 "
                                 "are read")
        take("Q")  # tensor count
        out: dict[str, tuple[int, Any, int | None]] = {}
        for _ in range(take("Q")):
            key, kind = text(), take("I")
            if kind != _ARRAY:
                out[key] = (kind, value(kind), None)
                continue
            item, n = take("I"), take("Q")
            items = take(_SCALAR[item], n) if item in _SCALAR and n else \
                [value(item) for _ in range(n)]
            out[key] = (kind, items if isinstance(items, list) else [items], item)
        return out


def _tensorless_gguf(header: dict[str, tuple[int, Any, int | None]], file: Path) -> None:
    import gguf

    arch = header["general.architecture"][1]
    w = gguf.GGUFWriter(str(file), arch)
    for key, (kind, val, item) in header.items():
        if key != "general.architecture":  # the writer adds it from ``arch``
            w.add_key_value(key, val, gguf.GGUFValueType(kind),
                            sub_type=None if item is None else gguf.GGUFValueType(item))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def header_tokenizer(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """Build the tokenizer in the GGUF header of ``path`` and save it into ``folder``.

    Example::

        folder = header_tokenizer("r1-distill-head.gguf", "cache/r1-tokenizer")
        tok = AutoTokenizer.from_pretrained(folder)
        tok.convert_tokens_to_ids("<｜User｜>")     # 151644: its own id, one token

    Returns ``folder`` (``tokenizer.json``, ``tokenizer_config.json`` with the chat template).
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    header = read_header(path)
    tokens = header.get("tokenizer.ggml.tokens", (0, [], None))[1]
    if not tokens:
        raise ModelLoadError(f"{str(path)!r}: the GGUF header holds no tokenizer "
                             "(tokenizer.ggml.tokens)")
    types = header.get("tokenizer.ggml.token_type", (0, [1] * len(tokens), None))[1]
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        _tensorless_gguf(header, Path(tmp) / "header.gguf")
        converted = AutoTokenizer.from_pretrained(tmp, gguf_file="header.gguf")
    spec = json.loads(converted.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    extra = [i for i, k in enumerate(types) if k in (_CONTROL, _USER)]
    for i in extra:  # the real text at the token's own id, never a byte-level spelling
        old = by_id.get(i)
        if old is not None and old != tokens[i]:
            del vocab[old]
        vocab[tokens[i]] = i
    spec["added_tokens"] = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": tokens[i] not in _PLAIN_TEXT}
        for i in extra]
    backend = Tokenizer.from_str(json.dumps(spec))
    ids = {k: header[f"tokenizer.ggml.{k}_token_id"][1] for k in ("bos", "eos", "padding")
           if f"tokenizer.ggml.{k}_token_id" in header}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[ids["bos"]] if "bos" in ids else None,
        eos_token=tokens[ids["eos"]] if "eos" in ids else None,
        pad_token=tokens[ids["padding"]] if "padding" in ids else None,
        chat_template=header.get("tokenizer.chat_template", (0, None, None))[1])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    # no unknown token unless the header names one: else a model-type tokenizer class
    # (Qwen2Tokenizer) adds its default "<|endoftext|>" as a new token past the vocabulary
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    unk = header.get("tokenizer.ggml.unknown_token_id")
    cfg["unk_token"] = tokens[unk[1]] if unk is not None else None
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return folder


__all__ = ["cache_root", "cached_folder", "converted_folder", "file_hash", "header_tokenizer", "read_header",
           "use_cache"]
