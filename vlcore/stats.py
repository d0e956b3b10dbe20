"""Per-head attention statistics as tidy DataFrames (``example_id, layer, head, metric, value``).

One implementation, written in torch over a batch, serves both paths: a sweep calls it on
the model's device inside the batch loop (only ``[B, L, H]`` numbers leave the device), and a
stored `Trace` is fed through it on the CPU. Rows of an attention matrix are queries,
columns keys. Special tokens ([CLS], [SEP], image CLS) and padding are excluded before
the blocks are formed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from vlcore.trace import IMAGE, TEXT, Trace

BLOCK_METRICS = ("txt2txt", "txt2img", "img2txt", "img2img")
SUMMARY_COLUMNS = ["example_id", "layer", "head", "metric", "value"]


def token_masks(modality: torch.Tensor, special: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Boolean ``[B, N]`` masks of the non-special text and image tokens.

    Args:
        modality: int ``[B, N]``; 0 text, 1 image.
        special: bool ``[B, N]``.
        valid: bool ``[B, N]``; False for padding.
    """
    keep = valid & ~special
    return {"txt": keep & (modality == TEXT), "img": keep & (modality == IMAGE)}


def compute_block_means(attention: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean attention in each modality block of every head of one layer.

    Args:
        attention: ``[B, H, N, N]`` attention probabilities (rows are queries).
        masks: from `token_masks`.

    Returns:
        ``{"txt2txt": [B, H], "txt2img": ..., "img2txt": ..., "img2img": ...}`` float32;
        NaN where a block is empty.
    """
    keys = torch.stack([masks["txt"], masks["img"]], dim=-1).to(attention.dtype)  # [B, N, 2]
    row_mass = torch.matmul(attention, keys[:, None]).float()  # [B, H, N, 2]: each row's mass per key modality
    out = {}
    for qi, src in enumerate(("txt", "img")):
        q = masks[src].float()
        for ki, dst in enumerate(("txt", "img")):
            total = torch.einsum("bhn,bn->bh", row_mass[..., ki], q)
            cells = (q.sum(1) * keys[..., ki].float().sum(1))[:, None]
            out[f"{src}2{dst}"] = total / cells.where(cells > 0, torch.full_like(cells, float("nan")))
    return out


def compute_layer_summaries(
    attentions: tuple[torch.Tensor, ...] | list[torch.Tensor], modality, special, valid, patch_rc=None
) -> tuple[list[str], torch.Tensor]:
    """Every per-head summary metric for a batch, on the attentions' device.

    Args:
        attentions: one ``[B, H, N, N]`` tensor per layer.
        modality, special, valid: ``[B, N]`` tensors (see `token_masks`).

    Returns:
        ``(metric_names, values)`` with values float32 ``[B, L, H, M]``, still on the device.
    """
    masks = token_masks(modality, special, valid)
    per_layer = []
    for att in attentions:
        blocks = compute_block_means(att, masks)
        per_layer.append(torch.stack([blocks[m] for m in BLOCK_METRICS], dim=-1))
    return list(BLOCK_METRICS), torch.stack(per_layer, dim=1)


def summaries_to_frame(example_ids: list[str], names: list[str], values: np.ndarray) -> pd.DataFrame:
    """Tidy frame from ``[B, L, H, M]`` values: one row per example, layer, head and metric."""
    b, n_layers, n_heads, m = values.shape
    idx = np.indices((b, n_layers, n_heads, m)).reshape(4, -1)
    return pd.DataFrame(
        {
            "example_id": pd.Categorical(np.asarray(example_ids, dtype=object)[idx[0]]),
            "layer": idx[1].astype(np.int16),
            "head": idx[2].astype(np.int16),
            "metric": pd.Categorical(np.asarray(names, dtype=object)[idx[3]], categories=names),
            "value": values.reshape(-1).astype(np.float32),
        }
    )


def compute_trace_summaries(trace: Trace) -> pd.DataFrame:
    """The same per-head summaries as a sweep, from one stored trace (tidy frame)."""
    if trace.attentions is None:
        raise ValueError("this trace has no attentions")
    att = torch.from_numpy(np.asarray(trace.attentions, dtype=np.float32))
    valid = torch.ones((1, trace.n_tokens), dtype=torch.bool)
    names, values = compute_layer_summaries(
        [att[layer][None] for layer in range(att.shape[0])],
        torch.from_numpy(trace.modality.astype(np.int64))[None],
        torch.from_numpy(trace.special.copy())[None],
        valid,
    )
    return summaries_to_frame([trace.example_id], names, values.numpy())
