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

from collections.abc import Callable, Mapping

from vlcore.models.image_token_base import (
    GRID_KINDS,
    NEWLINE_TOKEN,
    ImageLayoutError,
    ImageTokens,
    proportional_grid,
    seen_image,
)
from vlcore.models.image_tokens_llava import llava_layouts, llava_next_layouts, llava_onevision_layouts
from vlcore.models.image_tokens_other import gemma3_layouts, idefics3_layouts, paligemma_layouts, qwen2_vl_layouts

__all__ = [
    "FAMILY_LAYOUTS",
    "GRID_KINDS",
    "NEWLINE_TOKEN",
    "ImageLayoutError",
    "ImageTokens",
    "gemma3_layouts",
    "idefics3_layouts",
    "image_token_layouts",
    "llava_layouts",
    "llava_next_layouts",
    "llava_onevision_layouts",
    "paligemma_layouts",
    "proportional_grid",
    "qwen2_vl_layouts",
    "seen_image",
]

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
