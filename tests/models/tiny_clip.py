"""Tiny CLIP and SigLIP checkpoints written to a folder, for tests that load them through `load_adapter`.

Each builder writes a seeded random-weight ``CLIPModel`` or ``SiglipModel`` with its processor geometry scaled down
(32-px images, 8-px patches: a 4 x 4 grid) and a tokenizer built locally with ``tokenizers``:

- CLIP: a byte-level BPE with CLIP's pipeline (``CLIPTokenizer``: lower-casing, ``</w>`` word ends) trained on a
  few words, with ``<|startoftext|>`` and ``<|endoftext|>`` last in the vocabulary as in OpenAI's (the end token is
  the highest id, and pads are end tokens too), and ``eos_token_id=2`` in the text config as in
  ``openai/clip-vit-base-patch32`` (the pooled token is then the argmax of the ids); 16 text positions.
- SigLIP: a word-level tokenizer with a metaspace pre-tokenizer (SigLIP's own needs ``sentencepiece``), no start
  token, ``</s>`` appended and used as the pad as in ``google/siglip-base-patch16-224``; padded to 16 positions
  (64 in the real model).

The vision tower (hidden 48, 3 heads) and the text tower (hidden 32, 4 heads) differ in width and head count on
purpose: a mix-up of the two shows up as a shape error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "green", "what", "is", "color", "shape", "there",
         "in", "image", "circle", "square", "yes", "no", "two", "?", "."]
IMAGE_PX, PATCH_PX = 32, 8
TEXT_LEN = 16
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def _towers(text_vocab: int, **text) -> tuple[dict, dict]:
    text_config = dict(vocab_size=text_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=TEXT_LEN, **text)
    vision_config = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                         image_size=IMAGE_PX, patch_size=PATCH_PX)
    return text_config, vision_config


def build_clip_tokenizer():
    """A ``CLIPTokenizer`` over a BPE trained with ``tokenizers`` on `WORDS`; every byte, alone or ending a word,
    is in the vocabulary, and the two specials come last."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=CLIP_EOS))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=2000, min_frequency=1, end_of_word_suffix="</w>",
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + sorted({c + "</w>" for c in alphabet} - set(model["vocab"]))
    tokens += [CLIP_BOS, CLIP_EOS]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=TEXT_LEN)


def build_siglip_tokenizer():
    """A lower-casing word-level tokenizer (``▁word`` pieces, punctuation dropped as SigLIP's canonicalisation
    does), ``</s>`` appended and used as the pad."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        if word.isalpha():
            vocab["▁" + word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), "")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>",
                                   model_max_length=TEXT_LEN)


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Write a seeded tiny ``CLIPModel`` with its ``CLIPProcessor`` into ``folder``; return the folder."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_clip_tokenizer()
    text, vision = _towers(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_PX},
                                            crop_size={"height": IMAGE_PX, "width": IMAGE_PX})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder


def write_tiny_siglip(folder: Path, seed: int = 0) -> Path:
    """Write a seeded tiny ``SiglipModel`` (attention-pooling head on) with its ``SiglipProcessor``."""
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_siglip_tokenizer()
    text, vision = _towers(len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           projection_size=48)  # SigLIP compares the pooled vectors: text head -> vision width
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():  # SigLIP starts at scale 1, bias 0; a trained one has a large scale and negative bias
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-1.0)
    model.save_pretrained(folder)
    SiglipProcessor(SiglipImageProcessorPil(size={"height": IMAGE_PX, "width": IMAGE_PX}), tok).save_pretrained(folder)
    return folder


TINY_CHECKPOINTS: dict[str, Callable[[Path], Path]] = {"clip": write_tiny_clip, "siglip": write_tiny_siglip}
