"""Tests of thinklens.hooks.store: bit-exact round trips, resume, kill-safety, verification."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thinklens.errors import ConfigError, SiteError, StoreError
from thinklens.hooks import store as store_module
from thinklens.hooks.store import Store

_spec = importlib.util.spec_from_file_location("_store_writer",
                                               Path(__file__).with_name("_store_writer.py"))
writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writer)

RESID, Z = writer.SITES
INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so -0.0 vs 0.0 or a changed NaN payload would also fail equality."""
    return t.view(INT_OF.get(t.dtype, t.dtype))


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def create(dtype: str = "float32", **extra) -> dict:
    return {"model_name": "organism", "revision": None, "dtype": dtype,
            "sites": [RESID, Z], **extra}


def ragged(i: int, dtype: torch.dtype) -> tuple[str, dict, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(i)
    rows = [3, 0, 7, 1, 5, 2][i % 6]  # includes an empty trace
    return (f"t{i}", {"index": i}, {
        RESID: (torch.randn(rows, 8, generator=g) * 100).to(dtype),
        Z: torch.randn(rows, 2, 4, generator=g).to(dtype),
        "__positions__": torch.arange(rows, dtype=torch.int64) + 10 * i,
    })


AXES = {RESID: ("pos", "d_model"), Z: ("pos", "head", "d_head")}


def assert_same_store(a: Store, b: Store) -> None:
    assert a.trace_ids == b.trace_ids and a.trace_dicts == b.trace_dicts
    assert a.keys == b.keys and a.axes == b.axes
    for key in a.keys:
        for x, y in zip(a.read(key), b.read(key), strict=True):
            assert_bit_equal(x, y)
    for x, y in zip(a._positions(), b._positions(), strict=True):
        assert_bit_equal(x, y)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_bit_exact_across_appends(tmp_path, dtype):
    torch_dtype = getattr(torch, dtype)
    records = [ragged(i, torch_dtype) for i in range(6)]
    store = Store.open(tmp_path / "s", create=create(dtype, task="arith"))
    assert store.append(records[:2], AXES) == 2
    assert store.append(records[2:5], AXES) == 3
    assert store.append(records[5:], AXES) == 1

    with Store.open(tmp_path / "s") as reopened:
        assert reopened.trace_ids == [r[0] for r in records] and len(reopened) == 6
        assert reopened.trace_dicts == [r[1] for r in records]
        assert reopened.meta == {"task": "arith"} and reopened.dtype == torch_dtype
        assert reopened.axes == AXES
        for key in (RESID, Z):
            for got, (_, _, want) in zip(reopened.read(key), records, strict=True):
                assert_bit_equal(got, want[key])
        acts = reopened[RESID]  # padded view from ActivationReader
        assert acts.axes == ("trace", "pos", "d_model") and acts.values.shape == (6, 7, 8)
        assert acts.lengths.tolist() == [3, 0, 7, 1, 5, 2]
        assert_bit_equal(acts.unpadded(2), records[2][2][RESID])
        assert acts.positions[4, :5].tolist() == list(range(40, 45))
        assert (acts.positions[4, 5:] == -1).all()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "manifest.json", *(f"shard-{i:06d}.{ext}" for i in range(3)
                           for ext in ("safetensors", "traces.json"))]


def test_rerun_skips_stored_trace_ids(tmp_path):
    records = [ragged(i, torch.float32) for i in range(4)]
    store = Store.open(tmp_path, create=create())
    assert store.append(records[:2], AXES) == 2
    again = Store.open(tmp_path, create=create())
    assert again.append(records[:2], AXES) == 0  # nothing new: no shard written
    assert again.append([*records, records[3]], AXES) == 2  # repeated id within a call too
    assert again.trace_ids == ["t0", "t1", "t2", "t3"] and "t3" in again and "t9" not in again
    assert len(json.loads((tmp_path / "manifest.json").read_text())["shards"]) == 2


def test_reading_one_key_requests_only_its_tensors(tmp_path, monkeypatch):
    store = Store.open(tmp_path, create=create())
    store.append([ragged(i, torch.float32) for i in range(3)], AXES)
    store.append([ragged(i, torch.float32) for i in range(3, 5)], AXES)
    opened, requested = [], []
    real_open = store_module.safe_open

    class Spy:
        def __init__(self, path, **kwargs):
            opened.append(Path(path).name)
            self._inner = real_open(path, **kwargs)

        def __enter__(self):
            self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def get_tensor(self, name):
            requested.append(name)
            return self._inner.get_tensor(name)

    monkeypatch.setattr(store_module, "safe_open", Spy)
    store.read(Z)
    assert sorted(requested) == sorted(f"{Z}/{n}" for n in range(5))
    assert sorted(opened) == ["shard-000000.safetensors", "shard-000001.safetensors"]


def _run_until_killed(out: Path, line: str, occurrence: int) -> None:
    """Start the writer; SIGKILL it while it waits at its ``occurrence``-th ``line``."""
    proc = subprocess.Popen([sys.executable, writer.__file__, str(out), "6", line,
                             str(occurrence)], stdout=subprocess.PIPE, text=True)
    seen = 0
    for got in proc.stdout:
        seen += got.strip() == line
        if seen == occurrence:
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    assert proc.wait(timeout=60) == -signal.SIGKILL, f"the writer never printed {line!r}"


def test_killed_writer_leaves_a_valid_store_and_resumes_to_the_same_content(tmp_path):
    reference = tmp_path / "reference"
    writer.write(reference, 6)
    out = tmp_path / "out"
    # Each run resumes the store the previous kill left. (writer line, occurrence,
    # traces committed when killed, files the kill leaves beside the committed ones)
    kills = [
        # mid-write of trace-1's temp shard (step 2): a half-written .tmp
        ("half-written shard-000001.safetensors.tmp", 1, 1,
         {"shard-000001.safetensors.tmp"}),
        # trace-1 is redone; between steps 3 and 5 of trace-2: an orphan shard
        ("replace manifest.json", 2, 2,
         {"shard-000002.safetensors", "shard-000002.traces.json", "manifest.json.tmp"}),
        # trace-2 and -3 are redone; in step 3 of trace-4: a complete .tmp, its traces file
        ("replace shard-000004.safetensors", 1, 4,
         {"shard-000004.safetensors.tmp", "shard-000004.traces.json"}),
    ]
    for line, occurrence, committed, leftovers in kills:
        _run_until_killed(out, line, occurrence)
        store = Store.open(out, verify="hash")
        listed = {"manifest.json", *(f"shard-{i:06d}.{ext}" for i in range(committed)
                                     for ext in ("safetensors", "traces.json"))}
        assert {p.name for p in out.iterdir()} == listed | leftovers
        assert store.trace_ids == [f"trace-{i}" for i in range(committed)]
        for i, got in enumerate(store.read(RESID)):
            assert_bit_equal(got, writer.record(i)[2][RESID])

    subprocess.run([sys.executable, writer.__file__, str(out), "6"], check=True,
                   stdout=subprocess.DEVNULL, timeout=60)
    assert_same_store(Store.open(out, verify="hash"), Store.open(reference))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_cut, _flip_last_byte], ids=["truncated", "altered"])
def test_damaged_shard_is_refused_by_name_and_repair_lets_a_rerun_recompute_it(tmp_path,
                                                                                damage):
    records = [ragged(i, torch.float32) for i in range(5)]
    store = Store.open(tmp_path, create=create())
    store.append(records[:2], AXES)
    store.append(records[2:4], AXES)
    store.append(records[4:], AXES)
    shard = tmp_path / "shard-000001.safetensors"
    damage(shard)

    with pytest.raises(StoreError, match="shard-000001.safetensors") as err:
        Store.open(tmp_path, verify="hash")
    assert "expected" in str(err.value) and "found" in str(err.value)
    assert "repair()" in str(err.value)
    if damage is _flip_last_byte:
        Store.open(tmp_path, verify="size")  # same size, valid header: only the hash sees it
    else:
        with pytest.raises(StoreError, match="truncated"):
            Store.open(tmp_path, verify="size")

    assert Store.open(tmp_path, verify="none").repair() == ["t2", "t3"]
    assert not shard.exists()
    store = Store.open(tmp_path, create=create())
    assert store.trace_ids == ["t0", "t1", "t4"]
    assert store.append(records, AXES) == 2  # only the dropped traces are recomputed
    assert sorted(store.trace_ids) == ["t0", "t1", "t2", "t3", "t4"]
    for tid, got in zip(store.trace_ids, Store.open(tmp_path).read(RESID), strict=True):
        assert_bit_equal(got, records[int(tid[1:])][2][RESID])


@pytest.mark.parametrize(("field", "value"), [("model_name", "other-model"),
                                              ("dtype", "bfloat16"), ("revision", "abc123")])
def test_incompatible_reopen_names_the_field(tmp_path, field, value):
    Store.open(tmp_path, create=create())
    with pytest.raises(StoreError, match=f"{field}=.*{field}=.*new --out folder"):
        Store.open(tmp_path, create={**create(), field: value})


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="nowhere"):
        Store.open(tmp_path / "nowhere")
    Store.open(tmp_path, create=create())
    with pytest.raises(StoreError, match="blocks.5.hook_resid_post"):
        Store.open(tmp_path, create={**create(), "sites": [RESID, "blocks.5.hook_resid_post"]})
    Store.open(tmp_path, create={**create(), "sites": [RESID]})  # a subset is fine
    with pytest.raises(ConfigError, match="fp32"):
        Store.open(tmp_path / "new", create=create("fp32"))
    with pytest.raises(ConfigError, match="verify='md5'"):
        Store.open(tmp_path, verify="md5")


def test_bad_appends_write_nothing(tmp_path):
    store = Store.open(tmp_path, create=create())
    good = ragged(0, torch.float32)
    wrong_dtype = ("x", {}, {RESID: torch.zeros(2, 8, dtype=torch.float16)})
    with pytest.raises(ConfigError, match=r"float16.*float32"):
        store.append([good, wrong_dtype], AXES)
    assert store.append([good], AXES) == 1
    with pytest.raises(StoreError, match=r"axes \['pos', 'd_model'\].*\['pos', 'd_sae'\]"):
        store.append([ragged(1, torch.float32)], {**AXES, RESID: ("pos", "d_sae")})
    with pytest.raises(SiteError, match="Did you mean 'blocks.0.hook_resid_post'"):
        store.append([("y", {}, {"blocks.0.hook_resid": torch.zeros(1, 8)})], AXES)
    with pytest.raises(ConfigError, match="one position per row"):
        store.append([("z", {}, {RESID: torch.zeros(3, 8),
                                 "__positions__": torch.arange(2)})], AXES)
    assert store.trace_ids == ["t0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json", "shard-000000.safetensors", "shard-000000.traces.json"]


def test_unknown_key_read_suggests_the_stored_one(tmp_path):
    store = Store.open(tmp_path, create=create())
    store.append([ragged(0, torch.float32)], AXES)
    with pytest.raises(SiteError, match="Did you mean 'blocks.0.hook_resid_post'"):
        store.read("blocks.0.hook_resid")
    with pytest.raises(SiteError, match="Did you mean"):
        store["blocks.0.hook_resid"]


def test_files_without_a_commit_are_ignored_and_cleaned(tmp_path):
    store = Store.open(tmp_path, create=create())
    store.append([ragged(0, torch.float32)], AXES)
    (tmp_path / "shard-000001.safetensors").write_bytes(b"orphan from a killed writer")
    (tmp_path / "shard-000002.safetensors.tmp").write_bytes(b"half a shard")
    (tmp_path / "manifest.json.tmp").write_text("{")
    (tmp_path / "shard-000001.traces.json").write_text("{}")
    store = Store.open(tmp_path)
    assert store.trace_ids == ["t0"]
    store.append([ragged(1, torch.float32)], AXES)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json", "shard-000000.safetensors", "shard-000000.traces.json",
        "shard-000001.safetensors", "shard-000001.traces.json"]
    assert_bit_equal(Store.open(tmp_path).read(Z)[1], ragged(1, torch.float32)[2][Z])
    assert os.path.getsize(tmp_path / "shard-000001.safetensors") > 100


def test_views_of_one_batch_tensor_and_real_traces_round_trip(tmp_path):
    from thinklens.hooks.trace import Sentence, Span, Trace

    trace = Trace(model_name="organism", tokenizer_id="tok", prompt="p", text="abc",
                  token_ids=[1, 2, 3], tokens=["a", "b", "c"], offsets=[(0, 1), (1, 2), (2, 3)],
                  prompt_span=Span(0, 1), think_span=Span(1, 2), answer_span=Span(2, 3),
                  sentences=[Sentence(1, 2, 1, 2, "b", "computation")], truncated=False)
    batch = torch.randn(2, 5, 8)  # a padded batch, as a capture produces it
    records = [(f"v{j}", trace.to_dict(), {RESID: batch[j, : 3 + 2 * j]}) for j in range(2)]
    store = Store.open(tmp_path, create=create())
    assert store.append(records, {RESID: AXES[RESID]}) == 2
    reopened = Store.open(tmp_path)
    assert reopened.traces == [trace, trace] and reopened._positions() is None
    assert reopened.keys == [RESID] and reopened.sites == [RESID, Z]
    for j, got in enumerate(reopened.read(RESID)):
        assert_bit_equal(got, batch[j, : 3 + 2 * j])


def test_traces_live_beside_their_shard_and_version_1_stores_still_read(tmp_path):
    big = {"tokens": ["tok"] * 2000, "text": "x" * 5000}
    store = Store.open(tmp_path / "s", create=create())
    for i in range(3):
        tid, _, per_key = ragged(i, torch.float32)
        store.append([(tid, {**big, "i": i}, per_key)], AXES)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["version"] == 2 and all("trace" not in t for t in manifest["traces"])
    # an append rewrites ~100 bytes per stored trace, not the traces themselves
    assert (tmp_path / "s" / "manifest.json").stat().st_size < 3000
    assert [d["i"] for d in Store.open(tmp_path / "s").trace_dicts] == [0, 1, 2]
    (tmp_path / "s" / "shard-000001.traces.json").write_text("{}")
    with pytest.raises(StoreError, match=r"shard-000001.safetensors.*traces.json"):
        Store.open(tmp_path / "s", verify="size")
    # version 1: each trace dict inline in the manifest
    v1 = dict(manifest, version=1, traces=[{**t, "trace": {"i": k}} for k, t in
                                           enumerate(manifest["traces"])])
    for s in v1["shards"]:
        del s["traces_file"], s["traces_bytes"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(v1))
    old = Store.open(tmp_path / "s", verify="hash")
    assert [d["i"] for d in old.trace_dicts] == [0, 1, 2]
    tid, _, per_key = ragged(3, torch.float32)
    old.append([(tid, {"i": 3}, per_key)], AXES)  # appending upgrades, old entries still read
    assert [d["i"] for d in Store.open(tmp_path / "s").trace_dicts] == [0, 1, 2, 3]
