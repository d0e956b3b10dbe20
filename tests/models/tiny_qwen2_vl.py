"""Tiny Qwen2-VL and Qwen2.5-VL checkpoints written to a folder, for the contract suite and
`tests/models/test_qwen2_vl.py`.

The real geometry scaled down: 14 px patches merged 2 x 2 (one decoder image token per 28 x 28 px), images
resized by the PIL ``Qwen2VLImageProcessorPil`` to multiples of 28 between 56 x 56 and 16 tokens' worth of pixels,
M-RoPE (``mrope_section`` over the 8-wide heads), a decoder of hidden 32, 2 layers, 4 query heads over 2 key/value
heads. Qwen2-VL's decoder has Qwen2's sliding window (8 keys) on its second layer; Qwen2.5-VL's vision tower runs
56 px windows (2 x 2 merged tokens) with full attention on its second block.

The vision blocks' attention output projections are zeroed: the blocks still run (rotary, windows, MLPs), but a
token's features then depend on its own pixels only, so the planted-patch tests can read the decoder's input
embeddings (Qwen's vision attention returns no weights, so its image stream is the decoder's).

The folder is what the hub has: tokenizer files (a word-level tokenizer built with ``tokenizers``, the Qwen
specials added), ``preprocessor_config.json`` naming the processor class, ``chat_template.jinja``, config, weights,
generation config; no video processor (it needs torchvision).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

WORDS = ["user", "assistant", "system", "\n", "what", "is", "the", "color", "of", "cat", "cat?", "?", "a", "red",
         "blue", "green", "grey", "yes", "no", "there", "in", "image", "square", "dog", "two", "left", "right",
         "describe", "top", "bottom"]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 16
PROCESSOR_CLASS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def build_tokenizer():
    """A word-level tokenizer: spaces dropped, newlines kept as tokens, the Qwen specials; ``<|endoftext|>`` pads
    (left) and ends text, ``<|im_end|>`` ends a turn."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|endoftext|>": 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[^\S\n]+"), "removed"),
                                                 pre_tokenizers.Split("\n", "isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_qwen(folder: Path, model_type: str = "qwen2_vl", seed: int = 0, ends: bool = False) -> Path:
    """A seeded tiny ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` saved as a
    checkpoint folder (weights, config, tokenizer, image processor, chat template; no video processor).

    Args:
        ends: keep the end tokens' LM-head rows (random weights may end an answer anywhere). False zeroes them
            (logit 0, never the largest of the random logits in practice), so every answer runs to
            ``max_new_tokens`` and two images give sequences of one length (the contract suite compares them).
    """
    import torch
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(folder)
    path = folder / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "processor_class": PROCESSOR_CLASS[model_type]}))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), 1]
    text = {"model_type": model_type + "_text", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(tok), "bos_token_id": 1,
            "eos_token_id": eos[0], "pad_token_id": 1, "max_position_embeddings": 256,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}}
    vision = {"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if model_type == "qwen2_vl":
        text.update(use_sliding_window=True, sliding_window=8, max_window_layers=1)
        vision.update(embed_dim=16, hidden_size=32, mlp_ratio=2)
    else:
        vision.update(hidden_size=16, intermediate_size=32, out_hidden_size=32, window_size=56,
                      fullatt_block_indexes=[1])
    cls = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}[model_type]
    config = getattr(transformers, f"{cls}Config")(text_config=text, vision_config=vision, **ids)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{cls}ForConditionalGeneration")(config)
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
        if not ends:
            model.lm_head.weight[eos] = 0
    model.generation_config.pad_token_id = 1
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    return folder


def write_qwen2_vl(folder: Path) -> Path:
    return write_qwen(folder, "qwen2_vl")


def write_qwen2_5_vl(folder: Path) -> Path:
    return write_qwen(folder, "qwen2_5_vl")


TINY_CHECKPOINTS: dict[str, Callable[[Path], Path]] = {"qwen2-vl": write_qwen2_vl, "qwen2.5-vl": write_qwen2_5_vl}
