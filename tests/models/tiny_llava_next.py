"""Tiny LLaVA-NeXT and LLaVA-OneVision checkpoints written to folders, for the contract suite and
`tests/models/test_llava_next.py`.

Both keep their family's geometry, scaled down: a 32-px vision tower with 8-px patches (a 4 x 4 grid per crop, 2
layers, 2 heads), anyres tiling over ``PINPOINTS`` (tiles of 32 px: 1 x 2, 2 x 1, 2 x 2, 1 x 3, 3 x 1), and a
decoder of width 32, 2 layers, 4 query heads over 2 key/value heads (grouped-query attention).

- ``llava_next`` (as ``llava-hf/llava-v1.6-mistral-7b-hf``): a CLIP tower (a CLS then the patches, the ``default``
  strategy dropping the CLS, feature layer -2), a Mistral decoder, ``[INST] <image>\\n{question} [/INST]``.
- ``llava_onevision`` (as ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``): a SigLIP tower (patches only, the
  ``full`` strategy, feature layer -1), a Qwen2 decoder (biased q/k/v), ``anyres_max_9``, the Qwen chat
  template; saved without a video processor (VLScope builds the processor from the tokenizer and the PIL image
  processor, `vlcore.models.image_only_processors`).

Tokenizers are word-level (built with ``tokenizers``; the image and chat markers special) and saved with their
processor and chat template, so ``load_adapter(folder)`` loads each offline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

WORDS = ["\n", "what", "is", "the", "color", "of", "cat", "cat?", "?", "a", "red", "blue", "green", "grey", "yes",
         "no", "there", "in", "image", "square", "dog", "two", "left", "right", "user", "assistant"]
PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
IMAGE_PX, PATCH_PX = 32, 8
NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " [/INST]{% else %} {% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}"
)
ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(specials: list[str], template: str, bos: str | None, eos: str):
    """A word-level tokenizer: spaces dropped, newlines kept as tokens, ``bos`` prepended (when given),
    ``specials`` special."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[^\S\n]+"), "removed"),
                                                 pre_tokenizers.Split("\n", "isolated")])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token=bos,
                                   eos_token=eos, padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": specials})
    fast.chat_template = template
    return fast


def _text(model_type: str, tok, **extra) -> dict:
    return {"model_type": model_type, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(tok), "bos_token_id": 2,
            "eos_token_id": tok.eos_token_id, "pad_token_id": 1, "max_position_embeddings": 256, **extra}


def _vision(model_type: str) -> dict:
    return {"model_type": model_type, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": IMAGE_PX, "patch_size": PATCH_PX}


def _save(model_cls, config, processor, folder: Path, eos: int, seed: int, tower_mixing: float = 1.0) -> Path:
    import torch

    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # scale how much the tower's attention mixes patches (SigLIP's init mixes strongly)
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.out_proj.weight.mul_(tower_mixing)
    model.generation_config.pad_token_id = 1
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


def write_llava_next(folder: Path, seed: int = 0) -> Path:
    """A seeded tiny LLaVA-NeXT (CLIP + Mistral) saved as a checkpoint folder."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(["<image>", "[INST]", "[/INST]"], NEXT_TEMPLATE, "<s>", "</s>")
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_PX},
                                    crop_size={"height": IMAGE_PX, "width": IMAGE_PX}, image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(ip, tok, patch_size=PATCH_PX, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=NEXT_TEMPLATE)
    config = LlavaNextConfig(vision_config=_vision("clip_vision_model"),
                             text_config=_text("mistral", tok, sliding_window=None),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS, pad_token_id=1)
    return _save(LlavaNextForConditionalGeneration, config, processor, folder, tok.eos_token_id, seed)


def onevision_processor(max_tiles: int = 9):
    """A LLaVA-OneVision processor without its video part (the tiny geometry)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    from vlcore.models.image_only_processors import image_only_processor_class

    tok = build_tokenizer(["<image>", "<video>", "<|im_start|>", "<|im_end|>"], ONEVISION_TEMPLATE, None,
                          "<|im_end|>")
    ip = LlavaOnevisionImageProcessorPil(size={"height": IMAGE_PX, "width": IMAGE_PX}, image_grid_pinpoints=PINPOINTS)
    return image_only_processor_class(LlavaOnevisionProcessor)(
        ip, tok, num_image_tokens=(IMAGE_PX // PATCH_PX) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{max_tiles}", chat_template=ONEVISION_TEMPLATE)


def write_llava_onevision(folder: Path, seed: int = 0, max_tiles: int = 9) -> Path:
    """A seeded tiny LLaVA-OneVision (SigLIP + Qwen2) saved as a checkpoint folder (no video processor)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    processor = onevision_processor(max_tiles)
    tok = processor.tokenizer
    config = LlavaOnevisionConfig(vision_config=_vision("siglip_vision_model"), text_config=_text("qwen2", tok),
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS,
                                  vision_aspect_ratio=f"anyres_max_{max_tiles}", pad_token_id=1)
    _save(LlavaOnevisionForConditionalGeneration, config, None, folder, tok.eos_token_id, seed, 0.02)
    # as on the hub: tokenizer, image processor, chat template and the processor's settings, each in its file
    tok.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(ONEVISION_TEMPLATE)
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "image_token": "<image>", "video_token": "<video>",
        "num_image_tokens": processor.num_image_tokens, "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": f"anyres_max_{max_tiles}"}, indent=2))
    return folder


TINY_CHECKPOINTS: dict[str, Callable[[Path], Path]] = {"llava_next": write_llava_next,
                                                        "llava_onevision": write_llava_onevision}
