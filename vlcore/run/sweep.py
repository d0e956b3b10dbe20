"""Run a model over a dataset: per-example summaries reduced on the device, written as resumable parquet.

Sweeps reduce inside the batch loop and copy only ``[B, L, H, M]`` summaries, the top-k predictions and a
bounded sample of token vectors (`sample_token_positions`: every text token, the image CLS and at most
``vector_patches`` patches per example, every layer, fp16, gathered on the device) to the host.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from filelock import FileLock

from vlcore.analysis.stats import (
    BUILTIN_METRICS,
    SUMMARY_COLUMNS,
    SummaryReducer,
    compute_custom_batch,
    custom_metric_names,
    summaries_to_frame,
)
from vlcore.data.example import Example
from vlcore.errors import DeviceMemoryError, InputError, StoreError
from vlcore.models.base import Capture, Captured, EncodedBatch, ModelAdapter
from vlcore.run.extract import _free_device_memory, is_out_of_memory, memory_message, model_image_input
from vlcore.storage.store import DamagedFileError, atomic_write_bytes, fingerprint, safetensors_from_bytes
from vlcore.storage.tables import parquet_from_bytes
from vlcore.trace import IMAGE, ROLE_PATCH, TEXT, TRACE_VERSION, TokenLayout

VECTOR_PATCHES = 16  # patches per example whose hidden vectors a sweep keeps (plus every text token)
VECTORS_FILE = "vectors.safetensors"
PREDICTION_COLUMNS = [
    "example_id", "question", "gold", "category", "prediction", "probability", "correct",
    "top_k", "text_truncated", "n_text_tokens", "n_image_tokens",
]


@dataclass
class BatchSummary:
    """What one sweep batch leaves on the host."""

    predictions: pd.DataFrame
    heads: pd.DataFrame
    vectors: dict | None = None  # `gather_token_vectors` output, when the sweep keeps vectors
    probe: dict | None = None  # `vlcore.run.probe_sweep.compute_probe_batch` output, in a probe sweep


def sample_token_positions(batch: EncodedBatch, max_patches: int, stream: str | None = None) -> list[np.ndarray]:
    """Per example, the positions of one stream whose hidden vectors a sweep keeps.

    Every valid token that is not an image patch (words, special tokens, image summaries such as the image
    CLS, generated tokens), and at most ``max_patches`` patches spread evenly over the example's patches in
    sequence order (deterministic: the same example always keeps the same patches).

    Args:
        batch: the encoded batch.
        max_patches: patch cap per example (0 keeps the other tokens only).
        stream: the stream (default ``batch.main``).

    Returns:
        ``B`` int64 arrays of positions in the padded batch, increasing.
    """
    out = []
    for lay in batch.streams[stream or batch.main]:
        keep = np.flatnonzero(lay.valid & (lay.role != ROLE_PATCH))
        patches = lay.index(ROLE_PATCH)
        if len(patches) > max_patches:
            patches = patches[np.unique(np.linspace(0, len(patches) - 1, max_patches).round().astype(int))]
        out.append(np.sort(np.concatenate([keep, patches])))
    return out


def gather_token_vectors(hidden_states: Sequence[torch.Tensor] | torch.Tensor, batch: EncodedBatch,
                         max_patches: int, stream: str | None = None) -> dict:
    """Pick the sampled tokens' vectors on the device and copy only them (fp16) to the host.

    Args:
        hidden_states: ``L + 1`` tensors ``[B, N, D]`` (or one ``[L + 1, B, N, D]``) of ``stream``, on the
            model's device.
        batch: the batch's layouts (first image pass).
        max_patches: patch cap per example (see `sample_token_positions`).
        stream: the stream the hidden states belong to (default ``batch.main``).

    Returns:
        ``vectors`` float16 ``[L + 1, T, D]`` and, per kept token, ``example`` (batch row), ``token``
        (index in the example's trace, padding removed), ``text``, ``modality``, ``special``,
        ``patch_rc`` and ``thumbs`` (uint8 ``[T, p, p, 3]`` patch pixels, zeros for non-patches).
    """
    layouts = batch.streams[stream or batch.main]
    positions = sample_token_positions(batch, max_patches, stream)
    rows = np.concatenate([np.full(len(p), b) for b, p in enumerate(positions)]).astype(np.int64)
    cols = np.concatenate(positions).astype(np.int64)
    dev = hidden_states[0].device
    r, c = torch.from_numpy(rows).to(dev), torch.from_numpy(cols).to(dev)
    vectors = torch.stack([h[r, c] for h in hidden_states]).half().cpu().numpy()
    picked = [(layouts[b], n) for b, n in zip(rows, cols)]
    rank = [np.cumsum(lay.valid) - 1 for lay in layouts]  # trace index of each valid position
    return {
        "vectors": vectors, "example": rows.astype(np.int32),
        "token": np.array([rank[b][n] for b, n in zip(rows, cols)], dtype=np.int32),
        "text": [lay.tokens[n] for lay, n in picked],
        "modality": np.array([lay.modality[n] for lay, n in picked], dtype=np.int8).reshape(-1),
        "special": np.array([lay.special[n] for lay, n in picked], dtype=bool).reshape(-1),
        "patch_rc": np.array([lay.patch_rc[n] for lay, n in picked], dtype=np.int16).reshape(-1, 2),
        "thumbs": _patch_thumbs(picked),
    }


def _patch_thumbs(picked: list) -> np.ndarray:
    """uint8 ``[T, p, p, 3]``: each picked patch token's cell of the image the model saw (zeros for other tokens),
    ``p`` the first patch cell's height; a cell of another size is resampled to it (nearest pixel)."""
    cells = [(lay.images[lay.image_of[n]], lay.cell[n]) if lay.role[n] == ROLE_PATCH else None for lay, n in picked]
    first = next((im.boxes[r, c] for im, (r, c) in filter(None, cells)), None)
    p = int(first[3] - first[1]) if first is not None else 1
    thumbs = np.zeros((len(picked), p, p, 3), dtype=np.uint8)
    for i, cell in enumerate(cells):
        if cell is None:
            continue
        image, (r, c) = cell
        x0, y0, x1, y1 = (int(v) for v in image.boxes[r, c])
        crop = image.image[y0:y1, x0:x1]
        if crop.shape[:2] != (p, p) and crop.size:
            crop = crop[np.arange(p) * crop.shape[0] // p][:, np.arange(p) * crop.shape[1] // p]
        thumbs[i, : crop.shape[0], : crop.shape[1]] = crop
    return thumbs


def prediction_row(example: Example, top: Sequence[tuple[str, float]], layouts: Sequence[TokenLayout],
                   truncated: bool, answers: bool = True) -> dict:
    """One row of a sweep's predictions table: the example, its top-k and, when it has gold answers and the
    model's predictions are answers (``answers``: `ModelAdapter.answers_compare`), whether the top prediction is
    one of them (as `vlcore.trace.Trace.correct`)."""
    best, prob = top[0] if top else (None, float("nan"))
    gold = list(example.answers)
    return {
        "example_id": example.example_id,
        "question": example.question,
        "gold": gold,
        "category": example.category,
        "prediction": best,
        "probability": prob,
        "correct": (best in gold) if answers and gold and best is not None else None,
        "top_k": json.dumps(list(top)),
        "text_truncated": truncated,
        "n_text_tokens": int(sum(((lay.modality == TEXT) & lay.valid).sum() for lay in layouts)),
        "n_image_tokens": int(sum(((lay.modality == IMAGE) & lay.valid).sum() for lay in layouts)),
    }


def summarize_batch(
    adapter: ModelAdapter, batch: EncodedBatch, examples: Sequence[Example], top_k: int = 5,
    vector_patches: int | None = None, probe: bool = False, block: str | None = None,
) -> BatchSummary:
    """Forward one encoded batch and reduce one attention block on the device.

    Only the per-head summaries ``[B, L, H, M]``, the top-k predictions and, when ``vector_patches``
    is not None, the sampled token vectors of the main stream (`gather_token_vectors`) are copied to the host;
    with ``probe``, also the probe payload (`vlcore.run.probe_sweep.compute_probe_batch`).

    Args:
        adapter, batch, examples, top_k, vector_patches, probe: as in `run_sweep`.
        block: the block summarised (default ``adapter.default_block``).
    """
    block = block or adapter.default_block
    spec = adapter.block_specs()[block]
    layout_batch = adapter.pass_batch(batch, 0)  # NLVR2: the first image's pass
    reducer = SummaryReducer.from_layouts(layout_batch.streams[spec.query],
                                          None if spec.is_self else layout_batch.streams[spec.key],
                                          causal=spec.causal, device=adapter.device)
    ids = [e.example_id for e in examples]
    with torch.no_grad():
        keep = probe or bool(custom_metric_names())  # these read each example's full attentions
        captured = _forward_reduced(adapter, batch, reducer, hidden=vector_patches is not None, keep_attentions=keep,
                                    block=block)
        names, values = list(BUILTIN_METRICS), reducer.values().cpu().numpy()
        layers = list(captured.attentions[block]) if keep else []
        custom = compute_custom_batch(layers, layout_batch, ids, adapter.model_id, spec, block) if keep else None
        if custom is not None:
            names, values = names + custom[0], np.concatenate([values, custom[1]], -1)
        vectors = None
        if vector_patches is not None and captured.hidden.get(layout_batch.main) is not None:
            vectors = gather_token_vectors(captured.hidden[layout_batch.main], layout_batch, vector_patches)
        probe_part = None
        if probe:  # probing data (issue 18): word→patch attention and region labels, reduced here
            from vlcore.run.probe_sweep import compute_probe_batch

            probe_part = compute_probe_batch(layers, layout_batch, examples, ids, query=spec.query, key=spec.key)
    preds = adapter.predict(captured.output, top_k=top_k, batch=batch)
    rows = [prediction_row(ex, preds[b], [lays[b] for lays in layout_batch.streams.values()], batch.truncated[b],
                           adapter.answers_compare) for b, ex in enumerate(examples)]
    if vectors is not None:
        vectors["example_ids"] = ids
    return BatchSummary(pd.DataFrame(rows, columns=PREDICTION_COLUMNS), summaries_to_frame(ids, names, values), vectors,
                        probe_part)


def _forward_reduced(
    adapter: ModelAdapter, batch: EncodedBatch, reducer: SummaryReducer, hidden: bool, keep_attentions: bool,
    block: str | None = None,
) -> Captured:
    """Forward a batch (`ModelAdapter.capture`) and feed each layer's attention of ``block`` (the first image pass)
    to ``reducer``.

    When nothing else needs the full attentions (``keep_attentions`` False) and the adapter can hand them over
    during the pass (`ModelAdapter.stream_attentions`), each layer is reduced inside the pass and dropped at
    once: the ``L`` attention tensors are never all held, and each is reduced while it is still in the cache.
    Otherwise the layers are reduced after the pass.

    Returns:
        The `Captured` pass; with the in-pass reduction its attentions of ``block`` are empty placeholders.
    """
    block = block or adapter.default_block
    n_layers = adapter.block_specs()[block].n_layers
    with ExitStack() as stack:
        streamed = False
        if not keep_attentions:
            try:
                stack.enter_context(adapter.stream_attentions(block, reducer.add, image_pass=0))
                streamed = True
            except NotImplementedError:
                pass
        captured = adapter.capture(batch, Capture(blocks=(block,), hidden=hidden))
    if not streamed:
        for attention in captured.attentions[block]:
            reducer.add(attention)
    if len(reducer.layers) != n_layers:
        raise RuntimeError(f"{adapter.model_id}: {len(reducer.layers)} attention layers of block {block!r} reached "
                           f"the statistics, expected {n_layers}")
    return captured


@dataclass
class SweepProgress:
    """Passed to the progress callback after every batch."""

    done: int
    total: int
    skipped: int
    rate: float  # examples per second in this run
    eta_s: float


def sweep_key(
    adapter: ModelAdapter, dataset: str, example_ids: Sequence[str], top_k: int = 5,
    vector_patches: int | None = VECTOR_PATCHES, probe: bool = False, block: str | None = None,
) -> str:
    """Store key of a sweep: model, processing, dataset name, the exact example list and settings (the block
    summarised, when not the adapter's default)."""
    settings = {"top_k": top_k, "vector_patches": vector_patches}
    if block is not None and block != adapter.default_block:  # default-block sweeps keep their keys
        settings["block"] = block
    if probe:  # a probe sweep is another sweep (vlcore.run.probe_sweep); plain sweeps keep their keys
        from vlcore.run.probe_sweep import PROBE_VERSION

        settings["probe"] = PROBE_VERSION
    return fingerprint("sweep", TRACE_VERSION, adapter.fingerprint(), dataset, list(example_ids), settings)


def run_sweep(
    adapter: ModelAdapter,
    examples: Sequence[Example],
    out_dir: str | Path,
    dataset: str = "",
    batch_size: int = 8,
    top_k: int = 5,
    progress: Callable[[SweepProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    vector_patches: int | None = VECTOR_PATCHES,
    probe: bool = False,
    block: str | None = None,
) -> Path:
    """Run a model over examples and write summaries as parquet, resumably.

    Every batch is written as parts named by the position of its first example: head stats, then
    the sampled token vectors (``part-*.vectors.safetensors``, when ``vector_patches`` is not None),
    then predictions last, so a predictions part marks a finished batch. A cancelled or crashed
    sweep resumes after the last finished batch. When all examples are done the parts are merged
    into ``head_stats.parquet``, ``vectors.safetensors`` and ``predictions.parquet``. A folder
    holding another model's or another example list's sweep is refused, never mixed in.

    Vectors are bounded: per example every text token (at most the model's 40 positions), the image
    CLS and ``vector_patches`` patches, for every layer, fp16: at most ``(40 + 1 + K) * (L + 1) * D * 2``
    bytes per example (ViLT-B/32 with K = 16 and a 12-token question: 29 tokens, 0.58 MB).

    Args:
        adapter: the model.
        examples: what to run, in order (ids must be unique).
        out_dir: the sweep folder (``Store.sweep_dir(key)`` or any folder).
        dataset: dataset name recorded in the manifest.
        batch_size: examples per forward pass.
        top_k: predictions kept per example.
        progress: called after each batch.
        should_stop: polled before each batch; True cancels (the work done so far is kept).
        vector_patches: patches per example whose vectors are kept (``K``); None keeps no vectors.
        probe: also store what probes need (``part-*.probe.safetensors``, merged into
            ``probe.safetensors``; see `vlcore.run.probe_sweep`). A probe sweep has its own key.
        block: the attention block whose per-head statistics are kept (default ``adapter.default_block``;
            another block makes another sweep). The manifest records it.

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
    block = block or adapter.default_block
    if block not in adapter.block_specs():
        raise InputError(f"{adapter.model_id} has no attention block {block!r}; its blocks: {list(adapter.block_specs())}")
    key = sweep_key(adapter, dataset, ids, top_k, vector_patches, probe=probe, block=block)
    with FileLock(str(out / ".lock")):
        notices = _drop_stale(out)
        _claim(out, key, adapter, dataset, len(examples), top_k, batch_size, vector_patches, probe=probe, block=block)
        done = completed_ids(out, notices)
        todo = [(i, e) for i, e in enumerate(examples) if e.example_id not in done]
        start, finished, b, size = time.perf_counter(), 0, 0, batch_size
        while b < len(todo):
            if should_stop is not None and should_stop():
                break
            chunk = todo[b : b + size]
            try:
                batch = adapter.encode([model_image_input(adapter, e) for _, e in chunk], [e.question for _, e in chunk])
                summary = summarize_batch(adapter, batch, [e for _, e in chunk], top_k, vector_patches, probe=probe,
                                          block=block)
            except (RuntimeError, MemoryError) as exc:  # out of memory: halve the batch and retry it
                if not is_out_of_memory(exc):
                    raise
                _free_device_memory(adapter)
                if size == 1:
                    raise DeviceMemoryError(memory_message(adapter, "at batch size 1; finished batches are kept")) from exc
                size = max(1, size // 2)
                continue
            b += len(chunk)
            part = f"part-{chunk[0][0]:07d}"
            _write_parquet(out / f"{part}.heads.parquet", summary.heads)
            if summary.vectors is not None:
                atomic_write_bytes(out / f"{part}.vectors.safetensors", vectors_to_bytes(summary.vectors))
            if summary.probe is not None:
                from vlcore.run.probe_sweep import probe_to_bytes

                atomic_write_bytes(out / f"{part}.probe.safetensors", probe_to_bytes(summary.probe))
            _write_parquet(out / f"{part}.predictions.parquet", summary.predictions)
            finished += len(chunk)
            if progress is not None:
                rate = finished / max(time.perf_counter() - start, 1e-9)
                progress(SweepProgress(len(done) + finished, len(examples), len(done), rate, (len(todo) - finished) / rate))
        if size != batch_size:
            notices.append(f"{adapter.model_id} ran out of memory on {adapter.device}: the batch size went from "
                           f"{batch_size} to {size} (the results are the same)")
        _write_manifest(out, {**_manifest(out), "notices": notices, "batch_size": size})
        if completed_ids(out) >= set(ids):
            _consolidate(out, ids)
    return out


def _drop_stale(out: Path) -> list[str]:
    """Empty a sweep folder whose manifest is damaged or of another schema; returns the notice."""
    path = out / "manifest.json"
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_bytes())  # an OSError of the disk propagates: it says nothing about the sweep
        schema = data.get("schema") if isinstance(data, dict) else "damaged"
    except FileNotFoundError:
        return []
    except ValueError:  # not JSON (or not UTF-8): the manifest is damaged
        schema = "damaged"
    if schema == TRACE_VERSION:
        return []
    for file in out.iterdir():
        if file.is_file() and file.name != ".lock":
            file.unlink(missing_ok=True)
    return [(f"dropped the sweep stored in {out.name[:12]} (manifest schema {schema}, this VLScope writes "
             f"{TRACE_VERSION}); it is computed again")]


def _claim(
    out: Path, key: str, adapter: ModelAdapter, dataset: str, n: int, top_k: int, batch_size: int,
    vector_patches: int | None, probe: bool = False, block: str | None = None,
) -> None:
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
        "batch_size": batch_size, "created": time.time(), "complete": False, "schema": TRACE_VERSION,
        "vector_patches": vector_patches, "block": block, **({"probe": True} if probe else {}),
    })


def completed_ids(out: Path, notices: list[str] | None = None) -> set[str]:
    """Example ids already summarised in a sweep folder (merged files or complete parts).

    A part (or merged file) whose predictions, head stats or (when the sweep keeps them) vectors are
    missing or do not parse (`DamagedFileError`) is deleted with its twins, so it is recomputed; ``notices``
    gets a line. Any other failure (``MemoryError``, a disk error, a bug) propagates and deletes nothing.
    """
    ids: set[str] = set()
    with_vectors = _manifest(out).get("vector_patches") is not None
    with_probe = bool(_manifest(out).get("probe"))
    if with_probe:
        from vlcore.run.probe_sweep import probe_part_ok, probe_part_path
    merged = out / "predictions.parquet"
    files = ([merged] if merged.exists() else []) + sorted(out.glob("part-*.predictions.parquet"))
    for path in files:
        if path == merged:
            heads, vectors = out / "head_stats.parquet", out / VECTORS_FILE
        else:
            heads = out / path.name.replace(".predictions.parquet", ".heads.parquet")
            vectors = out / path.name.replace(".predictions.parquet", ".vectors.safetensors")
        if with_probe and not probe_part_ok(probe_part_path(path)):  # a probe sweep's batch needs its probe part
            for twin in (path, heads, vectors, probe_part_path(path)):
                twin.unlink(missing_ok=True)
            if notices is not None:
                notices.append(f"dropped sweep results {path.name} without a readable probe part; they were "
                               "computed again")
            continue
        try:
            _read_parquet(heads, columns=["example_id"])
            if with_vectors:
                _vector_ids(vectors)
            ids.update(_read_parquet(path, columns=["example_id"])["example_id"].astype(str))
        except (FileNotFoundError, DamagedFileError) as exc:  # a missing twin or a corrupt file: drop, recompute
            for twin in (path, heads, vectors):
                twin.unlink(missing_ok=True)
            if notices is not None:
                notices.append(f"dropped damaged sweep results {path.name} ({_cause(exc)}); they were "
                               "computed again")
    return ids


def _manifest(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def vectors_to_bytes(part: dict) -> bytes:
    """A sweep's sampled token vectors (`gather_token_vectors` plus ``example_ids``) as safetensors.

    Strings (example ids, token texts) go into the header as JSON; patch thumbnails are stored for
    patch tokens only.
    """
    from safetensors.numpy import save

    is_patch = np.asarray(part["patch_rc"])[:, 0] >= 0
    tensors = {
        "vectors": np.ascontiguousarray(part["vectors"], dtype=np.float16),
        "example": np.asarray(part["example"], dtype=np.int32),
        "token": np.asarray(part["token"], dtype=np.int32),
        "modality": np.asarray(part["modality"], dtype=np.int8),
        "special": np.asarray(part["special"], dtype=np.uint8),
        "patch_rc": np.asarray(part["patch_rc"], dtype=np.int16),
        "thumbs": np.ascontiguousarray(np.asarray(part["thumbs"], dtype=np.uint8)[is_patch]),
    }
    meta = {"example_ids": json.dumps(list(part["example_ids"])), "text": json.dumps(list(part["text"])),
            "schema": "1"}
    return save(tensors, metadata=meta)


def vectors_from_bytes(data: bytes) -> dict:
    """Inverse of `vectors_to_bytes` (thumbnails expanded back to one per token).

    Raises:
        DamagedFileError: a damaged file (not safetensors, a header or shapes that do not match); a
            `ValueError`. Anything else (``MemoryError``, a bug) propagates.
    """
    arrays, header = safetensors_from_bytes(data, "vectors file")
    try:
        example_ids, text = json.loads(header["example_ids"]), json.loads(header["text"])
    except (KeyError, ValueError) as exc:
        raise DamagedFileError(f"damaged vectors file: no example ids or token texts ({exc})") from exc
    _check_vector_shapes(arrays, example_ids, text)
    part = {k: v for k, v in arrays.items() if k != "thumbs"}
    part["example_ids"], part["text"] = example_ids, text
    part["special"] = part["special"].astype(bool)
    is_patch = part["patch_rc"][:, 0] >= 0
    part["thumbs"] = np.zeros((len(is_patch), *arrays["thumbs"].shape[1:]), dtype=np.uint8)
    part["thumbs"][is_patch] = arrays["thumbs"]
    return part


def _check_vector_shapes(arrays: dict, example_ids, text) -> None:
    """Raise `DamagedFileError` unless the arrays and header of a vectors file fit together."""
    def fail(what: str):
        raise DamagedFileError(f"damaged vectors file: {what}")

    names = ("vectors", "example", "token", "modality", "special", "patch_rc", "thumbs")
    if missing := [n for n in names if n not in arrays]:
        fail(f"no {missing[0]!r} array")
    if not isinstance(example_ids, list) or not isinstance(text, list):
        fail("example ids or token texts are not lists")
    t = len(arrays["example"])
    if arrays["vectors"].ndim != 3 or arrays["vectors"].shape[1] != t or arrays["patch_rc"].shape != (t, 2):
        fail(f"{t} tokens, vectors {arrays['vectors'].shape}, patch_rc {arrays['patch_rc'].shape}")
    if any(len(arrays[n]) != t for n in ("token", "modality", "special")) or len(text) != t:
        fail(f"per-token fields of different lengths for {t} tokens")
    if t and not 0 <= int(arrays["example"].min()) <= int(arrays["example"].max()) < len(example_ids):
        fail("token rows point outside the example ids")
    if arrays["thumbs"].ndim != 4 or len(arrays["thumbs"]) != int((arrays["patch_rc"][:, 0] >= 0).sum()):
        fail(f"{len(arrays['thumbs'])} thumbnails for {int((arrays['patch_rc'][:, 0] >= 0).sum())} patch tokens")


def _vector_ids(path: Path) -> list[str]:
    """Example ids of a vectors file (reads the whole file: it also checks it is readable)."""
    return vectors_from_bytes(path.read_bytes())["example_ids"]


def _vector_files(out: Path) -> list[Path]:
    merged = out / VECTORS_FILE
    return ([merged] if merged.exists() else []) + sorted(out.glob("part-*.vectors.safetensors"))


def merge_vector_parts(parts: Sequence[dict], keep_ids: Sequence[str] | None = None) -> dict | None:
    """Concatenate vector parts into one, each example once (first seen), optionally ordered by ``keep_ids``.

    Returns:
        A dict of the `gather_token_vectors` form with ``example`` indexing ``example_ids``; None when
        ``parts`` is empty or keeps nothing.
    """
    if not parts:
        return None
    ids_in = [[str(part["example_ids"][i]) for i in part["example"]] for part in parts]
    order = list(keep_ids) if keep_ids is not None else list(dict.fromkeys(e for ids in ids_in for e in ids))
    rank = {eid: i for i, eid in enumerate(order)}
    seen: dict[str, int] = {}
    picks = []  # (example rank, part index, row)
    for p, ids in enumerate(ids_in):
        for row, eid in enumerate(ids):
            if eid in rank and seen.setdefault(eid, p) == p:
                picks.append((rank[eid], p, row))
    if not picks:
        return None
    picks.sort()  # by example, then part, then row (token order within an example)
    offsets = np.cumsum([0] + [len(part["example"]) for part in parts])
    flat = np.array([offsets[p] + r for _, p, r in picks], dtype=np.int64)
    used = [e for e in order if e in seen]
    new_index = {eid: i for i, eid in enumerate(used)}

    def cat(name: str, axis: int = 0) -> np.ndarray:
        return np.take(np.concatenate([part[name] for part in parts], axis=axis), flat, axis=axis)

    texts = [parts[p]["text"][r] for _, p, r in picks]
    example = np.array([new_index[ids_in[p][r]] for _, p, r in picks], dtype=np.int32)
    return {
        "vectors": cat("vectors", axis=1), "example": example, "token": cat("token"), "text": texts,
        "modality": cat("modality"), "special": cat("special"), "patch_rc": cat("patch_rc"),
        "thumbs": cat("thumbs"), "example_ids": used,
    }


def load_sweep_vectors(out_dir: str | Path) -> dict | None:
    """The sampled token vectors of a sweep folder, finished or not (merged file plus parts).

    Returns:
        The `merge_vector_parts` dict (``vectors`` float16 ``[L + 1, T, D]``, per-token fields, and
        ``example_ids``), or None when the sweep kept no vectors (made before vectors existed, or
        with ``vector_patches=None``). Files that vanished (merged meanwhile) or are damaged are skipped
        (never deleted here: the sweep itself drops and recomputes them); other errors propagate.
    """
    parts = []
    for path in _vector_files(Path(out_dir)):
        try:
            parts.append(vectors_from_bytes(path.read_bytes()))
        except (FileNotFoundError, DamagedFileError):
            continue
    return merge_vector_parts(parts)


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
    heads = pd.concat(heads, ignore_index=True) if heads else pd.DataFrame(columns=SUMMARY_COLUMNS)
    return pd.concat(preds, ignore_index=True), heads


def _read(path: Path) -> pd.DataFrame | None:
    """A parquet file, or None when it vanished (another session merged it) or is damaged.

    A damaged file (one that does not parse as parquet with an ``example_id`` column) is deleted and the
    sweep's manifest marked unfinished with a notice, so that the next start of the sweep recomputes what
    it held. Any other failure (``MemoryError``, a disk error, a bug) propagates and deletes nothing.
    """
    try:
        return _read_parquet(path)
    except FileNotFoundError:
        return None
    except DamagedFileError as exc:
        path.unlink(missing_ok=True)
        manifest = _manifest(path.parent)
        if manifest:
            note = (f"dropped damaged sweep results {path.name} ({_cause(exc)}); start the sweep again "
                    "to recompute them")
            _write_manifest(path.parent, {**manifest, "complete": False,
                                          "notices": [*manifest.get("notices", []), note]})
        return None


def _cause(exc: BaseException) -> str:
    """The name of what went wrong: the parser's own error under a `DamagedFileError`, else the error's."""
    return type(exc.__cause__ or exc).__name__


def _read_parquet(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A sweep parquet file; raises `DamagedFileError` when it does not parse or has no ``example_id``."""
    return parquet_from_bytes(path.read_bytes(), path.name, columns=columns, required=("example_id",))


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
    vectors = load_sweep_vectors(out)
    if vectors is not None:
        atomic_write_bytes(out / VECTORS_FILE, vectors_to_bytes(merge_vector_parts([vectors], ids)))
    if _manifest(out).get("probe"):
        from vlcore.run.probe_sweep import consolidate_probe

        consolidate_probe(out, ids)
    _write_parquet(out / "predictions.parquet", preds)  # written last: it marks completion
    for part in [*out.glob("part-*.parquet"), *out.glob("part-*.vectors.safetensors"), *out.glob("part-*.probe.safetensors")]:
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
