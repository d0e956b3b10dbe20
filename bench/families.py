"""Full-size random-weight checkpoints of every supported family, written to a folder and loaded through
`load_adapter` (as a user's folder would be), for the per-family rows of bench/extract.py.

The configurations are the published base sizes with random weights; tokenizers are the small ones the tests
build locally (no hub here), which changes no layer's size.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def blip_itm_base(folder: Path) -> Path:
    """BLIP ITM base (ViT-B/16 at 384 px: 24 x 24 patches; BERT-base text with cross-attention)."""
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessorPil, BlipProcessor

    from tests.models.tiny_blip import build_tokenizer, vocabulary

    vocab = vocabulary()
    text = {"vocab_size": len(vocab), "pad_token_id": vocab["[PAD]"], "bos_token_id": vocab["[DEC]"],
            "sep_token_id": vocab["[SEP]"], "eos_token_id": vocab["[SEP]"]}
    torch.manual_seed(0)
    BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config={"image_size": 384, "patch_size": 16})
                              ).save_pretrained(folder)
    BlipProcessor(BlipImageProcessorPil(size={"height": 384, "width": 384}), build_tokenizer()).save_pretrained(folder)
    return folder


def clip_b32(folder: Path) -> Path:
    """CLIP ViT-B/32 (224 px: 7 x 7 patches and CLS; 12-layer causal text tower)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from tests.models.tiny_clip import build_clip_tokenizer

    tok = build_clip_tokenizer()
    torch.manual_seed(0)
    text = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": 2, "pad_token_id": tok.pad_token_id}
    CLIPModel(CLIPConfig(text_config=text)).save_pretrained(folder)
    CLIPProcessor(CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
                  tok).save_pretrained(folder)
    return folder


def siglip_b16(folder: Path) -> Path:
    """SigLIP base patch 16 at 224 px (14 x 14 patches, attention-pooling head; 12-layer text tower)."""
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    from tests.models.tiny_clip import build_siglip_tokenizer

    tok = build_siglip_tokenizer()
    torch.manual_seed(0)
    text = {"vocab_size": len(tok), "bos_token_id": None, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    SiglipModel(SiglipConfig(text_config=text)).save_pretrained(folder)
    SiglipProcessor(SiglipImageProcessorPil(size={"height": 224, "width": 224}), tok).save_pretrained(folder)
    return folder


FAMILY_CHECKPOINTS = {"BLIP ITM base": blip_itm_base, "CLIP ViT-B/32": clip_b32, "SigLIP base/16": siglip_b16}


def load_family(name: str, device: str):
    """Write ``name``'s checkpoint to a temporary folder and load it with `load_adapter`."""
    from vlcore.models.registry import load_adapter

    folder = FAMILY_CHECKPOINTS[name](Path(tempfile.mkdtemp(prefix="vlscope-bench-family-")))
    return load_adapter(str(folder), device=device)
