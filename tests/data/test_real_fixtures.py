"""Real VCR and WebQA records (from ../shared/fixtures/real, beside the repository) through the adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlcore.data.vcr import load_vcr_examples, scale_regions
from vlcore.data.webqa import load_webqa_examples

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "real"
pytestmark = pytest.mark.skipif(
    not (REAL / "vcr_val_1.jsonl").is_file(),
    reason=f"real fixtures absent at {REAL} (only the development workspace has ../shared/fixtures/real)",
)


@pytest.fixture(autouse=True)
def _real_fixtures_are_a_data_root(monkeypatch):
    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(REAL))


@pytest.fixture
def vcr():
    (example,) = load_vcr_examples(REAL / "vcr_val_1.jsonl")
    return example


def test_real_vcr_question_and_gold_answer_render_names(vcr):
    person = vcr.meta["object_names"][0]
    assert person == "Casey"
    assert vcr.example_id == "vcr/val/val-1"
    assert vcr.question == f"Does {person} live in this house?"
    assert vcr.answer_label == 2 and vcr.answer_choices[2] == f"No, {person} is a visitor."
    assert vcr.answer_choices[3] == f"No {vcr.meta['object_names'][1]} does not belong here."
    assert vcr.rationale_label == 3
    assert (
        vcr.rationale_choices[3] == f"{person} is wearing outerwear, holding an umbrella, and there is a car outside."
    )


def test_real_vcr_mentions_point_at_names(vcr):
    (mention,) = vcr.meta["mentions"]["question"]
    assert mention["objects"] == [0] and vcr.question[mention["start"] : mention["end"]] == "Casey"
    second = vcr.meta["mentions"]["rationale_choices"][1]
    assert [vcr.rationale_choices[1][m["start"] : m["end"]] for m in second] == ["Jessie", "Casey"]


def test_real_vcr_regions_and_image(vcr):
    record = json.loads((REAL / "vcr_val_1.jsonl").read_text().splitlines()[0])
    metadata = json.loads((REAL / "vcr1images" / record["metadata_fn"]).read_text())
    assert len(vcr.regions) == 6
    assert [r.label for r in vcr.regions] == ["Casey", "Riley", "Jessie", "car 1", "cellphone 1", "clock 1"]
    assert [list(r.box) for r in vcr.regions] == [b[:4] for b in metadata["boxes"]]
    image = vcr.load_image()
    assert image.size == (metadata["width"], metadata["height"]) == tuple(vcr.meta["image_size"])
    half = scale_regions(vcr.regions, image.size, (image.width // 2, image.height // 2))
    assert half[0].box[2] == pytest.approx(metadata["boxes"][0][2] / 2)


def test_real_webqa_record():
    (ex,) = load_webqa_examples(REAL / "webqa_train_record.json")
    assert ex.example_id == "webqa/train/d5c5bcf60dba11ecb1e81171463288e9"
    assert ex.question == "What color is the belly of a Green Tree Frog?"
    assert ex.answers == ("The belly of a Green Tree Frog is white.",)
    assert ex.category == "color" and ex.meta["topic"] == "frog" and ex.meta["keywords"] == "white"
    image_facts = [f for f in ex.facts if f.kind == "image"]
    text_facts = [f for f in ex.facts if f.kind == "text"]
    assert sum(f.positive for f in image_facts) == 1 and sum(not f.positive for f in image_facts) == 16
    assert sum(f.positive for f in text_facts) == 0 and len(text_facts) == 16
    assert ex.facts[0].positive and ex.facts[0].image_id == "30240126" == ex.meta["image_id"]
    assert ex.facts[0].title == "Litoria caerulea - Darwin NT"


def test_real_vcr_record_with_split_contractions_renders_them_joined():
    from vlcore.data.vcr import vcr_record_to_example

    record = json.loads((REAL / "vcr_val_1.jsonl").read_text().splitlines()[0])
    record["question"] = ["Is", [0], "'", "s", "coat", "wet", "?"]  # VCR's own split of "Casey's"
    record["answer_choices"][0] = ["No", ",", "it", "'", "s", "dry", "and", "she", "'", "ll", "stay", "."]
    ex = vcr_record_to_example(record, images_root=REAL / "vcr1images")
    assert ex.question == "Is Casey's coat wet?" and ex.answer_choices[0] == "No, it's dry and she'll stay."
    (mention,) = ex.meta["mentions"]["question"]
    assert ex.question[mention["start"] : mention["end"]] == "Casey"
    assert ex.answer_choices[2] == "No, Casey is a visitor."  # the record's own choices unchanged
