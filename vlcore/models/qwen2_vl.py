"""Qwen2-VL and Qwen2.5-VL adapter: ``Qwen2VLForConditionalGeneration`` and
``Qwen2_5_VLForConditionalGeneration``, generative models (VQA: they write the answer).

The streams, blocks, generation trace, attention without eager mode and the logit lens are the shared generative
adapter's (`vlcore.models.generative`). What is Qwen's own:

- the image tokens: the image is resized to multiples of 28 px, cut into 14 px patches, and each 2 x 2 group of
  patches is merged into one decoder token: one ``<|image_pad|>`` per 28 x 28 px cell, row-major over the grid that
  ``image_grid_thw`` gives (`vlcore.models.image_tokens`). Qwen2.5-VL's vision tower runs its blocks in window
  order but puts the merged tokens back in row-major order before the decoder reads them.
- no ``vision`` stream: the vision tower's attention returns no weights (``VisionAttention.forward`` returns the
  output only), so the image stream is the decoder's own (``lm``), its image tokens at their (row, col).
- positions: M-RoPE (a (time, row, col) position per token; text tokens on the diagonal after the image). Every
  teacher-forced pass gets the positions ``generate`` used, computed by the model's own ``get_rope_index`` from the
  batch's real attention mask (before an image-token mask, which must hide image tokens, not move the text after
  them), the fed-back answer continuing after the prompt's last position.
- the processor: ``Qwen2VLProcessor`` wants a video processor, which needs torchvision; without torchvision the
  processor is built from the checkpoint's tokenizer, image processor and chat template
  (`vlcore.models.image_only_processors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vlcore.errors import ModelLoadError
from vlcore.models.generative import GenerationResult, GenerativeAdapter
from vlcore.models.registry import Family, LoadContext

ARCHITECTURES = {"Qwen2VLForConditionalGeneration": "vqa", "Qwen2_5_VLForConditionalGeneration": "vqa"}

FAMILY = Family(
    name="qwen2_vl",
    title="Qwen2-VL",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    architectures=ARCHITECTURES,
    checkpoints={
        "Qwen/Qwen2-VL-2B-Instruct": "Qwen2-VL, 2B: generates a free-form answer (any image size, 28 px per token)",
        "Qwen/Qwen2.5-VL-3B-Instruct": "Qwen2.5-VL, 3B: generates a free-form answer (windowed vision tower)",
    },
)
VISION_NOTE = ("{title}'s vision tower returns no attention weights, so its self-attention is not shown; the image "
               "tokens are shown where the language model reads them.")


def load(ctx: LoadContext) -> Qwen2VLAdapter:
    """Load a Qwen2-VL or Qwen2.5-VL checkpoint on sdpa with its processor (built without a video processor when
    torchvision does not load)."""
    import transformers

    model = ctx.from_pretrained(getattr(transformers, ctx.architecture), attn_implementation="sdpa")
    return Qwen2VLAdapter(model, load_processor(ctx), model_id=ctx.model_id, device=ctx.device, dtype=ctx.dtype)


def load_processor(ctx: LoadContext):
    """The checkpoint's processor: the stock one where torchvision loads, else the family's processor class minus
    its video part, from the tokenizer, the image processor and the processor's chat template.

    Raises:
        ModelLoadError: the tokenizer or the image processor cannot be loaded, or there is no chat template.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    from vlcore.models.image_only_processors import build_qwen2_vl_processor, torchvision_available

    if torchvision_available():
        processor = ctx.processor(AutoProcessor)
    else:
        tokenizer = ctx.processor(AutoTokenizer)
        image_processor = ctx.processor(AutoImageProcessor)
        parts = {"tokenizer": tokenizer, "image_processor": image_processor,
                 "chat_template": _chat_template(ctx) or getattr(tokenizer, "chat_template", None)}
        processor = build_qwen2_vl_processor(parts, ctx.config.model_type)
    if not getattr(processor, "chat_template", None):
        raise ModelLoadError(f"{ctx.source!r} has no chat template (chat_template.jinja, chat_template.json or one "
                             "in tokenizer_config.json); VLScope writes Qwen prompts with it. Use an -Instruct "
                             "checkpoint or save the processor with its chat template.")
    return processor


def _chat_template(ctx: LoadContext) -> str | None:
    """The processor's chat template (``chat_template.jinja`` or ``chat_template.json``) of a folder or a hub
    checkpoint (from the hub cache when offline); None when it has neither."""
    import json

    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        if ctx.local:
            path = Path(ctx.path) / name
        else:
            found = cached_file(ctx.path, name, revision=ctx.revision,
                                local_files_only=ctx.kwargs.get("local_files_only", False),
                                _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
            path = Path(found) if found else None
        if path is not None and path.is_file():
            text = path.read_text()
            return text if name.endswith(".jinja") else json.loads(text).get("chat_template")
    return None


class Qwen2VLAdapter(GenerativeAdapter):
    """A Qwen2-VL or Qwen2.5-VL model with its processor: streams ``lm``, ``generated``; block ``lm.generated``
    (see `GenerativeAdapter` for the arguments)."""

    family = "qwen2_vl"
    title = "Qwen2-VL"
    tasks = FAMILY.tasks
    passes_position_ids = False  # M-RoPE: the positions come from the model's get_rope_index (_model_inputs)

    def __init__(self, model, processor, model_id: str, device: str = "auto", dtype=None):
        super().__init__(model, processor, model_id, device, dtype)
        vcfg = model.config.vision_config
        self.merge = int(vcfg.spatial_merge_size)
        self.patch_px = int(vcfg.patch_size) * self.merge  # one decoder image token per 28 x 28 px
        if model.config.model_type == "qwen2_5_vl":
            self.title = "Qwen2.5-VL"

    def vision_note(self) -> str:
        return VISION_NOTE.format(title=self.title)

    # -- M-RoPE positions ---------------------------------------------------------------------------
    def _rope_positions(self, inputs: dict) -> torch.Tensor:
        """``[3, B, N]`` (time, row, col) positions of ``inputs`` by the model's own ``get_rope_index``, over the
        tokens its ``attention_mask`` keeps (left and right padding get position 0, as in ``generate``)."""
        extra = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                 if inputs.get(k) is not None}
        positions, _ = self.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                       attention_mask=inputs["attention_mask"], **extra)
        return positions

    def _model_inputs(self, inputs: dict) -> dict:
        """The generic inputs plus M-RoPE positions from the unmasked attention mask: an image-token mask
        (``image_keep``) hides image tokens from the decoder but moves no position (the model's own computation
        would drop the hidden tokens from its position count and fail, or shift the text after them)."""
        out = super()._model_inputs(inputs)
        with torch.no_grad():
            out["position_ids"] = self._rope_positions(inputs)
        return out

    def _result(self, logits: torch.Tensor, inputs: dict, model_inputs: dict, sums: dict) -> GenerationResult:
        result = super()._result(logits, inputs, model_inputs, sums)
        P = int(inputs["prompt_len"])
        result.prompt["position_ids"] = model_inputs["position_ids"][..., :P]  # [3, B, P]: batch on dim 1
        return result

    def _teacher_forced(self, output: GenerationResult, b: int, ids: Sequence[int]) -> torch.Tensor:
        """``[len(ids), V]`` log-probabilities of row ``b``'s prompt followed by ``ids``: the row's own images
        (``pixel_values`` hold every image's patches back to back, ``image_grid_thw`` one row per image), its
        positions continued after the prompt's last one, as ``generate`` continues them."""
        p = output.prompt
        ids_in = p["input_ids"]
        P = ids_in.shape[1]
        extra = torch.as_tensor(ids[:-1], dtype=ids_in.dtype, device=ids_in.device)[None]
        k = extra.shape[1]
        grid = p["image_grid_thw"]
        per_image = (grid.prod(-1) // self.merge ** 2).tolist()
        counts = (ids_in == self.config.image_token_id).sum(1).tolist()
        owner = []  # the row of each image, in the processor's order
        for row, n in enumerate(counts):
            while n > 0:
                n -= per_image[len(owner)]
                owner.append(row)
        mine = torch.tensor([o == b for o in owner], device=grid.device)
        patches = torch.repeat_interleave(mine, grid.prod(-1))
        pos = p["position_ids"][:, b:b + 1]
        inputs = {"input_ids": torch.cat([ids_in[b:b + 1], extra], 1),
                  "attention_mask": torch.cat([p["attention_mask"][b:b + 1], torch.ones_like(extra)], 1),
                  "mm_token_type_ids": torch.cat([p["mm_token_type_ids"][b:b + 1], torch.zeros_like(extra)], 1)
                  .to(p["mm_token_type_ids"].dtype),
                  "position_ids": torch.cat([pos, pos[..., -1:] + 1 + torch.arange(k, device=pos.device)], -1),
                  "pixel_values": p["pixel_values"][patches.to(p["pixel_values"].device)],
                  "image_grid_thw": grid[mine]}
        out = self.model(**inputs, use_cache=False)
        return out.logits[0, P - 1:].float().log_softmax(-1)

    def info(self) -> dict:
        return {**super().info(), "patch_px": self.patch_px}
