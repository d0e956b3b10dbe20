"""Tiny BLIP checkpoints written to a folder, for tests that load them through `load_adapter`.

Each builder writes a seeded random-weight ``BlipForImageTextRetrieval`` or ``BlipForQuestionAnswering`` with
BLIP's processor geometry scaled down (32-px images, 8-px patches: a 4 x 4 grid), a BERT-style WordPiece tokenizer
built with ``tokenizers`` (with BLIP's extra specials: ``[DEC]`` as the decoder's start token, ``[ENC]``) and a
``BlipProcessor`` saved beside the weights, so ``load_adapter(folder)`` loads it offline.

The ITM model's vision tower (hidden 48, 3 heads) and text model (hidden 32, 4 heads) have different widths and
head counts on purpose (as in BLIP-large: 1024 and 768), so a mix-up of the two shows up as a shape error; the VQA
model's vision tower has the text width (its decoder needs that) and 2 heads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "green", "what", "is", "the", "color", "shape", "?",
         "yes", "no", "there", "in", "image", "circle", "square", "two", "on", "left", "right", "##s"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EXTRA = ["[DEC]", "[ENC]"]  # BLIP's decoder start token and encoder token, after the vocabulary as in BLIP's
IMAGE_PX, PATCH_PX = 32, 8
TEXT_LEN = 40


def vocabulary() -> dict[str, int]:
    """Token -> id: the specials, the words, then ``[DEC]`` and ``[ENC]``."""
    return {tok: i for i, tok in enumerate(SPECIALS + WORDS + EXTRA)}


def build_tokenizer():
    """A lower-casing WordPiece tokenizer, ``[CLS] text [SEP]``, with ``[DEC]`` as its bos token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizer

    vocab = vocabulary()
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    return BertTokenizer(tokenizer_object=tok, bos_token="[DEC]", additional_special_tokens=["[ENC]"],
                         model_max_length=TEXT_LEN)


def tiny_config(vision_hidden: int = 48, vision_heads: int = 3, **text):
    """A `BlipConfig`: vision 2 layers x ``vision_heads`` heads (hidden ``vision_hidden``), text 2 layers x 4 heads
    (hidden 32), 32-px images and 8-px patches. BLIP's VQA decoder cross-attends to the question encoder with the
    vision width, so a VQA model needs ``vision_hidden`` 32 (as BLIP-base, where both are 768)."""
    from transformers import BlipConfig

    vocab = vocabulary()
    text_config = {
        "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": TEXT_LEN, "pad_token_id": vocab["[PAD]"],
        "bos_token_id": vocab["[DEC]"], "sep_token_id": vocab["[SEP]"], "eos_token_id": vocab["[SEP]"],
        "projection_dim": 16, **text,
    }
    vision_config = {
        "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden, "num_hidden_layers": 2,
        "num_attention_heads": vision_heads, "image_size": IMAGE_PX, "patch_size": PATCH_PX, "projection_dim": 16,
        "initializer_range": 0.02,
    }
    return BlipConfig(text_config=text_config, vision_config=vision_config, image_text_hidden_size=16,
                      projection_dim=16)


def write_tiny_blip(folder: Path, architecture: str, seed: int = 0, vision_hidden: int = 48,
                    vision_heads: int = 3) -> Path:
    """Write a seeded tiny BLIP of ``architecture`` with its processor into ``folder``; return the folder."""
    import transformers
    from transformers import BlipImageProcessorPil, BlipProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(tiny_config(vision_hidden, vision_heads)).eval()
    with torch.no_grad():  # BLIP initialises the vision embeddings with std 1e-10: give them some spread
        emb = model.vision_model.embeddings
        emb.class_embedding.normal_(0, 0.5)
        emb.position_embedding.normal_(0, 0.5)
    model.save_pretrained(folder)
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": IMAGE_PX, "width": IMAGE_PX}), build_tokenizer())
    processor.save_pretrained(folder)
    return folder


def blip_itm(folder: Path) -> Path:
    """A tiny ``BlipForImageTextRetrieval`` (ITM head and contrastive projections)."""
    return write_tiny_blip(Path(folder), "BlipForImageTextRetrieval", seed=0)


def blip_vqa(folder: Path) -> Path:
    """A tiny ``BlipForQuestionAnswering`` (question encoder and answer decoder)."""
    return write_tiny_blip(Path(folder), "BlipForQuestionAnswering", seed=1, vision_hidden=32, vision_heads=2)


TINY_CHECKPOINTS: dict[str, Callable[[Path], Path]] = {"blip-itm": blip_itm, "blip-vqa": blip_vqa}
