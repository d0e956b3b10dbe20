"""Cache faults: damaged traces and sweeps are dropped and recomputed with a notice; a full disk leaves no half
file; two sessions compute one example once; an interrupted sweep resumes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import vlcore.run.extract as extract_mod
from tests.conftest import ROOT
from vlcore.data.example import Example
from vlcore.errors import StoreError
from vlcore.run.extract import extract_trace, trace_for_example
from vlcore.run.sweep import run_sweep
from vlcore.storage.sweeps import load_sweep
from vlcore.storage.store import Store, atomic_write_bytes, trace_to_bytes


@pytest.fixture
def example(noise_image):
    return Example("ex/1", "what is the color of the cat?", image=noise_image, answers=("red",))


def only_trace_file(store: Store):
    files = list((store.root / "traces").glob("*/*.safetensors"))
    assert len(files) == 1
    return files[0]


def leftovers(folder) -> list[str]:
    """Every file under ``folder`` (temporary files start with a dot)."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# -- damaged traces ---------------------------------------------------------------------------------
def test_truncated_trace_is_dropped_and_recomputed_bit_identically(tiny_adapter, example):
    store = Store()
    first, _ = trace_for_example(tiny_adapter, example, store)
    path = only_trace_file(store)
    path.write_bytes(path.read_bytes()[:1000])
    again, cached = trace_for_example(tiny_adapter, example, store)
    assert not cached and "damaged" in store.notices[0] and "recomputed" in store.notices[0]
    assert trace_to_bytes(again) == trace_to_bytes(first)


@pytest.mark.parametrize("schema", [0, 1])  # 1: round one's flat single-stream traces, never misread as blocks
def test_trace_header_of_another_schema_version_is_dropped(tiny_adapter, example, schema):
    store = Store()
    first, _ = trace_for_example(tiny_adapter, example, store)
    path = only_trace_file(store)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["vlscope"])
    meta["schema"] = schema
    header["__metadata__"]["vlscope"] = json.dumps(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n :])
    again, cached = trace_for_example(tiny_adapter, example, store)
    from vlcore.trace import TRACE_VERSION

    assert not cached and f"schema {schema} != {TRACE_VERSION}" in store.notices[0]
    assert np.array_equal(again.attentions, first.attentions)


# -- damaged sweeps ---------------------------------------------------------------------------------
def sweep_examples(n: int = 8) -> list[Example]:
    rng = np.random.default_rng(3)
    return [Example(f"s/{i}", "what is the color?", image=Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                    answers=("red",)) for i in range(n)]


@pytest.fixture
def finished_sweep(tiny_adapter, tmp_path):
    exs = sweep_examples()
    out = run_sweep(tiny_adapter, exs, tmp_path / "sweep", batch_size=4)
    return exs, out, load_sweep(out)


def manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("name", ["predictions.parquet", "head_stats.parquet"])
def test_merged_parquet_cut_in_half_is_dropped_then_recomputed(tiny_adapter, finished_sweep, name):
    exs, out, (preds, heads) = finished_sweep
    path = out / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    load_sweep(out)  # a page reading the sweep finds the damage
    assert not path.exists() and not manifest(out)["complete"]
    assert any(name in n and "start the sweep again" in n for n in manifest(out)["notices"])
    run_sweep(tiny_adapter, exs, out, batch_size=4)
    again_preds, again_heads = load_sweep(out)
    pd.testing.assert_frame_equal(again_preds, preds)
    pd.testing.assert_frame_equal(again_heads, heads)
    assert manifest(out)["complete"]


def test_damage_found_by_the_sweep_itself_is_reported(tiny_adapter, finished_sweep):
    exs, out, (preds, _) = finished_sweep
    (out / "predictions.parquet").write_bytes(b"PAR1 not really")
    run_sweep(tiny_adapter, exs, out, batch_size=4)
    assert any("dropped damaged sweep results predictions.parquet" in n for n in manifest(out)["notices"])
    pd.testing.assert_frame_equal(load_sweep(out)[0], preds)


@pytest.mark.parametrize("bad", [{"schema": 0}, "not json {"])
def test_sweep_manifest_of_another_schema_is_skipped_then_recomputed(tiny_adapter, finished_sweep, bad):
    exs, out, (preds, _) = finished_sweep
    old = manifest(out)
    text = json.dumps({**old, **bad}) if isinstance(bad, dict) else bad
    (out / "manifest.json").write_text(text)
    store = Store(out.parent / "store")  # sweeps live in <root>/sweeps/<key>
    (store.root / "sweeps").mkdir(parents=True)
    out = out.rename(store.root / "sweeps" / out.name)
    assert store.list_sweeps() == [] and "run the sweep again" in store.notices[0]
    run_sweep(tiny_adapter, exs, out, batch_size=4)
    assert any("dropped the sweep" in n for n in manifest(out)["notices"])
    pd.testing.assert_frame_equal(load_sweep(out)[0], preds)
    assert [m["key"] for m in store.list_sweeps()] == [old["key"]]


# -- full disk ------------------------------------------------------------------------------------------
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["fsync", "replace", "write"])
def test_full_disk_leaves_no_file_and_no_temp_file(tmp_path, monkeypatch, where):
    target = tmp_path / "cache" / "x.bin"
    if where == "write":
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

            def write(self, data):
                self.fh.write(data[: len(data) // 2])
                _disk_full()

        monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(os, where, _disk_full)
    with pytest.raises(StoreError) as err:
        atomic_write_bytes(target, b"x" * 4096)
    assert str(err.value).startswith("the disk is full: could not write x.bin")
    assert "nothing was half-written" in str(err.value)
    assert leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize("where", ["write", "replace"])  # a trace is not fsynced: the disk fills during the write
def test_full_disk_while_caching_a_trace_still_shows_the_result(tiny_adapter, example, monkeypatch, where):
    store = Store()
    if where == "write":
        real_fdopen = os.fdopen

        class FullWriter:
            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

            def write(self, data):
                self.fh.write(data[: len(data) // 2])
                _disk_full()

            def flush(self):
                self.fh.flush()

            def fileno(self):
                return self.fh.fileno()

        monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullWriter(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(os, "replace", _disk_full)
    trace, cached = trace_for_example(tiny_adapter, example, store)
    assert not cached and trace.attentions is not None
    assert "not stored: the disk is full" in store.notices[0]
    assert leftovers(store.root / "traces") == []
    monkeypatch.undo()
    _, cached = trace_for_example(tiny_adapter, example, store)
    assert not cached  # stored now that there is space
    assert trace_for_example(tiny_adapter, example, store)[1]


def test_full_disk_during_a_sweep_keeps_finished_batches(tiny_adapter, tmp_path, monkeypatch):
    exs = sweep_examples()
    real_fsync, synced = os.fsync, []

    def fsync(fd):
        synced.append(fd)
        if len(synced) > 4:  # the manifest and the first batch's three parts fit, then the disk is full
            _disk_full()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StoreError, match="the disk is full"):
        run_sweep(tiny_adapter, exs, tmp_path / "s", batch_size=4)
    assert not [n for n in leftovers(tmp_path / "s") if n.endswith(".tmp")]
    assert len(load_sweep(tmp_path / "s")[0]) == 4
    monkeypatch.undo()
    run_sweep(tiny_adapter, exs, tmp_path / "s", batch_size=4)
    assert len(load_sweep(tmp_path / "s")[0]) == 8


# -- two sessions ----------------------------------------------------------------------------------------
def test_two_threads_compute_one_example_once_with_identical_results(tiny_adapter, example, monkeypatch):
    calls = []
    real = extract_mod.extract_trace

    def slow_extract(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # widen the window in which the other session could start computing too
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_mod, "extract_trace", slow_extract)
    results = {}

    def session(name):
        results[name] = trace_for_example(tiny_adapter, example, Store())  # separate Store objects, one folder

    threads = [threading.Thread(target=session, args=(n,)) for n in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(cached for _, cached in results.values()) == [False, True, True]
    blobs = {trace_to_bytes(trace) for trace, _ in results.values()}
    assert len(blobs) == 1


SESSION = r"""
import hashlib, sys, time
from pathlib import Path
from vlcore.storage.store import Store, trace_from_bytes, trace_to_bytes
root, source, marker = sys.argv[1:4]
def compute():
    with open(marker, "a") as fh:
        fh.write("computed\n")
    time.sleep(0.5)
    return trace_from_bytes(Path(source).read_bytes())
trace, cached = Store(root).get_or_compute_trace("k" * 64, compute)
print(hashlib.sha256(trace_to_bytes(trace)).hexdigest(), cached)
"""


def test_two_processes_compute_one_entry_once(tiny_adapter, noise_image, tmp_path):
    source = tmp_path / "trace.safetensors"
    source.write_bytes(trace_to_bytes(extract_trace(tiny_adapter, noise_image, "what is it?", "p/1")))
    marker = tmp_path / "computed.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", SESSION, str(tmp_path / "root"), str(source), str(marker)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert marker.read_text().count("computed") == 1
    assert outputs[0][0] == outputs[1][0]
    assert sorted(o[1] for o in outputs) == ["False", "True"]


# -- interrupted sweeps ------------------------------------------------------------------------------------
def test_sweep_crashing_mid_way_resumes_after_the_last_finished_batch(tiny_adapter, tmp_path):
    exs = sweep_examples(12)
    real = tiny_adapter.forward
    sizes = []

    def crash_on_third(batch, *args, **kwargs):
        sizes.append(len(batch))
        if len(sizes) == 3:
            raise KeyboardInterrupt  # the user closed the tab / the process was killed
        return real(batch, *args, **kwargs)

    tiny_adapter.forward = crash_on_third
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny_adapter, exs, tmp_path / "s", batch_size=4)
    assert len(load_sweep(tmp_path / "s")[0]) == 8
    sizes.clear()
    tiny_adapter.forward = lambda batch, *a, **k: sizes.append(len(batch)) or real(batch, *a, **k)
    run_sweep(tiny_adapter, exs, tmp_path / "s", batch_size=4)
    assert sizes == [4]  # only the unfinished batch ran
    tiny_adapter.forward = real
    fresh = run_sweep(tiny_adapter, exs, tmp_path / "fresh", batch_size=4)
    pd.testing.assert_frame_equal(load_sweep(tmp_path / "s")[0], load_sweep(fresh)[0])
