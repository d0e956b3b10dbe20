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

from vlcore.analysis.answers import answer_in_gold
from vlcore.analysis.stats import (
    BUILTIN_METRICS,
    PROMPT_METRICS,
    SummaryReducer,
    compute_custom_batch,
    custom_metric_names,
    summaries_to_frame,
)
from vlcore.data.example import Example
from vlcore.errors import DeviceMemoryError, InputError
from vlcore.models.attention_rows import HeadSummaries
from vlcore.models.base import Capture, Captured, EncodedBatch, ModelAdapter
from vlcore.run.extract import _free_device_memory, is_out_of_memory, memory_message, model_image_input
from vlcore.storage.store import atomic_write_bytes, fingerprint
from vlcore.storage.sweeps import (
    claim,
    completed_ids,
    consolidate,
    drop_stale,
    read_manifest,
    vectors_to_bytes,
    write_manifest,
    write_parquet,
)
from vlcore.trace import IMAGE, ROLE_PATCH, TEXT, TRACE_VERSION, TokenLayout

VECTOR_PATCHES = 16  # patches per example whose hidden vectors a sweep keeps (plus every text token)
VECTORS_FILE = "vectors.safetensors"
GENERATIVE_SWEEP_VERSION = 1  # part of a generative model's sweep key: a change of its parts makes a new sweep
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
    one of them after VQA answer normalisation (`vlcore.analysis.answers.answer_in_gold`, as
    `vlcore.trace.Trace.correct`: a generated "Red." is correct for gold "red")."""
    best, prob = top[0] if top else (None, float("nan"))
    gold = list(example.answers)
    return {
        "example_id": example.example_id,
        "question": example.question,
        "gold": gold,
        "category": example.category,
        "prediction": best,
        "probability": prob,
        "correct": answer_in_gold(best, gold) if answers and gold and best is not None else None,
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
        prompt = prompt_summaries(captured, spec.n_layers, spec.n_heads)
        if prompt is not None:
            names, values = names + list(PROMPT_METRICS), np.concatenate([values, prompt], -1)
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


def prompt_summaries(captured: Captured, n_layers: int, n_heads: int) -> np.ndarray | None:
    """The per-head summaries over the prompt's rows that the pass computed on the device, if it did.

    A generative model's output carries them (`vlcore.models.attention_rows.HeadSummaries`: the entropy of each
    prompt row divided by the log of the keys its query sees, and the row's share on image tokens, reduced in row
    chunks while the pass ran) when its generated-token block was captured without eager attention.

    Args:
        captured: the pass.
        n_layers, n_heads: the summarised block's heads; summaries of another shape are not this block's.

    Returns:
        float32 ``[B, L, H, 2]`` (`PROMPT_METRICS` order), or None.
    """
    found = getattr(captured.output, "summaries", None)
    if not isinstance(found, HeadSummaries) or found.entropy.shape[1:] != (n_layers, n_heads):
        return None
    return np.stack([found.entropy, found.key_mass], -1).astype(np.float32)


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
    if adapter.generates:  # its parts hold the prompt metrics and normalised answers; earlier ones did not
        settings["generated"] = GENERATIVE_SWEEP_VERSION
    if probe:  # a probe sweep is another sweep (vlcore.run.probe_sweep); plain sweeps keep their keys
        from vlcore.storage.sweeps import PROBE_VERSION

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
        notices = drop_stale(out)
        claim(out, key, adapter.model_id, dataset, len(examples), top_k, batch_size, vector_patches, probe=probe, block=block)
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
            write_parquet(out / f"{part}.heads.parquet", summary.heads)
            if summary.vectors is not None:
                atomic_write_bytes(out / f"{part}.vectors.safetensors", vectors_to_bytes(summary.vectors))
            if summary.probe is not None:
                from vlcore.storage.sweeps import probe_to_bytes

                atomic_write_bytes(out / f"{part}.probe.safetensors", probe_to_bytes(summary.probe))
            write_parquet(out / f"{part}.predictions.parquet", summary.predictions)
            finished += len(chunk)
            if progress is not None:
                rate = finished / max(time.perf_counter() - start, 1e-9)
                progress(SweepProgress(len(done) + finished, len(examples), len(done), rate, (len(todo) - finished) / rate))
        if size != batch_size:
            notices.append(f"{adapter.model_id} ran out of memory on {adapter.device}: the batch size went from "
                           f"{batch_size} to {size} (the results are the same)")
        write_manifest(out, {**read_manifest(out), "notices": notices, "batch_size": size})
        if completed_ids(out) >= set(ids):
            consolidate(out, ids)
    return out


