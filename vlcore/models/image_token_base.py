"""Shared pieces of the image-token layouts (`vlcore.models.image_tokens`): the result type, the per-sequence
builder, and the pixels the model saw."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vlcore.errors import InputError
from vlcore.trace import PAD_TOKEN, ROLE_PAD, ROLE_PATCH, ROLE_SPECIAL, ROLE_TEXT, ImageGrid, TokenLayout

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
def to_numpy(value) -> np.ndarray:
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


def config_id(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


class SequenceLayout:
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


def sequence_layouts(batch: Mapping, tokenizer, placeholder: int | None) -> list[SequenceLayout]:
    ids = to_numpy(batch["input_ids"]).astype(np.int64)
    ids = ids[None] if ids.ndim == 1 else ids
    mask = batch.get("attention_mask")
    valid = np.ones(ids.shape, bool) if mask is None else to_numpy(mask).reshape(ids.shape).astype(bool)
    return [SequenceLayout(ids[b], valid[b], tokenizer, placeholder) for b in range(len(ids))]


def row_major(rows: int, cols: int) -> np.ndarray:
    """int ``[rows * cols, 2]``: (row, col) in row-major order."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([r, c], axis=1)


def next_image(images: Sequence, k: int, family: str):
    if k >= len(images):
        raise ImageLayoutError(f"the prompts hold more {family} image placeholders than the {len(images)} images in "
                               "pixel_values: pass every image of every prompt to the processor in one call.")
    return images[k]


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def text_only_aware(family: Callable[..., list[ImageTokens]]) -> Callable[..., list[ImageTokens]]:
    """A batch without ``pixel_values`` gets plain text layouts (an image placeholder in it is an error)."""

    @functools.wraps(family)
    def layouts(batch: Mapping, processor, config, **kwargs) -> list[ImageTokens]:
        if batch.get("pixel_values") is None:
            placeholder = config_id(config, "image_token_id", "image_token_index")
            return [ex.finish() for ex in sequence_layouts(batch, tokenizer_of(processor), placeholder)]
        return family(batch, processor, config, **kwargs)

    return layouts


def stitch(tiles: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``[rows * cols, h, w, 3]`` tiles, row-major, into one ``[rows * h, cols * w, 3]`` image."""
    rows, cols = grid
    h, w = tiles.shape[1:3]
    return tiles.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
