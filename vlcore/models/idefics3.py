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
- no ``vision.self`` block (`vision_note`): the vision tower runs once per tile and once on the global image,
  and a decoder image token is a pixel-shuffled block of ``scale_factor**2`` tower tokens, so the tower's tokens
  are not the decoder's; the image stream is the decoder's ``lm``.
"""

from __future__ import annotations

import importlib.util
import json

from vlcore.errors import ModelLoadError
from vlcore.models.generative import GenerativeAdapter, image_groups
from vlcore.models.registry import Family, LoadContext

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
    """Load an Idefics3 or SmolVLM checkpoint, all on sdpa (the vision tower's attention is not collected, and
    eager would hold ``[frames, heads, 1024, 1024]`` per tower layer: 0.8 GiB in float32 for SmolVLM-256M's 17
    frames of a square image); its processor."""
    import transformers

    model = ctx.from_pretrained(getattr(transformers, ctx.architecture), attn_implementation="sdpa")
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
    """An Idefics3 / SmolVLM model with its processor: streams ``lm``, ``generated``; block ``lm.generated``
    (see `GenerativeAdapter` for the arguments)."""

    family = "idefics3"
    title = "SmolVLM / Idefics3"
    tasks = FAMILY.tasks

    @property
    def language_model(self):
        """The decoder: ``model.model.text_model`` (a Llama)."""
        return self.model.model.text_model

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

    def vision_note(self) -> str:
        scale = int(self.config.scale_factor)
        return (f"{self.title}'s vision tower runs once per tile and once on the global image, and the decoder "
                f"reads each frame's tower tokens pixel-shuffled {scale} x {scale} into one token, so the tower's "
                "tokens are not the decoder's: its self-attention is not collected. The image maps show the "
                "decoder's image tokens on the tiles grid and on the global image.")

    def info(self) -> dict:
        vision = self.config.vision_config
        return {**super().info(), "patch_px": int(vision.patch_size), "frame_px": int(vision.image_size),
                "scale_factor": int(self.config.scale_factor)}
