"""Checks a capture job makes before any work: its arguments, and the store it resumes.

1. **Arguments** (:func:`check_capture_args`): positions, attention, dtype, budget, batch
   and round sizes, and the generation settings are checked before a model loads or a
   token is generated, so a typo costs nothing (before, ``--positions`` was checked only
   when the first round of traces was captured).
2. **The store it resumes** (:func:`check_store`): a store's activations are only
   comparable when every trace was captured with the same settings, so a rerun into an
   existing store with other ``sites`` (or attention), ``positions`` or ``dtype`` is
   refused, naming the stored and the requested settings. Sites and dtype are in the
   store's manifest; positions in ``capture.json`` beside it (:data:`SETTINGS`), written
   while the store is still empty. Settings bind only once something is stored: a run
   that failed before storing anything never blocks the corrected rerun.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from thinklens.errors import ConfigError, PositionError, did_you_mean
from thinklens.hooks._fileio import atomic_write_json
from thinklens.hooks.budget import parse_budget
from thinklens.hooks.dtypes import parse_dtype
from thinklens.hooks.positions import POSITION_SELECTORS
from thinklens.hooks.store import Store

SETTINGS = "capture.json"  # the positions a store's traces were captured at
SENTENCE_KEY = "sentence_attention"


def check_positions(positions: Any) -> None:
    """Refuse a positions argument that no trace could satisfy (a selector typo, a float)."""
    if isinstance(positions, str):
        if positions not in POSITION_SELECTORS:
            raise PositionError(f"unknown positions {positions!r}."
                                f"{did_you_mean(positions, POSITION_SELECTORS)} Valid: "
                                f"{', '.join(POSITION_SELECTORS)}, or a list of token indices")
        return
    values = positions if isinstance(positions, list | tuple) else None
    if values is None or not values or not all(isinstance(v, int) and not isinstance(v, bool)
                                                for v in values):
        if not isinstance(positions, torch.Tensor):  # tensors are checked per trace
            raise PositionError(f"positions={positions!r}; give one of "
                                f"{', '.join(POSITION_SELECTORS)} or a list of token indices")


def check_capture_args(*, positions: Any = "all", attention: Any = None, dtype: Any = None,
                       budget: Any = None, batch_size: int = 8, chunk: int = 32) -> None:
    """Every capture argument, checked before a model loads (ConfigError names the value)."""
    check_positions(positions)
    if attention not in (None, "sentence") and not isinstance(attention, list | tuple | dict):
        raise ConfigError(f"attention={attention!r}; give None, 'sentence' or [(layer, head)]")
    parse_dtype(dtype)
    if budget is not None:
        parse_budget(budget, torch.device("cpu"))
    for name, v in (("batch_size", batch_size), ("chunk", chunk)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}={v!r}; give an integer >= 1")


def _positions_key(positions: Any) -> Any:
    """The JSON form positions are recorded and compared in (None: not comparable)."""
    if isinstance(positions, str):
        return positions
    if isinstance(positions, list | tuple) and all(isinstance(v, int) for v in positions):
        return list(positions)
    return None


def check_store(out: str | os.PathLike[str], *, positions: Any, keys: list[str] | None = None,
                attention: Any = None, dtype: torch.dtype | None = None) -> None:
    """Refuse capturing into the store at ``out`` with other settings than it holds.

    Example::

        check_store("acts/", positions="thinking")           # before the model loads
        check_store("acts/", positions="thinking", keys=model.sites(sites),
                    attention="sentence", dtype=model.dtype)  # after: sites and dtype too

    Without a store at ``out`` (nothing stored yet) it records ``positions`` in
    ``out/capture.json`` (replacing what a failed run left) and returns.
    """
    out = Path(out)
    want = _positions_key(positions)
    if not (out / "manifest.json").is_file():
        if keys is not None and want is not None:  # about to store: record what binds
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / SETTINGS, {"positions": want})
        return
    changed = []
    file = out / SETTINGS
    had = json.loads(file.read_text()).get("positions") if file.is_file() else None
    if had is not None and want is not None and had != want:
        changed.append(f"positions: stored {had!r}, requested {want!r}")
    if keys is not None:
        store = Store.open(out, verify="none")
        if attention in (None, "sentence"):
            asked = [*keys, *([SENTENCE_KEY] if attention == "sentence" else [])]
            if set(asked) != set(store.sites):
                changed.append(f"sites: stored {store.sites}, requested {asked}")
        if dtype is not None and dtype != store.dtype:
            changed.append(f"dtype: stored {str(store.dtype).removeprefix('torch.')}, "
                           f"requested {str(dtype).removeprefix('torch.')}")
    if changed:
        raise ConfigError(f"the store at '{out}' was captured with other settings "
                          f"({'; '.join(changed)}); its traces would not be comparable. "
                          "Capture into a new --out folder, or rerun with the stored settings")


__all__ = ["SETTINGS", "check_capture_args", "check_positions", "check_store"]
