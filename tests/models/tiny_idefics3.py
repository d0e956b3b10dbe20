"""Tiny Idefics3 / SmolVLM checkpoints written to a folder, for the contract suite and `tests/models/test_idefics3.py`.

SmolVLM-256M-Instruct's geometry scaled down: its vision tower reads 512-px frames in 16-px patches (32 x 32) and
the connector pixel-shuffles them by ``scale_factor`` 4 into 8 x 8 = 64 decoder tokens a frame; its image
processor resizes the longest edge to 2048 (4 x 512) and splits the image into 512-px tiles plus a global 512-px
image. Here: 32-px frames, 4-px patches (8 x 8), ``scale_factor`` 2 (4 x 4 = 16 tokens a frame), longest edge 64,
32-px tiles: a square image gives 2 x 2 tiles (an 8 x 8 tile-token grid of 8-px cells) and a global image (4 x 4).
A SigLIP-like vision tower (hidden 16, 2 layers, 2 heads) and a Llama decoder (hidden 32, 2 layers, 4 query heads
over 2 key/value heads). The tokenizer is word-level (built with ``tokenizers``) with SmolVLM's markers as
special tokens (``<fake_token_around_image>``, ``<image>``, ``<global-img>``, ``<row_i_col_j>``,
``<end_of_utterance>``, the end token) and SmolVLM's chat template (``<|im_start|>User:<image>{question}
<end_of_utterance>\\nAssistant:``).

- ``idefics3`` (the contract suite's, `write_contract_idefics3`: one tower layer whose attention adds nothing):
  ``Idefics3ForConditionalGeneration`` with an ``Idefics3Processor`` saved beside it (what
  SmolVLM v1 checkpoints such as ``HuggingFaceTB/SmolVLM-256M-Instruct`` ship).
- ``smolvlm`` (`write_smolvlm`, not in `TINY_CHECKPOINTS`: the contract suite runs on ``idefics3``):
  ``SmolVLMForConditionalGeneration`` (SmolVLM2's classes) with the files a ``SmolVLMProcessor`` saves, written
  by hand: that processor needs ``num2words`` and a torchvision video processor, neither of which loads here.

The image processor resamples with NEAREST (the real one: LANCZOS): an image at the size the model sees then
comes through the processor's resize (to the longest edge, then down to the global image) unchanged, which the
contract suite's planted-cell test relies on. `tests/models/test_idefics3.py` checks LANCZOS too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

WORDS = ["User:", "Assistant:", "\n", "what", "is", "the", "color", "of", "cat", "cat?", "?", "a", "red", "blue",
         "green", "grey", "yes", "no", "there", "in", "image", "square", "dog", "two", "left", "right"]
SPECIALS = ["<|im_start|>", "<fake_token_around_image>", "<image>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
END = "<end_of_utterance>"
# SmolVLM's chat template (images before the text of a user turn), as its checkpoints ship it
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
FRAME_PX, PATCH_PX, SCALE, LONGEST_PX = 32, 4, 2, 64
IMAGE_SEQ_LEN = (FRAME_PX // PATCH_PX // SCALE) ** 2  # 16 decoder tokens a frame


def build_tokenizer():
    """A word-level tokenizer: spaces dropped, newlines kept as tokens, SmolVLM's markers special; the end token
    ``<end_of_utterance>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, END: 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[^\S\n]+"), "removed"),
                                                 pre_tokenizers.Split("\n", "isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token=END,
                                   padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def image_processor(cls=None, resample=None, **settings):
    """SmolVLM's image processor (PIL backend), scaled down: longest edge 64, 32-px tiles and global image."""
    from PIL import Image
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    cls = cls or Idefics3ImageProcessorPil
    return cls(size={"longest_edge": LONGEST_PX}, max_image_size={"longest_edge": FRAME_PX},
               resample=Image.NEAREST if resample is None else resample, **settings)


def config_dict(vocab: int, image_token_id: int, vision_layers: int = 2, patch_px: int = PATCH_PX) -> dict:
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": vision_layers,
              "num_attention_heads": 2, "image_size": FRAME_PX, "patch_size": patch_px}
    text = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab, "bos_token_id": None,
            "eos_token_id": 2, "pad_token_id": 1, "max_position_embeddings": 512}
    return {"vision_config": vision, "text_config": text, "scale_factor": SCALE, "image_token_id": image_token_id,
            "pad_token_id": 1, "tie_word_embeddings": False}


def _save_model(cls_name: str, folder: Path, tok, seed: int, vision_layers: int, patch_px: int = PATCH_PX,
                local_tower: bool = False) -> None:
    import torch
    import transformers

    config = getattr(transformers, f"{cls_name}Config")(
        **config_dict(len(tok), tok.convert_tokens_to_ids("<image>"), vision_layers, patch_px))
    torch.manual_seed(seed)
    model = getattr(transformers, f"{cls_name}ForConditionalGeneration")(config)
    if local_tower:  # the tower's attention adds nothing to its tokens: each token depends on its own patch only
        with torch.no_grad():
            for layer in model.model.vision_model.encoder.layers:
                layer.self_attn.out_proj.weight.zero_()
    model.generation_config.pad_token_id = 1
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = None
    model.save_pretrained(folder)


def write_idefics3(folder: Path, seed: int = 0, vision_layers: int = 2, resample=None, patch_px: int = PATCH_PX,
                   local_tower: bool = False) -> Path:
    """A seeded tiny Idefics3 (SmolVLM v1) saved as a checkpoint folder (weights, config, processor, chat
    template). ``patch_px`` 1 makes a tower of 1,024 patches a frame (SmolVLM-256M's count); ``local_tower``
    zeroes the tower's attention output projections (its weights are real, but each token stays its own
    patch's)."""
    from transformers import Idefics3Processor

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    processor = Idefics3Processor(image_processor(resample=resample), tok,
                                  image_seq_len=(FRAME_PX // patch_px // SCALE) ** 2, chat_template=CHAT_TEMPLATE)
    _save_model("Idefics3", folder, tok, seed, vision_layers, patch_px, local_tower)
    processor.save_pretrained(folder)
    return folder


def write_smolvlm(folder: Path, seed: int = 0) -> Path:
    """A seeded tiny SmolVLM (SmolVLM2's classes) with the files a ``SmolVLMProcessor`` would save (its
    tokenizer, image processor, chat template and ``processor_config.json``), written without building one."""
    import json

    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    _save_model("SmolVLM", folder, tok, seed, 2)
    tok.save_pretrained(folder)
    image_processor(SmolVLMImageProcessorPil).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "SmolVLMProcessor",
                                                              "image_seq_len": IMAGE_SEQ_LEN}))
    return folder


def write_contract_idefics3(folder: Path) -> Path:
    """The contract suite's tiny Idefics3: one vision-tower layer whose attention output projection is zero. The
    suite's planted-cell test reads the decoder's input embeddings, and a tower layer's attention mixes every
    token of a frame (a planted pixel would reach its whole tile); with that projection zero each decoder image
    token depends on its own cell's pixels only, while the layer's attention weights (``vision.self``, the
    global image's) are still real and go through every contract test."""
    return write_idefics3(folder, vision_layers=1, local_tower=True)


TINY_CHECKPOINTS: dict[str, Callable[[Path], Path]] = {"idefics3": write_contract_idefics3}
