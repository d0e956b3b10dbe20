"""VCR: reference rendering, mention spans, boxes, metadata checks, lazy images, hub mirrors."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from tests.data._records import (
    BLUE,
    GREEN,
    RED,
    VCR_BOXES,
    VCR_CONTRACTIONS_RECORD,
    VCR_OBJECTS,
    VCR_RECORD,
    png_bytes,
    vcr_image,
    write_vcr,
)
from vlcore.data.vcr import (
    compute_object_names,
    join_names,
    load_vcr_examples,
    render_tokens,
    scale_box,
    scale_regions,
    vcr_record_to_example,
)
from vlcore.data.vcr_hub import vcr_hub_columns, vcr_hub_examples
from vlcore.errors import DatasetError, InputError


@pytest.fixture
def vcr_example(tmp_path):
    return load_vcr_examples(write_vcr(tmp_path))[0]


def all_texts_and_mentions(ex):
    mentions = ex.meta["mentions"]
    yield ex.question, mentions["question"]
    yield from zip(ex.answer_choices, mentions["answer_choices"])
    yield from zip(ex.rationale_choices, mentions["rationale_choices"])


def test_record_maps_to_filled_example(vcr_example, tmp_path):
    ex = vcr_example
    assert ex.example_id == "vcr/val/val-7"
    assert ex.source == "vcr"
    assert ex.question == "Are Casey and Riley friends?"
    assert len(ex.answer_choices) == 4 and len(ex.rationale_choices) == 4
    assert ex.answer_label == 0 and ex.rationale_label == 0
    assert ex.answers == ("Yes, Casey smiles at Riley.",)
    assert [r.label for r in ex.regions] == ["Casey", "Riley", "car 1", "Jessie"]
    assert [r.index for r in ex.regions] == [0, 1, 2, 3]
    assert ex.regions[0].box == (4.0, 6.0, 24.0, 50.0) and ex.regions[0].score == pytest.approx(0.99)
    assert ex.meta["objects"] == VCR_OBJECTS and ex.meta["image_size"] == [80, 60]
    assert ex.image_path == str(tmp_path / "vcr1images" / VCR_RECORD["img_fn"])
    assert ex.load_image().size == (80, 60)


def test_reference_to_two_objects_renders_both_names(vcr_example):
    (mention,) = vcr_example.meta["mentions"]["question"]
    assert mention["objects"] == [0, 1]
    assert vcr_example.question[mention["start"] : mention["end"]] == "Casey and Riley"
    assert [vcr_example.question[n["start"] : n["end"]] for n in mention["names"]] == ["Casey", "Riley"]
    assert vcr_example.answer_choices[3] == "car 1 is red and Casey, Riley and Jessie ignore it."


def test_person_names_are_stable_across_question_answers_and_rationales(vcr_example):
    seen: dict[int, set[str]] = {}
    for text, mentions in all_texts_and_mentions(vcr_example):
        for mention in mentions:
            for name in mention["names"]:
                seen.setdefault(name["object"], set()).add(text[name["start"] : name["end"]])
    assert seen == {0: {"Casey"}, 1: {"Riley"}, 2: {"car 1"}, 3: {"Jessie"}}


def test_mention_spans_point_at_the_rendered_reference(vcr_example):
    names = vcr_example.meta["object_names"]
    count = 0
    for text, mentions in all_texts_and_mentions(vcr_example):
        for mention in mentions:
            assert text[mention["start"] : mention["end"]] == join_names([names[i] for i in mention["objects"]])
            count += 1
    assert count == 10


def test_detokenisation_joins_punctuation_and_possessives(vcr_example):
    assert vcr_example.answer_choices[1] == "No, Jessie is alone."
    assert vcr_example.rationale_choices[0] == "Casey's hand is on Riley's shoulder."
    text, _ = render_tokens(["He", "said", '"', "go", '"', "(", "now", ")", "."], [])
    assert text == 'He said "go" (now).'


def test_split_contractions_and_possessives_render_without_a_space(tmp_path):
    (ex,) = load_vcr_examples(write_vcr(tmp_path, VCR_CONTRACTIONS_RECORD))
    assert ex.question == "What is Casey's job?"
    assert ex.answer_choices == ("She'll leave soon.", "She's a nurse at the nurses' station.",
                                 "Casey's clothing is a uniform.", "Casey and Riley don't work here.")
    assert ex.rationale_choices[:2] == ("They're in a hospital and she'd wear a badge.",
                                        "I'm sure we've seen Riley's badge.")
    for text, mentions in all_texts_and_mentions(ex):
        assert "' " not in text.replace("nurses' station", "") and " '" not in text
        for mention in mentions:
            assert [text[n["start"] : n["end"]] for n in mention["names"]] == [
                ex.meta["object_names"][i] for i in mention["objects"]]


def test_an_apostrophe_before_other_words_keeps_the_following_space():
    assert render_tokens(["the", "dogs", "'", "tails", "."], [])[0] == "the dogs' tails."
    assert render_tokens([[0], "'", "S", "hat"], ["Avery"])[0] == "Avery'S hat"

def test_object_names_follow_person_order_and_number_other_classes():
    assert compute_object_names(["car", "person", "car", "person"]) == ["car 1", "Casey", "car 2", "Riley"]
    many = compute_object_names(["person"] * 16)
    assert len(set(many)) == 16 and many[14] == "Casey 2"


def test_reference_outside_objects_is_a_dataset_error():
    with pytest.raises(DatasetError, match="0-based indexes"):
        render_tokens(["Is", [5], "ok"], ["Casey"])


def test_boxes_scale_onto_a_resized_image(vcr_example):
    image = vcr_example.load_image()
    small = image.resize((40, 30))
    regions = scale_regions(vcr_example.regions, image.size, small.size)
    assert regions[0].box == scale_box(VCR_BOXES[0], (80, 60), (40, 30)) == (2.0, 3.0, 12.0, 25.0)
    arr = np.asarray(small).astype(int)
    for region, colour in zip(regions[:3], (RED, GREEN, BLUE)):
        x1, y1, x2, y2 = region.box
        centre = arr[int((y1 + y2) / 2), int((x1 + x2) / 2)]
        assert np.abs(centre - colour).max() < 40, (region.label, centre)
    assert regions[0].label == "Casey" and regions[0].score == vcr_example.regions[0].score


def test_scale_box_rejects_empty_sizes():
    with pytest.raises(InputError, match="positive"):
        scale_box((0, 0, 1, 1), (0, 10), (5, 5))


def test_metadata_names_not_matching_objects_is_a_clear_error(tmp_path):
    bad = {"boxes": VCR_BOXES[:3], "names": VCR_OBJECTS[:3], "width": 80, "height": 60}
    with pytest.raises(DatasetError) as err:
        load_vcr_examples(write_vcr(tmp_path, metadata=bad))
    message = str(err.value)
    assert "still@0.json" in message and "4" in message and "3 boxes" in message


def test_metadata_with_other_class_names_is_a_clear_error(tmp_path):
    bad = {"boxes": VCR_BOXES, "names": ["person", "person", "dog", "person"], "width": 80, "height": 60}
    with pytest.raises(DatasetError, match="still@0.json"):
        load_vcr_examples(write_vcr(tmp_path, metadata=bad))


def test_missing_image_fails_when_loaded_not_when_mapped(tmp_path):
    ex = load_vcr_examples(write_vcr(tmp_path, image=False))[0]
    assert ex.image_path.endswith("still@0.jpg") and len(ex.regions) == 4
    with pytest.raises(InputError, match="not found"):
        ex.load_image()


def test_missing_metadata_leaves_no_regions_and_a_warning(tmp_path):
    ex = vcr_record_to_example(VCR_RECORD, images_root=tmp_path, index=0)
    assert ex.regions == () and "metadata file not found" in ex.meta["warnings"][0]
    assert ex.example_id == "vcr/val/val-7"


def test_record_without_required_keys_lists_what_it_has(tmp_path):
    with pytest.raises(DatasetError, match="lacks"):
        vcr_record_to_example({"question": ["Hi"]}, images_root=tmp_path)


def test_folder_without_split_lists_jsonl_files(tmp_path):
    write_vcr(tmp_path)
    with pytest.raises(DatasetError, match=r"no train\.jsonl.*val\.jsonl"):
        load_vcr_examples(tmp_path, split="train")


def test_limit_and_offset_read_only_the_lines_asked(tmp_path):
    write_vcr(tmp_path)
    lines = [json.dumps({**VCR_RECORD, "annot_id": f"val-{i}"}) for i in range(5)]
    (tmp_path / "val.jsonl").write_text("\n".join(lines) + "\n")
    ids = [e.example_id for e in load_vcr_examples(tmp_path, split="val", limit=2, offset=2)]
    assert ids == ["vcr/val/val-2", "vcr/val/val-3"]


# -- hub mirrors ------------------------------------------------------------------------------
def mirror(**overrides) -> datasets.Dataset:
    """A VCR mirror as parquet would hold it: token lists as JSON text, an Image column."""
    columns = {
        "annot_id": ["val-7"],
        "question": [json.dumps(VCR_RECORD["question"])],
        "answer_choices": [[json.dumps(c) for c in VCR_RECORD["answer_choices"]]],
        "rationale_choices": [[json.dumps(c) for c in VCR_RECORD["rationale_choices"]]],
        "answer_label": [0],
        "rationale_label": [0],
        "objects": [VCR_OBJECTS],
        "boxes": [VCR_BOXES],
        "image": [{"bytes": png_bytes(vcr_image()), "path": None}],
    }
    columns.update(overrides)
    features = {
        "annot_id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer_choices": datasets.List(datasets.Value("string")),
        "rationale_choices": datasets.List(datasets.Value("string")),
        "answer_label": datasets.Value("int64"),
        "rationale_label": datasets.Value("int64"),
        "objects": datasets.List(datasets.Value("string")),
        "boxes": datasets.List(datasets.List(datasets.Value("float64"))),
        "image": datasets.Image(),
    }
    return datasets.Dataset.from_dict(columns, features=datasets.Features({k: features[k] for k in columns}))


def test_hub_mirror_maps_like_the_original(vcr_example):
    (ex,) = vcr_hub_examples(mirror(), split="val")
    assert ex.example_id == vcr_example.example_id
    assert ex.question == vcr_example.question
    assert ex.answer_choices == vcr_example.answer_choices
    assert ex.rationale_choices == vcr_example.rationale_choices
    assert ex.meta["mentions"] == vcr_example.meta["mentions"]
    assert [r.label for r in ex.regions] == ["Casey", "Riley", "car 1", "Jessie"]
    assert ex.image is None and ex.load_image().size == (80, 60)


def test_hub_mirror_columns_are_found_by_features():
    columns = vcr_hub_columns(mirror().features)
    assert columns["question"] == "question" and columns["image"] == "image" and columns["boxes"] == "boxes"
    assert columns["answer_label"] == "answer_label" and columns["id"] == "annot_id"


def test_hub_mirror_without_answer_choices_lists_columns():
    ds = mirror().remove_columns(["answer_choices"])
    with pytest.raises(DatasetError) as err:
        vcr_hub_examples(ds, split="val")
    assert "answer_choices" in str(err.value) and "question (string)" in str(err.value)


def test_hub_mirror_boxes_not_matching_objects_is_an_error():
    with pytest.raises(DatasetError, match="one box and name per object"):
        vcr_hub_examples(mirror(boxes=[VCR_BOXES[:2]]), split="val")


def test_hub_mirror_with_broken_image_bytes_fails_only_when_loaded():
    (ex,) = vcr_hub_examples(mirror(image=[{"bytes": b"not an image", "path": None}]), split="val")
    assert ex.question == "Are Casey and Riley friends?"
    with pytest.raises(InputError, match="not a readable image"):
        ex.load_image()
