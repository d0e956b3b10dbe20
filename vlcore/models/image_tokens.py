"""Where each image token of a generative vision-language model's decoder sequence looks.

A processor expands each image placeholder of a prompt into a run of image tokens; the model then writes one
vision feature into each. `image_token_layouts` turns one processed batch back into a `TokenLayout` per example:
every token's role (``patch`` for a grid cell, ``image_summary`` for a pooled/CLS token, ``special`` for the
markers a scheme inserts), the grid it lies on (``image_of``) and its (row, col), with one `ImageGrid` per grid
whose cell boxes are in the pixels of the image as the model saw it (rebuilt from ``pixel_values``, so every
resize, pad and crop the processor made is in it).

A tiled scheme shows one image several times: each of those views is a grid of its own, and `ImageTokens` says
which prompt image (``grid_image``) and which view (``grid_kind``) each grid is:

- ``image``: the whole image, once (LLaVA 1.5, Qwen2-VL, PaliGemma, Gemma 3, a small Idefics3 image).
- ``base`` (LLaVA-NeXT / OneVision): the whole image squashed to the vision tower's square; sequence order: first.
- ``tiles`` (NeXT / OneVision anyres, Idefics3 splitting): the tiles stitched back into the whole image resized as
  the model saw it (NeXT: less the padding the model cuts off; Idefics3: every tile).
- ``global`` (Idefics3): the whole image squashed to one tile; sequence order: after the tiles.
- ``crop`` (Gemma 3 pan and scan, when the crop counts are given): a crop, on its own grid.

The rules, read from transformers 5.23's processors and modeling code, with every size from the config:

- LLaVA 1.5: ``(image_size / patch_size)**2`` cells; the vision tower's prefix tokens (CLS:
  ``num_additional_image_tokens``) come first, and the ``default`` feature strategy drops the first token.
- LLaVA-NeXT: the base grid, then the anyres tile grid (``select_best_resolution`` over ``image_grid_pinpoints``,
  tiles row-major, features un-padded by the model's own ``unpad_image``) row by row, each row followed by one
  ``image_newline`` token (role special, on the image, no cell); needs ``image_sizes``.
- LLaVA-OneVision: as NeXT; when the un-padded grid exceeds ``anyres_max_N`` tiles the model shrinks it
  bilinearly to ``int(h // ratio) x int(w // ratio)`` cells (each box: its share of the image; a cell blends its
  neighbours at the edges). An example with several images (``batch_num_images``) gets the base grid only,
  padded to a square, and one newline token after it.
- Qwen2-VL / Qwen2.5-VL: ``image_grid_thw`` (t, h, w) patches of ``patch_size`` px; the merger joins
  ``spatial_merge_size``-square blocks, so tokens are the (h/m) x (w/m) blocks row-major, ``m * patch_size`` px
  each (28). Qwen2.5-VL's window ordering is internal to its vision tower: the tower permutes the patches into
  windows and un-permutes the merged features (``reverse_indices``) before the language model sees them, so
  the decoder's image tokens are row-major as in Qwen2-VL. ``<|vision_start|>`` / ``<|vision_end|>``: special.
- Idefics3 / SmolVLM: each tile and the global image give ``(tile / patch / scale_factor)**2`` tokens, the pixel
  shuffle joining ``scale_factor``-square patch blocks row-major; tiles come row-major (``<row_i_col_j>``),
  the global image last (``<global-img>``); ``<fake_token_around_image>``, the row/col and global tags and the
  newlines between tile rows are special.
- PaliGemma: ``image_seq_length`` tokens, ``(image_size / patch_size)**2`` cells, at the start of the prompt.
- Gemma 3: ``mm_tokens_per_image`` tokens, a ``sqrt`` x ``sqrt`` grid average-pooled from the
  ``image_size / patch_size`` patch grid; ``<start_of_image>`` / ``<end_of_image>``: special.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vlcore.errors import InputError
from vlcore.trace import (
    IMAGE_CLS_TOKEN,
    PAD_TOKEN,
    ROLE_IMAGE_SUMMARY,
    ROLE_PAD,
    ROLE_PATCH,
    ROLE_SPECIAL,
    ROLE_TEXT,
    ImageGrid,
    TokenLayout,
)

NEWLINE_TOKEN = "<newline>"
GRID_KINDS = ("image", "base", "tiles", "global", "crop")
_CELL_WORD = {"image": "patch", "base": "base", "tiles": "tile", "global": "global", "crop": "crop"}


class ImageLayoutError(InputError):
    """The processor's image tokens do not match what the model config says it will fill in."""


@dataclass(frozen=True, eq=False)
class ImageTokens:
    """One example's decoder sequence with its image tokens placed.

    Attributes:
        layout: the sequence's `TokenLayout`; ``layout.images[g]`` is grid ``g``.
        grid_image: per grid, the index of the prompt image it shows (prompt order, from 0 in each example).
        grid_kind: per grid, one of `GRID_KINDS`.
    """

    layout: TokenLayout
    grid_image: tuple[int, ...]
    grid_kind: tuple[str, ...]

    @property
    def n_images(self) -> int:
        """The number of prompt images."""
        return len(set(self.grid_image))

    def grids_of(self, image: int) -> tuple[int, ...]:
        """The grids (indices into ``layout.images``) that show prompt image ``image``, in sequence order."""
        return tuple(g for g, i in enumerate(self.grid_image) if i == image)


# -- shared pieces ----------------------------------------------------------------------------------------------
def _array(value) -> np.ndarray:
    """A numpy copy of a tensor, array or nested list (floating tensors as float32)."""
    if hasattr(value, "detach"):
        value = value.detach()
        if value.is_floating_point():
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)


def seen_image(chw: np.ndarray, image_processor) -> np.ndarray:
    """Undo an image processor's rescale and normalisation: the pixels the model saw.

    Args:
        chw: float ``[C, H, W]`` pixel values of one image (or tile).
        image_processor: the processor that made them (reads ``image_mean``, ``image_std``, ``rescale_factor``).

    Returns:
        uint8 ``[H, W, 3]``.
    """
    chw = np.asarray(chw, np.float32)
    n = chw.shape[0]
    mean = np.zeros(n, np.float32)
    std = np.ones(n, np.float32)
    if getattr(image_processor, "do_normalize", True) and getattr(image_processor, "image_mean", None) is not None:
        mean = np.broadcast_to(np.asarray(image_processor.image_mean, np.float32), (n,))
        std = np.broadcast_to(np.asarray(image_processor.image_std, np.float32), (n,))
    scale = float(image_processor.rescale_factor) if getattr(image_processor, "do_rescale", True) else 1.0
    pixels = (chw * std[:, None, None] + mean[:, None, None]) / scale
    hwc = np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return np.repeat(hwc, 3, axis=2) if n == 1 else hwc[..., :3]


def _edges(n_cells: int, length: float) -> np.ndarray:
    return np.rint(np.arange(n_cells + 1) * (length / n_cells)).astype(np.int32)


def proportional_grid(image: np.ndarray, grid: tuple[int, int]) -> ImageGrid:
    """A grid of ``grid`` cells sharing ``image`` in equal parts (edges rounded to whole pixels).

    >>> proportional_grid(np.zeros((10, 9, 3), np.uint8), (3, 2)).boxes[2, 1].tolist()
    [4, 7, 9, 10]
    """
    ys, xs = _edges(grid[0], image.shape[0]), _edges(grid[1], image.shape[1])
    r, c = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    boxes = np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=-1).astype(np.int32)
    return ImageGrid(np.asarray(image, np.uint8), (int(grid[0]), int(grid[1])), boxes)


def _config_id(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


class _Example:
    """The layout of one sequence while its images are placed."""

    def __init__(self, ids: np.ndarray, valid: np.ndarray, tokenizer, placeholder: int | None):
        self.ids, self.valid = ids, valid
        n = len(ids)
        specials = np.asarray(sorted(set(tokenizer.all_special_ids)), np.int64)
        self.role = np.where(np.isin(ids, specials), ROLE_SPECIAL, ROLE_TEXT).astype(np.int8)
        self.role[~valid] = ROLE_PAD
        self.image_of = np.full(n, -1, np.int16)
        self.cell = np.full((n, 2), -1, np.int16)
        self.labels: dict[int, str] = {}
        self.grids: list[ImageGrid] = []
        self.grid_image: list[int] = []
        self.grid_kind: list[str] = []
        self.tokenizer = tokenizer
        self.free = np.flatnonzero((ids == placeholder) & valid) if placeholder is not None else np.zeros(0, int)
        self.used = 0

    # placeholders, in order
    def remaining(self) -> int:
        return len(self.free) - self.used

    def take(self, n: int, what: str) -> np.ndarray:
        """The next ``n`` placeholder positions, which must be one contiguous run."""
        pos = self.free[self.used:self.used + n]
        if n and (len(pos) < n or pos[-1] - pos[0] != n - 1):
            raise ImageLayoutError(
                f"{what} needs {n} consecutive image tokens, but the prompt has {self.remaining()} left "
                f"({'not one run' if len(pos) == n else 'too few'}): the processor and the model config disagree "
                "(patch size, feature strategy, grid pinpoints); load both from the same checkpoint folder.")
        self.used += n
        return pos

    def add_grid(self, grid: ImageGrid, image: int, kind: str) -> int:
        self.grids.append(grid)
        self.grid_image.append(int(image))
        self.grid_kind.append(kind)
        return len(self.grids) - 1

    def put(self, positions, role: int, grid: int, cells=None, label: str | None = None) -> None:
        positions = np.atleast_1d(np.asarray(positions, np.int64))
        self.role[positions] = role
        self.image_of[positions] = grid
        if cells is not None:
            self.cell[positions] = np.asarray(cells, np.int16).reshape(len(positions), 2)
        if label is not None:
            self.labels.update({int(p): label for p in positions})

    def mark_if(self, position: int, token_id: int | None, grid: int) -> None:
        """Mark the token at ``position`` special on ``grid`` when it is ``token_id`` (a begin/end marker)."""
        if token_id is not None and 0 <= position < len(self.ids) and self.ids[position] == token_id:
            self.put(position, ROLE_SPECIAL, grid)

    def finish(self) -> ImageTokens:
        if self.remaining():
            raise ImageLayoutError(
                f"{self.remaining()} image tokens are left over after every image was placed: the processor and "
                "the model config disagree, or the prompt has more image placeholders than images.")
        several = len(set(self.grid_image)) > 1
        tokens = self._strings()
        for n in np.flatnonzero(self.role == ROLE_PATCH):
            g = int(self.image_of[n])
            prefix = f"img{self.grid_image[g]} " if several else ""
            tokens[n] = f"<{prefix}{_CELL_WORD[self.grid_kind[g]]} {self.cell[n, 0]},{self.cell[n, 1]}>"
        for n, label in self.labels.items():
            tokens[n] = label
        for n in np.flatnonzero(self.role == ROLE_PAD):
            tokens[n] = PAD_TOKEN
        layout = TokenLayout(tuple(tokens), self.role, self.image_of, self.cell, tuple(self.grids))
        return ImageTokens(layout, tuple(self.grid_image), tuple(self.grid_kind))

    def _strings(self) -> list[str]:
        keep = np.flatnonzero((self.role == ROLE_TEXT) | (self.role == ROLE_SPECIAL))
        decoded = self.tokenizer.batch_decode([[int(self.ids[n])] for n in keep], skip_special_tokens=False)
        tokens = [""] * len(self.ids)
        for n, text in zip(keep, decoded):
            tokens[n] = text
        return tokens


def _examples(batch: Mapping, tokenizer, placeholder: int | None) -> list[_Example]:
    ids = _array(batch["input_ids"]).astype(np.int64)
    ids = ids[None] if ids.ndim == 1 else ids
    mask = batch.get("attention_mask")
    valid = np.ones(ids.shape, bool) if mask is None else _array(mask).reshape(ids.shape).astype(bool)
    return [_Example(ids[b], valid[b], tokenizer, placeholder) for b in range(len(ids))]


def _cells(rows: int, cols: int) -> np.ndarray:
    """int ``[rows * cols, 2]``: (row, col) in row-major order."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([r, c], axis=1)


def _next_image(images: Sequence, k: int, family: str):
    if k >= len(images):
        raise ImageLayoutError(f"the prompts hold more {family} image placeholders than the {len(images)} images in "
                               "pixel_values: pass every image of every prompt to the processor in one call.")
    return images[k]


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _text_only_aware(family: Callable[..., list[ImageTokens]]) -> Callable[..., list[ImageTokens]]:
    """A batch without ``pixel_values`` gets plain text layouts (an image placeholder in it is an error)."""

    @functools.wraps(family)
    def layouts(batch: Mapping, processor, config, **kwargs) -> list[ImageTokens]:
        if batch.get("pixel_values") is None:
            placeholder = _config_id(config, "image_token_id", "image_token_index")
            return [ex.finish() for ex in _examples(batch, _tokenizer(processor), placeholder)]
        return family(batch, processor, config, **kwargs)

    return layouts


# -- LLaVA 1.5 --------------------------------------------------------------------------------------------------
def _vision_sequence(n_prefix: int, rows: int, cols: int, strategy: str) -> list[tuple[int, int] | None]:
    """The vision tower's tokens as (row, col) cells, None for a prefix (CLS) token, after the feature strategy.

    >>> _vision_sequence(1, 1, 2, "default"), _vision_sequence(1, 1, 2, "full")
    ([(0, 0), (0, 1)], [None, (0, 0), (0, 1)])
    """
    seq = [None] * n_prefix + [(int(r), int(c)) for r, c in _cells(rows, cols)]
    return seq[1:] if strategy == "default" else seq


def _place_vision(ex: _Example, seq, grid: int, what: str) -> None:
    pos = ex.take(len(seq), what)
    for p, cell in zip(pos, seq):
        if cell is None:
            ex.put(p, ROLE_IMAGE_SUMMARY, grid, label=IMAGE_CLS_TOKEN)
        else:
            ex.put(p, ROLE_PATCH, grid, [cell])


@_text_only_aware
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
    pixels = _array(batch["pixel_values"])
    out, k = [], 0
    for ex in _examples(batch, _tokenizer(processor), _config_id(config, "image_token_id", "image_token_index")):
        user = 0
        while ex.remaining():
            image = seen_image(_next_image(pixels, k, "LLaVA"), processor.image_processor)
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


def _stitch(tiles: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``[rows * cols, h, w, 3]`` tiles, row-major, into one ``[rows * h, cols * w, 3]`` image."""
    rows, cols = grid
    h, w = tiles.shape[1:3]
    return tiles.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)


def _anyres_tiles(ex: _Example, crops: np.ndarray, image_size, config, processor, user: int, what: str,
                  unpad_image, max_tiles: int | None) -> None:
    """The base grid, then the un-padded tile grid with a newline token after each row."""
    from transformers.image_processing_utils import select_best_resolution

    side_px, ps = int(config.vision_config.image_size), int(config.vision_config.patch_size)
    side = side_px // ps
    best = select_best_resolution([int(v) for v in image_size], config.image_grid_pinpoints)
    grid = (best[0] // side_px, best[1] // side_px)
    tiles = np.stack([seen_image(c, processor.image_processor) for c in crops[1:1 + grid[0] * grid[1]]])
    rs, cs = _unpadded(grid[0] * side, grid[1] * side, image_size, unpad_image)
    whole = _stitch(tiles, grid)[rs.start * ps:rs.stop * ps, cs.start * ps:cs.stop * ps]
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


def _base(ex: _Example, crop: np.ndarray, config, processor, user: int, what: str, n_prefix: int) -> None:
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


@_text_only_aware
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


@_text_only_aware
def llava_onevision_layouts(batch: Mapping, processor, config) -> list[ImageTokens]:
    """LLaVA-OneVision: as `llava_next_layouts`, with ``anyres_max`` shrinking of large tile grids; an example
    with several images (``batch_num_images``) gets only the base grid (padded to a square) and one newline.

    Args, Returns and Raises: as `llava_next_layouts`.
    """
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

    max_tiles = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))
    counts = batch.get("batch_num_images")
    return _anyres_layouts(batch, processor, config, unpad_image, max_tiles,
                           None if counts is None else [int(n) for n in _array(counts).ravel()])


def _anyres_layouts(batch, processor, config, unpad_image, max_tiles, counts) -> list[ImageTokens]:
    if batch.get("image_sizes") is None:
        raise ImageLayoutError("LLaVA-NeXT-style image tokens need the processor's `image_sizes`; pass the whole "
                               "processor output.")
    pixels, sizes = _array(batch["pixel_values"]), _array(batch["image_sizes"]).reshape(-1, 2)
    pixels = pixels[:, None] if pixels.ndim == 4 else pixels
    patching = [True] * len(pixels) if counts is None else [n == 1 for n in counts for _ in range(n)]
    n_prefix = int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    out, k = [], 0
    for ex in _examples(batch, _tokenizer(processor), _config_id(config, "image_token_id", "image_token_index")):
        user = 0
        while ex.remaining():
            crops, what = _next_image(pixels, k, "LLaVA-NeXT"), f"image {k}"
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


# -- Qwen2-VL and Qwen2.5-VL -----------------------------------------------------------------------------------
def _qwen_image(rows: np.ndarray, thw, patch: int, merge: int, image_processor) -> np.ndarray:
    """Undo the Qwen image processor's patchify: flat patches ``[t*h*w, C*tp*ps*ps]`` in merge-block order into
    the first frame ``[h*ps, w*ps, 3]``."""
    t, h, w = (int(v) for v in thw)
    tp = rows.shape[1] // (3 * patch * patch)
    blocks = rows.reshape(t, h // merge, w // merge, merge, merge, 3, tp, patch, patch)[0, ..., 0, :, :]
    chw = blocks.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, h * patch, w * patch)
    return seen_image(chw, image_processor)


@_text_only_aware
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
    thws = _array(batch["image_grid_thw"]).reshape(-1, 3).astype(int)
    pixels = _array(batch["pixel_values"])
    offsets = np.concatenate([[0], np.cumsum(thws.prod(axis=1))])
    start, end = _config_id(config, "vision_start_token_id"), _config_id(config, "vision_end_token_id")
    out, k = [], 0
    for ex in _examples(batch, _tokenizer(processor), _config_id(config, "image_token_id")):
        user = 0
        while ex.remaining():
            t, h, w = _next_image(thws, k, "Qwen")
            image = _qwen_image(pixels[offsets[k]:offsets[k + 1]], (t, h, w), patch, merge, processor.image_processor)
            rows, cols = h // merge, w // merge
            g = ex.add_grid(ImageGrid.regular(image, (rows, cols), patch * merge), user, "image")
            pos = ex.take(t * rows * cols, f"image {k}")
            ex.put(pos, ROLE_PATCH, g, np.tile(_cells(rows, cols), (t, 1)))
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


def _idefics_frames(ex: _Example, run_ids, fake_id: int, n_tokens: int) -> list[list[tuple[np.ndarray, str]]]:
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


@_text_only_aware
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
    tokenizer = _tokenizer(processor)
    fake_id = tokenizer.convert_tokens_to_ids(getattr(processor, "fake_image_token", "<fake_token_around_image>"))
    pixels = _array(batch["pixel_values"])
    pixels = pixels[None] if pixels.ndim == 4 else pixels
    out = []
    for b, ex in enumerate(_examples(batch, tokenizer, _config_id(config, "image_token_id"))):
        frames = [f for f in pixels[b] if np.any(f != 0.0)]  # the model drops all-zero (padding) frames
        runs = _runs(ex.free)
        ex.used = len(ex.free)
        f = 0
        for user, image_runs in enumerate(_idefics_frames(ex, runs, fake_id, n * n)):
            seen = [seen_image(_next_image(frames, f + i, "Idefics3"), processor.image_processor)
                    for i in range(len(image_runs))]
            f += len(image_runs)
            _place_idefics(ex, image_runs, seen, n, scale * patch, user, fake_id)
        if f != len(frames):
            raise ImageLayoutError(f"example {b} has {len(frames)} image frames but its prompt places {f}: pass "
                                   "the images of each prompt together with it.")
        out.append(ex.finish())
    return out


def _place_idefics(ex: _Example, image_runs, seen, n: int, cell_px: int, user: int, fake_id: int) -> None:
    tiles = [(run, tag, gap) for run, tag, gap in image_runs if _ROW_COL.search(tag)]
    local = _cells(n, n)
    if tiles:
        where = [tuple(int(v) - 1 for v in _ROW_COL.search(tag).groups()) for _, tag, _ in tiles]
        grid = (max(r for r, _ in where) + 1, max(c for _, c in where) + 1)
        if sorted(where) != where or len(where) != grid[0] * grid[1]:
            raise ImageLayoutError(f"Idefics3 tile tags {where} are not a full row-major grid.")
        g = ex.add_grid(ImageGrid.regular(_stitch(np.stack(seen[:len(tiles)]), grid), (grid[0] * n, grid[1] * n),
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
@_text_only_aware
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
    pixels = _array(batch["pixel_values"])
    out, k = [], 0
    for ex in _examples(batch, _tokenizer(processor), _config_id(config, "image_token_id", "image_token_index")):
        user = 0
        while ex.remaining():
            image = seen_image(_next_image(pixels, k, "PaliGemma"), processor.image_processor)
            rows, cols = image.shape[0] // ps, image.shape[1] // ps
            g = ex.add_grid(ImageGrid.regular(image, (rows, cols), ps), user, "image")
            ex.put(ex.take(rows * cols, f"image {k}"), ROLE_PATCH, g, _cells(rows, cols))
            k, user = k + 1, user + 1
        out.append(ex.finish())
    return out


@_text_only_aware
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
    kinds = ["image"] * len(_array(batch["pixel_values"])) if num_crops is None else \
        [kind for c in num_crops for kind in ["image"] + ["crop"] * int(c)]
    pixels = _array(batch["pixel_values"])
    boi, eoi = _config_id(config, "boi_token_id", "boi_token_index"), _config_id(config, "eoi_token_id",
                                                                               "eoi_token_index")
    out, k = [], 0
    for ex in _examples(batch, _tokenizer(processor), _config_id(config, "image_token_id", "image_token_index")):
        user = -1
        while ex.remaining():
            image = seen_image(_next_image(pixels, k, "Gemma 3"), processor.image_processor)
            kind = kinds[k] if k < len(kinds) else "image"
            user += kind == "image"
            g = ex.add_grid(ImageGrid.regular(image, (side, side), cell_px), user, kind)
            pos = ex.take(side * side, f"image frame {k}")
            ex.put(pos, ROLE_PATCH, g, _cells(side, side))
            ex.mark_if(pos[0] - 1, boi, g)
            ex.mark_if(pos[-1] + 1, eoi, g)
            k += 1
        out.append(ex.finish())
    return out


FAMILY_LAYOUTS: dict[str, Callable[..., list[ImageTokens]]] = {
    "llava": llava_layouts,
    "llava_next": llava_next_layouts,
    "llava_onevision": llava_onevision_layouts,
    "qwen2_vl": qwen2_vl_layouts,
    "qwen2_5_vl": qwen2_vl_layouts,
    "idefics3": idefics3_layouts,
    "smolvlm": idefics3_layouts,
    "paligemma": paligemma_layouts,
    "gemma3": gemma3_layouts,
}


def image_token_layouts(batch: Mapping, processor, config, **kwargs) -> list[ImageTokens]:
    """The `ImageTokens` of every example of a processed batch, by the config's ``model_type``.

    Args:
        batch: the processor's output for the batch, unchanged (tensors or arrays).
        processor: the processor that made it.
        config: the model's config.
        **kwargs: family extras (Gemma 3: ``num_crops``).

    Returns:
        One `ImageTokens` per example, in batch order.

    Raises:
        ImageLayoutError: the family has no image-token rules here, or the batch does not match the config.
    """
    family = FAMILY_LAYOUTS.get(getattr(config, "model_type", None))
    if family is None:
        raise ImageLayoutError(f"no image-token rules for model type {getattr(config, 'model_type', None)!r}; "
                               f"known: {sorted(FAMILY_LAYOUTS)}.")
    return family(batch, processor, config, **kwargs)
