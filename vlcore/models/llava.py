"""LLaVA-1.5 adapter: ``LlavaForConditionalGeneration``, a generative model (VQA: it writes the answer).

The streams, blocks, generation trace, attention without eager mode and the logit lens are the shared generative
adapter's (`vlcore.models.generative`). What is LLaVA's own:

- the image tokens: ``(image_size / patch_size)**2`` cells of one grid, row-major, the vision CLS dropped by the
  ``default`` feature strategy (`vlcore.models.image_tokens`);
- ``vision``: the CLIP tower's tokens, the CLS (image summary) then the patches. Its ``vision.self`` block is
  collected by scoped forward hooks with the tower alone on eager attention (it is small: 577 tokens for
  LLaVA-1.5); a decoder image token is the projection of the vision token on the same cell, which is how the
  decoder's rollout is composed with the tower's (`GenerativeAdapter.trace_meta`). The image stream (what
  image-token removal indexes) is the decoder's ``lm``, as for every generative model.
"""

from __future__ import annotations

from vlcore.models.base import BlockSpec
from vlcore.models.generative import VISION, GenerativeAdapter
from vlcore.models.registry import Family, LoadContext
from vlcore.trace import IMAGE_CLS_TOKEN, ROLE_IMAGE_SUMMARY, ROLE_PATCH, TokenLayout, patch_token

ARCHITECTURES = {"LlavaForConditionalGeneration": "vqa"}

FAMILY = Family(
    name="llava",
    title="LLaVA",
    model_types=("llava",),
    architectures=ARCHITECTURES,
    checkpoints={"llava-hf/llava-1.5-7b-hf": "LLaVA 1.5, 7B: generates a free-form answer (CLIP ViT-L/336, Vicuna)"},
)


def load(ctx: LoadContext) -> LlavaAdapter:
    """Load a LLaVA checkpoint: the language model on sdpa, the vision tower on eager; its processor."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model = ctx.from_pretrained(LlavaForConditionalGeneration,
                                attn_implementation={"text_config": "sdpa", "vision_config": "eager"})
    processor = ctx.processor(LlavaProcessor)
    return LlavaAdapter(model, processor, model_id=ctx.model_id, device=ctx.device, dtype=ctx.dtype)


class LlavaAdapter(GenerativeAdapter):
    """A LLaVA-1.5 model with its processor: streams ``lm``, ``generated``, ``vision``; blocks ``lm.generated``,
    ``vision.self`` (see `GenerativeAdapter` for the arguments)."""

    family = "llava"
    title = "LLaVA"
    tasks = FAMILY.tasks

    def __init__(self, model, processor, model_id: str, device: str = "auto", dtype=None):
        super().__init__(model, processor, model_id, device, dtype)
        self.patch_px = int(model.config.vision_config.patch_size)

    @property
    def vision_tower(self):
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    def vision_spec(self) -> BlockSpec:
        vcfg = self.config.vision_config
        return BlockSpec(VISION, VISION, int(vcfg.num_hidden_layers), int(vcfg.num_attention_heads), False,
                         "image self-attention (vision tower)")

    def _vision_feature_layers(self) -> int:
        """The tower layers before ``hidden_states[vision_feature_layer]`` (LLaVA-1.5: -2, all but the last)."""
        n = int(self.config.vision_config.num_hidden_layers)
        feature = self.config.vision_feature_layer
        feature = feature if isinstance(feature, (list, tuple)) else [feature]
        return max(int(f) % (n + 1) for f in feature)  # hidden_states[k] is the output of the first k layers

    def _vision_attention(self) -> list:
        return [layer.self_attn for layer in self.vision_tower.encoder.layers]

    def _vision_hidden_modules(self) -> list:
        return [self.vision_tower.pre_layrnorm, *self.vision_tower.encoder.layers]

    def _vision_layouts(self, prompt_layout: TokenLayout, row: int, enc) -> TokenLayout:
        grid = prompt_layout.images[0]
        rows, cols = grid.grid
        cells = [(r, c) for r in range(rows) for c in range(cols)]
        n_prefix = int(getattr(self.processor, "num_additional_image_tokens", 1) or 1)
        tokens = [IMAGE_CLS_TOKEN] * n_prefix + [patch_token(r, c) for r, c in cells]
        roles = [ROLE_IMAGE_SUMMARY] * n_prefix + [ROLE_PATCH] * len(cells)
        return TokenLayout.build(tokens, roles, [0] * len(tokens), [(-1, -1)] * n_prefix + cells, (grid,))

    def info(self) -> dict:
        return {**super().info(), "patch_px": self.patch_px}
