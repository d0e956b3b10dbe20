"""Reads that may delete: only a file that does not parse as what it claims to be is dropped and recomputed.

A `MemoryError`, a disk error or a bug raised while reading a sweep part, a merged sweep file, a vectors file,
a head-importance file or a cached trace propagates and leaves every file where it was.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import vlcore.storage.store as store_mod
from tests.test_cache_faults import finished_sweep, manifest, sweep_examples  # noqa: F401 (fixture)
from vlcore.attribution.ablation import IMPORTANCE_FILE, importance_frame, load_sweep_importance, save_sweep_importance
from vlcore.data.example import Example
from vlcore.run.extract import trace_for_example
from vlcore.storage.store import DamagedFileError, Store
from vlcore.storage.tables import parquet_from_bytes
from vlcore.run.sweep import run_sweep
from vlcore.storage.sweeps import VECTORS_FILE, load_sweep, load_sweep_vectors, vectors_from_bytes, vectors_to_bytes


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (lock files aside) with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def out_of_memory(*args, **kwargs):
    raise MemoryError("simulated: the host ran out of memory while reading")


@pytest.fixture
def unfinished_sweep(tiny_adapter, tmp_path):
    """A sweep stopped after its first batch: parts (heads, vectors, predictions) on disk, nothing merged."""
    exs = sweep_examples()
    polls = iter(range(100))
    out = run_sweep(tiny_adapter, exs, tmp_path / "sweep", batch_size=4, should_stop=lambda: next(polls) >= 1)
    assert sorted(p.name for p in out.glob("part-*")) == [
        "part-0000000.heads.parquet", "part-0000000.predictions.parquet", "part-0000000.vectors.safetensors"]
    return exs, out


# -- a MemoryError inside a read deletes nothing -------------------------------------------------------------
def test_memory_error_while_reading_a_finished_sweep_leaves_every_file(finished_sweep, monkeypatch):  # noqa: F811
    _, out, _ = finished_sweep
    before = snapshot(out)
    monkeypatch.setattr(pd, "read_parquet", out_of_memory)
    with pytest.raises(MemoryError):
        load_sweep(out)
    assert snapshot(out) == before  # before: both merged files deleted and the manifest marked unfinished


def test_memory_error_while_a_sweep_checks_its_parts_leaves_every_file(tiny_adapter, unfinished_sweep, monkeypatch):
    exs, out = unfinished_sweep
    before = snapshot(out)
    monkeypatch.setattr(pd, "read_parquet", out_of_memory)
    with pytest.raises(MemoryError):
        run_sweep(tiny_adapter, exs, out, batch_size=4)
    assert snapshot(out) == before
    monkeypatch.undo()
    run_sweep(tiny_adapter, exs, out, batch_size=4)  # memory is back: the sweep resumes from the kept part
    assert len(load_sweep(out)[0]) == len(exs)


def test_memory_error_while_reading_vectors_leaves_every_file(tiny_adapter, unfinished_sweep, monkeypatch):
    exs, out = unfinished_sweep
    before = snapshot(out)
    monkeypatch.setattr(store_mod, "st_load", out_of_memory)
    monkeypatch.setattr("safetensors.numpy.load", out_of_memory)
    with pytest.raises(MemoryError):
        load_sweep_vectors(out)
    with pytest.raises(MemoryError):  # the sweep's own check of its parts reads the vectors too
        run_sweep(tiny_adapter, exs, out, batch_size=4)
    assert snapshot(out) == before


def test_memory_error_while_reading_head_importance_leaves_the_file(tmp_path, monkeypatch):
    save_sweep_importance(tmp_path, importance_frame("e/1", np.arange(4, dtype=np.float32).reshape(2, 2)))
    before = snapshot(tmp_path)
    monkeypatch.setattr(pd, "read_parquet", out_of_memory)
    with pytest.raises(MemoryError):
        load_sweep_importance(tmp_path)
    with pytest.raises(MemoryError):  # saving more rows reads the old ones first: still nothing is lost
        save_sweep_importance(tmp_path, importance_frame("e/2", np.zeros((2, 2), np.float32)))
    assert snapshot(tmp_path) == before


def test_memory_error_or_a_bug_while_reading_a_trace_leaves_the_file(tiny_adapter, noise_image, monkeypatch):
    store = Store()
    example = Example("ex/1", "what is the color of the cat?", image=noise_image)
    trace_for_example(tiny_adapter, example, store)
    before = snapshot(store.root)
    monkeypatch.setattr(store_mod, "st_load", out_of_memory)
    with pytest.raises(MemoryError):
        trace_for_example(tiny_adapter, example, store)
    monkeypatch.undo()

    def bug(*args, **kwargs):
        raise TypeError("simulated programming error in building the trace")

    monkeypatch.setattr(store_mod, "_build_trace", bug)
    with pytest.raises(TypeError, match="simulated"):
        trace_for_example(tiny_adapter, example, store)
    assert snapshot(store.root) == before and store.notices == []


def test_a_disk_error_on_the_manifest_does_not_empty_the_sweep(tiny_adapter, finished_sweep, monkeypatch):  # noqa: F811
    exs, out, _ = finished_sweep
    before = snapshot(out)
    real_bytes, real_text = Path.read_bytes, Path.read_text

    def refuse(reader):
        def read(self, *args, **kwargs):
            if self.name == "manifest.json":
                raise PermissionError(13, "Permission denied", str(self))
            return reader(self, *args, **kwargs)
        return read

    monkeypatch.setattr(Path, "read_bytes", refuse(real_bytes))
    monkeypatch.setattr(Path, "read_text", refuse(real_text))
    with pytest.raises(PermissionError):
        run_sweep(tiny_adapter, exs, out, batch_size=4)
    monkeypatch.undo()
    assert snapshot(out) == before  # before: an unreadable manifest counted as damaged and the folder was emptied


# -- a truly damaged file is still dropped and recomputed ---------------------------------------------------
def corrupt_a_page(data: bytes) -> bytes:
    """Parquet bytes with zeros over the start of the first data page (magic and footer intact)."""
    return data[:4] + bytes(200) + data[204:]


def test_parquet_with_a_corrupt_page_is_dropped_then_recomputed(tiny_adapter, finished_sweep):  # noqa: F811
    exs, out, (_, heads) = finished_sweep
    path = out / "head_stats.parquet"
    path.write_bytes(corrupt_a_page(path.read_bytes()))
    with pytest.raises(DamagedFileError):
        parquet_from_bytes(path.read_bytes(), path.name)
    load_sweep(out)
    assert not path.exists() and not manifest(out)["complete"]
    run_sweep(tiny_adapter, exs, out, batch_size=4)
    pd.testing.assert_frame_equal(load_sweep(out)[1], heads)
    assert manifest(out)["complete"]


def test_parquet_without_example_ids_is_dropped_with_its_twins(tiny_adapter, unfinished_sweep):
    exs, out = unfinished_sweep
    buf = io.BytesIO()
    pd.DataFrame({"x": [1, 2]}).to_parquet(buf)
    (out / "part-0000000.heads.parquet").write_bytes(buf.getvalue())
    run_sweep(tiny_adapter, exs, out, batch_size=4)
    assert any("part-0000000.predictions.parquet (ArrowInvalid)" in n for n in manifest(out)["notices"])
    assert len(load_sweep(out)[0]) == len(exs) and manifest(out)["complete"]


@pytest.mark.parametrize("damage", ["truncated", "thumbnail count", "token rows"])
def test_damaged_vectors_part_is_dropped_with_its_twins_and_recomputed(tiny_adapter, unfinished_sweep, damage):
    exs, out = unfinished_sweep
    path = out / "part-0000000.vectors.safetensors"
    good = path.read_bytes()
    part = vectors_from_bytes(good)
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "thumbnail count":  # a valid safetensors file whose header and arrays disagree
        patch_rc = part["patch_rc"].copy()
        patch_rc[np.flatnonzero(patch_rc[:, 0] < 0)[0]] = (0, 0)  # one more "patch" than stored thumbnails
        from safetensors.numpy import load, save

        arrays = {**load(good), "patch_rc": patch_rc}
        meta = json.loads(good[8 : 8 + int.from_bytes(good[:8], "little")])["__metadata__"]
        path.write_bytes(save(arrays, metadata=meta))
    else:
        path.write_bytes(vectors_to_bytes({**part, "example_ids": part["example_ids"][:1]}))
    with pytest.raises(DamagedFileError):
        vectors_from_bytes(path.read_bytes())
    assert load_sweep_vectors(out) is None  # a reader skips it and deletes nothing
    assert path.exists()
    run_sweep(tiny_adapter, exs, out, batch_size=4)  # the sweep drops it with its twins and recomputes
    assert any("dropped damaged sweep results part-0000000.predictions.parquet" in n for n in manifest(out)["notices"])
    assert (out / VECTORS_FILE).exists() and manifest(out)["complete"]
    vectors = load_sweep_vectors(out)
    assert vectors["example_ids"] == [e.example_id for e in exs]
    first = {k: v for k, v in vectors_from_bytes(good).items()}
    np.testing.assert_array_equal(vectors["vectors"][:, : len(first["example"])], first["vectors"])


def test_damaged_head_importance_file_is_dropped(tmp_path):
    (tmp_path / IMPORTANCE_FILE).write_bytes(b"PAR1 half a file")
    assert load_sweep_importance(tmp_path) is None and not (tmp_path / IMPORTANCE_FILE).exists()
    buf = io.BytesIO()
    pd.DataFrame({"example_id": ["e"], "value": [1.0]}).to_parquet(buf)  # parquet, but not head importance
    (tmp_path / IMPORTANCE_FILE).write_bytes(buf.getvalue())
    assert load_sweep_importance(tmp_path) is None and not (tmp_path / IMPORTANCE_FILE).exists()
    new = importance_frame("e/1", np.ones((2, 2), np.float32))
    save_sweep_importance(tmp_path, new)
    pd.testing.assert_frame_equal(load_sweep_importance(tmp_path), new)
