"""Image tokens of generative VLMs mapped back to (image, row, col), checked through the real processors and models.

Each family's real processor (PIL image processor, geometry scaled down, tokenizer built with ``tokenizers``)
processes an image twice: as is and with a bright block planted in it. A tiny model of the family whose vision
tower is local (its features read before any attention layer, so a token's feature depends on its own pixels
only) embeds both; the decoder positions whose input embedding changes are the image tokens that see the planted
pixels, by the model's own code. The layout must say exactly that: a patch token changes if and only if its
cell box, on its grid's image as the model saw it, holds a changed pixel, and no other token changes. Known
answers pin the planted block's (row, col) per family, computed here from the family's resize rule.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from vlcore.models.image_only_processors import build_qwen2_vl_processor, image_only_processor_class
from vlcore.models.image_tokens import NEWLINE_TOKEN, ImageLayoutError, image_token_layouts
from vlcore.trace import ROLE_PAD, ROLE_PATCH, ROLE_SPECIAL, ROLE_TEXT

WORDS = ["what", "is", "in", "the", "image", "describe", "a", "and", "?", ".", "\n", "user", "assistant",
         "User:", "Assistant:", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(specials=(), **attributes):
    """A word-level tokenizer (spaces dropped, newlines kept as tokens) with ``specials`` added as special
    tokens and ``attributes`` as named extra special tokens (Gemma 3's ``boi_token`` ...)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<bos>": 2, "<eos>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[^\S\n]+"), "removed"),
                                                 pre_tokenizers.Split("\n", "isolated")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", extra_special_tokens=attributes or None)
    fast.add_special_tokens({"additional_special_tokens": list(specials)})
    return fast


def text_config(model_type: str, vocab: int, **extra) -> dict:
    return dict(model_type=model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab, **extra)


def clip_vision(image_size: int, patch_size: int) -> dict:
    # one layer; the LLaVA models read hidden_states[-2], the embeddings: a local vision tower
    return dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, image_size=image_size, patch_size=patch_size)


def siglip_vision(image_size: int, patch_size: int, layers: int = 0) -> dict:
    return dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                num_attention_heads=2, image_size=image_size, patch_size=patch_size)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, (h, w, 3), dtype=np.uint8)


def planted(image: np.ndarray, y: int, x: int, r: int = 1) -> np.ndarray:
    out = image.copy()
    out[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1] = 255
    return out


def embeddings(model, batch) -> torch.Tensor:
    """float ``[B, N, D]``: the decoder's input embeddings (image features scattered in)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[0].float()


def run_planted(model, processor, config, images_a, images_b, texts, **kwargs):
    """Process and embed both image sets; assert the layouts match the changed positions exactly.

    Returns:
        (layouts of the first batch, per example the int64 positions whose embedding changed).
    """
    kwargs.setdefault("return_tensors", "pt")
    batch_a = processor(images=images_a, text=texts, **kwargs)
    batch_b = processor(images=images_b, text=texts, **kwargs)
    diff = (embeddings(model, batch_a) - embeddings(model, batch_b)).abs().amax(-1).numpy()
    lay_a = image_token_layouts(batch_a, processor, config)
    lay_b = image_token_layouts(batch_b, processor, config)
    changed = []
    for b, (ta, tb) in enumerate(zip(lay_a, lay_b)):
        layout = ta.layout
        assert layout.n_tokens == diff.shape[1]
        assert layout.tokens == tb.layout.tokens
        moved = [np.any(ga.image != gb.image, axis=-1) for ga, gb in zip(layout.images, tb.layout.images)]
        expect = np.zeros(layout.n_tokens, bool)
        for n in np.flatnonzero(layout.role == ROLE_PATCH):
            x0, y0, x1, y1 = layout.images[layout.image_of[n]].boxes[tuple(layout.cell[n])]
            expect[n] = moved[layout.image_of[n]][y0:y1, x0:x1].any()
        got = diff[b] > 1e-6 * max(1.0, float(diff.max()))
        assert expect.any()
        np.testing.assert_array_equal(got, expect, err_msg=f"example {b}: tokens changed vs boxes with new pixels")
        changed.append(np.flatnonzero(got))
    return lay_a, changed


def cells_changed(tokens, changed, kind: str, image: int = 0) -> set[tuple[int, int]]:
    """The (row, col) of the changed tokens on the ``kind`` grid of prompt image ``image``."""
    lay = tokens.layout
    grids = {g for g in tokens.grids_of(image) if tokens.grid_kind[g] == kind}
    return {tuple(int(v) for v in lay.cell[n]) for n in changed if lay.image_of[n] in grids}


def centre_fraction(grid_image: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(y, x) of the centre of the pixels that differ, as fractions of the image's height and width."""
    ys, xs = np.nonzero(np.any(grid_image != other, axis=-1))
    return (ys.mean() + 0.5) / grid_image.shape[0], (xs.mean() + 0.5) / grid_image.shape[1]


# -- LLaVA 1.5 --------------------------------------------------------------------------------------------------
@functools.cache
def llava(strategy: str = "default"):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = build_tokenizer(["<image>"])
    ip = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=1)
    config = LlavaConfig(vision_config=clip_vision(32, 8), text_config=text_config("llama", len(tok)),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy=strategy)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), processor, config


def test_llava_planted_cell_non_square_two_adjacent_images():
    """48 x 64 image: shortest edge to 32 (x 2/3) and a centre crop of 32 (5 px off the left of 42); the second
    image (64 x 40) goes to 51 x 32 (int(64 * 32 / 40)) and is cropped 9 px from the top ((51 - 32) // 2)."""
    model, processor, config = llava()
    a1, a2 = random_image(48, 64, 1), random_image(64, 40, 2)
    # seen cell (2, 1) of image 0: centre (20, 12) -> user (30, (12 + 5) * 1.5 = 25.5)
    # seen cell (1, 3) of image 1: centre (12, 28) -> user ((12 + 9) * 1.25 = 26.25, 28 * 1.25 = 35)
    b1, b2 = planted(a1, 30, 25), planted(a2, 26, 35)
    (tokens,), (changed,) = run_planted(model, processor, config, [a1, a2], [b1, b2], ["what is <image><image> ?"])
    lay = tokens.layout
    assert tokens.grid_kind == ("image", "image") and tokens.grid_image == (0, 1)
    assert [g.grid for g in lay.images] == [(4, 4), (4, 4)] and lay.images[0].image.shape == (32, 32, 3)
    assert cells_changed(tokens, changed, "image", 0) == {(2, 1)}
    assert cells_changed(tokens, changed, "image", 1) == {(1, 3)}
    assert (lay.role == ROLE_PATCH).sum() == 32 and lay.tokens[2] == "<img0 patch 0,0>"


def test_llava_full_strategy_keeps_the_cls_as_a_summary_token():
    model, processor, config = llava("full")
    a = random_image(40, 40, 3)
    (tokens,), (changed,) = run_planted(model, processor, config, [a], [planted(a, 5, 35)], ["<image> what"])
    lay = tokens.layout
    first = lay.first(ROLE_PATCH) - 1
    assert lay.role[first] == 3 and lay.image_of[first] == 0  # ROLE_IMAGE_SUMMARY, the CLS
    assert cells_changed(tokens, changed, "image") == {(0, 3)}


def test_llava_wrong_config_is_a_one_line_error():
    _, processor, config = llava()
    batch = processor(images=[random_image(32, 32)], text=["<image>"], return_tensors="pt")
    wrong = config.__class__.from_dict({**config.to_dict(), "vision_feature_select_strategy": "full"})
    with pytest.raises(ImageLayoutError, match="disagree"):
        image_token_layouts(batch, processor, wrong)


# -- LLaVA-NeXT ------------------------------------------------------------------------------------------------
PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


@functools.cache
def llava_next():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = build_tokenizer(["<image>"])
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)
    config = LlavaNextConfig(vision_config=clip_vision(32, 8), text_config=text_config("llama", len(tok)),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(config).eval(), processor, config


def test_llava_next_base_and_unpadded_tiles_with_one_newline_per_row():
    """A 40 x 72 image: best resolution 64 x 64 (2 x 2 tiles of 4 x 4 features); resized to 36 x 64 and padded
    14 px above; the model keeps feature rows 2..5 of 8 (round(40 * 8 / 72) = 4, centred), pixels 16..48. A
    second, 50 x 50 image in the same prompt: 64 x 64, nothing cut."""
    model, processor, config = llava_next()
    a1, a2 = random_image(40, 72, 4), random_image(50, 50, 5)
    b1, b2 = planted(a1, 24, 49, 0), planted(a2, 9, 9, 0)
    (tokens,), (changed,) = run_planted(model, processor, config, [a1, a2], [b1, b2], ["<image> and <image> ?"])
    lay = tokens.layout
    assert tokens.grid_kind == ("base", "tiles", "base", "tiles") and tokens.grid_image == (0, 0, 1, 1)
    assert [g.grid for g in lay.images] == [(4, 4), (4, 8), (4, 4), (8, 8)]
    assert lay.images[1].image.shape == (32, 64, 3)
    for g in (1, 3):  # one newline per tile row, right after the row's last cell
        newlines = np.flatnonzero((lay.image_of == g) & (lay.role == ROLE_SPECIAL))
        assert len(newlines) == lay.images[g].grid[0] and all(lay.tokens[n] == NEWLINE_TOKEN for n in newlines)
        assert all(tuple(lay.cell[n - 1]) == (r, lay.images[g].grid[1] - 1) for r, n in enumerate(newlines))
        assert (lay.cell[newlines] == -1).all()
    assert lay.role[lay.index(ROLE_PATCH)[0] - 1] == ROLE_TEXT  # nothing before the base grid
    # base, squashed to 32 x 32: (24 * 32/40, 49 * 32/72) = (19.2, 21.8)
    assert cells_changed(tokens, changed, "base", 0) == {(2, 2)}
    # tiles: x 64/72: (24 * 0.889 + 14 - 16, 49 * 0.889) = (19.3, 43.6)
    assert cells_changed(tokens, changed, "tiles", 0) == {(2, 5)}
    # 50 -> 32 (base) and 64 (tiles): (9.5 * 0.64, 9.5 * 1.28) = (6.1, 12.2)
    assert cells_changed(tokens, changed, "base", 1) == {(0, 0)}
    assert cells_changed(tokens, changed, "tiles", 1) == {(1, 1)}


def test_llava_next_needs_image_sizes():
    _, processor, config = llava_next()
    batch = dict(processor(images=[random_image(32, 32)], text=["<image>"], return_tensors="pt"))
    del batch["image_sizes"]
    with pytest.raises(ImageLayoutError, match="image_sizes"):
        image_token_layouts(batch, processor, config)


# -- LLaVA-OneVision --------------------------------------------------------------------------------------------
@functools.cache
def llava_onevision(max_tiles: int = 9):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    tok = build_tokenizer(["<image>", "<video>"])
    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    processor = image_only_processor_class(LlavaOnevisionProcessor)(
        ip, tok, num_image_tokens=16, vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{max_tiles}")
    config = LlavaOnevisionConfig(vision_config=siglip_vision(32, 8, layers=1),
                                  text_config=text_config("qwen2", len(tok)),
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-2,
                                  image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=f"anyres_max_{max_tiles}")
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration(config).eval(), processor, config


def test_llava_onevision_single_image_tiles_and_shrunk_grid():
    """A 72 x 40 image: 2 x 2 tiles; resized to 64 x 36, padded 14 px on the left; the model keeps feature
    columns 2..5 (round(40 * 8 / 72) = 4), pixels 16..48."""
    a = random_image(72, 40, 6)
    b = planted(a, 49, 16, 0)
    model, processor, config = llava_onevision()
    (tokens,), (changed,) = run_planted(model, processor, config, [a], [b], ["<image> what"])
    lay = tokens.layout
    assert tokens.grid_kind == ("base", "tiles") and lay.images[1].grid == (8, 4)
    assert cells_changed(tokens, changed, "base") == {(2, 1)}  # (49 * 32/72, 16 * 32/40) = (21.8, 12.8)
    assert cells_changed(tokens, changed, "tiles") == {(5, 1)}  # (49 * 0.889, 16 * 0.889 + 14 - 16) = (43.6, 12.2)
    # anyres_max_1: 32 cells > 1.1 * 16: shrunk by sqrt(2) to int(8 // 1.41) x int(4 // 1.41) = 5 x 2
    model, processor, config = llava_onevision(1)
    batch = processor(images=[a], text=["<image> what"], return_tensors="pt")
    (shrunk,) = image_token_layouts(batch, processor, config)
    grid = shrunk.layout.images[1]
    assert grid.grid == (5, 2) and grid.image.shape == (64, 32, 3)
    assert grid.boxes[4, 1].tolist() == [16, 51, 32, 64]  # row edges round(k * 64 / 5)
    assert (shrunk.layout.role == ROLE_SPECIAL).sum() == 5  # one newline per shrunk row
    with torch.no_grad():  # the model fills exactly these tokens
        model(**batch)


def test_llava_onevision_two_images_get_base_grids_and_one_newline_each():
    """Several images in one prompt: no tiles; each image padded to a square, squashed to 32 x 32."""
    model, processor, config = llava_onevision()
    a1, a2 = random_image(40, 72, 7), random_image(30, 30, 8)
    b1, b2 = planted(a1, 29, 27, 0), planted(a2, 3, 27)
    (tokens,), (changed,) = run_planted(model, processor, config, [[a1, a2]], [[b1, b2]], ["<image><image> what"])
    lay = tokens.layout
    assert tokens.grid_kind == ("base", "base") and tokens.grid_image == (0, 1)
    newlines = np.flatnonzero(lay.role == ROLE_SPECIAL)
    assert [lay.image_of[n] for n in newlines] == [0, 1] and lay.tokens[newlines[0]] == NEWLINE_TOKEN
    assert newlines[0] == lay.patch_positions(0)[0][-1] + 1
    # 40 x 72 padded to 72 x 72 (16 px above), then x 32/72: ((29 + 16) * 0.444, 27 * 0.444) = (20, 12)
    assert cells_changed(tokens, changed, "base", 0) == {(2, 1)}
    assert cells_changed(tokens, changed, "base", 1) == {(0, 3)}  # 30 -> 32: (3.7, 29.3)
