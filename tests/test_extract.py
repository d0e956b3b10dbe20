"""Sweeps: summaries computed on the device equal the trace path; parquet output; resume."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from vlcore.data.example import Example
from vlcore.run.extract import extract_trace
from vlcore.run.sweep import run_sweep, summarize_batch
from vlcore.storage.sweeps import PREDICTION_COLUMNS, load_sweep
from vlcore.analysis.stats import BUILTIN_METRICS, compute_trace_summaries
from vlcore.storage.sweeps import SUMMARY_COLUMNS


def examples(n: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = 48 if i % 3 else 32  # mixed sizes -> padded patches inside batches
        img = Image.fromarray(rng.integers(0, 255, (32, w, 3), dtype=np.uint8))
        q = ["what is the color?", "is there a cat in the image?", "what shape?"][i % 3]
        out.append(Example(f"t/{i}", q, image=img, answers=("red",), category=f"c{i % 2}"))
    return out


def test_batched_summaries_match_single_trace_path(tiny_adapter):
    exs = examples(6)
    batch = tiny_adapter.encode([e.load_image() for e in exs], [e.question for e in exs])
    summary = summarize_batch(tiny_adapter, batch, exs)
    assert list(summary.heads.columns) == SUMMARY_COLUMNS
    for ex in exs:
        trace = extract_trace(tiny_adapter, ex.load_image(), ex.question, ex.example_id)
        ref = compute_trace_summaries(trace).set_index(["layer", "head", "metric"])["value"]
        got = summary.heads[summary.heads.example_id == ex.example_id].set_index(["layer", "head", "metric"])["value"]
        np.testing.assert_allclose(got.sort_index().to_numpy(), ref.sort_index().to_numpy(), atol=1e-5)
        row = summary.predictions.set_index("example_id").loc[ex.example_id]
        assert row["prediction"] == trace.predicted


def test_sweep_writes_parquet_and_does_not_recompute(tiny_adapter, tmp_path):
    exs = examples(20)
    out = run_sweep(tiny_adapter, exs, tmp_path / "sweep", batch_size=4)
    preds, heads = load_sweep(out)
    assert list(preds.columns) == PREDICTION_COLUMNS and len(preds) == 20
    assert preds["example_id"].tolist() == [e.example_id for e in exs]
    assert len(heads) == 20 * 2 * 2 * len(BUILTIN_METRICS) and set(heads["metric"]) == set(BUILTIN_METRICS)
    assert (out / "predictions.parquet").exists() and not list(out.glob("part-*"))
    seen = []
    run_sweep(tiny_adapter, exs, out, batch_size=4, progress=seen.append)
    assert seen == []  # nothing recomputed


def test_interrupted_sweep_resumes_at_the_next_example(tiny_adapter, tmp_path):
    exs = examples(20)
    seen = []
    run_sweep(tiny_adapter, exs, tmp_path / "s", batch_size=5, progress=seen.append, should_stop=lambda: len(seen) >= 2)
    preds, _ = load_sweep(tmp_path / "s")
    assert len(preds) == 10
    encoded = []
    original = tiny_adapter.encode
    tiny_adapter.encode = lambda imgs, texts: encoded.append(len(texts)) or original(imgs, texts)
    progress = []
    run_sweep(tiny_adapter, exs, tmp_path / "s", batch_size=5, progress=progress.append)
    assert sum(encoded) == 10 and progress[0].skipped == 10  # resumed at example 11
    preds, heads = load_sweep(tmp_path / "s")
    assert preds["example_id"].tolist() == [e.example_id for e in exs]
    full = run_sweep(tiny_adapter, exs, tmp_path / "fresh", batch_size=5)
    ref_preds, ref_heads = load_sweep(full)
    pd.testing.assert_frame_equal(preds, ref_preds)


def test_damaged_part_is_recomputed(tiny_adapter, tmp_path):
    exs = examples(8)
    seen = []
    run_sweep(tiny_adapter, exs, tmp_path / "s", batch_size=4, progress=seen.append, should_stop=lambda: len(seen) >= 1)
    part = sorted((tmp_path / "s").glob("part-*.predictions.parquet"))[0]
    part.write_bytes(part.read_bytes()[:20])
    run_sweep(tiny_adapter, exs, tmp_path / "s", batch_size=4)
    preds, _ = load_sweep(tmp_path / "s")
    assert sorted(preds["example_id"]) == sorted(e.example_id for e in exs)
