"""Image-token layouts of Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM, PaliGemma and Gemma 3 (rules:
`vlcore.models.image_tokens`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from vlcore.models.image_token_base import (
    ImageLayoutError,
    ImageTokens,
    SequenceLayout,
    config_id,
    next_image,
    row_major,
    seen_image,
    sequence_layouts,
    stitch,
    text_only_aware,
    to_numpy,
    tokenizer_of,
)
from vlcore.trace import ROLE_PATCH, ROLE_SPECIAL, ImageGrid


# -- Qwen2-VL and Qwen2.5-VL -----------------------------------------------------------------------------------
def _qwen_image(rows: np.ndarray, thw, patch: int, merge: int, image_processor) -> np.ndarray:
    """Undo the Qwen image processor's patchify: flat patches ``[t*h*w, C*tp*ps*ps]`` in merge-block order into
    the first frame ``[h*ps, w*ps, 3]``."""
    t, h, w = (int(v) for v in thw)
    tp = rows.shape[1] // (3 * patch * patch)
    blocks = rows.reshape(t, h // merge, w // merge, merge, merge, 3, tp, patch, patch)[0, ..., 0, :, :]
    chw = blocks.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, h * patch, w * patch)
    return seen_image(chw, image_processor)


@text_only_aware
def qwen2_vl_layouts(batch: Mapping, processor, config) -> list[ImageTokens]:
    """Qwen2-VL and Qwen2.5-VL: per image a grid of ``spatial_merge_size``-square patch blocks (28 px at 14 / 2),
    row-major (Qwen2.5-VL's windows live inside its vision tower only).

    Args:
        batch: the processor's output (``input_ids``, ``pixel_values [patches, dim]``, ``image_grid_thw [I, 3]``).
        processor: the Qwen processor (see `vlcore.models.image_only_processors.build_qwen2_vl_processor`).
        config: the ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig``.

    Returns:
        One `ImageTokens` per example.

    Raises:
        ImageLayoutError: no ``image_grid_thw``, or the image tokens do not match it.
    """
    if batch.get("image_grid_thw") is None:
        raise ImageLayoutError("Qwen image tokens need the processor's `image_grid_thw`; pass the whole processor "
                               "output.")
    vision = config.vision_config
    patch, merge = int(vision.patch_size), int(vision.spatial_merge_size)
    thws = to_numpy(batch["image_grid_thw"]).reshape(-1, 3).astype(int)
    pixels = to_numpy(batch["pixel_values"])
    offsets = np.concatenate([[0], np.cumsum(thws.prod(axis=1))])
    start, end = config_id(config, "vision_start_token_id"), config_id(config, "vision_end_token_id")
    out, k = [], 0
    for ex in sequence_layouts(batch, tokenizer_of(processor), config_id(config, "image_token_id")):
        user = 0
        while ex.remaining():
            t, h, w = next_image(thws, k, "Qwen")
            image = _qwen_image(pixels[offsets[k]:offsets[k + 1]], (t, h, w), patch, merge, processor.image_processor)
            rows, cols = h // merge, w // merge
            g = ex.add_grid(ImageGrid.regular(image, (rows, cols), patch * merge), user, "image")
            pos = ex.take(t * rows * cols, f"image {k}")
            ex.put(pos, ROLE_PATCH, g, np.tile(row_major(rows, cols), (t, 1)))
            ex.mark_if(pos[0] - 1, start, g)
            ex.mark_if(pos[-1] + 1, end, g)
            k, user = k + 1, user + 1
        out.append(ex.finish())
    return out


# -- Idefics3 and SmolVLM ----------------------------------------------------------------------------------------
_ROW_COL = re.compile(r"row_(\d+)_col_(\d+)")


def _runs(positions: np.ndarray) -> list[np.ndarray]:
    """Consecutive runs of sorted positions.

    >>> [r.tolist() for r in _runs(np.array([2, 3, 7, 8, 9]))]
    [[2, 3], [7, 8, 9]]
    """
    if not len(positions):
        return []
    return np.split(positions, np.flatnonzero(np.diff(positions) != 1) + 1)


def _idefics_frames(ex: SequenceLayout, run_ids, fake_id: int, n_tokens: int) -> list[list[tuple[np.ndarray, str]]]:
    """The runs of image tokens grouped by prompt image: per image, ``(run, tag, gap)`` per frame, with ``tag``
    the text of the run's markers (``<fake_token_around_image><row_1_col_2>`` or ``...<global-img>``) and ``gap``
    the marker positions before the run (the tile-row newlines included) that belong to the image."""
    images, current, prev_end = [], [], -1
    for run in run_ids:
        if len(run) != n_tokens:
            raise ImageLayoutError(f"an Idefics3 frame holds {len(run)} image tokens, the config says {n_tokens} "
                                   "((image_size / patch_size / scale_factor)**2): use the checkpoint's processor.")
        fakes = np.flatnonzero(ex.ids[prev_end + 1:run[0]] == fake_id) + prev_end + 1
        lo = int(fakes[-1]) if len(fakes) else run[0]
        gap_lo = prev_end + 1 if current else lo  # the newlines between tile rows belong to the image
        tag = ex.tokenizer.decode([int(i) for i in ex.ids[lo:run[0]]], skip_special_tokens=False)
        current.append((run, tag, np.arange(gap_lo, run[0])))
        prev_end = run[-1]
        if "global" in tag:
            images.append(current)
            current = []
    if current:
        raise ImageLayoutError("an Idefics3 image's tiles are not followed by its <global-img> frame: the prompt "
                               "was cut short (truncation); raise the maximum length.")
    return images


@text_only_aware
def idefics3_layouts(batch: Mapping, processor, config) -> list[ImageTokens]:
    """Idefics3 and SmolVLM: per image a ``tiles`` grid (the tiles stitched) and a ``global`` grid, or one
    ``image`` grid when the image was not split; each token a ``scale_factor``-square block of patches.

    Args:
        batch: the processor's output (``input_ids``, ``pixel_values [B, frames, 3, S, S]``).
        processor: the ``Idefics3Processor`` / ``SmolVLMProcessor``.
        config: the ``Idefics3Config`` / ``SmolVLMConfig`` (``scale_factor``, vision ``image_size``, ``patch_size``).

    Returns:
        One `ImageTokens` per example.

    Raises:
        ImageLayoutError: the image tokens, markers and frames do not match.
    """
    vision = config.vision_config
    side_px, patch, scale = int(vision.image_size), int(vision.patch_size), int(config.scale_factor)
    n = side_px // patch // scale
    tokenizer = tokenizer_of(processor)
    fake_id = tokenizer.convert_tokens_to_ids(getattr(processor, "fake_image_token", "<fake_token_around_image>"))
    pixels = to_numpy(batch["pixel_values"])
    pixels = pixels[None] if pixels.ndim == 4 else pixels
    out = []
    for b, ex in enumerate(sequence_layouts(batch, tokenizer, config_id(config, "image_token_id"))):
        frames = [f for f in pixels[b] if np.any(f != 0.0)]  # the model drops all-zero (padding) frames
        runs = _runs(ex.free)
        ex.used = len(ex.free)
        f = 0
        for user, image_runs in enumerate(_idefics_frames(ex, runs, fake_id, n * n)):
            seen = [seen_image(next_image(frames, f + i, "Idefics3"), processor.image_processor)
                    for i in range(len(image_runs))]
            f += len(image_runs)
            _place_idefics(ex, image_runs, seen, n, scale * patch, user, fake_id)
        if f != len(frames):
            raise ImageLayoutError(f"example {b} has {len(frames)} image frames but its prompt places {f}: pass "
                                   "the images of each prompt together with it.")
        out.append(ex.finish())
    return out


def _place_idefics(ex: SequenceLayout, image_runs, seen, n: int, cell_px: int, user: int, fake_id: int) -> None:
    tiles = [(run, tag, gap) for run, tag, gap in image_runs if _ROW_COL.search(tag)]
    local = row_major(n, n)
    if tiles:
        where = [tuple(int(v) - 1 for v in _ROW_COL.search(tag).groups()) for _, tag, _ in tiles]
        grid = (max(r for r, _ in where) + 1, max(c for _, c in where) + 1)
        if sorted(where) != where or len(where) != grid[0] * grid[1]:
            raise ImageLayoutError(f"Idefics3 tile tags {where} are not a full row-major grid.")
        g = ex.add_grid(ImageGrid.regular(stitch(np.stack(seen[:len(tiles)]), grid), (grid[0] * n, grid[1] * n),
                                          cell_px), user, "tiles")
        for (run, _, gap), (tr, tc) in zip(tiles, where):
            ex.put(gap, ROLE_SPECIAL, g)
            ex.put(run, ROLE_PATCH, g, local + [tr * n, tc * n])
    run, _, gap = image_runs[-1]
    g = ex.add_grid(ImageGrid.regular(seen[-1], (n, n), cell_px), user, "global" if tiles else "image")
    ex.put(gap, ROLE_SPECIAL, g)
    ex.put(run, ROLE_PATCH, g, local)
    ex.mark_if(run[-1] + 1, fake_id, g)


# -- PaliGemma and Gemma 3 -------------------------------------------------------------------------------------
@text_only_aware
def paligemma_layouts(batch: Mapping, processor, config) -> list[ImageTokens]:
    """PaliGemma: ``image_seq_length`` tokens per image on an ``image_size / patch_size`` square grid (16 x 16 at
    224 / 14), before the prompt.

    Args:
        batch: the processor's output (``input_ids``, ``pixel_values [I, 3, S, S]``).
        processor: the ``PaliGemmaProcessor``.
        config: the ``PaliGemmaConfig``.

    Returns:
        One `ImageTokens` per example.

    Raises:
        ImageLayoutError: the image tokens do not match the images and the config.
    """
    ps = int(config.vision_config.patch_size)
    pixels = to_numpy(batch["pixel_values"])
    out, k = [], 0
    for ex in sequence_layouts(batch, tokenizer_of(processor), config_id(config, "image_token_id", "image_token_index")):
        user = 0
        while ex.remaining():
            image = seen_image(next_image(pixels, k, "PaliGemma"), processor.image_processor)
            rows, cols = image.shape[0] // ps, image.shape[1] // ps
            g = ex.add_grid(ImageGrid.regular(image, (rows, cols), ps), user, "image")
            ex.put(ex.take(rows * cols, f"image {k}"), ROLE_PATCH, g, row_major(rows, cols))
            k, user = k + 1, user + 1
        out.append(ex.finish())
    return out


@text_only_aware
def gemma3_layouts(batch: Mapping, processor, config, num_crops: Sequence[int] | None = None) -> list[ImageTokens]:
    """Gemma 3: ``mm_tokens_per_image`` tokens per image (or pan-and-scan crop), a ``sqrt`` x ``sqrt`` grid of
    average-pooled patch blocks (16 x 16 cells of 56 px at 896 / 14), between ``<start_of_image>`` and
    ``<end_of_image>``.

    Args:
        batch: the processor's output (``input_ids``, ``pixel_values [frames, 3, S, S]``).
        processor: the ``Gemma3Processor``.
        config: the ``Gemma3Config``.
        num_crops: with pan and scan, the crops of each image across the batch (the processor computes them but
            does not return them); without it every frame counts as an image of its own.

    Returns:
        One `ImageTokens` per example.

    Raises:
        ImageLayoutError: the image tokens do not match the frames and the config.
    """
    vision = config.vision_config
    per_side = int(vision.image_size) // int(vision.patch_size)
    side = math.isqrt(int(config.mm_tokens_per_image))
    cell_px = (per_side // side) * int(vision.patch_size)
    kinds = ["image"] * len(to_numpy(batch["pixel_values"])) if num_crops is None else \
        [kind for c in num_crops for kind in ["image"] + ["crop"] * int(c)]
    pixels = to_numpy(batch["pixel_values"])
    boi, eoi = config_id(config, "boi_token_id", "boi_token_index"), config_id(config, "eoi_token_id",
                                                                               "eoi_token_index")
    out, k = [], 0
    for ex in sequence_layouts(batch, tokenizer_of(processor), config_id(config, "image_token_id", "image_token_index")):
        user = -1
        while ex.remaining():
            image = seen_image(next_image(pixels, k, "Gemma 3"), processor.image_processor)
            kind = kinds[k] if k < len(kinds) else "image"
            user += kind == "image"
            g = ex.add_grid(ImageGrid.regular(image, (side, side), cell_px), user, kind)
            pos = ex.take(side * side, f"image frame {k}")
            ex.put(pos, ROLE_PATCH, g, row_major(side, side))
            ex.mark_if(pos[0] - 1, boi, g)
            ex.mark_if(pos[-1] + 1, eoi, g)
            k += 1
        out.append(ex.finish())
    return out
