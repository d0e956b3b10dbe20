"""What a probe sweep stores beside the usual parts: region labels per patch and word→patch attention.

`vlcore.run.sweep.run_sweep(..., probe=True)` calls `compute_probe_batch` in each batch pass, on the model's
device, and writes its result as ``part-*.probe.safetensors`` (merged into ``probe.safetensors`` when the
sweep is complete), resumable and checked like the other parts. Per example it keeps:

- labels: the easy-VQA image's ``shape`` and ``color`` (from its questions' answers; see `vlcore.analysis.probe_labels`);
- every patch's coverage by the example's region (the easy-VQA shape mask; the union of the boxes of the
  objects a VCR question names): ``patch_example, patch_rc, patch_cover``;
- per grounding word (a word naming a region, `vlcore.analysis.probe_labels.example_regions`): its text, role and token
  positions, and for each patch its attention in every layer and head, averaged over the word's pieces,
  with the patch's coverage by the word's own region: ``pair_word, pair_rc, pair_cover, pair_attention
  [Q, L, H]`` (float16). Only these ``Q × L × H`` numbers leave the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from vlcore.analysis.probe_labels import compute_cover_grid, example_regions
from vlcore.analysis.probing import ProbingError
from vlcore.trace import TEXT



def compute_probe_batch(attentions: Sequence[torch.Tensor], batch, examples: Sequence, example_ids: Sequence[str],
                        query: str | None = None, key: str | None = None) -> dict:
    """The probe payload of one batch (see the module docstring).

    Args:
        attentions: ``L`` tensors ``[B, H, Q, K]`` of one block on the model's device (one image pass).
        batch: the `EncodedBatch` (its layouts and the images the model saw).
        examples: the batch's `Example` records.
        example_ids: their ids.
        query: the block's query stream, whose words are probed (default ``batch.main``).
        key: the block's key stream, whose patches are probed (default ``query``).

    Returns:
        A dict of the arrays in `ARRAYS` plus ``example_ids``, ``labels`` ({name: [value per example]}),
        ``word_text``, ``word_role`` and ``word_tokens`` (trace indices of each word's pieces).
    """
    query = query or batch.main
    key = key or query
    n_layers = len(attentions)
    n_heads = int(attentions[0].shape[1]) if n_layers else 0
    labels: dict[str, list] = {}
    patch_parts, words, pairs = [], [], []  # pairs: (batch row, word index, patch positions, cover)
    for b, example in enumerate(examples):
        q_lay, k_lay = batch.streams[query][b], batch.streams[key][b]
        rank = np.cumsum(q_lay.valid) - 1  # trace index of each valid query position
        text = np.flatnonzero((q_lay.modality == TEXT) & q_lay.valid & ~q_lay.special)
        cols, rc = k_lay.patch_positions(0)
        rc = rc.astype(np.int64)
        seen = k_lay.images[0] if k_lay.images else None
        image = seen.image if seen is not None else np.zeros((0, 0, 3), np.uint8)
        grid = seen.grid if seen is not None else (0, 0)
        p = seen.cell_px if seen is not None else 1
        found, region, grounding = example_regions(example, image, q_lay.tokens, text)
        for name, value in found.items():
            labels.setdefault(name, [None] * len(examples))[b] = value
        cover = compute_cover_grid(region, grid, p)[rc[:, 0], rc[:, 1]] if region is not None else np.full(len(cols), np.nan)
        patch_parts.append((np.full(len(cols), b), rc, cover))
        for word in grounding:
            own = compute_cover_grid(word.mask, grid, p)[rc[:, 0], rc[:, 1]]
            pairs.append((b, len(words), cols, rc, own))
            words.append((b, word.text, word.role, [int(rank[q]) for q in word.positions], list(word.positions)))
    payload = {
        "example_ids": list(example_ids), "labels": labels,
        "patch_example": np.concatenate([e for e, _, _ in patch_parts]).astype(np.int32),
        "patch_rc": np.concatenate([r for _, r, _ in patch_parts]).reshape(-1, 2).astype(np.int16),
        "patch_cover": np.concatenate([c for _, _, c in patch_parts]).astype(np.float16),
        "word_example": np.array([w[0] for w in words], dtype=np.int32),
        "word_text": [w[1] for w in words], "word_role": [w[2] for w in words], "word_tokens": [w[3] for w in words],
    }
    payload.update(_pair_attention(attentions, words, pairs, n_layers, n_heads))
    return payload


def _pair_attention(attentions, words: list, pairs: list, n_layers: int, n_heads: int) -> dict:
    """Gather each word's attention to each patch on the device: float16 ``[Q, L, H]`` plus the pair arrays."""
    if not pairs:
        return {"pair_word": np.zeros(0, np.int32), "pair_rc": np.zeros((0, 2), np.int16),
                "pair_cover": np.zeros(0, np.float16), "pair_attention": np.zeros((0, n_layers, n_heads), np.float16)}
    dev = attentions[0].device
    piece_row = torch.tensor([w[0] for w in words for _ in w[4]], device=dev)
    piece_pos = torch.tensor([q for w in words for q in w[4]], device=dev)
    piece_word = torch.tensor([i for i, w in enumerate(words) for _ in w[4]], device=dev)
    n_pieces = torch.bincount(piece_word, minlength=len(words)).to(attentions[0].dtype)[:, None, None]
    pair_word = torch.from_numpy(np.concatenate([np.full(len(c), i) for _, i, c, _, _ in pairs])).to(dev)
    pair_col = torch.from_numpy(np.concatenate([c for _, _, c, _, _ in pairs])).to(dev)
    out = []
    for att in attentions:  # [B, H, N, N]
        rows = att[piece_row, :, piece_pos, :]  # [pieces, H, N]
        per_word = torch.zeros((len(words), *rows.shape[1:]), dtype=rows.dtype, device=dev).index_add_(0, piece_word, rows)
        per_word = per_word / n_pieces
        out.append(per_word[pair_word, :, pair_col])  # [Q, H]
    return {
        "pair_word": pair_word.cpu().numpy().astype(np.int32),
        "pair_rc": np.concatenate([r for _, _, _, r, _ in pairs]).astype(np.int16),
        "pair_cover": np.concatenate([c for _, _, _, _, c in pairs]).astype(np.float16),
        "pair_attention": torch.stack(out, 1).half().cpu().numpy(),
    }


# -- files ------------------------------------------------------------------------------------------


# -- tables for the probes --------------------------------------------------------------------------


def example_label_table(probe: dict | None, predictions: pd.DataFrame | None) -> pd.DataFrame:
    """Example-level targets, indexed by example id: ``answer`` (first gold answer) and ``category`` from the
    predictions, plus the probe payload's labels (``shape``, ``color``)."""
    frame = pd.DataFrame(index=pd.Index([], dtype=object, name="example_id"))
    if predictions is not None and len(predictions):
        ids = predictions["example_id"].astype(str)
        gold = predictions["gold"].map(lambda g: g[0] if g is not None and len(g) else None)
        frame = pd.DataFrame({"answer": gold.to_numpy(), "category": predictions["category"].to_numpy()},
                             index=pd.Index(ids, name="example_id"))
    if probe is not None:
        extra = pd.DataFrame(probe["labels"], index=pd.Index(probe["example_ids"], name="example_id"))
        frame = frame.join(extra, how="outer") if len(frame) else extra
    return frame[~frame.index.duplicated()]


def patch_cover_table(probe: dict | None) -> pd.DataFrame:
    """``example_id, row, col, cover`` of every patch in a probe payload (empty without one)."""
    if probe is None:
        return pd.DataFrame(columns=["example_id", "row", "col", "cover"])
    ids = np.asarray(probe["example_ids"], dtype=object)
    return pd.DataFrame({"example_id": ids[probe["patch_example"]], "row": probe["patch_rc"][:, 0].astype(np.int64),
                         "col": probe["patch_rc"][:, 1].astype(np.int64),
                         "cover": probe["patch_cover"].astype(np.float32)})


def require_probe(probe: dict | None) -> dict:
    """The payload, or a `ProbingError` saying how to make a probe sweep."""
    if probe is None:
        raise ProbingError("this sweep stored no probe data (word→patch attention, region labels); make a probe "
                           "sweep: run_sweep(..., probe=True), or the button on the Probing page")
    return probe
