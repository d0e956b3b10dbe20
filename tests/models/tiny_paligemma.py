"""A tiny PaliGemma checkpoint written to a folder, for the contract suite and `tests/models/test_paligemma.py`.

``PaliGemmaForConditionalGeneration`` with PaliGemma-224's geometry scaled down: a SigLIP vision tower (32-px
images squashed, 8-px patches: a 4 x 4 grid, no CLS, 2 layers, 2 heads; 16 image tokens where the real model has
256) and a Gemma decoder (hidden 32, 2 layers, 4 query heads over one key/value head: multi-query attention like
Gemma-2B). The tokenizer is word-level (built with ``tokenizers``; no BOS added by the tokenizer: the processor
writes ``<image>...<bos>`` itself, as it does for the real checkpoint); a ``PaliGemmaProcessor`` with
``SiglipImageProcessorPil`` (``image_seq_length`` 16) is saved beside the weights, so ``load_adapter(folder)``
loads it offline. PaliGemma has no chat template: the prompt is the processor's text prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

WORDS = ["answer", "en", "caption", "what", "is", "the", "color", "of", "cat", "cat?", "?", "a", "red", "blue",
         "green", "grey", "yes", "no", "there", "in", "image", "square", "dog", "two", "left", "right", "\n"]
IMAGE_PX, PATCH_PX = 32, 8


def build_tokenizer():
    """A word-level tokenizer: spaces dropped, newlines kept as tokens; ``<image>`` special (the processor adds
    PaliGemma's ``<locNNNN>``/``<segNNN>`` tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}  # Gemma's special ids
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[^\S\n]+"), "removed"),
                                                 pre_tokenizers.Split("\n", "isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_processor():
    """The processor (SigLIP squash to 32 px, 16 image tokens) on the local tokenizer."""
    from transformers import PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    ip = SiglipImageProcessorPil(size={"height": IMAGE_PX, "width": IMAGE_PX})
    ip.image_seq_length = (IMAGE_PX // PATCH_PX) ** 2
    return PaliGemmaProcessor(ip, build_tokenizer())


def write_paligemma(folder: Path, seed: int = 0, local_vision: bool = False) -> Path:
    """A seeded tiny PaliGemma saved as a checkpoint folder (weights, config, processor).

    Args:
        folder: where to write it.
        seed: the weights' seed.
        local_vision: zero the vision tower's attention output projections, so each image token depends on its
            own cell's pixels only (its attention weights stay those of random queries and keys).
    """
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    tok = processor.tokenizer
    vision = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": IMAGE_PX, "patch_size": PATCH_PX,
              "vision_use_head": False}
    text = {"model_type": "gemma", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": len(tok),
            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "max_position_embeddings": 256,
            "tie_word_embeddings": False}
    config = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=32,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), pad_token_id=0,
                             tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    if local_vision:
        with torch.no_grad():
            for layer in model.model.vision_tower.encoder.layers:
                layer.self_attn.out_proj.weight.zero_()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_contract_paligemma(folder: Path) -> Path:
    """The contract suite's tiny PaliGemma: a local vision tower (``local_vision``). The suite's planted-cell test
    reads the decoder's image-token embeddings, which a tower with attention mixes over the whole image."""
    return write_paligemma(folder, local_vision=True)


TINY_CHECKPOINTS: dict[str, Callable[[Path], Path]] = {"paligemma": write_contract_paligemma}
