"""(c) Store throughput: ``Store.append`` / ``Store.read`` against raw file I/O.

1. Make ``--traces`` records of ``--sites`` float32 tensors ``[--rows, --d-model]`` each
   (about 200 MB by default), a ``__positions__`` row index and a realistic trace dict
   (``Trace.to_dict()`` of a ``--trace-tokens``-token trace: the manifest holds it).
2. Write, ``--per-append`` traces per call as ``capture(store=...)`` does (one call per
   batch): ``store`` = ``Store.append`` (safetensors shard, fsync, sha256, manifest);
   ``raw`` = one file per batch, ``tensor.numpy().tofile`` for every tensor, then fsync.
3. Read every site back: ``store`` = ``Store.open`` (``verify="hash"``, the default,
   and ``"none"``) then ``read(site)`` for each site, and ``store[site]`` (padded into
   one tensor); ``raw`` = ``np.fromfile`` of every file. Reads run warm (files in the
   page cache) and cold (``posix_fadvise(DONTNEED)`` first; not a real disk read on
   every file system, so compare cold with cold only).
4. Growth (``--grow`` appends of ``--per-append`` small traces with the same trace dicts):
   time of one append and of ``Store.open`` as the store fills, and manifest size.

MB/s counts the tensor bytes only (what raw writes), timed in interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import (
    CACHE,
    command_line,
    exact_trace,
    interleaved,
    machine_info,
    print_profile,
    profile,
    save,
    setup_threads,
    table,
)

from thinklens.hooks.store import Store


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--traces", type=int, default=64)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--rows", type=int, default=256, help="rows (positions) per trace and site")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--per-append", type=int, default=8, help="traces per append / raw file")
    p.add_argument("--trace-tokens", type=int, default=256,
                   help="length of the trace whose dict each record carries")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--grow", type=int, default=40, help="appends in the growth test (0 = skip)")
    p.add_argument("--grow-tokens", type=int, default=2048,
                   help="trace length (dict size) in the growth test")
    p.add_argument("--dir", default=str(CACHE / "bench-store"),
                   help="scratch folder (emptied and removed at the end)")
    p.add_argument("--device", default="cpu",
                   help="where the tensors start (cuda: writes include the copy to the host)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true",
                   help="cProfile one store write and one verify='hash' read")
    p.add_argument("--out", default=None, help="JSON path (default results/store-DEVICE.json)")
    return p.parse_args(argv)


def trace_dict(tokens: int, i: int) -> dict:
    from thinklens.zoo.vocab import build_tokenizer

    tok = build_tokenizer()
    rendered = tok.apply_chat_template([{"role": "user", "content": "a = 7 ; ? b"}],
                                       tokenize=False, add_generation_prompt=True)
    return exact_trace(tok, rendered_prompt=rendered, prompt="a = 7 ; ? b",
                       body="a = 7 ; b = a + 2 . ", length=tokens, model_name="organism",
                       trace_id=f"t{i}").to_dict()


def make_records(args):
    g = torch.Generator().manual_seed(0)
    sites = [f"blocks.{i}.hook_resid_post" for i in range(args.sites)]
    td = trace_dict(args.trace_tokens, 0)
    records = []
    for i in range(args.traces):
        tensors = {s: torch.randn(args.rows, args.d_model, generator=g).to(args.device)
                   for s in sites}
        tensors["__positions__"] = torch.arange(args.rows)
        records.append((f"trace-{i}", {**td, "meta": {"id": f"trace-{i}"}}, tensors))
    return sites, records


def write_store(folder: Path, sites, records, per: int) -> None:
    store = Store.open(folder, create={"model_name": "bench", "revision": None,
                                       "dtype": "float32", "sites": sites})
    axes = {s: ("pos", "d_model") for s in sites}
    for j in range(0, len(records), per):
        store.append(records[j: j + per], axes)


def write_raw(folder: Path, records, per: int) -> None:
    folder.mkdir(parents=True)
    for j in range(0, len(records), per):
        with open(folder / f"batch-{j // per:06d}.bin", "wb") as f:
            for _, _, tensors in records[j: j + per]:
                for t in tensors.values():
                    t.detach().cpu().numpy().tofile(f)
            f.flush()
            os.fsync(f.fileno())


# every read sums what it got: safetensors hands out tensors backed by the memory-mapped
# file, which are read from disk only when touched


def read_store(folder: Path, sites, verify: str) -> float:
    store = Store.open(folder, verify=verify)
    return sum(float(t.sum()) for s in sites for t in store.read(s))


def read_padded(folder: Path, sites) -> float:
    store = Store.open(folder, verify="none")
    return sum(float(store[s].values.sum()) for s in sites)


def read_raw(folder: Path) -> float:
    return sum(float(torch.from_numpy(np.fromfile(f, dtype=np.float32)).sum())
               for f in sorted(folder.iterdir()))


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (best effort, no root needed)."""
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def throughput(args, scratch: Path, sites, records) -> tuple[dict, dict]:
    nbytes = sum(t.nbytes for _, _, ts in records for k, t in ts.items() if k != "__positions__")
    counter = iter(range(10**9))

    # each write goes to a new folder, removed only at the end: deleting is not timed
    def w_store():
        write_store(scratch / f"store-{next(counter)}", sites, records, args.per_append)

    def w_raw():
        write_raw(scratch / f"raw-{next(counter)}", records, args.per_append)

    print(f"write {nbytes / 1e6:.0f} MB, {args.repeats} rounds ...", flush=True)
    writes, _ = interleaved({"store": w_store, "raw": w_raw}, repeats=args.repeats)
    st, raw = scratch / "read-store", scratch / "read-raw"
    write_store(st, sites, records, args.per_append)
    write_raw(raw, records, args.per_append)
    fns = {"store verify=hash": lambda: read_store(st, sites, "hash"),
           "store verify=none": lambda: read_store(st, sites, "none"),
           "store[site] padded": lambda: read_padded(st, sites),
           "raw": lambda: read_raw(raw)}
    print("read warm ...", flush=True)
    warm, _ = interleaved(fns, repeats=args.repeats)

    def cold(fn, folder):
        def run():
            evict(folder)
            return fn()
        return run

    print("read cold ...", flush=True)
    cold_t, _ = interleaved({k: cold(f, raw if k == "raw" else st) for k, f in fns.items()},
                            repeats=args.repeats, warmup=0)
    store_bytes = sum(f.stat().st_size for f in st.iterdir())
    if args.profile:
        print_profile(profile(lambda: write_store(scratch / "profiled", sites, records,
                                                  args.per_append)), "one store write")
        print_profile(profile(lambda: read_store(st, sites, "hash")), "one store read (hash)")
    rows = {}
    for phase, times in (("write", writes), ("read warm", warm), ("read cold", cold_t)):
        base = times["wall"]["raw"]
        for name, t in times["wall"].items():
            med = statistics.median(t)
            rows[f"{phase}: {name}"] = {
                "median_s": med, "runs_s": t, "MB_per_s": nbytes / med / 1e6,
                "time_vs_raw": statistics.median(a / b for a, b in zip(t, base))}
    return rows, {"tensor_bytes": nbytes, "store_bytes_on_disk": store_bytes}


def growth(args, scratch: Path) -> list[dict]:
    """Append time, open time and manifest size as a store fills with trace dicts."""
    td = trace_dict(args.grow_tokens, 0)
    folder = scratch / "grow"
    sites = ["blocks.0.hook_resid_post"]
    store = Store.open(folder, create={"model_name": "bench", "revision": None,
                                       "dtype": "float32", "sites": sites})
    axes = {sites[0]: ("pos", "d_model")}
    out, n = [], 0
    checkpoints = {1, *(round(args.grow * f) for f in (0.25, 0.5, 0.75, 1.0))}
    for a in range(1, args.grow + 1):
        recs = []
        for _ in range(args.per_append):
            recs.append((f"g{n}", {**td, "meta": {"id": f"g{n}"}},
                         {sites[0]: torch.zeros(4, 8), "__positions__": torch.arange(4)}))
            n += 1
        t0 = time.perf_counter()
        store.append(recs, axes)
        t_append = time.perf_counter() - t0
        if a in checkpoints:
            t0 = time.perf_counter()
            reopened = Store.open(folder, verify="size")
            t_open = time.perf_counter() - t0
            t0 = time.perf_counter()
            for k in range(100):
                _ = f"g{k}" in reopened
            t_in = (time.perf_counter() - t0) / 100
            out.append({"appends": a, "traces": n, "append_s": t_append, "open_size_s": t_open,
                        "contains_s": t_in,
                        "manifest_MB": (folder / "manifest.json").stat().st_size / 1e6})
            print(f"  {a} appends, {n} traces: append {t_append:.3f}s, open {t_open:.3f}s, "
                  f"manifest {out[-1]['manifest_MB']:.1f} MB", flush=True)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_threads(args.threads)
    warnings.filterwarnings("ignore")
    scratch = Path(args.dir)
    scratch.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=scratch))
    try:
        sites, records = make_records(args)
        rows, sizes = throughput(args, scratch, sites, records)
        grow = growth(args, scratch) if args.grow else []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            scratch.parent.rmdir()  # only if empty: never another run's files
        except OSError:
            pass
    print(table([[k, f"{r['median_s']:.3f}", f"{r['MB_per_s']:,.0f}", f"{r['time_vs_raw']:.2f}x"]
                 for k, r in rows.items()],
                ["operation", "median s", "MB/s", "time / raw (paired median)"]))
    print(f"tensor bytes {sizes['tensor_bytes'] / 1e6:.1f} MB; store on disk "
          f"{sizes['store_bytes_on_disk'] / 1e6:.1f} MB")
    if grow:
        print(table([[g["appends"], g["traces"], f"{g['append_s'] * 1e3:.0f}",
                      f"{g['open_size_s'] * 1e3:.0f}", f"{g['contains_s'] * 1e3:.2f}",
                      f"{g['manifest_MB']:.1f}"] for g in grow],
                    ["appends", "traces stored", "one append ms", "Store.open(verify='size') ms",
                     "`id in store` ms", "manifest MB"]))
    path = save(f"store-{args.device.split(':')[0]}", {
        "benchmark": "store", "command": command_line(), "machine": machine_info(args.device),
        "scratch_dir": str(Path(args.dir).resolve()), "config": vars(args), "sizes": sizes,
        "results": rows, "growth": grow}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
