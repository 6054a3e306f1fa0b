"""Resumable, journaled capture: think on prompts and store their activations, surviving kills.

:func:`run_capture` turns ``(id, prompt)`` records into a :class:`~thinklens.hooks.store.Store`
in rounds of ``chunk`` prompts. A rerun after a kill (``SIGKILL`` included) redoes no
finished work:

1. **What is done.** The store at ``out`` (if any) lists the trace ids it holds; those
   prompts are skipped.
2. **What was generated.** ``out/pending-traces.jsonl`` (the journal) holds traces that
   were generated but not yet stored, one JSON line each. A kill in the middle of a line
   leaves a torn tail; it is cut off (:func:`drop_torn_tail`) before anything is appended,
   so the next line does not bury it, and that one trace is generated again.
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

Test hook: with ``THINKLENS_TEST_KILL_AT="STEP:N"`` in the environment the process kills
itself (``SIGKILL``) the N-th time it reaches the named step — ``journaled`` (a round's
traces are in the journal, not yet stored) or ``capture-chunk`` (a round is stored) — so
tests interrupt a run at exactly that point, whatever the machine's load.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from thinklens.errors import ConfigError
from thinklens.hooks.store import Store
from thinklens.hooks.trace import Trace

PENDING = "pending-traces.jsonl"  # traces generated but not yet captured (the journal)
KILL_AT = "THINKLENS_TEST_KILL_AT"
_reached: Counter[str] = Counter()


def _kill_point(step: str) -> None:
    """Test hook: SIGKILL this process at the N-th ``step`` if ``$THINKLENS_TEST_KILL_AT`` is
    ``"step:N"``; does nothing otherwise."""
    want = os.environ.get(KILL_AT)
    if not want:
        return
    _reached[step] += 1
    name, _, count = want.rpartition(":")
    if name == step and count.isdigit() and _reached[step] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)


def read_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    """The JSON value of every non-blank line of ``path``; a torn (unparsable) last line is
    dropped, a bad line elsewhere raises :class:`~thinklens.errors.ConfigError`."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
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
    """
    if not Path(path).exists():
        raise ConfigError(f"prompts file {str(path)!r} does not exist; give a JSONL file with "
                          'one {"prompt": "..."} object per line')
    out, seen = [], set()
    for n, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f"{path}: line {n} has no string 'prompt' key: {row!r}")
        pid = str(row.get("id") or hashlib.sha256(row["prompt"].encode()).hexdigest()[:16])
        if pid in seen:
            raise ConfigError(f"{path}: line {n} repeats id {pid!r}; ids must be unique")
        seen.add(pid)
        out.append((pid, row["prompt"], row))
    return out


def _drop_torn_tail(path: Path) -> None:
    """Cut a JSONL file after its last complete line (what a killed writer left)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def _journal(path: Path, traces: Sequence[Trace]) -> None:
    """Append traces to the journal, one line each, fsynced before returning."""
    with open(path, "a") as f:
        for tr in traces:
            f.write(json.dumps(tr.to_dict()) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_capture(model: Any, records: Sequence[tuple[str, str]], out: str | os.PathLike[str], *,
                sites: Sequence[str], positions: Any = "all", attention: Any = None,
                max_new_tokens: int = 256, temperature: float = 0.0, seed: int | None = 0,
                batch_size: int = 8, generate_batch_size: int = 64, dtype: Any = None,
                budget: Any = None, chunk: int = 32, progress: bool = True,
                log: Callable[[str], None] | None = None) -> Store:
    """Think on every ``(id, prompt)`` not yet stored and capture it into the store at ``out``.

    Example::

        store = run_capture(model, [("p0", "a = 7 ; ? a")], "runs/s",
                            sites=["blocks.*.hook_resid_post"], max_new_tokens=64)
        store.trace_ids                 # ['p0']; a rerun returns at once

    ``batch_size`` is the capture's forward batch, ``generate_batch_size`` generation's;
    ``chunk`` prompts make one resumable round (see the module docstring). ``log``, if
    given, receives one line per round.
    """
    out = Path(out)
    if chunk < 1:
        raise ConfigError(f"chunk={chunk}; must be at least 1 (prompts per round)")
    out.mkdir(parents=True, exist_ok=True)
    keys = model.sites(sites) if sites else []
    store = Store.open(out, verify="size") if (out / "manifest.json").exists() else None
    done = set(store.trace_ids) if store is not None else set()
    journal = out / PENDING
    pending: dict[str, Trace] = {}
    if journal.exists():
        _drop_torn_tail(journal)  # a kill mid-line; appending after it would bury it
        for row in read_jsonl(journal):
            pending[row["meta"]["id"]] = Trace.from_dict(row)
    todo = [(pid, p) for pid, p in records if pid not in done]
    bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="prompts",
               unit="prompt", disable=not progress)
    for start in range(0, len(todo), chunk):
        part = todo[start: start + chunk]
        fresh = [(pid, p) for pid, p in part if pid not in pending]
        if fresh:
            made = model.think_batch([p for _, p in fresh], max_new_tokens=max_new_tokens,
                                     temperature=temperature, seed=seed,
                                     batch_size=generate_batch_size, progress=False)
            for (pid, _), tr in zip(fresh, made):
                tr.meta["id"] = pid
                pending[pid] = tr
            _journal(journal, made)
        _kill_point("journaled")
        store = model.capture([pending[pid] for pid, _ in part], sites=keys,
                              positions=positions, attention=attention, dtype=dtype,
                              store=store if store is not None else out,
                              batch_size=batch_size, budget=budget, progress=False)
        _kill_point("capture-chunk")
        bar.update(len(part))
        if log is not None:
            log(f"stored {len(store)} of {len(records)} traces in {out} "
                f"({len(fresh)} generated this round)")
    bar.close()
    if store is None:
        store = Store.open(out, verify="size")
    if journal.exists() and all(pid in store for pid in pending):
        journal.unlink()
    return store


__all__ = ["read_jsonl", "read_prompts", "run_capture"]
