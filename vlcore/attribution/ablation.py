"""Causal head importance: mask one head at a time and measure the drop in the answer's probability.

Transformers 5.x's ViLT has no ``head_mask`` argument, so masking is a forward hook on each layer's
self-attention module (the adapter names them: `ModelAdapter.self_attention_modules`) that zeroes
the head's slice of the attention output, which is exactly what ``head_mask`` did (it multiplied the
head's attention probabilities by 0, so its context vector is 0). All ``L × H`` masked variants of
one example run as copies in a few batched forward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vlcore.models.base import ModelAdapter

METRIC = "ablation_drop"


@contextmanager
def head_mask_hooks(adapter: ModelAdapter, mask: torch.Tensor):
    """Within the block, multiply every head's output by ``mask`` ``[B, L, H]`` (1 keeps, 0 removes).

    The hooks go through `ModelAdapter.hooked`: they mask only the passes this block runs, never another
    session's pass through the same shared model, and are removed in ``finally``.
    """
    modules = adapter.self_attention_modules()
    if mask.shape[1:] != (len(modules), adapter.n_heads):
        raise ValueError(f"mask must be [B, {len(modules)}, {adapter.n_heads}], got {tuple(mask.shape)}")

    def make_hook(layer: int):
        def hook(module, args, output):
            context = output[0]  # [B, N, H * d]
            b, n, width = context.shape
            scale = mask[:, layer].to(context.dtype).repeat_interleave(width // adapter.n_heads, dim=1)
            return (context * scale[:, None, :],) + tuple(output[1:])
        return hook

    with adapter.hooked([(module, make_hook(layer)) for layer, module in enumerate(modules)]):
        yield


def extract_head_importance(
    adapter: ModelAdapter, image, text: str, answer: str | None = None, batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, str, float]:
    """Drop in the answer's probability when each head alone is masked.

    Args:
        adapter: a loaded model with a VQA, NLVR2 or ITM head.
        image: the example's image (a pair for NLVR2).
        text: the question or caption.
        answer: the answer label to follow; None follows the model's prediction.
        batch_size: masked copies per forward pass (``L × H`` copies in all).
        progress: called with ``(done, total)`` after each pass.

    Returns:
        ``(drop [L, H] float32, answer, base_probability)``; ``drop[l, h] = p(answer) - p(answer | head (l, h) masked)``.
    """
    batch = adapter.encode([image], [text])
    n_layers, n_heads = adapter.n_layers, adapter.n_heads
    with torch.no_grad():
        logits = adapter.forward(batch, attentions=False, hidden=False).logits
        base_probs, label = adapter.answer_probabilities(logits, answer)
        base = float(base_probs[0])
        total = n_layers * n_heads
        probs = np.empty(total, dtype=np.float32)
        eye = torch.eye(total, device=adapter.device).reshape(total, n_layers, n_heads)
        for start in range(0, total, batch_size):
            chunk = 1.0 - eye[start : start + batch_size]
            with head_mask_hooks(adapter, chunk):
                out = adapter.model(**batch.repeated_inputs(len(chunk)), return_dict=True)
            probs[start : start + len(chunk)] = adapter.answer_probabilities(out.logits, label)[0].float().cpu().numpy()
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
    from vlcore.storage.tables import frame_to_parquet
    from vlcore.storage.store import atomic_write_bytes

    old = load_sweep_importance(sweep_dir)
    merged = new if old is None else pd.concat([old, new], ignore_index=True)
    path = Path(sweep_dir) / IMPORTANCE_FILE
    atomic_write_bytes(path, frame_to_parquet(merged.drop_duplicates(["example_id", "layer", "head"], keep="last")))
    return path
