"""The bundled generative demo (a tiny LLaVA trained on easy-VQA): answers with plain transformers, keeps its accuracy."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlcore.data.easy_vqa import answer_category, load_easy_vqa

ROOT = Path(__file__).resolve().parents[1]
LVLM_DIR = ROOT / "sample_data" / "models" / "llava-tiny-easyvqa"
GUARD_SIZE = 300
# Measured on the guard subset when the bundled checkpoint was trained: 0.98 (README.md there; 0.9693 on the full
# test split, whose target is 0.93). Nine misses of slack; a checkpoint that loses the shapes (0.35 on shape
# questions, as before the grounding stage) scores about 0.84 here.
GUARD_MIN_ACCURACY = 0.95
# The tests of the bundled folder skip (and say so) in a checkout without it; the training script's smoke run always runs.
needs_bundle = pytest.mark.skipif(not (LVLM_DIR / "model.safetensors").is_file(),
                                  reason="the generative demo sample_data/models/llava-tiny-easyvqa is not in this checkout")


def _training_script():
    spec = importlib.util.spec_from_file_location("train_demo_lvlm", ROOT / "scripts" / "train_demo_lvlm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lvlm():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(2)
    return AutoProcessor.from_pretrained(str(LVLM_DIR)), LlavaForConditionalGeneration.from_pretrained(str(LVLM_DIR))


def _generate(processor, model, records) -> list[str]:
    """Greedy answers through nothing but the chat template, the processor and `generate` (left-padded batch)."""
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.question}]}],
        add_generation_prompt=True) for r in records]
    images = [Image.open(r.image_path).convert("RGB") for r in records]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=4)
    return [a.strip() for a in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


@needs_bundle
def test_bundled_folder_is_small_and_complete():
    names = {p.name for p in LVLM_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja",
            "generation_config.json", "README.md", "training_metrics.json"} <= names
    assert sum(p.stat().st_size for p in LVLM_DIR.iterdir()) <= 10 * 2**20


@needs_bundle
def test_first_colour_question_round_trips_through_chat_template_and_generate(lvlm):
    processor, model = lvlm
    record = next(r for r in load_easy_vqa("test") if answer_category(r.answer) == "color")
    assert record.example_id == "easy_vqa/test/1"
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record.question}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    assert prompt == f"<s><|user|><image>{record.question}<|assistant|>"
    inputs = processor(images=Image.open(record.image_path).convert("RGB"), text=prompt, return_tensors="pt")
    n_patches = (64 // model.config.vision_config.patch_size) ** 2
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == model.config.image_seq_length == n_patches
    out = model.generate(**inputs, do_sample=False, max_new_tokens=4)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert new[-1] == processor.tokenizer.eos_token_id  # the answer ends with </s>, well before the token limit
    assert processor.decode(new, skip_special_tokens=True).strip() == record.answer


@needs_bundle
def test_accuracy_guard_on_a_fixed_subset_with_plain_generate(lvlm):
    processor, model = lvlm
    test = load_easy_vqa("test")
    subset = [test[i * len(test) // GUARD_SIZE] for i in range(GUARD_SIZE)]
    answers = []
    for start in range(0, GUARD_SIZE, 100):
        answers += _generate(processor, model, subset[start : start + 100])
    accuracy = sum(a == r.answer for a, r in zip(answers, subset)) / GUARD_SIZE
    assert accuracy >= GUARD_MIN_ACCURACY, f"guard subset accuracy {accuracy:.4f}"


@needs_bundle
def test_training_format_matches_the_processor_and_teacher_forcing_matches_generate(lvlm):
    processor, model = lvlm
    train = _training_script()
    records = load_easy_vqa("test")[:48]
    data = train.encode_split("test", processor, limit=48)
    for i in (0, 7, 47):  # the script's prompt ids are exactly what the processor feeds `generate`
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": records[i].question}]}],
            add_generation_prompt=True)
        ids = processor(images=Image.open(records[i].image_path).convert("RGB"), text=prompt)["input_ids"][0]
        assert list(ids) == data["input_ids"][i, : data["prompt_len"][i]].tolist()
    hits = train.exact_match(model, data, "cpu", batch_size=16).tolist()
    assert hits == [a == r.answer for a, r in zip(_generate(processor, model, records), records)]


def test_training_script_smoke_run_writes_a_loadable_checkpoint_and_card(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    train = _training_script()
    assert train.main(["--out", str(tmp_path), "--limit", "40", "--max-steps", "2", "--epochs", "1",
                       "--vision-hidden", "32", "--vision-layers", "1", "--hidden", "32", "--layers", "1",
                       "--heads", "2"]) == 0
    model = LlavaForConditionalGeneration.from_pretrained(str(tmp_path))
    processor = AutoProcessor.from_pretrained(str(tmp_path))
    assert model.config.text_config.hidden_size == 32 and model.config.vision_config.num_hidden_layers == 1
    assert len(_generate(processor, model, load_easy_vqa("test")[:2])) == 2
    card = (tmp_path / "README.md").read_text()
    assert "recipe `llava-tiny-easyvqa-v2`" in card and "colour-blind" in card
    assert "Stage 1, the vision tower: 2 updates" in card and "grounding loss" in card
    assert "questions about shapes drawn 3x" in card and "seed 0" in card
    assert "| 1 |" in card  # the per-epoch table


def _word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "circle", "rectangle", "triangle", "red", "blue", "green"]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({w: i for i, w in enumerate(words)},
                                                                        unk_token="<unk>")), unk_token="<unk>")


def test_grounding_targets_find_a_planted_rectangle_and_its_patches():
    train = _training_script()
    image = Image.new("RGB", (64, 64), (240, 235, 250))
    image.paste((200, 20, 20), (16, 8, 40, 24))  # patches rows 1-2, cols 2-4 of the 8x8 grid
    targets = train.grounding_targets("test", [-1], [image], 8, _word_tokenizer())  # no question names image -1
    cover = targets["cover"][0]
    assert cover.shape == (8, 8)
    assert cover.nonzero().tolist() == [[r, c] for r in (1, 2) for c in (2, 3, 4)]
    assert torch.all(cover[1:3, 2:5] == 1.0)
    assert targets["shape_id"].tolist() == [2]  # read from the mask: "rectangle"
    assert targets["color_id"].tolist() == [-1]  # no question reveals it: left out


def test_grounding_targets_take_the_answers_first():
    # Test image 41: its questions say a green triangle; the mask's fill ratio reads a circle (a small triangle).
    from vlcore.analysis.probe_labels import compute_mask_shape
    from vlcore.data.easy_vqa import compute_shape_mask

    train = _training_script()
    record = next(r for r in load_easy_vqa("test") if r.image_id == 41)
    image = Image.open(record.image_path).convert("RGB")
    assert compute_mask_shape(compute_shape_mask(np.array(image))) == "circle"
    targets = train.grounding_targets("test", [41], [image], 8, _word_tokenizer())
    assert targets["shape_id"].tolist() == [3] and targets["color_id"].tolist() == [6]  # triangle, green
    assert targets["cover"][0].sum() > 0


def test_grounding_loss_known_answers():
    train = _training_script()
    embedding = torch.eye(6) * 1.0
    cover = torch.zeros(2, 2, 2)
    cover[0, 0, 1] = 0.9  # image 0: the shape covers token 1
    cover[1, 1, 0] = 0.3  # image 1: no token reaches 0.5, so the most covered one (token 2) is used
    feats = torch.zeros(2, 4, 6)
    feats[0, 1, [1, 4]] = 60.0  # token 1 says "circle" and "red": the best it can do with two words, log 2
    feats[0, 0, 3] = 60.0  # a background token: not scored, whatever it says
    feats[1, 2, 2] = 60.0  # "rectangle" alone, colour unknown: loss 0
    shape_id, color_id = torch.tensor([1, 2]), torch.tensor([4, -1])
    loss = train.grounding_loss(feats, embedding, cover, shape_id, color_id)
    assert loss.item() == pytest.approx(math.log(2) / 2, abs=1e-4)
    feats[1, 2, 2], feats[1, 2, 3] = 0.0, 60.0  # image 1's token now names the wrong shape: a large loss
    assert train.grounding_loss(feats, embedding, cover, shape_id, color_id).item() > 20
    # An image with neither label, and one the shape does not cover at all, add nothing to the loss.
    unlabelled = train.grounding_loss(feats, embedding, cover, torch.tensor([1, -1]), torch.tensor([4, -1]))
    assert unlabelled.item() == pytest.approx(math.log(2), abs=1e-4)
    empty = cover.clone()
    empty[1] = 0.0
    assert train.grounding_loss(feats, embedding, empty, shape_id, color_id).item() == pytest.approx(math.log(2),
                                                                                                     abs=1e-4)


def test_yes_no_balance_keeps_each_texts_share_and_lifts_the_rarer_answer():
    train = _training_script()
    questions = ["is there a red shape?"] * 8 + ["is there a circle?"] * 4 + ["is it?"] * 3 + ["what color?"]
    answers = ["no"] * 7 + ["yes"] + ["no", "no", "yes", "yes"] + ["yes"] * 3 + ["red"]
    for share in (1 / 3, 0.5):
        w = train.yes_no_balance(questions, answers, share)
        assert float(w[:8].sum()) == pytest.approx(8) and float(w[8:12].sum()) == pytest.approx(4)
        assert float(w[7]) / float(w[:8].sum()) == pytest.approx(share)  # the one "yes" of 8 now has `share`
        assert w[8:].tolist() == [1.0] * 8  # already balanced, one answer only, not yes/no: unchanged
    assert train.yes_no_balance(questions, answers, 0.1)[:8].tolist() == [1.0] * 8  # 1/8 already above 0.1
    for bad in (0.0, 0.6, -0.2):
        with pytest.raises(ValueError, match="share"):
            train.yes_no_balance(questions, answers, bad)


def test_flips_and_rotations_move_the_cover_grid_with_the_pixels():
    train = _training_script()
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    image.paste((20, 20, 200), (0, 0, 24, 8))  # the top-left corner strip
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().repeat(32, 1, 1, 1)
    cover = train.grounding_targets("test", [-1], [image], 8, _word_tokenizer())["cover"].repeat(32, 1, 1)
    gen = torch.Generator().manual_seed(0)
    moved_pixels, moved_cover = train.dihedral(pixels, gen, cover)
    assert len({tuple(c.flatten().tolist()) for c in moved_cover}) == 8  # all 8 poses drawn
    for k in range(32):
        seen = Image.fromarray(moved_pixels[k].permute(1, 2, 0).byte().numpy())
        again = train.grounding_targets("test", [-1], [seen], 8, _word_tokenizer())["cover"][0]
        assert torch.equal(again, moved_cover[k])


@needs_bundle
def test_bundled_image_tokens_name_the_shape_they_show(lvlm):
    # The grounding stage's promise, recomputed: the shape's image tokens, read against the word embeddings, name
    # the image's shape (0.99 of the 1,000 test images at bundling, grounded_shape_accuracy in training_metrics.json;
    # chance is 1/3).
    processor, model = lvlm
    data = _training_script().encode_split("test", processor)
    assert _training_script().grounded_shape_accuracy(model, data, "cpu") >= 0.95
