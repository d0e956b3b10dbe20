"""LLaVA-NeXT and LLaVA-OneVision adapters: ``LlavaNextForConditionalGeneration`` and
``LlavaOnevisionForConditionalGeneration``, generative models (VQA: they write the answer).

The streams, blocks, generation trace, attention without eager mode and the logit lens are the shared generative
adapter's (`vlcore.models.generative`). What is this family's own:

- The image tokens (`vlcore.models.image_tokens`): per image a ``base`` grid (the whole image squashed to the
  vision tower's square), then the ``tiles`` grid (the anyres tiles stitched, less the padding the model cuts off),
  each tile row followed by one newline token (role special, no cell); the model needs ``image_sizes``.
  OneVision (SigLIP, no CLS) shrinks a tile grid larger than ``anyres_max_N`` tiles bilinearly.
- The vision tower reads every crop (the base crop, then each tile) as a sequence of its own: 1 + the tiles'
  count sequences per image. ``vision`` is the base crop's sequence (CLIP: its CLS as an image summary, then the
  patches; SigLIP: the patches), and ``vision.self`` its self-attention, collected with the tower alone on eager
  attention. The tiles' attention is not kept (each tile is a separate ``[L, H, 577, 577]`` sequence; the tiles'
  tokens are in ``lm``), and `vision_note` says so.
- Removing a ``vision`` token removes, from the decoder's view, the image tokens that look at the same part of
  the image: its base-grid token and every tile token whose cell overlaps its cell (both grids cover the whole
  image). Removing every vision patch thus removes every image token; the newline tokens stay (a learned
  constant, not image content).
- A head mask on ``vision.self`` acts on every crop of the tower (base and tiles) of each example.
- OneVision's stock processor needs a video processor and torchvision: without torchvision the processor is built
  from the checkpoint's tokenizer, PIL image processor, chat template and settings
  (`vlcore.models.image_only_processors`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlcore.models.base import BlockSpec, EncodedBatch
from vlcore.models.generative import VISION
from vlcore.models.llava import LlavaAdapter
from vlcore.models.registry import Family, LoadContext
from vlcore.trace import IMAGE_CLS_TOKEN, ROLE_IMAGE_SUMMARY, ROLE_PATCH, TokenLayout, patch_token

ARCHITECTURES = {"LlavaNextForConditionalGeneration": "vqa", "LlavaOnevisionForConditionalGeneration": "vqa"}
ONEVISION = "LlavaOnevisionForConditionalGeneration"

FAMILY = Family(
    name="llava_next",
    title="LLaVA-NeXT / OneVision",
    model_types=("llava_next", "llava_onevision"),
    architectures=ARCHITECTURES,
    checkpoints={
        "llava-hf/llava-v1.6-mistral-7b-hf": "LLaVA-NeXT (1.6), 7B: generates a free-form answer; anyres tiles "
                                             "(CLIP ViT-L/336, Mistral)",
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": "LLaVA-OneVision, 0.5B: generates a free-form answer; anyres "
                                                     "tiles (SigLIP-400M/384, Qwen2)",
    },
)

# the processor files of a hub checkpoint (OneVision without torchvision reads them from the snapshot folder)
PROCESSOR_FILES = ["*.json", "*.jinja", "*.txt", "*.model"]
# crops per example of the pass running in this context (the vision head mask's crop -> example map)


def load(ctx: LoadContext) -> LlavaNextAdapter:
    """Load a LLaVA-NeXT or LLaVA-OneVision checkpoint: the language model on sdpa, the vision tower on eager; its
    processor (OneVision's without a video processor when torchvision is missing)."""
    from transformers import (
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        LlavaOnevisionForConditionalGeneration,
    )

    attn = {"text_config": "sdpa", "vision_config": "eager"}
    if ctx.architecture == ONEVISION:
        model = ctx.from_pretrained(LlavaOnevisionForConditionalGeneration, attn_implementation=attn)
        processor = ctx.processor(_OnevisionProcessor)
        return LlavaOnevisionAdapter(model, processor, model_id=ctx.model_id, device=ctx.device, dtype=ctx.dtype)
    model = ctx.from_pretrained(LlavaNextForConditionalGeneration, attn_implementation=attn)
    processor = ctx.processor(LlavaNextProcessor)
    return LlavaNextAdapter(model, processor, model_id=ctx.model_id, device=ctx.device, dtype=ctx.dtype)


class _OnevisionProcessor:
    """``from_pretrained`` for OneVision's processor: the stock one with torchvision, else the image-only one built
    from the checkpoint folder (a hub id: its snapshot's processor files)."""

    @staticmethod
    def from_pretrained(path: str, revision: str | None = None, local_files_only: bool = False, **_kwargs):
        from vlcore.models.image_only_processors import build_image_only_processor

        folder = Path(path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, revision=revision, local_files_only=local_files_only,
                                            allow_patterns=PROCESSOR_FILES))
        return build_image_only_processor(folder)


class LlavaNextAdapter(LlavaAdapter):
    """A LLaVA-NeXT model with its processor: streams ``lm``, ``generated``, ``vision`` (the base crop); blocks
    ``lm.generated``, ``vision.self`` (see `GenerativeAdapter` for the arguments)."""

    selects_vision_crops = True  # `_crops_per_example`: each example's base crop, whatever its image count

    family = "llava_next"
    title = "LLaVA-NeXT"
    tasks = FAMILY.tasks

    def __init__(self, model, processor, model_id: str, device: str = "auto", dtype=None):
        super().__init__(model, processor, model_id, device, dtype)
        embeddings = self.vision_tower.embeddings
        self.n_prefix = int(embeddings.num_positions - embeddings.num_patches)  # CLIP: its CLS; SigLIP: none

    # -- the vision tower: the base crop -----------------------------------------------------------------
    def vision_spec(self) -> BlockSpec:
        vcfg = self.config.vision_config
        return BlockSpec(VISION, VISION, int(vcfg.num_hidden_layers), int(vcfg.num_attention_heads), False,
                         "image self-attention of the base crop (vision tower)")

    def _vision_hidden_modules(self) -> list:
        tower = self.vision_tower
        first = getattr(tower, "pre_layrnorm", None)  # CLIP's hidden_states[0] is after it
        return [tower.embeddings if first is None else first, *tower.encoder.layers]

    def _vision_layouts(self, prompt_layout: TokenLayout, row: int, enc) -> TokenLayout:
        grid = prompt_layout.images[0]  # one image per prompt: its base grid comes first
        rows, cols = grid.grid
        cells = [(r, c) for r in range(rows) for c in range(cols)]
        tokens = [IMAGE_CLS_TOKEN] * self.n_prefix + [patch_token(r, c) for r, c in cells]
        roles = [ROLE_IMAGE_SUMMARY] * self.n_prefix + [ROLE_PATCH] * len(cells)
        return TokenLayout.build(tokens, roles, [0] * len(tokens), [(-1, -1)] * self.n_prefix + cells, (grid,))

    def vision_note(self) -> str:
        return ("The vision tower reads each image as separate crops: the whole image squashed to its square (the "
                "base crop), then each anyres tile. The vision stream and its self-attention are the base crop's; "
                "the tiles' tower attention is not kept, and the tiles' tokens are in the decoder's stream.")

    def crops_per_image(self, inputs: dict) -> list[int]:
        """The tower's crops (sequences) per image of a batch, as the model counts them from ``image_sizes``."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = inputs["image_sizes"].tolist()
        counts = inputs.get("batch_num_images")
        tiled = [True] * len(sizes) if counts is None else [n == 1 for n in counts.tolist() for _ in range(n)]
        side = int(self.config.vision_config.image_size)
        return [image_size_to_num_patches(s, self.config.image_grid_pinpoints, side) if t else 1
                for s, t in zip(sizes, tiled)]

    def _crops_per_example(self, inputs: dict) -> tuple[list[int], list[int]]:
        """(crops per example, the tower-batch index of each example's first base crop)."""
        crops = self.crops_per_image(inputs)
        counts = inputs.get("batch_num_images")
        counts = inputs.get("images_per_prompt") if counts is None else counts  # NeXT: from `encode`
        images = [1] * len(crops) if counts is None else [int(n) for n in counts.tolist()]
        starts = np.concatenate([[0], np.cumsum(crops)]).astype(int)
        first = np.concatenate([[0], np.cumsum(images)]).astype(int)
        return ([int(starts[first[e + 1]] - starts[first[e]]) for e in range(len(images))],
                [int(starts[first[e]]) for e in range(len(images))])

    def _tower_selection(self, batch: EncodedBatch) -> tuple[list[int], list[int]]:
        """Each example's crops, and its first base crop as the one kept."""
        return self._crops_per_example(batch.inputs)

    # -- description ----------------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        ip = getattr(self.processor, "image_processor", None)
        return {**super().fingerprint(), "image_grid_pinpoints": str(self.config.image_grid_pinpoints),
                "processor_pinpoints": str(getattr(ip, "image_grid_pinpoints", None)),
                "vision_aspect_ratio": str(getattr(self.config, "vision_aspect_ratio", None))}

    def info(self) -> dict:
        pinpoints = self.config.image_grid_pinpoints
        side = int(self.config.vision_config.image_size)
        return {**super().info(), "tower_px": side,
                "max_tiles": max(h // side * (w // side) for h, w in pinpoints) if pinpoints else 0}


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """A LLaVA-OneVision model with its processor (as `LlavaNextAdapter`; the tower is SigLIP: no summary token)."""

    title = "LLaVA-OneVision"
