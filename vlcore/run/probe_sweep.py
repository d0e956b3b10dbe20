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

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vlcore.analysis.probe_labels import compute_cover_grid, example_regions
from vlcore.analysis.probing import ProbingError
from vlcore.trace import TEXT

PROBE_FILE = "probe.safetensors"
PROBE_VERSION = "2"  # part of a probe sweep's key: a change of the payload makes a new sweep
ARRAYS = ("patch_example", "patch_rc", "patch_cover", "word_example", "pair_word", "pair_rc", "pair_cover",
          "pair_attention")


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


def probe_to_bytes(part: dict) -> bytes:
    """A probe payload as safetensors (strings and labels in the header as JSON)."""
    from safetensors.numpy import save

    tensors = {name: np.ascontiguousarray(part[name]) for name in ARRAYS}
    meta = {name: json.dumps(part[name]) for name in ("example_ids", "labels", "word_text", "word_role", "word_tokens")}
    return save(tensors, metadata={**meta, "schema": PROBE_VERSION})


def probe_from_bytes(data: bytes) -> dict:
    """Inverse of `probe_to_bytes`.

    Raises:
        ValueError: a damaged file.
    """
    from safetensors.numpy import load

    try:
        part = dict(load(data))
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
        for name in ("example_ids", "labels", "word_text", "word_role", "word_tokens"):
            part[name] = json.loads(header[name])
        missing = [name for name in ARRAYS if name not in part]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
    except Exception as exc:  # safetensors raises its own error type; any failure means damaged
        raise ValueError(f"damaged probe file: {type(exc).__name__}: {exc}") from exc
    return part


def probe_part_ok(path: Path) -> bool:
    """Whether a probe file exists and parses (a sweep recomputes a batch whose probe part is not)."""
    try:
        probe_from_bytes(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return False
    return True


def probe_files(out: Path) -> list[Path]:
    """The merged probe file (if any) then the parts, in order."""
    merged = out / PROBE_FILE
    return ([merged] if merged.exists() else []) + sorted(out.glob("part-*.probe.safetensors"))


def probe_part_path(predictions_part: Path) -> Path:
    """The probe twin of a sweep's predictions file (part or merged)."""
    if predictions_part.name == "predictions.parquet":
        return predictions_part.parent / PROBE_FILE
    return predictions_part.parent / predictions_part.name.replace(".predictions.parquet", ".probe.safetensors")


def merge_probe_parts(parts: Sequence[dict], keep_ids: Sequence[str] | None = None) -> dict | None:
    """Concatenate probe parts, each example once (first seen), ordered by ``keep_ids`` when given.

    Returns:
        One payload whose example indices point into its ``example_ids``; None when nothing is kept.
    """
    seen: dict[str, tuple[int, int]] = {}  # example id -> (part, row)
    for p, part in enumerate(parts):
        for row, eid in enumerate(part["example_ids"]):
            seen.setdefault(str(eid), (p, row))
    order = [e for e in (keep_ids if keep_ids is not None else seen) if e in seen]
    if not order:
        return None
    new_index = {eid: i for i, eid in enumerate(order)}
    names = sorted({name for part in parts for name in part["labels"]})
    labels = {name: [None] * len(order) for name in names}
    pieces: dict[str, list] = {name: [] for name in (*ARRAYS, "word_text", "word_role", "word_tokens")}
    n_words = 0
    for p, part in enumerate(parts):
        remap = np.array([new_index.get(str(e), -1) if seen.get(str(e), (None,))[0] == p else -1
                          for e in part["example_ids"]], dtype=np.int64)
        for name, values in part["labels"].items():
            for row, value in enumerate(values):
                if remap[row] >= 0:
                    labels[name][remap[row]] = value
        keep_patch, keep_word = remap[part["patch_example"]] >= 0, remap[part["word_example"]] >= 0
        word_new = np.cumsum(keep_word) - 1 + n_words
        keep_pair = keep_word[part["pair_word"]] if len(part["pair_word"]) else np.zeros(0, bool)
        pieces["patch_example"].append(remap[part["patch_example"]][keep_patch])
        for name in ("patch_rc", "patch_cover"):
            pieces[name].append(part[name][keep_patch])
        pieces["word_example"].append(remap[part["word_example"]][keep_word])
        for name in ("word_text", "word_role", "word_tokens"):
            pieces[name].append([v for v, k in zip(part[name], keep_word) if k])
        pieces["pair_word"].append(word_new[part["pair_word"]][keep_pair])
        for name in ("pair_rc", "pair_cover", "pair_attention"):
            pieces[name].append(part[name][keep_pair])
        n_words += int(keep_word.sum())
    merged = {name: np.concatenate(pieces[name]) for name in ARRAYS}
    for name in ("patch_example", "word_example", "pair_word"):
        merged[name] = merged[name].astype(np.int32)
    merged.update({name: [v for chunk in pieces[name] for v in chunk] for name in ("word_text", "word_role", "word_tokens")})
    return {**merged, "example_ids": order, "labels": labels}


def load_sweep_probe(out_dir: str | Path) -> dict | None:
    """The probe payload of a sweep folder, finished or not (merged file plus parts); None when the sweep
    stored none. Unreadable files are skipped."""
    parts = []
    for path in probe_files(Path(out_dir)):
        try:
            parts.append(probe_from_bytes(path.read_bytes()))
        except (OSError, ValueError):
            continue
    return merge_probe_parts(parts)


def consolidate_probe(out: Path, ids: Sequence[str]) -> None:
    """Merge a finished sweep's probe parts into `PROBE_FILE` (the parts are deleted by the caller)."""
    from vlcore.storage.store import atomic_write_bytes

    merged = load_sweep_probe(out)
    if merged is not None:
        atomic_write_bytes(out / PROBE_FILE, probe_to_bytes(merge_probe_parts([merged], ids)))


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
