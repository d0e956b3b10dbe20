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

from vlcore.models.image_only_processors import (
    build_image_only_processor,
    build_qwen2_vl_processor,
    image_only_processor_class,
)
from vlcore.models.image_tokens import NEWLINE_TOKEN, ImageLayoutError, image_token_layouts
from vlcore.trace import ROLE_PAD, ROLE_PATCH, ROLE_SPECIAL, ROLE_TEXT

WORDS = ["what", "is", "in", "the", "image", "describe", "a", "and", "?", ".", "\n", "user", "assistant",
         "User:", "Assistant:", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(specials=(), padding_side: str = "right", **attributes):
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
                                   eos_token="<eos>", padding_side=padding_side,
                                   extra_special_tokens=attributes or None)
    fast.add_special_tokens({"additional_special_tokens": list(specials)})
    return fast


def text_config(model_type: str, vocab: int, **extra) -> dict:
    return dict(model_type=model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab, bos_token_id=2, eos_token_id=3,
                pad_token_id=1, **extra)


def clip_vision(image_size: int, patch_size: int) -> dict:
    # one layer; the LLaVA models read hidden_states[-2], the embeddings: a local vision tower
    return {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size}


def siglip_vision(image_size: int, patch_size: int, layers: int = 0) -> dict:
    return {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": layers, "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size}


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, (h, w, 3), dtype=np.uint8)


def planted(image: np.ndarray, y: int, x: int, r: int = 1) -> np.ndarray:
    out = image.copy()
    out[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1] = 255
    return out


def resized(image: np.ndarray, h: int, w: int, resample=Image.BICUBIC) -> np.ndarray:
    """The image resized with PIL (bicubic unless told): what a squashing processor does, done independently."""
    return np.asarray(Image.fromarray(image).resize((w, h), resample))


def assert_same_pixels(seen: np.ndarray, reference: np.ndarray) -> None:
    assert seen.shape == reference.shape
    assert np.abs(seen.astype(int) - reference).max() <= 1


def embeddings(model, batch) -> torch.Tensor:
    """float ``[B, N, D]``: the decoder's input embeddings (image features scattered in)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[0].float()


def run_planted(model, processor, config, images_a, images_b, texts, layout_kwargs=None, **kwargs):
    """Process and embed both image sets; assert the layouts match the changed positions exactly.

    Returns:
        (layouts of the first batch, per example the int64 positions whose embedding changed).
    """
    kwargs.setdefault("return_tensors", "pt")
    batch_a = processor(images=images_a, text=texts, **kwargs)
    batch_b = processor(images=images_b, text=texts, **kwargs)
    diff = (embeddings(model, batch_a) - embeddings(model, batch_b)).abs().amax(-1).numpy()
    lay_a = image_token_layouts(batch_a, processor, config, **(layout_kwargs or {}))
    lay_b = image_token_layouts(batch_b, processor, config, **(layout_kwargs or {}))
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
    assert_same_pixels(lay.images[0].image, resized(a1, 32, 42)[:, 5:37])  # the centre crop
    assert (lay.role == ROLE_PATCH).sum() == 32 and lay.tokens[2] == "<img0 patch 0,0>"


def test_llava_full_strategy_keeps_the_cls_as_a_summary_token():
    model, processor, config = llava("full")
    a = random_image(40, 40, 3)
    (tokens,), (changed,) = run_planted(model, processor, config, [a], [planted(a, 5, 35)], ["<image> what"])
    lay = tokens.layout
    first = lay.first(ROLE_PATCH) - 1
    assert lay.role[first] == 3 and lay.image_of[first] == 0  # ROLE_IMAGE_SUMMARY, the CLS
    assert cells_changed(tokens, changed, "image") == {(0, 3)}


def test_text_only_prompt_and_a_placeholder_without_its_image():
    _, processor, config = llava()
    (tokens,) = image_token_layouts(processor(text=["what is the image ?"], return_tensors="pt"), processor, config)
    assert tokens.layout.tokens == ("what", "is", "the", "image", "?") and not tokens.layout.images
    assert (tokens.layout.role == ROLE_TEXT).all()
    batch = processor(images=[random_image(32, 32)], text=["<image> what"], return_tensors="pt")
    with pytest.raises(ImageLayoutError, match="left over"):
        image_token_layouts({k: v for k, v in batch.items() if k != "pixel_values"}, processor, config)


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


def test_llava_onevision_processor_from_a_folder_without_video_processor(tmp_path, monkeypatch):
    """A hub-like OneVision folder (processor settings in processor_config.json) builds the video-free processor
    with those settings: the same image tokens as the processor made in memory."""
    import json

    import vlcore.models.image_only_processors as iop

    monkeypatch.setattr(iop, "torchvision_available", lambda: False)
    _, processor, config = llava_onevision()
    processor.tokenizer.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 16, "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9", "image_token": "<image>"}))
    built = build_image_only_processor(tmp_path)
    assert type(built).__name__ == "LlavaOnevisionProcessorImageOnly" and built.num_image_tokens == 16
    image = random_image(40, 72)
    mine = built(images=[image], text=["<image> what"], return_tensors="pt")
    theirs = processor(images=[image], text=["<image> what"], return_tensors="pt")
    assert mine["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert image_token_layouts(mine, built, config)[0].layout.tokens == image_token_layouts(
        theirs, processor, config)[0].layout.tokens
    from vlcore.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="video processor"):
        build_image_only_processor({"tokenizer": processor.tokenizer, "image_processor": processor.image_processor},
                                   "LlavaNextProcessor")


# -- Qwen2-VL and Qwen2.5-VL ------------------------------------------------------------------------------------
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_folder(tmp_path, model_type: str):
    """A Qwen checkpoint folder as the hub has it: tokenizer files, preprocessor_config.json (the image processor,
    ``processor_class`` set), chat_template.jinja and config.json; no video processor."""
    import json

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer(QWEN_SPECIALS, padding_side="left")
    tok.save_pretrained(tmp_path)
    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    ip.save_pretrained(tmp_path)
    config_path = tmp_path / "preprocessor_config.json"
    processor_class = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[model_type]
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "processor_class": processor_class}))
    (tmp_path / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return tmp_path, tok


def qwen_model(model_type: str, tok):
    import transformers

    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (("image_token_id", "<|image_pad|>"),
           ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
           ("vision_end_token_id", "<|vision_end|>"))}
    vision = {"depth": 0, "hidden_size": 16, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2}
    if model_type == "qwen2_vl":
        vision.update(embed_dim=16, hidden_size=32)
    else:  # windows of 112 px: 4 x 4 merged tokens
        vision.update(intermediate_size=32, out_hidden_size=32, window_size=112, fullatt_block_indexes=[])
    cls = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}[model_type]
    text = text_config(model_type + "_text", len(tok), rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    config = getattr(transformers, f"{cls}Config")(vision_config=vision, text_config=text, **ids)
    torch.manual_seed(0)
    return getattr(transformers, f"{cls}ForConditionalGeneration")(config).eval(), config


def chat(processor, n_images: int, words: str) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": words}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_merged_cells_through_chat_template_batch_of_two(tmp_path, monkeypatch, model_type):
    """Smart resize to multiples of 28: 110 x 150 -> 112 x 140 (4 x 5 tokens of 28 x 28 px), 60 x 60 -> 56 x 56
    (2 x 2), 90 x 40 -> 84 x 56 (3 x 2). Qwen2.5-VL's tower runs 112 px windows (4 x 4 tokens; the 4 x 5 grid
    is two windows), and un-permutes them: the decoder still sees the tokens row-major."""
    import vlcore.models.image_only_processors as iop

    monkeypatch.setattr(iop, "torchvision_available", lambda: False)  # the path this machine takes anyway
    folder, tok = qwen_folder(tmp_path, model_type)
    processor = build_qwen2_vl_processor(folder)
    assert type(processor).__name__ == {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[
        model_type] + "ImageOnly"
    assert type(processor).get_attributes() == ["image_processor", "tokenizer"]
    model, config = qwen_model(model_type, tok)
    a = [random_image(110, 150, 9), random_image(60, 60, 10), random_image(90, 40, 11)]
    # targets: image 0 cell (2, 3) centre (70, 98) in 112 x 140 -> user (68.75, 105); image 2 cell (2, 0):
    # centre (70, 14) in 84 x 56 -> user (75, 10)
    b = [planted(a[0], 69, 105), a[1], planted(a[2], 75, 10)]
    texts = [chat(processor, 1, "what is in the image ?"), chat(processor, 2, "describe")]
    lays, changed = run_planted(model, processor, config, a, b, texts, padding=True)
    one, two = lays
    assert two.layout.role[0] == ROLE_PAD and one.layout.role[0] != ROLE_PAD  # left padding
    assert [g.grid for g in one.layout.images] == [(4, 5)] and [g.grid for g in two.layout.images] == [(2, 2), (3, 2)]
    for tokens in lays:
        for grid in tokens.layout.images:
            sides = np.stack([grid.boxes[..., 2] - grid.boxes[..., 0], grid.boxes[..., 3] - grid.boxes[..., 1]])
            assert (sides == 28).all()
        lay = tokens.layout
        for g in range(len(lay.images)):  # <|vision_start|> before, <|vision_end|> after, on the image
            idx, _ = lay.patch_positions(g)
            assert lay.tokens[idx[0] - 1] == "<|vision_start|>" and lay.tokens[idx[-1] + 1] == "<|vision_end|>"
            assert lay.role[idx[0] - 1] == lay.role[idx[-1] + 1] == ROLE_SPECIAL
            assert lay.image_of[idx[0] - 1] == lay.image_of[idx[-1] + 1] == g
        assert lay.tokens[lay.first(ROLE_SPECIAL, ROLE_TEXT)] == "<|im_start|>"
    assert cells_changed(one, changed[0], "image") == {(2, 3)}
    for grid, image, (h, w) in zip(one.layout.images + two.layout.images, a, [(112, 140), (56, 56), (84, 56)]):
        assert_same_pixels(grid.image, resized(image, h, w))  # the flat patches put back in place
    assert cells_changed(two, changed[1], "image", 0) == set()
    assert cells_changed(two, changed[1], "image", 1) == {(2, 0)}
    assert two.layout.tokens[two.layout.patch_positions(1)[0][0]] == "<img1 patch 0,0>"


def test_qwen_processor_from_parts_and_missing_folder(tmp_path):
    """Built from parts, the processor expands ``<|image_pad|>`` by the image's merged grid (56 x 84: 2 x 3); the
    stock class cannot be built here without a video processor; a folder without files is a one-line error."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    import vlcore.models.image_only_processors as iop
    from vlcore.errors import ModelLoadError

    tok = build_tokenizer(QWEN_SPECIALS)
    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    processor = build_qwen2_vl_processor({"tokenizer": tok, "image_processor": ip})
    batch = processor(images=[random_image(56, 84)], text=["<|vision_start|><|image_pad|><|vision_end|> what"])
    assert batch["input_ids"][0].count(tok.convert_tokens_to_ids("<|image_pad|>")) == 2 * 3
    if iop.torchvision_available():
        pytest.skip("torchvision loads here: the stock processor and AutoProcessor work")
    with pytest.raises((TypeError, AttributeError, ImportError)):
        transformers.Qwen2VLProcessor(image_processor=ip, tokenizer=tok)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        build_qwen2_vl_processor(tmp_path / "nowhere")


# -- Idefics3 and SmolVLM ---------------------------------------------------------------------------------------
IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


@functools.cache
def idefics3(model_type: str = "idefics3"):
    """Tiles of 32 px, longest edge 96 (up to 3 x 3 tiles), 8 px patches, pixel shuffle 2: 2 x 2 tokens a tile,
    16 px each. SmolVLM's model reads the same token scheme (SmolVLM v1 checkpoints ship ``Idefics3Processor``)."""
    import transformers
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = build_tokenizer(IDEFICS_SPECIALS)
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 96}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(ip, tok, image_seq_len=4)
    cls = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[model_type]
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 0, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    config = getattr(transformers, f"{cls}Config")(vision_config=vision, text_config=text_config("llama", len(tok)),
                                                   scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    return getattr(transformers, f"{cls}ForConditionalGeneration")(config).eval(), processor, config


@pytest.mark.parametrize("model_type", ["idefics3", "smolvlm"])
def test_idefics3_tiles_and_global_image_batch_of_two(model_type):
    """60 x 90 -> 64 x 96: 2 x 3 tiles (a 4 x 6 token grid) and a global 32 x 32 image (2 x 2). 40 x 40 -> 96 x 96:
    3 x 3 tiles. The second example holds two images, so the first one's frames are padded."""
    model, processor, config = idefics3(model_type)
    a = [random_image(60, 90, 12), random_image(40, 40, 13), random_image(60, 90, 14)]
    # tile-grid cell (1, 4): centre (24, 72) in 64 x 96 -> user (22.5, 67.5); global (12, 24): cell (0, 1)
    # image 1: tile-grid cell (4, 1): centre (72, 24) in 96 x 96 -> user (30, 10); global (24, 8): cell (1, 0)
    b = [planted(a[0], 22, 67), planted(a[1], 30, 10, 0), a[2]]
    texts = ["User:<image> what<end_of_utterance>", "User:<image> and <image> what<end_of_utterance>"]
    lays, changed = run_planted(model, processor, config, [a[:1], a[1:]], [b[:1], b[1:]], texts, padding=True)
    one, two = lays
    assert one.grid_kind == ("tiles", "global") and two.grid_kind == ("tiles", "global", "tiles", "global")
    assert two.grid_image == (0, 0, 1, 1)
    assert [g.grid for g in one.layout.images] == [(4, 6), (2, 2)]
    assert [g.grid for g in two.layout.images] == [(6, 6), (2, 2), (4, 6), (2, 2)]
    assert one.layout.images[0].image.shape == (64, 96, 3) and one.layout.images[0].cell_px == 16
    assert cells_changed(one, changed[0], "tiles") == {(1, 4)}
    assert cells_changed(one, changed[0], "global") == {(0, 1)}
    assert cells_changed(two, changed[1], "tiles", 0) == {(4, 1)}
    assert cells_changed(two, changed[1], "global", 0) == {(1, 0)}
    assert cells_changed(two, changed[1], "tiles", 1) == set()
    lay = one.layout
    # markers: every token between the first <fake_token_around_image> and the last is special or a patch
    fakes = [n for n, t in enumerate(lay.tokens) if t == "<fake_token_around_image>"]
    inside = np.arange(fakes[0], fakes[-1] + 1)
    assert set(lay.role[inside]) == {ROLE_SPECIAL, ROLE_PATCH} and (lay.image_of[inside] >= 0).all()
    assert {lay.tokens[n] for n in inside if lay.role[n] == ROLE_SPECIAL} == {
        "<fake_token_around_image>", "<global-img>", "\n", *(f"<row_{i}_col_{j}>" for i in (1, 2) for j in (1, 2, 3))}
    assert lay.role[fakes[0] - 1] == ROLE_TEXT and lay.tokens[fakes[0] - 1] == "User:"
    tag = lay.tokens.index("<row_2_col_3>")  # tile (1, 2)'s tokens: cells (2..3, 4..5) of the tile grid
    assert [tuple(c) for c in lay.cell[tag + 1:tag + 5]] == [(2, 4), (2, 5), (3, 4), (3, 5)]


def test_idefics3_unsplit_image_is_one_grid():
    model, processor, config = idefics3()
    a = random_image(50, 30, 15)
    (tokens,), (changed,) = run_planted(model, processor, config, [[a]], [[planted(a, 40, 25)]], ["<image> what"],
                                        do_image_splitting=False)
    assert tokens.grid_kind == ("image",) and tokens.layout.images[0].grid == (2, 2)
    assert cells_changed(tokens, changed, "image") == {(1, 1)}  # squashed: (40 * 32/50, 25 * 32/30) = (25.6, 26.7)


# -- PaliGemma and Gemma 3 ---------------------------------------------------------------------------------------
@functools.cache
def paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = build_tokenizer(["<image>"])
    ip = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ip.image_seq_length = 16
    processor = PaliGemmaProcessor(ip, tok)
    config = PaliGemmaConfig(vision_config=siglip_vision(32, 8), projection_dim=32,
                             text_config=text_config("gemma", len(tok), head_dim=16),
                             image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    return PaliGemmaForConditionalGeneration(config).eval(), processor, config


def test_paligemma_prefix_grid_two_images():
    """Squashed to 32 x 32: a 4 x 4 grid of 8 px; two images make two grids before ``<bos>`` and the prompt."""
    model, processor, config = paligemma()
    a1, a2 = random_image(40, 80, 16), random_image(64, 32, 17)
    # (35, 10) * (32/40, 32/80) = (28, 4): cell (3, 0); (10, 20) * (32/64, 32/32) = (5, 20): cell (0, 2)
    b1, b2 = planted(a1, 35, 10), planted(a2, 10, 20)
    (tokens,), (changed,) = run_planted(model, processor, config, [[a1, a2]], [[b1, b2]], ["<image><image>what"])
    lay = tokens.layout
    assert [g.grid for g in lay.images] == [(4, 4), (4, 4)] and tokens.grid_kind == ("image", "image")
    assert (lay.role[:32] == ROLE_PATCH).all() and lay.tokens[32] == "<bos>" and lay.role[32] == ROLE_SPECIAL
    assert cells_changed(tokens, changed, "image", 0) == {(3, 0)}
    assert cells_changed(tokens, changed, "image", 1) == {(0, 2)}
    assert_same_pixels(lay.images[1].image, resized(a2, 32, 32))


@functools.cache
def gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = build_tokenizer(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(ip, tok, image_seq_length=4)
    ids = {"boi_token_index": tok.boi_token_id, "eoi_token_index": tok.eoi_token_id,
           "image_token_index": tok.image_token_id}
    config = Gemma3Config(vision_config=siglip_vision(32, 4), mm_tokens_per_image=4, **ids,
                          text_config=text_config("gemma3_text", len(tok), head_dim=16, sliding_window=8))
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # initialised to zeros: every image feature would be 0
        model.model.multi_modal_projector.mm_input_projection_weight.normal_()
    return model, processor, config


def test_gemma3_pooled_grid_between_begin_and_end_markers():
    """32 px squashed, 4 px patches (8 x 8) average-pooled 4 x 4: a 2 x 2 grid of 16 px cells."""
    model, processor, config = gemma3()
    a1, a2 = random_image(30, 60, 18), random_image(50, 50, 19)
    # (20, 10) * (32/30, 32/60) = (21.3, 5.3): cell (1, 0); (10, 40) * 0.64 = (6.4, 25.6): cell (0, 1)
    b1, b2 = planted(a1, 20, 10), planted(a2, 10, 40)
    text = "what <start_of_image> and <start_of_image> ?"
    (tokens,), (changed,) = run_planted(model, processor, config, [[a1, a2]], [[b1, b2]], [text])
    lay = tokens.layout
    assert [g.grid for g in lay.images] == [(2, 2), (2, 2)] and lay.images[0].cell_px == 16
    for g in (0, 1):
        idx, _ = lay.patch_positions(g)
        assert (lay.tokens[idx[0] - 1], lay.tokens[idx[-1] + 1]) == ("<start_of_image>", "<end_of_image>")
        assert lay.role[idx[0] - 1] == lay.role[idx[-1] + 1] == ROLE_SPECIAL
        assert lay.image_of[idx[0] - 1] == lay.image_of[idx[-1] + 1] == g
    assert cells_changed(tokens, changed, "image", 0) == {(1, 0)}
    assert cells_changed(tokens, changed, "image", 1) == {(0, 1)}
    assert_same_pixels(lay.images[0].image, resized(a1, 32, 32, processor.image_processor.resample))


def test_gemma3_pan_and_scan_crops_are_grids_of_their_image():
    """A 24 x 96 image (ratio 4) with pan and scan: the original squashed, then 4 crops of 24 x 24 side by side,
    each its own 2 x 2 grid; ``num_crops`` (from the image processor) ties them to the image."""
    model, processor, config = gemma3()
    a = random_image(24, 96, 20)
    # crop 2 (x 48..72): (18, 6) * 32/24 = (24, 8): cell (1, 0); the original: (18 * 32/24, 54 * 32/96) = (24, 18)
    b = planted(a, 18, 54, 0)
    options = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8, "pan_and_scan_max_num_crops": 4,
               "pan_and_scan_min_ratio_to_activate": 1.2}
    num_crops = processor.image_processor([Image.fromarray(a)], **options)["num_crops"]
    assert list(np.ravel(num_crops)) == [4]
    (tokens,), (changed,) = run_planted(model, processor, config, [[a]], [[b]], ["<start_of_image> what"],
                                        layout_kwargs={"num_crops": list(np.ravel(num_crops))}, **options)
    assert tokens.grid_kind == ("image", "crop", "crop", "crop", "crop") and tokens.grid_image == (0,) * 5
    lay = tokens.layout
    changed_grids = sorted({int(lay.image_of[n]) for n in changed})
    assert changed_grids == [0, 3]
    assert cells_changed(tokens, changed, "image") == {(1, 1)}
    assert {tuple(lay.cell[n]) for n in changed if lay.image_of[n] == 3} == {(1, 0)}
