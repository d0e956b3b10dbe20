"""Causal head importance: mask one head at a time and measure the drop in the target's probability.

Masking goes through the adapter (`ModelAdapter.head_mask`): each head's output in a block is multiplied by 0
(in a single-stream encoder: the head's slice of its self-attention output, what a ``head_mask`` argument does).
The drop is read from the adapter's score of the explained target (`ModelAdapter.target_score`). All ``L × H`` masked
variants of one example run as copies in a few batched passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vlcore.models.base import Capture, EncodedBatch, ModelAdapter

METRIC = "ablation_drop"


def head_mask_hooks(adapter: ModelAdapter, mask: torch.Tensor, block: str | None = None) -> AbstractContextManager[None]:
    """Within the block, multiply every head's output in ``block`` (default: the adapter's default block) by
    ``mask`` ``[B, L, H]`` (1 keeps, 0 removes): `ModelAdapter.head_mask`.

    The adapter's hooks go through `ModelAdapter.hooked`: they mask only the passes this block runs, never
    another session's pass through the same shared model, and are removed in ``finally``.
    """
    return adapter.head_mask(block or adapter.default_block, mask)


def repeat_batch(batch: EncodedBatch, n: int) -> EncodedBatch:
    """A one-example batch repeated ``n`` times (its inputs along the batch axis, its layouts)."""
    return EncodedBatch(batch.repeated_inputs(n), {k: v * n for k, v in batch.streams.items()}, batch.main,
                        batch.truncated * n, batch.n_text_full * n)


def extract_head_importance(
    adapter: ModelAdapter, image, text: str, answer: str | None = None, batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None, block: str | None = None,
) -> tuple[np.ndarray, str, float]:
    """Drop in the target's probability when each head of a block alone is masked.

    Args:
        adapter: a loaded model with something to explain (`ModelAdapter.target_score`) and head masking.
        image: the example's image (a pair for NLVR2).
        text: the question or caption.
        answer: the target to follow; None follows the model's prediction.
        batch_size: masked copies per forward pass (``L × H`` copies in all).
        progress: called with ``(done, total)`` after each pass.
        block: the block whose heads are masked (default ``adapter.default_block``).

    Returns:
        ``(drop [L, H] float32, answer, base_probability)``; ``drop[l, h] = p(answer) - p(answer | head (l, h) masked)``.
    """
    block = block or adapter.default_block
    spec = adapter.block_specs()[block]
    batch = adapter.encode([image], [text])
    n_layers, n_heads = spec.n_layers, spec.n_heads
    plain = Capture(blocks=(), hidden=False)
    with torch.no_grad():
        _, base_probs, label = adapter.target_score(adapter.capture(batch, plain).output, answer)
        base = float(base_probs[0])
        total = n_layers * n_heads
        probs = np.empty(total, dtype=np.float32)
        eye = torch.eye(total, device=adapter.device).reshape(total, n_layers, n_heads)
        for start in range(0, total, batch_size):
            chunk = 1.0 - eye[start : start + batch_size]
            with adapter.head_mask(block, chunk):
                out = adapter.capture(repeat_batch(batch, len(chunk)), plain).output
            probs[start : start + len(chunk)] = adapter.target_score(out, label)[1].float().cpu().numpy()
            if progress is not None:
                progress(min(start + len(chunk), total), total)
    return (base - probs).reshape(n_layers, n_heads), label, base


def importance_frame(example_id: str, drop: np.ndarray) -> pd.DataFrame:
    """Tidy rows (``example_id, layer, head, metric, value``) of a ``[L, H]`` drop."""
    layers, heads = np.indices(drop.shape)
    return pd.DataFrame({
        "example_id": example_id, "layer": layers.ravel().astype(np.int16), "head": heads.ravel().astype(np.int16),
        "metric": METRIC, "value": drop.ravel().astype(np.float32),
    })


def extract_sweep_importance(
    adapter: ModelAdapter, examples: Sequence, batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Head importance for each example (its predicted answer), as one tidy frame.

    Args:
        adapter: the model.
        examples: `Example` objects.
        batch_size: masked copies per forward pass.
        progress: called with ``(examples done, total)``.
    """
    from vlcore.run.extract import model_image_input

    frames = []
    for i, ex in enumerate(examples):
        drop, _, _ = extract_head_importance(adapter, model_image_input(adapter, ex), ex.question, batch_size=batch_size)
        frames.append(importance_frame(ex.example_id, drop))
        if progress is not None:
            progress(i + 1, len(examples))
    return pd.concat(frames, ignore_index=True)


IMPORTANCE_FILE = "head_importance.parquet"  # a sweep folder's stored head-importance rows
IMPORTANCE_COLUMNS = ("example_id", "layer", "head", "metric", "value")


def load_sweep_importance(sweep_dir: str | Path) -> pd.DataFrame | None:
    """The head-importance rows stored in a sweep folder, or None when there are none.

    A damaged file (not parquet, or without the ``example_id, layer, head, metric, value`` columns) is
    deleted (it can be recomputed) and None returned. Any other failure (``MemoryError``, a disk error, a
    bug) propagates and deletes nothing.
    """
    from vlcore.storage.store import DamagedFileError
    from vlcore.storage.tables import parquet_from_bytes

    path = Path(sweep_dir) / IMPORTANCE_FILE
    try:
        return parquet_from_bytes(path.read_bytes(), IMPORTANCE_FILE, required=IMPORTANCE_COLUMNS)
    except FileNotFoundError:
        return None
    except DamagedFileError:  # a half-written or corrupt file: drop it
        path.unlink(missing_ok=True)
        return None


def save_sweep_importance(sweep_dir: str | Path, new: pd.DataFrame) -> Path:
    """Add head-importance rows to a sweep folder's file (atomically; a later row for the same example and head
    replaces an earlier one)."""
    from vlcore.storage.store import atomic_write_bytes
    from vlcore.storage.tables import frame_to_parquet

    old = load_sweep_importance(sweep_dir)
    merged = new if old is None else pd.concat([old, new], ignore_index=True)
    path = Path(sweep_dir) / IMPORTANCE_FILE
    atomic_write_bytes(path, frame_to_parquet(merged.drop_duplicates(["example_id", "layer", "head"], keep="last")))
    return path
