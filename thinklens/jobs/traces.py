"""Traces files: generate reasoning traces into JSON lines (resumable) and read them back.

``thinklens think`` is :func:`run_think`; ``thinklens capture --traces`` reads a file with
:func:`read_traces` and captures it without generating. Generating and capturing can so
run apart: traces made on a serving cluster (``--engine vllm``) are analysed anywhere.

A traces file holds one :meth:`Trace.to_dict <thinklens.hooks.trace.Trace.to_dict>` per
line. Each trace's ``meta`` names its prompt (``prompt_id``), its sample index
(``sample``), its own ``id`` (the prompt id; ``"{prompt_id}#{sample}"`` when there are
several samples per prompt) and the run's settings (``run``).

:func:`run_think`:

1. **Check the input before any model loads**: every prompts line is one JSON object with
   a string ``prompt`` (:func:`~thinklens.jobs.journal.read_prompts`; an empty file is
   refused); an existing ``out`` must hold traces of the same prompts made with the same
   settings (a torn last line, what a kill mid-write leaves, is cut off first).
2. **Seeds.** ``N`` samples of each prompt: sample ``j`` of the prompt on line ``k``
   (0-based) is generated with seed ``S + k·N + j``. With ``N = 1`` the file therefore
   holds what ``model.think_batch(prompts, seed=S)`` returns, and every trace is
   reproducible on its own, whatever was done before it.
3. **Rounds.** The (prompt, sample) pairs not yet in ``out`` are taken in seed order,
   ``chunk`` at a time; a round of consecutive seeds is one
   :meth:`~thinklens.hooks.wrapper.Model.think_batch` call. Its traces are appended to
   ``out`` and fsynced before the next round starts, so a kill loses at most the round in
   flight, and a rerun generates only the pairs not written.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from thinklens.errors import ConfigError, ThinklensError, ThinklensWarning
from thinklens.hooks._fileio import append_jsonl, kill_point
from thinklens.hooks.capture import trace_id
from thinklens.hooks.engine import Sampling, check_engine
from thinklens.hooks.trace import THINKING_MODES, Trace

# settings that must agree between a traces file and the run that resumes it
_SETTINGS = ("samples", "seed", "max_new_tokens", "temperature", "top_p", "thinking")


@dataclass
class ThinkResult:
    """What :func:`run_think` did: the traces file, its traces, how many this run wrote."""

    path: Path
    traces: list[Trace]
    written: int
    seconds: float


def read_traces(path: str | os.PathLike[str], *, repair: bool = False,
                allow_empty: bool = False) -> list[Trace]:
    """The traces of a JSON-lines traces file, in file order.

    Example::

        traces = read_traces("traces.jsonl")   # [Trace, ...], one per line
        model.capture(traces, sites="blocks.*.hook_resid_post")

    A line that is not JSON, or not a trace, is refused with its line number, as is an empty
    file (unless ``allow_empty``) and two traces with one id. An unfinished last line (no
    newline: a writer killed mid-line) is skipped with a :class:`ThinklensWarning`, or cut
    off the file with ``repair=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"traces file {str(path)!r} does not exist; make one with "
                          "`thinklens think --prompts P.jsonl --out traces.jsonl`")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    lines = data[:end].decode("utf-8").splitlines()
    torn = data[end:].decode("utf-8", errors="replace")
    if torn.strip():
        try:
            json.loads(torn)
            lines.append(torn)  # a complete last line that lacks only its newline
            torn = ""
        except json.JSONDecodeError:
            pass
    if torn.strip():
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        else:
            warnings.warn(ThinklensWarning(
                f"{str(path)!r}: line {len(lines) + 1} is unfinished (a writer killed "
                "mid-line) and is skipped; rerun `thinklens think` to complete the file"),
                stacklevel=2)
    traces: list[Trace] = []
    first_line: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            tr = Trace.from_json(line)
        except ThinklensError as e:
            raise ConfigError(f"{str(path)!r}: line {n} is not a trace ({e}); each line must "
                              "be one trace as `thinklens think` writes them "
                              "(json.dumps(trace.to_dict()))") from e
        tid = trace_id(tr)
        if tid in first_line:
            raise ConfigError(f"{str(path)!r}: line {n} repeats trace id {tid!r} of line "
                              f"{first_line[tid]}; every trace needs its own meta['id']")
        first_line[tid] = n
        traces.append(tr)
    if not traces and not allow_empty:
        raise ConfigError(f"traces file {str(path)!r} is empty; make traces with "
                          "`thinklens think --prompts P.jsonl --out traces.jsonl`")
    return traces


def check_think_args(*, samples: int, temperature: float, top_p: float, max_new_tokens: int,
                     seed: int, engine: str, thinking: str) -> dict[str, Any]:
    """The run's settings (kept in every trace's ``meta["run"]``), checked before a model
    loads; a ConfigError names the bad value and the fix."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples={samples!r}; give an integer >= 1 (traces per prompt)")
    if samples > 1 and temperature == 0:
        raise ConfigError(f"samples={samples} at temperature 0 would be {samples} identical "
                          "greedy traces; give a temperature > 0 (e.g. 0.7) or samples=1")
    if thinking not in THINKING_MODES:
        raise ConfigError(f"thinking={thinking!r}; valid: {', '.join(THINKING_MODES)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r}; give an integer")
    check_engine(engine)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    return {"samples": samples, "seed": seed, "max_new_tokens": sampling.max_new_tokens,
            "temperature": float(sampling.temperature), "top_p": float(sampling.top_p),
            "thinking": thinking}


def plan_think(records: Sequence[tuple[str, str]], out: Path, run: dict[str, Any]
               ) -> tuple[list[Trace], list[tuple[int, int]]]:
    """``(traces already in out, (line k, sample j) pairs still to generate)``; refuses a
    file made from other prompts or with other settings (module docstring, step 1)."""
    done = read_traces(out, repair=True, allow_empty=True) if out.exists() else []
    prompts = {pid: (k, p) for k, (pid, p) in enumerate(records)}
    have = set()
    for n, tr in enumerate(done, 1):
        got = tr.meta.get("run")
        pid, j = tr.meta.get("prompt_id"), tr.meta.get("sample")
        if not isinstance(got, dict) or pid is None or not isinstance(j, int):
            raise ConfigError(f"{str(out)!r}: trace {n} ({trace_id(tr)!r}) was not written by "
                              "`thinklens think` (no meta prompt_id/sample/run); give a new --out")
        diff = [f"{k}={got.get(k)!r} (now {run[k]!r})" for k in _SETTINGS if got.get(k) != run[k]]
        if diff:
            raise ConfigError(f"{str(out)!r} was made with {', '.join(diff)}; resume with the "
                              "same settings, or write to a new --out")
        if pid not in prompts or prompts[pid][1] != tr.prompt:
            raise ConfigError(f"{str(out)!r}: trace {n} is of prompt {pid!r}, which this "
                              "prompts file does not hold (or holds with other text); give "
                              "the prompts file it was made from, or a new --out")
        have.add((prompts[pid][0], j))
    todo = [(k, j) for k in range(len(records)) for j in range(run["samples"])
            if (k, j) not in have]
    return done, todo


def run_think(model: Any, records: Sequence[tuple[str, str]], out: str | os.PathLike[str], *,
              samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
              max_new_tokens: int = 256, seed: int = 0, engine: str | None = None,
              thinking: str = "auto", batch_size: int = 64, chunk: int = 64,
              progress: bool = True, log: Callable[[str], None] | None = None) -> ThinkResult:
    """Generate ``samples`` traces of every ``(id, prompt)`` into the traces file ``out``.

    Example::

        res = run_think(model, [("p0", "a = 7 ; ? a")], "traces.jsonl", max_new_tokens=64)
        res.traces[0].meta["id"], res.written       # 'p0', 1; a rerun writes 0

    See the module docstring for the seeds and the rounds; ``batch_size`` is generation's
    batch, ``chunk`` the pairs of one durable round.
    """
    t0 = time.time()
    out = Path(out)
    engine = engine if engine is not None else getattr(model, "default_engine", "hf")
    run = check_think_args(samples=samples, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, seed=seed, engine=engine,
                           thinking=thinking)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk={chunk!r}; give an integer >= 1 (traces per saved round)")
    done, todo = plan_think(records, out, run)
    if done and done[0].tokenizer_id != model.tokenizer_id:
        raise ConfigError(f"{str(out)!r} holds traces of model {done[0].model_name!r} (another "
                          f"tokenizer than {model.name!r}'s); resume with that model, or give a "
                          "new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    rounds: list[list[tuple[int, int]]] = []
    for k, j in todo:  # consecutive seeds, at most `chunk` per round
        last = rounds[-1][-1] if rounds else None
        if last is None or len(rounds[-1]) == chunk or (k * samples + j) != (
                last[0] * samples + last[1] + 1):
            rounds.append([])
        rounds[-1].append((k, j))
    bar = tqdm(total=len(records) * samples, initial=len(records) * samples - len(todo),
               desc="think", unit="trace", disable=not progress)
    made: list[Trace] = []
    for part in rounds:
        k0, j0 = part[0]
        batch = model.think_batch([records[k][1] for k, _ in part],
                                  max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed + k0 * samples + j0,
                                  batch_size=batch_size, progress=False, engine=engine,
                                  thinking=thinking)
        for (k, j), tr in zip(part, batch):
            pid = records[k][0]
            tr.meta.update(id=pid if samples == 1 else f"{pid}#{j}", prompt_id=pid, sample=j,
                           run=run)
        append_jsonl(out, [tr.to_dict() for tr in batch])
        made += batch
        kill_point("think-round")
        bar.update(len(part))
        if log is not None:
            log(f"wrote {len(done) + len(made)} of {len(records) * samples} traces to {out}")
    bar.close()
    order = {(k, j): i for i, (k, j) in enumerate(
        (k, j) for k in range(len(records)) for j in range(samples))}
    ids = {pid: k for k, (pid, _) in enumerate(records)}
    traces = sorted(done + made, key=lambda t: order[(ids[t.meta["prompt_id"]], t.meta["sample"])])
    return ThinkResult(out, traces, len(made), time.time() - t0)


__all__ = ["ThinkResult", "read_traces", "check_think_args", "plan_think", "run_think"]
