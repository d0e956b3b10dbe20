"""The result store: round trips, damaged entries, LRU eviction, single computation."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from vlcore.run.extract import extract_trace, trace_for_example, trace_key
from vlcore.data.example import Example
from vlcore.storage.store import Store, trace_from_bytes, trace_to_bytes


@pytest.fixture
def trace(tiny_adapter, noise_image):
    return extract_trace(tiny_adapter, noise_image, "what is the cat?", "ex/1", gold=["red"])


def test_trace_round_trip_is_exact(trace):
    back = trace_from_bytes(trace_to_bytes(trace))
    for name in ("modality", "special", "patch_rc", "image", "attentions", "hidden"):
        a, b = getattr(trace, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert back.tokens == trace.tokens and back.grid == trace.grid and back.prediction == trace.prediction
    assert back.gold == ("red",) and back.meta == trace.meta and back.text == trace.text


def test_fp16_trace_is_about_half_of_fp32(trace):
    raw = (trace.attentions.size + trace.hidden.size) * 4
    assert len(trace_to_bytes(trace)) <= 0.55 * raw + trace.image.nbytes + 4096


def test_corrupted_entry_is_dropped_then_recomputed(tmp_path, trace):
    store = Store(tmp_path)
    path = store.put_trace("k" * 64, trace)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated file
    assert store.get_trace("k" * 64) is None
    assert not path.exists() and "damaged" in store.notices[0]
    calls = []
    got, cached = store.get_or_compute_trace("k" * 64, lambda: calls.append(1) or trace)
    assert not cached and calls == [1] and np.array_equal(got.attentions, trace.attentions)
    got, cached = store.get_or_compute_trace("k" * 64, lambda: calls.append(1) or trace)
    assert cached and calls == [1]


def test_wrong_schema_version_is_treated_as_damaged(tmp_path, trace, monkeypatch):
    import vlcore.storage.store as store_mod

    store = Store(tmp_path)
    store.put_trace("a" * 64, trace)
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 99)
    assert store.get_trace("a" * 64) is None


def test_eviction_keeps_the_cap_and_drops_least_recently_used(tmp_path, trace):
    size = len(trace_to_bytes(trace))
    store = Store(tmp_path, cap_bytes=int(2.5 * size))
    keys = [c * 64 for c in "abc"]
    store.put_trace(keys[0], trace)
    store.put_trace(keys[1], trace)
    old = time.time() - 100
    os.utime(store.trace_path(keys[0]), (old, old))
    os.utime(store.trace_path(keys[1]), (old - 50, old - 50))
    assert store.get_trace(keys[1]) is not None  # touching b makes a the least recently used
    store.put_trace(keys[2], trace)
    assert not store.has_trace(keys[0]) and store.has_trace(keys[1]) and store.has_trace(keys[2])
    on_disk = sum(p.stat().st_size for p in (tmp_path / "traces").rglob("*.safetensors"))
    assert on_disk <= store.cap_bytes


def test_trace_for_example_caches_by_content(tmp_path, tiny_adapter, noise_image):
    store = Store(tmp_path)
    ex = Example("ex/1", "what is the cat?", image=noise_image, answers=("red",))
    first, cached1 = trace_for_example(tiny_adapter, ex, store)
    second, cached2 = trace_for_example(tiny_adapter, ex, store)
    assert (cached1, cached2) == (False, True)
    assert np.array_equal(first.attentions, second.attentions)
    other = Example("ex/1", "what is the dog?", image=noise_image, answers=("red",))
    _, cached3 = trace_for_example(tiny_adapter, other, store)
    assert not cached3  # different text, different key


def test_key_changes_with_model_and_settings(tiny_adapter, tiny_tokenizer_dir):
    from tests.conftest import make_tiny_adapter

    other = make_tiny_adapter(tiny_tokenizer_dir, seed=1)
    assert trace_key(tiny_adapter, "h") != trace_key(other, "h")
    assert trace_key(tiny_adapter, "h", top_k=5) != trace_key(tiny_adapter, "h", top_k=3)
    assert trace_key(tiny_adapter, "h") == trace_key(tiny_adapter, "h")


def test_clear_and_size(tmp_path, trace):
    store = Store(tmp_path)
    store.put_trace("d" * 64, trace)
    assert store.size_bytes() > 0
    store.clear()
    assert store.size_bytes() == 0
