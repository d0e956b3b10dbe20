"""Idefics3 / SmolVLM adapter: ``Idefics3ForConditionalGeneration`` (SmolVLM v1, e.g.
``HuggingFaceTB/SmolVLM-256M-Instruct``) and ``SmolVLMForConditionalGeneration`` (SmolVLM2), generative models
(VQA: they write the answer).

The streams, blocks, generation trace, attention without eager mode and the logit lens are the shared generative
adapter's (`vlcore.models.generative`). What is Idefics3's own:

- the decoder is ``model.model.text_model`` (a Llama);
- the image tokens: the processor resizes the image (longest edge ``size``, then up to whole tiles of
  ``max_image_size``), splits it into tiles and adds the whole image squashed to one tile (the global image);
  each frame's vision-tower patches are pixel-shuffled ``scale_factor`` x ``scale_factor`` into one decoder
  token. The decoder's image tokens lie on two grids of the image (`vlcore.models.image_tokens`): ``tiles`` (the
  tiles stitched, ``<row_i_col_j>`` markers) and ``global`` (``<global-img>``); an image small enough for one
  tile, or a processor with ``do_image_splitting`` off, gives one ``image`` grid;
- the processor takes its images as one list per prompt (`_process`);
- SmolVLM2's ``SmolVLMProcessor`` needs ``num2words`` and a torchvision video processor; where either is missing
  the processor is an ``Idefics3Processor`` built from the checkpoint's tokenizer, image processor, chat template
  and ``image_seq_len`` (`build_processor_from_parts`): both expand an image into the same tokens;
- ``vision`` / ``vision.self``: the vision tower runs once per frame (each tile, then the global image; the model
  drops the all-zero padding frames of a batch) and returns its weights on eager attention. Only each example's
  global image is kept (its first image's, in a prompt with several; the only frame of an image that was not
  split): ``vision`` is its ``n x n`` patch grid over the global image as the model saw it, and ``vision.self``
  its self-attention (`Idefics3Adapter.capture`); a global-image patch maps to the decoder's global-grid token
  whose ``scale_factor`` x ``scale_factor`` block holds it (the pixel shuffle, `Idefics3Adapter._lm_positions_of`).
  The tiles' tower attention is not kept (their tokens are in ``lm``). A tower of more than `MAX_VISION_TOKENS`
  patches a frame (SmolVLM-256M and -500M: 512-px frames of 16-px patches, 1,024) loads on sdpa and keeps no
  ``vision`` stream (`Idefics3Adapter.vision_note` says why); the image stream is always the decoder's ``lm``.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np

from vlcore.errors import ModelLoadError
from vlcore.models.base import BlockSpec, EncodedBatch
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

ARCHITECTURES = {"Idefics3ForConditionalGeneration": "vqa", "SmolVLMForConditionalGeneration": "vqa"}

FAMILY = Family(
    name="idefics3",
    title="SmolVLM / Idefics3",
    model_types=("idefics3", "smolvlm"),
    architectures=ARCHITECTURES,
    checkpoints={"HuggingFaceTB/SmolVLM-256M-Instruct": "SmolVLM 256M: generates a free-form answer (SigLIP tiles "
                                                        "plus a global image, SmolLM2 decoder)"},
)




def load(ctx: LoadContext) -> Idefics3Adapter:
    """Load an Idefics3 or SmolVLM checkpoint: the language model on sdpa; the vision tower on eager where its
    global image's self-attention is kept (at most `MAX_VISION_TOKENS` patches a frame), else on sdpa (eager would
    hold ``[frames, heads, 1024, 1024]`` per tower layer: 0.8 GiB in float32 for SmolVLM-256M's 17 frames of a
    square image); its processor."""
    import transformers

    model = ctx.from_pretrained(getattr(transformers, ctx.architecture), attn_implementation={
        "text_config": "sdpa", "vision_config": tower_implementation(ctx.config.vision_config)})
    return Idefics3Adapter(model, load_processor(ctx), model_id=ctx.model_id, device=ctx.device, dtype=ctx.dtype)


def smolvlm_processor_loads() -> bool:
    """True when ``SmolVLMProcessor`` can be built here (it needs ``num2words`` and torchvision)."""
    from vlcore.models.image_only_processors import torchvision_available

    return importlib.util.find_spec("num2words") is not None and torchvision_available()


def load_processor(ctx: LoadContext):
    """The checkpoint's processor: ``Idefics3Processor`` for ``idefics3``; for ``smolvlm`` its
    ``SmolVLMProcessor`` where that loads, else an ``Idefics3Processor`` from its parts.

    Raises:
        ModelLoadError: the processor files are missing or damaged.
    """
    from transformers import Idefics3Processor

    if ctx.config.model_type != "smolvlm":
        return ctx.processor(Idefics3Processor)
    if smolvlm_processor_loads():
        from transformers import SmolVLMProcessor

        return ctx.processor(SmolVLMProcessor)
    return build_processor_from_parts(ctx)


def _optional_file(ctx: LoadContext, name: str) -> str | None:
    """The text of one of the checkpoint's files, or None where it has none."""
    from transformers.utils import cached_file

    kwargs = {k: v for k, v in ctx.kwargs.items() if k in ("revision", "local_files_only")}
    try:
        path = cached_file(ctx.path, name, _raise_exceptions_for_missing_entries=False, **kwargs)
    except OSError:
        return None
    if path is None:
        return None
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def build_processor_from_parts(ctx: LoadContext):
    """An ``Idefics3Processor`` from a SmolVLM checkpoint's tokenizer, image processor (PIL), chat template and
    ``image_seq_len``: it writes the same ``<fake_token_around_image>``, ``<row_i_col_j>``, ``<global-img>``
    and ``<image>`` tokens as ``SmolVLMProcessor`` (videos are not read).

    Raises:
        ModelLoadError: the tokenizer or image processor cannot be read.
    """
    from transformers import AutoTokenizer, Idefics3Processor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    tokenizer = ctx.processor(AutoTokenizer)
    image_processor = ctx.processor(SmolVLMImageProcessorPil)
    try:
        settings = json.loads(_optional_file(ctx, "processor_config.json") or "{}")
        template = _optional_file(ctx, "chat_template.jinja") or json.loads(
            _optional_file(ctx, "chat_template.json") or "{}").get("chat_template")
    except ValueError as err:
        raise ModelLoadError(f"{ctx.source!r} has a damaged processor or chat template file ({err}); save the "
                             "processor again (processor.save_pretrained).") from err
    template = template or settings.get("chat_template") or getattr(tokenizer, "chat_template", None)
    seq_len = settings.get("image_seq_len")
    if seq_len is None:  # what the processor computes it from: the tower's frame and the pixel shuffle
        vision = ctx.config.vision_config
        seq_len = (int(vision.image_size) // int(vision.patch_size)) ** 2 // int(ctx.config.scale_factor) ** 2
    return Idefics3Processor(image_processor, tokenizer, image_seq_len=int(seq_len), chat_template=template)


class Idefics3Adapter(GenerativeAdapter):
    """An Idefics3 / SmolVLM model with its processor: streams ``lm``, ``generated`` (and ``vision``: the global
    image's tower patches); blocks ``lm.generated`` (and ``vision.self``) (see `GenerativeAdapter` for the
    arguments)."""

    selects_vision_crops = True  # `_global_frames`: each example's global frame, whatever its frame count

    family = "idefics3"
    title = "SmolVLM / Idefics3"
    tasks = FAMILY.tasks

    def __init__(self, model, processor, model_id: str, device: str = "auto", dtype=None):
        super().__init__(model, processor, model_id, device, dtype)
        vcfg = model.config.vision_config
        self.patch_px = int(vcfg.patch_size)
        self.patches_per_side = int(vcfg.image_size) // self.patch_px
        self.scale = int(model.config.scale_factor)

    @property
    def language_model(self):
        """The decoder: ``model.model.text_model`` (a Llama)."""
        return self.model.model.text_model

    @property
    def vision_tower(self):
        return self.model.model.vision_model

    @property
    def n_vision_tokens(self) -> int:
        """The tower's tokens a frame (its patches: no summary token)."""
        return self.patches_per_side ** 2

    def _process(self, images: list, prompts: list[str]):
        """The processor's batch, its images as one list per prompt (left-padded)."""
        return self.processor(images=image_groups(images), text=prompts, padding=True, padding_side="left",
                              return_tensors="pt")

    def _placeholder_ids(self) -> list[int]:
        """The image token and the image markers (``<fake_token_around_image>``, ``<global-img>``,
        ``<row_i_col_j>``): never generated (a random model would write them)."""
        tok = self.tokenizer
        names = [getattr(self.processor, "fake_image_token", "<fake_token_around_image>"), "<global-img>"]
        names += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
        ids = {tok.convert_tokens_to_ids(n) for n in names} - {tok.unk_token_id, None}
        return sorted(set(super()._placeholder_ids()) | ids)

    # -- the vision tower: each example's global image ------------------------------------------------------
    def vision_spec(self) -> BlockSpec | None:
        vcfg = self.config.vision_config
        layers = int(vcfg.num_hidden_layers)
        if self.n_vision_tokens > MAX_VISION_TOKENS or layers == 0:
            return None
        return BlockSpec(VISION, VISION, layers, int(vcfg.num_attention_heads), False,
                         "image self-attention of the global image (vision tower, before the pixel shuffle)")

    def _vision_attention(self) -> list:
        return [layer.self_attn for layer in self.vision_tower.encoder.layers]

    def _vision_hidden_modules(self) -> list:
        return [self.vision_tower.embeddings, *self.vision_tower.encoder.layers]

    def _global_grid(self, layout: TokenLayout) -> int:
        """The grid of ``layout`` (an ``lm`` layout) showing its first image's global frame: grid 0 where the
        image was not split (its only grid, ``n x n`` tokens), else grid 1 (after its tiles, never ``n x n``:
        a split image has at least two tiles)."""
        n = self.patches_per_side // self.scale
        return 0 if tuple(layout.images[0].grid) == (n, n) else 1

    def _global_frame(self, layout: TokenLayout) -> int:
        """The index, among its example's real frames, of the first image's global frame (after its tiles)."""
        if self._global_grid(layout) == 0:
            return 0
        n = self.patches_per_side // self.scale
        rows, cols = layout.images[0].grid
        return (rows // n) * (cols // n)

    def _vision_layouts(self, prompt_layout: TokenLayout, row: int, enc) -> TokenLayout:
        """The tower's ``n x n`` patch grid over the first image's global frame as the model saw it."""
        seen = prompt_layout.images[self._global_grid(prompt_layout)]
        n = self.patches_per_side
        grid = ImageGrid.regular(seen.image, (n, n), (seen.image.shape[0] // n, seen.image.shape[1] // n))
        cells = [(r, c) for r in range(n) for c in range(n)]
        return TokenLayout.build([patch_token(r, c) for r, c in cells], [ROLE_PATCH] * len(cells),
                                 [0] * len(cells), cells, (grid,))

    def _lm_positions_of(self, batch: EncodedBatch, index: int, row: int = 0) -> list[int]:
        """The ``lm`` position of ``vision`` token ``index``: the global-grid token whose ``scale_factor`` x
        ``scale_factor`` block of patches holds its cell (the connector's pixel shuffle)."""
        lm, vision = batch.streams[LM][row], batch.streams[VISION][row]
        if vision.role[index] != ROLE_PATCH:
            return []
        cell = np.asarray(vision.cell[index]) // self.scale
        g = self._global_grid(lm)
        return np.flatnonzero((lm.role == ROLE_PATCH) & (lm.image_of == g) & (lm.cell == cell).all(1)).tolist()

    def _global_frames(self, batch: EncodedBatch) -> tuple[list[int], list[int]]:
        """(real frames per example, the tower-batch index of each example's global frame). The tower's batch is
        every real frame in example order: the model drops the frames that are all zeros (a batch's padding), as
        ``Idefics3Model.get_image_features`` does."""
        pixels = batch.inputs["pixel_values"]
        pixels = pixels.to(self.vision_tower.dtype).flatten(2)  # [B, F, C*S*S], in the tower's dtype like the model
        real = (pixels == 0.0).sum(-1) != pixels.shape[-1]
        frames = real.sum(1).tolist()
        starts = np.concatenate([[0], np.cumsum(frames)]).astype(int)
        keep = [int(starts[b]) + self._global_frame(lay) for b, lay in enumerate(batch.streams[LM])]
        return frames, keep

    def _tower_selection(self, batch: EncodedBatch) -> tuple[list[int], list[int]] | None:
        """Each example's frames, and its global frame as the one kept (where the tower's attention is kept)."""
        return None if self.vision_spec() is None else self._global_frames(batch)

    def vision_note(self) -> str:
        vcfg = self.config.vision_config
        n, side, scale = self.n_vision_tokens, self.patches_per_side, self.scale
        if self.vision_spec() is not None:
            return (f"The vision tower reads each tile and the global image (the whole image squashed to one tile) as "
                    f"separate frames of {n:,} patches ({side} x {side}). The vision stream and its self-attention "
                    "are the global image's (of the first image, in a prompt with several); the tiles' tower "
                    f"attention is not kept. The decoder reads each frame's patches pixel-shuffled {scale} x {scale} "
                    "into one token: the tiles' tokens and the global image's are in its stream.")
        layers, heads = int(vcfg.num_hidden_layers), int(vcfg.num_attention_heads)
        if layers == 0:
            return "The vision tower has no layers: there is no self-attention to show."
        gb = layers * heads * n * n * 4 / 1e9
        return (f"The vision tower's self-attention is not kept: it reads each tile and the global image as "
                f"{n:,} patches ({side} x {side}) in {layers} layers of {heads} heads, {gb:,.1f} GB of weights a "
                f"frame in float32 (VLScope keeps a tower's attention up to {MAX_VISION_TOKENS:,} tokens). The "
                f"image maps show the decoder's image tokens (each frame's patches pixel-shuffled {scale} x {scale} "
                "into one token) on the tiles grid and on the global image.")

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "vision_block": "global image" if self.vision_spec() is not None else "none"}

    def info(self) -> dict:
        vision = self.config.vision_config
        return {**super().info(), "patch_px": int(vision.patch_size), "frame_px": int(vision.image_size),
                "scale_factor": int(self.config.scale_factor)}
