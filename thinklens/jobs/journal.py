"""Resumable, journaled capture: think on prompts and store their activations, surviving kills.

:func:`run_capture` turns ``(id, prompt)`` records into a :class:`~thinklens.hooks.store.Store`
in rounds of ``chunk`` prompts. A rerun after a kill (``SIGKILL`` included) redoes no
finished work:

1. **What is done.** The store at ``out`` (if any) lists the trace ids it holds; those
   prompts are skipped.
2. **What was generated.** ``out/pending-traces.jsonl`` (the journal) holds traces that
   were generated but not yet stored, one JSON line each. A kill in the middle of a line
   leaves a torn tail; it is cut off (``hooks._fileio.read_jsonl(repair=True)``) before
   anything is appended, so the next line does not bury it, and that one trace is
   generated again. Before any of it, the arguments and an existing store's settings are
   checked (:mod:`thinklens.jobs.checks`): a rerun with other sites, positions or dtype
   is refused.
3. **Each round** takes the next ``chunk`` prompts not yet stored: the ones not in the
   journal are generated (:meth:`Model.think_batch`), appended to the journal and fsynced;
   then the round's traces are captured into the store as one atomic append (the store's
   own commit protocol, :mod:`thinklens.hooks.store`).
4. **At the end**, when every journaled trace is in the store, the journal is deleted.

So a kill during generation loses at most that round's generation; a kill during capture
loses at most that round's capture (its traces are in the journal).

Prompt files are JSONL: :func:`read_jsonl` reads any such file (a torn last line from a
killed writer is ignored), :func:`read_prompts` checks each row has a ``prompt`` and gives
each an id (its ``id`` key, or a hash of the prompt).

Test hook (:func:`thinklens.hooks._fileio.kill_point`): with
``THINKLENS_TEST_KILL_AT="STEP:N"`` in the environment the process kills itself
(``SIGKILL``) the N-th time it reaches the named step — ``journaled`` (a round's traces
are in the journal, not yet stored), ``capture-chunk`` (a round is stored), or
``think-round`` (a round of ``thinklens think`` is appended to its traces file) — so
tests interrupt a run at exactly that point, whatever the machine's load.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from thinklens.errors import ConfigError
from thinklens.hooks._fileio import KILL_AT, append_jsonl, kill_point
from thinklens.hooks._fileio import read_jsonl as read_journal
from thinklens.hooks.dtypes import parse_dtype
from thinklens.hooks.store import Store
from thinklens.hooks.trace import Trace

from .checks import check_capture_args, check_store

PENDING = "pending-traces.jsonl"  # traces generated but not yet captured (the journal)


def read_jsonl(path: str | os.PathLike[str], *, torn_ok: bool = True) -> list[Any]:
    """The JSON value of every non-blank line of ``path``; a torn (unparsable) last line is
    dropped when ``torn_ok`` (what a killed writer leaves), a bad line elsewhere raises
    :class:`~thinklens.errors.ConfigError` naming its line number."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if torn_ok and n == len(lines):
                break  # a torn last line from a killed writer
            raise ConfigError(f"{path}: line {n} is not JSON ({e}); each line must be one "
                              "JSON object") from e
    return rows


def read_prompts(path: str | os.PathLike[str]) -> list[tuple[str, str, dict]]:
    """``(id, prompt, row)`` for every line of a JSONL prompts file, in order.

    Example::

        read_prompts("p.jsonl")   # [("p0", "a = 7 ; ? a", {"id": "p0", "prompt": ...}), ...]

    ``row`` is the whole JSON object (extra keys are kept for ``field:KEY`` labels); the
    id is the row's ``id`` or, without one, the first 16 hex digits of the prompt's SHA-256.
    Every line is checked (a person wrote the file: no line is dropped as torn); a bad
    one is refused with its line number, and an empty file as empty.
    """
    if not Path(path).is_file():
        raise ConfigError(f"prompts file {str(path)!r} does not exist; give a JSONL file with "
                          'one {"prompt": "..."} object per line')
    out, seen = [], set()
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {n} is not JSON ({e}); each line must be one "
                              'object like {"id": "p0", "prompt": "..."}') from e
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f"{path}: line {n} has no string 'prompt' key: {row!r}; each "
                              'line must be one object like {"id": "p0", "prompt": "..."}')
        pid = str(row.get("id") or hashlib.sha256(row["prompt"].encode()).hexdigest()[:16])
        if pid in seen:
            raise ConfigError(f"{path}: line {n} repeats id {pid!r}; ids must be unique")
        seen.add(pid)
        out.append((pid, row["prompt"], row))
    if not out:
        raise ConfigError(f"prompts file {str(path)!r} is empty; give one "
                          '{"prompt": "..."} object per line')
    return out


def run_capture(model: Any, records: Sequence[tuple[str, str]], out: str | os.PathLike[str], *,
                sites: Sequence[str], positions: Any = "all", attention: Any = None,
                max_new_tokens: int = 256, temperature: float = 0.0, seed: int | None = 0,
                thinking: str = "auto", batch_size: int = 8, generate_batch_size: int = 64,
                dtype: Any = None,
                budget: Any = None, chunk: int = 32, progress: bool = True,
                log: Callable[[str], None] | None = None) -> Store:
    """Think on every ``(id, prompt)`` not yet stored and capture it into the store at ``out``.

    Example::

        store = run_capture(model, [("p0", "a = 7 ; ? a")], "runs/s",
                            sites=["blocks.*.hook_resid_post"], max_new_tokens=64)
        store.trace_ids                 # ['p0']; a rerun returns at once

    ``thinking`` is :func:`~thinklens.hooks.trace.build_trace`'s (``"auto"``, ``"tags"``,
    ``"answer"``). ``batch_size`` is the capture's forward batch, ``generate_batch_size``
    generation's;
    ``chunk`` prompts make one resumable round (see the module docstring). ``log``, if
    given, receives one line per round.
    """
    out = Path(out)
    check_capture_args(positions=positions, attention=attention, dtype=dtype, budget=budget,
                       batch_size=batch_size, chunk=chunk)
    keys = model.sites(sites) if sites else []
    # before any token is generated: a rerun with other settings is refused
    check_store(out, positions=positions, keys=keys, attention=attention,
                dtype=parse_dtype(dtype) or model.dtype)
    out.mkdir(parents=True, exist_ok=True)
    store = Store.open(out, verify="size") if (out / "manifest.json").exists() else None
    done = set(store.trace_ids) if store is not None else set()
    journal = out / PENDING
    pending: dict[str, Trace] = {}
    if journal.exists():  # repair: cut a line torn by a kill, or appending would bury it
        for row in read_journal(journal, repair=True):
            pending[row["meta"]["id"]] = Trace.from_dict(row)
    todo = [(pid, p) for pid, p in records if pid not in done]
    # each prompt's seed follows its line in the prompts file, not the round it lands in,
    # so a resumed sampled run generates what an uninterrupted one does
    line = {pid: k for k, (pid, _) in enumerate(records)}
    bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="prompts",
               unit="prompt", disable=not progress)
    try:  # the bar ends its line before an interrupt's message (cli.py) is printed
        for start in range(0, len(todo), chunk):
            part = todo[start: start + chunk]
            fresh = [(pid, p) for pid, p in part if pid not in pending]
            if fresh:
                made = model.think_batch([p for _, p in fresh], max_new_tokens=max_new_tokens,
                                         temperature=temperature, thinking=thinking,
                                         seed=None if seed is None else
                                         [seed + line[pid] for pid, _ in fresh],
                                         batch_size=generate_batch_size, progress=False)
                for (pid, _), tr in zip(fresh, made):
                    tr.meta["id"] = pid
                    pending[pid] = tr
                append_jsonl(journal, [tr.to_dict() for tr in made])
            kill_point("journaled")
            store = model.capture([pending[pid] for pid, _ in part], sites=keys,
                                  positions=positions, attention=attention, dtype=dtype,
                                  store=store if store is not None else out,
                                  batch_size=batch_size, budget=budget, progress=False)
            kill_point("capture-chunk")
            bar.update(len(part))
            if log is not None:
                log(f"stored {len(store)} of {len(records)} traces in {out} "
                    f"({len(fresh)} generated this round)")
    finally:
        bar.close()
    if store is None:
        store = Store.open(out, verify="size")
    if journal.exists() and all(pid in store for pid in pending):
        journal.unlink()
    return store


__all__ = ["read_jsonl", "read_prompts", "run_capture", "PENDING", "KILL_AT"]
