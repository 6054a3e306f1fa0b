"""Loading a GGUF file as a CLI call does: a fresh process each time, direct vs cached.

``thinklens.load(file.gguf)`` converts the file once into a cached safetensors folder
(:mod:`thinklens.hooks.gguf`); this measures a fresh process's ``load`` of SmolLM2-135M's
GGUF file with ``THINKLENS_GGUF_CACHE=0`` (transformers de-quantizes the file, as every
call did before) and with the cache (already converted), interleaved, ``--rounds`` times.

    python benchmarks/bench_gguf_load.py --rounds 2
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = "import torch; torch.set_num_threads(1); import thinklens; thinklens.load({path!r})"


def _once(path: Path, cache: bool, cache_dir: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child): CPU time is what a loaded machine's
    wall clock inflates, so both are reported."""
    env = {**os.environ, "THINKLENS_CACHE": str(cache_dir),
           "THINKLENS_GGUF_CACHE": "1" if cache else "0", "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", CODE.format(path=str(path))], env=env, check=True,
                   capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gguf", default=str(ROOT / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--cache", default=str(ROOT / ".cache" / "thinklens"))
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    path, cache_dir = Path(a.gguf), Path(a.cache)
    wall, cpu = _once(path, True, cache_dir)  # converts if not yet cached
    print(f"first cached load (converts if needed): {wall:.1f} s wall, {cpu:.1f} s CPU",
          flush=True)
    for r in range(a.rounds):
        (dw, dc), (cw, cc) = _once(path, False, cache_dir), _once(path, True, cache_dir)
        print(f"round {r}: direct {dw:.1f} s wall / {dc:.1f} s CPU, cached {cw:.1f} s wall / "
              f"{cc:.1f} s CPU; {dw / cw:.1f}x wall, {dc / cc:.1f}x CPU", flush=True)


if __name__ == "__main__":
    main()
