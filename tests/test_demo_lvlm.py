"""The bundled generative demo (a tiny LLaVA trained on easy-VQA): answers with plain transformers, keeps its accuracy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlcore.data.easy_vqa import answer_category, load_easy_vqa

ROOT = Path(__file__).resolve().parents[1]
LVLM_DIR = ROOT / "sample_data" / "models" / "llava-tiny-easyvqa"
GUARD_SIZE = 300
# Measured on the guard subset when the bundled checkpoint was trained (0.84, README.md there); six misses of slack.
# Issue 17 asks for 0.93 on the full test split; the bundled checkpoint (0.8439) does not reach it yet.
GUARD_MIN_ACCURACY = 0.82
# Issue 17 is open: until a checkpoint that meets the targets is bundled, the tests of the bundled folder say so and
# skip; the training script's smoke run below always runs.
needs_bundle = pytest.mark.skipif(not (LVLM_DIR / "model.safetensors").is_file(),
                                  reason="the generative demo sample_data/models/llava-tiny-easyvqa is not bundled yet "
                                         "(issue 17)")


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
    # A colour question: the bundled checkpoint answers colours (0.99) but shapes only at chance (issue 17 open).
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
    assert "recipe `llava-tiny-easyvqa-v1`" in card and "colour-blind" in card
    assert "questions about shapes drawn 3x" in card and "seed 0" in card
    assert "| 1 |" in card  # the per-epoch table
