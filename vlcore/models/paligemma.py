"""PaliGemma adapter: ``PaliGemmaForConditionalGeneration``, a generative model (VQA: it writes the answer).

The streams, blocks, generation trace, attention without eager mode and the logit lens are the shared generative
adapter's (`vlcore.models.generative`). What is PaliGemma's own:

- no chat template: the prompt is the processor's text prefix. The processor writes ``<image>`` x 256 (224 px,
  14-px patches: a 16 x 16 grid), then ``<bos>``, the prompt and ``"\\n"``. The mix checkpoints read a task
  prefix (``answer en``, ``caption en``, ``detect``, ...): a question without one is asked as ``answer en
  <question>`` (`PaliGemmaAdapter.prompt_text`).
- the prefix (image and prompt, ``token_type_ids`` 0) attends bidirectionally; the answer is the causal suffix
  (``token_type_ids`` 1, as ``generate`` extends them and as the processor marks a ``suffix``). The fed-back
  answer gets 1 (`GenerativeAdapter.answer_token_values`), so the teacher-forced pass is ``generate``'s. The
  ``lm.generated`` rows are recomputed with that mask (the first generating step is the prefix's last token).
- positions are 1-based (``prepare_inputs_for_generation`` adds 1): `GenerativeAdapter.position_offset` is 1.
- ``vision``: the SigLIP tower's 256 patch tokens (no CLS); ``vision.self`` is collected with the tower alone on
  eager attention (the decoder stays on sdpa). A decoder image token is the projection of the vision token on the
  same cell (after the tower's last layer and its norm). The image stream (what image-token removal indexes) is
  the decoder's ``lm``, as for every generative model.
"""

from __future__ import annotations

from typing import ClassVar

from vlcore.models.base import BlockSpec
from vlcore.models.generative import MAX_VISION_TOKENS, VISION, GenerativeAdapter, tower_implementation
from vlcore.models.registry import Family, LoadContext
from vlcore.trace import ROLE_PATCH, TokenLayout, patch_token

ARCHITECTURES = {"PaliGemmaForConditionalGeneration": "vqa"}

FAMILY = Family(
    name="paligemma",
    title="PaliGemma",
    model_types=("paligemma",),
    architectures=ARCHITECTURES,
    checkpoints={"google/paligemma-3b-mix-224": "PaliGemma 3B mix, 224 px: answers, captions (SigLIP, Gemma-2B); "
                                                "a question is asked as 'answer en ...'"},
)

# The mix checkpoints' task prefixes; a prompt starting with one is passed as typed.
TASK_PREFIXES = ("answer ", "question ", "caption", "cap ", "describe", "detect ", "segment ", "ocr", "point ")
DEFAULT_TASK = "answer en "


def compute_prompt(question: str, image_token: str = "<image>") -> str:
    """The image token and the question, with ``answer en`` in front unless it starts with a task prefix (the
    processor adds ``<bos>`` after the image tokens and ``"\\n"`` at the end).

    >>> compute_prompt("what is this?"), compute_prompt("caption en")
    ('<image>answer en what is this?', '<image>caption en')
    """
    question = question.strip()
    task = "" if question.lower().startswith(TASK_PREFIXES) else DEFAULT_TASK
    return f"{image_token}{task}{question}"


def load(ctx: LoadContext) -> PaliGemmaAdapter:
    """Load a PaliGemma checkpoint: the language model on sdpa, the SigLIP tower on eager; its processor."""
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    model = ctx.from_pretrained(PaliGemmaForConditionalGeneration, attn_implementation={
        "text_config": "sdpa", "vision_config": tower_implementation(ctx.config.vision_config)})
    processor = ctx.processor(PaliGemmaProcessor)
    return PaliGemmaAdapter(model, processor, model_id=ctx.model_id, device=ctx.device, dtype=ctx.dtype)


class PaliGemmaAdapter(GenerativeAdapter):
    """A PaliGemma model with its processor: streams ``lm``, ``generated``, ``vision``; blocks ``lm.generated``,
    ``vision.self`` (see `GenerativeAdapter` for the arguments)."""

    family = "paligemma"
    title = "PaliGemma"
    tasks = FAMILY.tasks
    answer_token_values: ClassVar[dict[str, int]] = {"token_type_ids": 1}  # the answer is the causal suffix
    position_offset = 1  # PaliGemma counts positions from 1

    def __init__(self, model, processor, model_id: str, device: str = "auto", dtype=None):
        super().__init__(model, processor, model_id, device, dtype)
        self.patch_px = int(model.config.vision_config.patch_size)

    @property
    def vision_tower(self):
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    @property
    def n_vision_tokens(self) -> int:
        vcfg = self.config.vision_config
        return (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2

    def vision_spec(self) -> BlockSpec | None:
        """``vision.self`` up to `MAX_VISION_TOKENS` tower tokens (224 px: 256); None for the 448 / 896 px
        checkpoints (1,024 / 4,096 tokens)."""
        if self.n_vision_tokens > MAX_VISION_TOKENS:
            return None
        vcfg = self.config.vision_config
        return BlockSpec(VISION, VISION, int(vcfg.num_hidden_layers), int(vcfg.num_attention_heads), False,
                         "image self-attention (SigLIP tower)")

    def vision_note(self) -> str | None:
        if self.vision_spec() is not None:
            return None
        return (f"The vision tower's self-attention is not kept: it reads {self.n_vision_tokens:,} patches, past the "
                f"{MAX_VISION_TOKENS + 1:,}-token limit on a full [layer, head, N, N] tensor; the decoder's attention to "
                "each image token is shown.")

    def _vision_attention(self) -> list:
        return [layer.self_attn for layer in self.vision_tower.encoder.layers]

    def _vision_hidden_modules(self) -> list:
        return [self.vision_tower.embeddings, *self.vision_tower.encoder.layers]

    def _vision_layouts(self, prompt_layout: TokenLayout, row: int, enc) -> TokenLayout:
        grid = prompt_layout.images[0]
        rows, cols = grid.grid
        cells = [(r, c) for r in range(rows) for c in range(cols)]
        return TokenLayout.build([patch_token(r, c) for r, c in cells], [ROLE_PATCH] * len(cells),
                                 [0] * len(cells), cells, (grid,))

    def _process(self, images: list, prompts: list[str]):
        """The processor's batch without its training ``labels``."""
        enc = super()._process(images, prompts)
        enc.pop("labels", None)
        return enc

    def prompt_text(self, question: str, n_images: int = 1) -> str:
        """The processor's text prefix for the question after ``n_images`` images (`compute_prompt`)."""
        return compute_prompt(question, (getattr(self.processor, "image_token", None) or "<image>") * n_images)

    def info(self) -> dict:
        return {**super().info(), "patch_px": self.patch_px}
