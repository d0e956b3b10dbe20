"""Gemma 3 adapter: ``Gemma3ForConditionalGeneration``, a generative model (VQA: it writes the answer).

The streams, blocks, generation trace, attention without eager mode and the logit lens are the shared generative
adapter's (`vlcore.models.generative`). What is Gemma 3's own:

- the image tokens: the SigLIP tower's patch grid (896 px, 14-px patches: 64 x 64) average-pooled into
  ``mm_tokens_per_image`` tokens (16 x 16, each the mean of a 4 x 4 block of patches), between ``<start_of_image>``
  and ``<end_of_image>`` (`vlcore.models.image_tokens`); the tokens of one image attend to each other both ways
  (``token_type_ids`` 1; the answer is text, 0, the generic extension), and five of every six decoder layers
  attend within a sliding window: the ``lm.generated`` rows are recomputed with the model's own mask
  (`vlcore.models.attention_capture`). The logit lens reads the LM head as ``Gemma3ForConditionalGeneration``
  does: without a final softcap, even where the text config names one (transformers 5.23 applies it in
  ``Gemma3ForCausalLM`` only; Gemma-3-4B's config names none).
- the prompt: the processor's chat template, which writes ``<bos>`` itself, so the processor adds none.
- ``vision``: the SigLIP tower's patch tokens (no CLS) where its self-attention is small enough to keep
  (`MAX_VISION_TOKENS`): ``vision.self`` is then collected with the tower alone on eager attention, and a decoder
  image token covers a block of ``k x k`` vision tokens (`Gemma3Adapter._lm_positions_of`). Gemma-3-4B's tower
  reads 4,096 patches in 27 layers of 16 heads: its attention would be 27 x 16 x 4,096^2 weights a pass (29 GB in
  float32), so it is not kept and `Gemma3Adapter.vision_note` says so. The image stream (what image-token removal
  indexes) is the decoder's ``lm``, as for every generative model. Pan-and-scan crops are not asked for (the
  processor's default).
"""

from __future__ import annotations

import numpy as np

from vlcore.models.base import BlockSpec
from vlcore.models.generative import (
    LM,
    MAX_VISION_TOKENS,
    VISION,
    GenerativeAdapter,
    image_groups,
    tower_implementation,
)
from vlcore.models.registry import Family, LoadContext
from vlcore.trace import ROLE_PATCH, ImageGrid, TokenLayout, patch_token

ARCHITECTURES = {"Gemma3ForConditionalGeneration": "vqa"}

FAMILY = Family(
    name="gemma3",
    title="Gemma 3",
    model_types=("gemma3",),
    architectures=ARCHITECTURES,
    checkpoints={"google/gemma-3-4b-it": "Gemma 3, 4B instruction-tuned: generates a free-form answer (SigLIP "
                                         "896 px pooled to 16 x 16 image tokens)"},
)



def load(ctx: LoadContext) -> Gemma3Adapter:
    """Load a Gemma 3 checkpoint: the language model on sdpa, the SigLIP tower on eager; its processor."""
    from transformers import Gemma3ForConditionalGeneration, Gemma3Processor

    model = ctx.from_pretrained(Gemma3ForConditionalGeneration, attn_implementation={
        "text_config": "sdpa", "vision_config": tower_implementation(ctx.config.vision_config)})
    processor = ctx.processor(Gemma3Processor)
    return Gemma3Adapter(model, processor, model_id=ctx.model_id, device=ctx.device, dtype=ctx.dtype)


class Gemma3Adapter(GenerativeAdapter):
    """A Gemma 3 model with its processor: streams ``lm``, ``generated`` (and ``vision``); blocks ``lm.generated``
    (and ``vision.self``) (see `GenerativeAdapter` for the arguments)."""

    family = "gemma3"
    title = "Gemma 3"
    tasks = FAMILY.tasks

    def __init__(self, model, processor, model_id: str, device: str = "auto", dtype=None):
        super().__init__(model, processor, model_id, device, dtype)
        vcfg = model.config.vision_config
        self.patch_px = int(vcfg.patch_size)
        self.patches_per_side = int(vcfg.image_size) // self.patch_px
        self.pool = self.patches_per_side // round(int(model.config.mm_tokens_per_image) ** 0.5)

    @property
    def vision_tower(self):
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    @property
    def n_vision_tokens(self) -> int:
        return self.patches_per_side ** 2

    def vision_spec(self) -> BlockSpec | None:
        if self.n_vision_tokens > MAX_VISION_TOKENS:
            return None
        vcfg = self.config.vision_config
        return BlockSpec(VISION, VISION, int(vcfg.num_hidden_layers), int(vcfg.num_attention_heads), False,
                         "image self-attention (SigLIP tower, before pooling)")

    def vision_note(self) -> str | None:
        if self.vision_spec() is not None:
            return None
        vcfg = self.config.vision_config
        n, layers, heads = self.n_vision_tokens, int(vcfg.num_hidden_layers), int(vcfg.num_attention_heads)
        gb = layers * heads * n * n * 4 / 1e9
        side = self.patches_per_side // self.pool
        return (f"The vision tower's self-attention is not kept: it reads {n:,} patches ({self.patches_per_side} x "
                f"{self.patches_per_side}) in {layers} layers of {heads} heads, {gb:,.0f} GB of weights a pass in "
                f"float32. The image tokens shown are the decoder's {side} x {side} pooled tokens (each the mean of "
                f"a {self.pool} x {self.pool} block of patches).")

    def _vision_attention(self) -> list:
        return [layer.self_attn for layer in self.vision_tower.encoder.layers]

    def _vision_hidden_modules(self) -> list:
        return [self.vision_tower.embeddings, *self.vision_tower.encoder.layers]

    def _vision_layouts(self, prompt_layout: TokenLayout, row: int, enc) -> TokenLayout:
        """The tower's ``n x n`` patch grid over the image the decoder's first grid shows."""
        seen = prompt_layout.images[0]
        n = self.patches_per_side
        cell = (seen.image.shape[0] // n, seen.image.shape[1] // n)
        grid = ImageGrid.regular(seen.image, (n, n), cell)
        cells = [(r, c) for r in range(n) for c in range(n)]
        return TokenLayout.build([patch_token(r, c) for r, c in cells], [ROLE_PATCH] * len(cells),
                                 [0] * len(cells), cells, (grid,))

    def _lm_positions_of(self, batch, index: int, row: int = 0) -> list[int]:
        """The ``lm`` position of ``vision`` token ``index``: the pooled image token whose ``k x k`` block holds
        its cell (``k`` = patches per side / tokens per side)."""
        lm, vision = batch.streams[LM][row], batch.streams[VISION][row]
        if vision.role[index] != ROLE_PATCH:
            return []
        g = int(vision.image_of[index])
        pooled = np.asarray(vision.cell[index]) // self.pool
        return np.flatnonzero((lm.role == ROLE_PATCH) & (lm.image_of == g) & (lm.cell == pooled).all(1)).tolist()

    def _process(self, images: list, prompts: list[str]):
        """One image per prompt; no second ``<bos>`` where the chat template wrote one."""
        bos = self.tokenizer.bos_token
        own_bos = bool(bos) and all(p.startswith(bos) for p in prompts)
        return self.processor(images=image_groups(images), text=prompts, padding=True, padding_side="left",
                              add_special_tokens=not own_bos, return_tensors="pt")

    def _lens_logits(self, hidden):
        """Logits of residual-stream states through the final norm and the LM head, uncapped like the model's."""
        return self.model.lm_head(self.language_model.norm(hidden)).float()

    def info(self) -> dict:
        return {**super().info(), "patch_px": self.patch_px, "pool": self.pool}
