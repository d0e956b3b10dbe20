"""Image-token layouts of LLaVA 1.5, LLaVA-NeXT and LLaVA-OneVision (rules: `vlcore.models.image_tokens`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from vlcore.models.image_token_base import (
    NEWLINE_TOKEN,
    ImageLayoutError,
    ImageTokens,
    SequenceLayout,
    config_id,
    next_image,
    proportional_grid,
    row_major,
    seen_image,
    sequence_layouts,
    stitch,
    text_only_aware,
    to_numpy,
    tokenizer_of,
)
from vlcore.trace import IMAGE_CLS_TOKEN, ROLE_IMAGE_SUMMARY, ROLE_PATCH, ROLE_SPECIAL, ImageGrid


# -- LLaVA 1.5 --------------------------------------------------------------------------------------------------
def _vision_sequence(n_prefix: int, rows: int, cols: int, strategy: str) -> list[tuple[int, int] | None]:
    """The vision tower's tokens as (row, col) cells, None for a prefix (CLS) token, after the feature strategy.

    >>> _vision_sequence(1, 1, 2, "default"), _vision_sequence(1, 1, 2, "full")
    ([(0, 0), (0, 1)], [None, (0, 0), (0, 1)])
    """
    seq = [None] * n_prefix + [(int(r), int(c)) for r, c in row_major(rows, cols)]
    return seq[1:] if strategy == "default" else seq


def _place_vision(ex: SequenceLayout, seq, grid: int, what: str) -> None:
    pos = ex.take(len(seq), what)
    for p, cell in zip(pos, seq):
        if cell is None:
            ex.put(p, ROLE_IMAGE_SUMMARY, grid, label=IMAGE_CLS_TOKEN)
        else:
            ex.put(p, ROLE_PATCH, grid, [cell])


@text_only_aware
def llava_layouts(batch: Mapping, processor, config) -> list[ImageTokens]:
    """LLaVA 1.5: one regular grid per image, ``image_size / patch_size`` cells a side (24 x 24 at 336 / 14).

    Args:
        batch: the processor's output for a batch (``input_ids``, ``attention_mask``, ``pixel_values [I, 3, H, W]``).
        processor: the ``LlavaProcessor`` (its tokenizer, image processor, ``num_additional_image_tokens``).
        config: the model's ``LlavaConfig``.

    Returns:
        One `ImageTokens` per example.

    Raises:
        ImageLayoutError: the image tokens do not match the images and the config.
    """
    ps = int(config.vision_config.patch_size)
    strategy = config.vision_feature_select_strategy
    n_prefix = int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    pixels = to_numpy(batch["pixel_values"])
    out, k = [], 0
    for ex in sequence_layouts(batch, tokenizer_of(processor), config_id(config, "image_token_id", "image_token_index")):
        user = 0
        while ex.remaining():
            image = seen_image(next_image(pixels, k, "LLaVA"), processor.image_processor)
            rows, cols = image.shape[0] // ps, image.shape[1] // ps
            g = ex.add_grid(ImageGrid.regular(image, (rows, cols), ps), user, "image")
            _place_vision(ex, _vision_sequence(n_prefix, rows, cols, strategy), g, f"image {k}")
            k, user = k + 1, user + 1
        out.append(ex.finish())
    return out


# -- LLaVA-NeXT and LLaVA-OneVision ------------------------------------------------------------------------------
def _unpadded(rows: int, cols: int, image_size, unpad_image) -> tuple[slice, slice]:
    """The feature rows and columns the model's ``unpad_image`` keeps of a ``rows x cols`` grid."""
    import torch

    index = torch.arange(rows * cols).view(1, rows, cols)
    kept = unpad_image(index, [int(v) for v in image_size])[0]
    r0, c0 = divmod(int(kept[0, 0]), cols)
    return slice(r0, r0 + kept.shape[0]), slice(c0, c0 + kept.shape[1])


def _anyres_tiles(ex: SequenceLayout, crops: np.ndarray, image_size, config, processor, user: int, what: str,
                  unpad_image, max_tiles: int | None) -> None:
    """The base grid, then the un-padded tile grid with a newline token after each row."""
    from transformers.image_processing_utils import select_best_resolution

    side_px, ps = int(config.vision_config.image_size), int(config.vision_config.patch_size)
    side = side_px // ps
    best = select_best_resolution([int(v) for v in image_size], config.image_grid_pinpoints)
    grid = (best[0] // side_px, best[1] // side_px)
    tiles = np.stack([seen_image(c, processor.image_processor) for c in crops[1:1 + grid[0] * grid[1]]])
    rs, cs = _unpadded(grid[0] * side, grid[1] * side, image_size, unpad_image)
    whole = stitch(tiles, grid)[rs.start * ps:rs.stop * ps, cs.start * ps:cs.stop * ps]
    rows, cols = rs.stop - rs.start, cs.stop - cs.start
    tile_grid = ImageGrid.regular(whole, (rows, cols), ps)
    if max_tiles is not None:  # OneVision's anyres_max: the model shrinks a large grid bilinearly
        ratio = math.sqrt(rows * cols / (max_tiles * side ** 2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
            tile_grid = proportional_grid(whole, (rows, cols))
    g = ex.add_grid(tile_grid, user, "tiles")
    pos = ex.take(rows * (cols + 1), f"{what}'s tiles")
    for r in range(rows):
        run = pos[r * (cols + 1):(r + 1) * (cols + 1)]
        ex.put(run[:-1], ROLE_PATCH, g, [(r, c) for c in range(cols)])
        ex.put(run[-1], ROLE_SPECIAL, g, label=NEWLINE_TOKEN)


def _base(ex: SequenceLayout, crop: np.ndarray, config, processor, user: int, what: str, n_prefix: int) -> None:
    ps = int(config.vision_config.patch_size)
    image = seen_image(crop, processor.image_processor)
    rows, cols = image.shape[0] // ps, image.shape[1] // ps
    g = ex.add_grid(ImageGrid.regular(image, (rows, cols), ps), user, "base")
    _place_vision(ex, _vision_sequence(n_prefix, rows, cols, config.vision_feature_select_strategy), g, what)
    return g


def _kept_prefix(n_prefix: int, config) -> None:
    if n_prefix - (config.vision_feature_select_strategy == "default") != 0:
        raise ImageLayoutError(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} with "
            f"{n_prefix} prefix token(s) leaves a tile that is not a full grid, which the model cannot unpad: "
            "use the checkpoint's own processor and config.")


@text_only_aware
def llava_next_layouts(batch: Mapping, processor, config) -> list[ImageTokens]:
    """LLaVA-NeXT: per image a ``base`` grid (the image squashed to the tower's square) and a ``tiles`` grid (the
    anyres tiles stitched, less the padding the model cuts off), each tile row ended by a newline token.

    Args:
        batch: the processor's output (``input_ids``, ``pixel_values [I, P, 3, S, S]``, ``image_sizes [I, 2]``).
        processor: the ``LlavaNextProcessor``.
        config: the ``LlavaNextConfig`` (``image_grid_pinpoints``, vision ``image_size`` and ``patch_size``).

    Returns:
        One `ImageTokens` per example.

    Raises:
        ImageLayoutError: no ``image_sizes``, or the image tokens do not match the images and the config.
    """
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    return _anyres_layouts(batch, processor, config, unpad_image, None, None)


@text_only_aware
def llava_onevision_layouts(batch: Mapping, processor, config) -> list[ImageTokens]:
    """LLaVA-OneVision: as `llava_next_layouts`, with ``anyres_max`` shrinking of large tile grids; an example
    with several images (``batch_num_images``) gets only the base grid (padded to a square) and one newline.

    Args, Returns and Raises: as `llava_next_layouts`.
    """
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

    max_tiles = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))
    counts = batch.get("batch_num_images")
    return _anyres_layouts(batch, processor, config, unpad_image, max_tiles,
                           None if counts is None else [int(n) for n in to_numpy(counts).ravel()])


def _anyres_layouts(batch, processor, config, unpad_image, max_tiles, counts) -> list[ImageTokens]:
    if batch.get("image_sizes") is None:
        raise ImageLayoutError("LLaVA-NeXT-style image tokens need the processor's `image_sizes`; pass the whole "
                               "processor output.")
    pixels, sizes = to_numpy(batch["pixel_values"]), to_numpy(batch["image_sizes"]).reshape(-1, 2)
    pixels = pixels[:, None] if pixels.ndim == 4 else pixels
    patching = [True] * len(pixels) if counts is None else [n == 1 for n in counts for _ in range(n)]
    n_prefix = int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    out, k = [], 0
    for ex in sequence_layouts(batch, tokenizer_of(processor), config_id(config, "image_token_id", "image_token_index")):
        user = 0
        while ex.remaining():
            crops, what = next_image(pixels, k, "LLaVA-NeXT"), f"image {k}"
            if k < len(patching) and patching[k]:
                _kept_prefix(n_prefix, config)
                _base(ex, crops[0], config, processor, user, what, n_prefix)
                _anyres_tiles(ex, crops, sizes[k], config, processor, user, what, unpad_image, max_tiles)
            else:
                g = _base(ex, crops[0], config, processor, user, what, n_prefix)
                ex.put(ex.take(1, f"{what}'s newline"), ROLE_SPECIAL, g, label=NEWLINE_TOKEN)
            k, user = k + 1, user + 1
        out.append(ex.finish())
    return out
