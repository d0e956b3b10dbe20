"""Run a model: one example into a full `Trace`, or a dataset into per-example summaries.

A full trace (every attention and hidden state, fp16) exists only for examples a user
opens. Sweeps reduce on the model's device inside the batch loop and copy only
``[B, L, H, M]`` summaries and the top-k predictions to the host.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from filelock import FileLock

from vlcore.data.example import Example, content_hash
from vlcore.models.base import EncodedBatch, ModelAdapter
from vlcore.errors import InputError, StoreError
from vlcore.stats import SUMMARY_COLUMNS, compute_layer_summaries, summaries_to_frame
from vlcore.store import Store, atomic_write_bytes, fingerprint
from vlcore.trace import Trace

EXTRACT_VERSION = 1
PREDICTION_COLUMNS = [
    "example_id", "question", "gold", "category", "prediction", "probability", "correct",
    "top_k", "text_truncated", "n_text_tokens", "n_image_tokens",
]


def trace_key(adapter: ModelAdapter, example_hash: str, top_k: int = 5) -> str:
    """Store key of a full trace: model, processing, example content and settings."""
    return fingerprint("trace", EXTRACT_VERSION, adapter.fingerprint(), example_hash, {"top_k": top_k})


def extract_trace(
    adapter: ModelAdapter,
    image,
    text: str,
    example_id: str,
    gold: Sequence[str] | None = None,
    top_k: int = 5,
    meta: dict | None = None,
    image_pass: int = 0,
) -> Trace:
    """Run one (image, text) pair and capture everything.

    Args:
        adapter: a loaded model adapter.
        image: a PIL image; for an NLVR2 head a pair ``(left, right)``.
        text: the question or caption.
        example_id: id stored in the trace.
        gold: gold answers, if known.
        top_k: how many predictions to keep.
        meta: extra JSON-able fields for ``Trace.meta``.
        image_pass: which image's encoder pass to capture (NLVR2 runs one pass per image; the
            prediction always combines both).

    Returns:
        A `Trace` with float16 ``attentions [L, H, N, N]`` and ``hidden [L + 1, N, D]``; padding
        tokens (an NLVR2 pair of different sizes) are dropped.
    """
    batch = adapter.encode([image], [text])
    layout = adapter.pass_layout(batch, image_pass)
    keep = np.flatnonzero(layout.valid[0])
    with torch.no_grad():
        out = adapter.forward(batch, attentions=True, hidden=True)
        att_layers, hid_layers = adapter.pass_outputs(out, image_pass)
        attentions = torch.stack(att_layers)[:, 0].half().cpu().numpy()[:, :, keep][:, :, :, keep]
        hidden = torch.stack(hid_layers)[:, 0].half().cpu().numpy()[:, keep]
    prediction = adapter.predict(getattr(out, "logits", None), top_k=top_k, batch=batch)[0]
    return Trace(
        example_id=example_id,
        model_id=adapter.model_id,
        tokens=tuple(layout.tokens[0][i] for i in keep),
        modality=layout.modality[0][keep],
        special=layout.special[0][keep],
        patch_rc=layout.patch_rc[0][keep],
        grid=layout.grids[0],
        image=layout.images[0],
        patch_px=adapter.patch_px,
        attentions=attentions,
        hidden=hidden,
        prediction=tuple(prediction),
        gold=tuple(gold) if gold else None,
        text_truncated=batch.truncated[0],
        text=text,
        meta={
            "task": adapter.task,
            "n_text_tokens_full": batch.n_text_full[0],
            "max_text_len": adapter.max_text_len,
            "hidden_note": "hidden[L] is before the final LayerNorm",
            "image_pass": image_pass,
            "n_image_passes": adapter.n_passes,
            **(meta or {}),
        },
    )


def model_image_input(adapter: ModelAdapter, example: Example):
    """What the adapter reads as the example's image: one PIL image, or a pair for NLVR2.

    Raises:
        InputError: an NLVR2 model on an example with fewer than two images.
    """
    if adapter.n_passes == 1:
        return example.load_image()
    images = example.load_images()
    if len(images) < adapter.n_passes:
        raise InputError(
            f"{adapter.model_id} compares {adapter.n_passes} images (NLVR2); example {example.example_id} has "
            f"{len(images)}. Upload a second image or map a second image column."
        )
    return tuple(images[: adapter.n_passes])


def trace_for_example(
    adapter: ModelAdapter, example: Example, store: Store, top_k: int = 5, image_pass: int = 0
) -> tuple[Trace, bool]:
    """The example's trace from the store, computing and storing it on a miss.

    Returns:
        ``(trace, cached)``.
    """
    image = model_image_input(adapter, example)
    images = image if isinstance(image, tuple) else (image,)
    digest = "|".join(content_hash(im, example.question, example.answers) for im in images)
    key = trace_key(adapter, f"{example.example_id}|{digest}|pass{image_pass}", top_k)

    def compute() -> Trace:
        return extract_trace(
            adapter, image, example.question, example.example_id, example.answers or None, top_k,
            meta={"category": example.category, "source": example.source}, image_pass=image_pass,
        )

    return store.get_or_compute_trace(key, compute)


# ---------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------


@dataclass
class BatchSummary:
    """What one sweep batch leaves on the host."""

    predictions: pd.DataFrame
    heads: pd.DataFrame


def summarize_batch(adapter: ModelAdapter, batch: EncodedBatch, examples: Sequence[Example], top_k: int = 5) -> BatchSummary:
    """Forward one encoded batch and reduce it on the device.

    Only the per-head summaries ``[B, L, H, M]`` and the top-k predictions are copied to the host.
    """
    dev = adapter.device
    with torch.no_grad():
        out = adapter.forward(batch, attentions=True, hidden=False)
        names, values = compute_layer_summaries(
            adapter.pass_outputs(out, 0)[0],  # NLVR2: the first image's pass
            torch.from_numpy(batch.modality.astype(np.int64)).to(dev),
            torch.from_numpy(batch.special).to(dev),
            torch.from_numpy(batch.valid).to(dev),
            patch_rc=torch.from_numpy(batch.patch_rc.astype(np.int64)).to(dev),
        )
        values = values.cpu().numpy()
    preds = adapter.predict(getattr(out, "logits", None), top_k=top_k, batch=batch)
    ids = [e.example_id for e in examples]
    rows = []
    for b, ex in enumerate(examples):
        top = preds[b]
        best, prob = (top[0] if top else (None, float("nan")))
        gold = list(ex.answers)
        rows.append({
            "example_id": ex.example_id,
            "question": ex.question,
            "gold": gold,
            "category": ex.category,
            "prediction": best,
            "probability": prob,
            "correct": (best in gold) if adapter.task == "vqa" and gold and best is not None else None,
            "top_k": json.dumps(top),
            "text_truncated": batch.truncated[b],
            "n_text_tokens": int(((batch.modality[b] == 0) & batch.valid[b]).sum()),
            "n_image_tokens": int(((batch.modality[b] == 1) & batch.valid[b]).sum()),
        })
    return BatchSummary(pd.DataFrame(rows, columns=PREDICTION_COLUMNS), summaries_to_frame(ids, names, values))


@dataclass
class SweepProgress:
    """Passed to the progress callback after every batch."""

    done: int
    total: int
    skipped: int
    rate: float  # examples per second in this run
    eta_s: float


def sweep_key(adapter: ModelAdapter, dataset: str, example_ids: Sequence[str], top_k: int = 5) -> str:
    """Store key of a sweep: model, processing, dataset name and the exact example list."""
    return fingerprint("sweep", EXTRACT_VERSION, adapter.fingerprint(), dataset, list(example_ids), {"top_k": top_k})


def run_sweep(
    adapter: ModelAdapter,
    examples: Sequence[Example],
    out_dir: str | Path,
    dataset: str = "",
    batch_size: int = 8,
    top_k: int = 5,
    progress: Callable[[SweepProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    """Run a model over examples and write summaries as parquet, resumably.

    Every batch is written as a pair of parquet parts (head stats first, predictions last, so a
    predictions part marks a finished batch) named by the position of its first example. A
    cancelled or crashed sweep resumes after the last finished batch. When all examples are done
    the parts are merged into ``predictions.parquet`` and ``head_stats.parquet``. A folder holding
    another model's or another example list's sweep is refused, never mixed in.

    Args:
        adapter: the model.
        examples: what to run, in order (ids must be unique).
        out_dir: the sweep folder (``Store.sweep_dir(key)`` or any folder).
        dataset: dataset name recorded in the manifest.
        batch_size: examples per forward pass.
        top_k: predictions kept per example.
        progress: called after each batch.
        should_stop: polled before each batch; True cancels (the work done so far is kept).

    Raises:
        StoreError: ``out_dir`` holds a sweep of a different model, settings or example list.
        InputError: duplicate example ids.

    Returns:
        ``out_dir``.
    """
    ids = [e.example_id for e in examples]
    if len(set(ids)) != len(ids):
        raise InputError("the examples to sweep have duplicate ids; give every example a unique id")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = sweep_key(adapter, dataset, ids, top_k)
    with FileLock(str(out / ".lock")):
        _claim(out, key, adapter, dataset, len(examples), top_k, batch_size)
        done = completed_ids(out)
        todo = [(i, e) for i, e in enumerate(examples) if e.example_id not in done]
        start, finished = time.perf_counter(), 0
        for b in range(0, len(todo), batch_size):
            if should_stop is not None and should_stop():
                break
            chunk = todo[b : b + batch_size]
            batch = adapter.encode([model_image_input(adapter, e) for _, e in chunk], [e.question for _, e in chunk])
            summary = summarize_batch(adapter, batch, [e for _, e in chunk], top_k)
            part = f"part-{chunk[0][0]:07d}"
            _write_parquet(out / f"{part}.heads.parquet", summary.heads)
            _write_parquet(out / f"{part}.predictions.parquet", summary.predictions)
            finished += len(chunk)
            if progress is not None:
                rate = finished / max(time.perf_counter() - start, 1e-9)
                progress(SweepProgress(len(done) + finished, len(examples), len(done), rate, (len(todo) - finished) / rate))
        if completed_ids(out) >= set(ids):
            _consolidate(out, ids)
    return out


def _claim(out: Path, key: str, adapter: ModelAdapter, dataset: str, n: int, top_k: int, batch_size: int) -> None:
    """Write the manifest, or check that the folder's sweep is this one."""
    path = out / "manifest.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if old.get("key") not in (None, key):
            raise StoreError(
                f"{out} holds a sweep of {old.get('model_id')} on {old.get('n_examples')} examples of "
                f"{old.get('dataset')!r} with other settings; use another output folder for this one"
            )
        if old.get("key") == key:
            return
    _write_manifest(out, {
        "key": key, "model_id": adapter.model_id, "dataset": dataset, "n_examples": n, "top_k": top_k,
        "batch_size": batch_size, "created": time.time(), "complete": False, "schema": EXTRACT_VERSION,
    })


def completed_ids(out: Path) -> set[str]:
    """Example ids already summarised in a sweep folder (merged or in complete part pairs).

    A part whose predictions or head stats are missing or unreadable is deleted, so it is recomputed.
    """
    ids: set[str] = set()
    merged = out / "predictions.parquet"
    files = ([merged] if merged.exists() else []) + sorted(out.glob("part-*.predictions.parquet"))
    for path in files:
        twin = out / ("head_stats.parquet" if path == merged else path.name.replace(".predictions.", ".heads."))
        try:
            pd.read_parquet(twin, columns=["example_id"])
            ids.update(pd.read_parquet(path, columns=["example_id"])["example_id"].astype(str))
        except Exception:  # a half-written or corrupt part: drop it and its twin, recompute
            path.unlink(missing_ok=True)
            twin.unlink(missing_ok=True)
    return ids


def load_sweep(out_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(predictions, head_stats)`` of a sweep folder, finished or not (merged file plus parts)."""
    out = Path(out_dir)
    pred_files = [p for p in [out / "predictions.parquet"] if p.exists()] + sorted(out.glob("part-*.predictions.parquet"))
    head_files = [p for p in [out / "head_stats.parquet"] if p.exists()] + sorted(out.glob("part-*.heads.parquet"))
    preds = [_read(p) for p in pred_files]
    heads = [_read(p) for p in head_files]
    preds, heads = [p for p in preds if p is not None], [h for h in heads if h is not None]
    if not preds:
        return pd.DataFrame(columns=PREDICTION_COLUMNS), pd.DataFrame(columns=SUMMARY_COLUMNS)
    return pd.concat(preds, ignore_index=True), pd.concat(heads, ignore_index=True)


def _read(path: Path) -> pd.DataFrame | None:
    """A parquet file, or None when it vanished or is unreadable (another session may be merging)."""
    try:
        return pd.read_parquet(path)
    except Exception:
        return None


def _consolidate(out: Path, ids: list[str]) -> None:
    """Merge every part (and an earlier merged file) into the two files, in example order."""
    preds, heads = load_sweep(out)
    order = {eid: i for i, eid in enumerate(ids)}
    preds = preds[preds["example_id"].isin(order)].drop_duplicates("example_id")
    preds = preds.sort_values("example_id", key=lambda c: c.map(order)).reset_index(drop=True)
    heads = heads[heads["example_id"].astype(str).isin(order)]
    heads = heads.drop_duplicates(["example_id", "layer", "head", "metric"])
    heads = heads.sort_values("example_id", key=lambda c: c.astype(str).map(order), kind="stable")
    _write_parquet(out / "head_stats.parquet", heads.reset_index(drop=True))
    _write_parquet(out / "predictions.parquet", preds)  # written last: it marks completion
    for part in out.glob("part-*.parquet"):
        part.unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    _write_manifest(out, {**manifest, "complete": True})


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def _write_manifest(out: Path, manifest: dict) -> None:
    manifest["updated"] = time.time()
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=1).encode())
