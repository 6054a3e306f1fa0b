"""Test helper for test_store.py: append N seeded records to a store, one shard each.

Usage: ``python tests/_store_writer.py OUT N [STOP_LINE OCCURRENCE]``.

It prints a line at each step of the store's commit protocol: ``half-written <tmp>``
halfway through writing a shard's temp file (step 2), ``replace <final>`` before each
atomic rename (steps 3 and 5), ``done`` at the end. At the OCCURRENCE-th STOP_LINE it
stops (sleeps) so that the test can SIGKILL it at exactly that step, whatever the load
of the machine. ``write`` without a stop line is the uninterrupted reference.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save

from thinklens.hooks import store as store_module
from thinklens.hooks.store import Store

SITES = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
AXES = {SITES[0]: ("pos", "d_model"), SITES[1]: ("pos", "head", "d_head")}
CREATE = {"model_name": "organism", "revision": None, "dtype": "float32", "sites": SITES}


def record(i: int) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """Trace ``i``: seeded, ragged (40 to 129 rows), about 0.5 MB."""
    g = torch.Generator().manual_seed(1000 + i)
    rows = 40 + (i * 37) % 90
    return (f"trace-{i}", {"index": i, "text": f"problem {i}"}, {
        SITES[0]: torch.randn(rows, 512, generator=g),
        SITES[1]: torch.randn(rows, 4, 128, generator=g),
        "__positions__": torch.arange(rows) * 2 + i,
    })


def write(out: Path, n: int) -> None:
    store = Store.open(out, create=CREATE)
    for i in range(n):
        store.append([record(i)], AXES)


def _stop_at(stop: str, occurrence: int) -> None:
    """Announce every protocol step, and wait to be killed at the chosen one."""
    seen: Counter[str] = Counter()

    def step(line: str) -> None:
        print(line, flush=True)
        seen[line] += 1
        if line == stop and seen[line] == occurrence:
            time.sleep(60)

    replace = store_module.replace_durably

    def announced_replace(tmp: Path, final: Path) -> None:
        step(f"replace {final.name}")
        replace(tmp, final)

    def save_in_two_halves(tensors, filename, metadata=None) -> None:
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            step(f"half-written {Path(filename).name}")
            f.write(data[len(data) // 2:])

    store_module.replace_durably = announced_replace
    store_module.save_file = save_in_two_halves


if __name__ == "__main__":
    if len(sys.argv) == 5:
        _stop_at(sys.argv[3], int(sys.argv[4]))
    write(Path(sys.argv[1]), int(sys.argv[2]))
    print("done", flush=True)
