"""A tiny Gemma 3 checkpoint written to a folder, for the contract suite and `tests/models/test_gemma3.py`.

``Gemma3ForConditionalGeneration`` with Gemma-3-4B's geometry scaled down: a SigLIP vision tower (32-px images
squashed, 4-px patches: an 8 x 8 patch grid, 2 layers, 2 heads) average-pooled 4 x 4 into ``mm_tokens_per_image``
= 4 image tokens (a 2 x 2 grid; the real model pools 64 x 64 into 16 x 16), and a Gemma 3 decoder (hidden 32,
2 layers: a sliding-window layer (window 6) then a full one, 4 query heads over 2 key/value heads; a final logit
softcap of 1.0 in the text config, which ``Gemma3ForConditionalGeneration`` does not apply, so the logit lens must
not either). The tokenizer is word-level (built with ``tokenizers``, BOS
added like Gemma's), with ``<start_of_image>``, ``<image_soft_token>``, ``<end_of_image>``, ``<start_of_turn>``
and ``<end_of_turn>`` special and a Gemma-style chat template (which writes ``<bos>`` itself); a
``Gemma3Processor`` with ``Gemma3ImageProcessorPil`` is saved beside the weights, so ``load_adapter(folder)`` loads
it offline. The image projection is initialised to zeros by transformers; it is drawn at random here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

WORDS = ["user", "model", "\n", "what", "is", "the", "color", "of", "cat", "cat?", "?", "a", "red", "blue", "green",
         "grey", "yes", "no", "there", "in", "image", "square", "dog", "two", "left", "right"]
CHAT_TEMPLATE = (  # newlines as Jinja strings: the template environment trims a newline after a block tag
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{% if message['role'] == 'assistant' %}model{% else %}{{ message['role'] }}{% endif %}{{ '\\n' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<end_of_turn>{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model{{ '\\n' }}{% endif %}"
)
IMAGE_PX, PATCH_PX, TOKENS_PER_IMAGE = 32, 4, 4
SPECIALS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def build_tokenizer():
    """A word-level tokenizer: spaces dropped, newlines kept as tokens, ``<bos>`` prepended."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}  # Gemma's special ids
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[^\S\n]+"), "removed"),
                                                 pre_tokenizers.Split("\n", "isolated")])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", padding_side="left", extra_special_tokens=SPECIALS)
    fast.add_special_tokens({"additional_special_tokens": [*SPECIALS.values(), "<start_of_turn>", "<end_of_turn>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_gemma3(folder: Path, seed: int = 0, local_vision: bool = False) -> Path:
    """A seeded tiny Gemma 3 saved as a checkpoint folder (weights, config, processor, chat template).

    Args:
        folder: where to write it.
        seed: the weights' seed.
        local_vision: zero the vision tower's attention output projections, so each image token depends on its
            own cell's pixels only (its attention weights stay those of random queries and keys).
    """
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ip = Gemma3ImageProcessorPil(size={"height": IMAGE_PX, "width": IMAGE_PX})
    processor = Gemma3Processor(ip, tok, image_seq_length=TOKENS_PER_IMAGE, chat_template=CHAT_TEMPLATE)
    vision = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": IMAGE_PX, "patch_size": PATCH_PX,
              "vision_use_head": False}
    text = {"model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "query_pre_attn_scalar": 8,
            "sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"],
            "final_logit_softcapping": 1.0, "vocab_size": len(tok), "bos_token_id": 2, "eos_token_id": 1,
            "pad_token_id": 0, "max_position_embeddings": 256, "tie_word_embeddings": False}
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=TOKENS_PER_IMAGE,
                          boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                          image_token_index=tok.image_token_id, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_()
        if local_vision:
            for layer in model.model.vision_tower.encoder.layers:
                layer.self_attn.out_proj.weight.zero_()
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = [1, end_of_turn]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_contract_gemma3(folder: Path) -> Path:
    """The contract suite's tiny Gemma 3: a local vision tower (``local_vision``). The suite's planted-cell test
    reads the decoder's image-token embeddings, which a tower with attention mixes over the whole image."""
    return write_gemma3(folder, local_vision=True)


TINY_CHECKPOINTS: dict[str, Callable[[Path], Path]] = {"gemma3": write_contract_gemma3}
