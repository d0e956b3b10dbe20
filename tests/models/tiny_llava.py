"""A tiny LLaVA-1.5 checkpoint written to a folder, for the contract suite and `tests/models/test_llava.py`.

``LlavaForConditionalGeneration`` with LLaVA-1.5's geometry scaled down: a CLIP vision tower (32-px images, 8-px
patches: a 4 x 4 grid after its CLS, 2 layers, 2 heads, the ``default`` feature strategy reading layer -2) and a
Llama decoder (hidden 32, 2 layers, 4 query heads over 2 key/value heads: grouped-query attention). The tokenizer
is word-level (built with ``tokenizers``; ``<image>`` a special token) with a LLaVA-1.5 style chat template
(``USER: <image>\\n{question} ASSISTANT:``); a ``LlavaProcessor`` with ``LlavaImageProcessorPil`` (CLIP's
resize-and-crop) is saved beside the weights, so ``load_adapter(folder)`` loads it offline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

WORDS = ["USER:", "ASSISTANT:", "\n", "what", "is", "the", "color", "of", "cat", "cat?", "?", "a", "red", "blue",
         "green", "grey", "yes", "no", "there", "in", "image", "square", "dog", "two", "left", "right"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %} {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IMAGE_PX, PATCH_PX = 32, 8


def build_tokenizer():
    """A word-level tokenizer: spaces dropped, newlines kept as tokens, ``<bos>`` prepended, ``<image>`` special."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<bos>": 2, "<eos>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[^\S\n]+"), "removed"),
                                                 pre_tokenizers.Split("\n", "isolated")])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_llava(folder: Path, seed: int = 0) -> Path:
    """A seeded tiny LLaVA-1.5 saved as a checkpoint folder (weights, config, processor, chat template)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ip = LlavaImageProcessorPil(size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX})
    processor = LlavaProcessor(ip, tok, patch_size=PATCH_PX, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    vision = {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": IMAGE_PX, "patch_size": PATCH_PX}
    text = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(tok), "bos_token_id": 2,
            "eos_token_id": 3, "pad_token_id": 1, "max_position_embeddings": 128}
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 1
    model.generation_config.eos_token_id = 3
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


TINY_CHECKPOINTS: dict[str, Callable[[Path], Path]] = {"llava": write_llava}
