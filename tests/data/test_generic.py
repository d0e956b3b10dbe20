"""Generic datasets: proposed and user mappings, missing image column, image folders."""

from __future__ import annotations

import datasets
import pytest

from tests.data._records import BLUE, GREEN, RED, png_bytes, solid
from vlcore.data.generic import check_mapping, describe_features, generic_examples, propose_mapping
from vlcore.data.hub import SourceSpec, load_source
from vlcore.errors import DatasetError


def captioned() -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "uid": ["a", "b", "c"],
            "img": [{"bytes": png_bytes(solid(colour=GREEN)), "path": None}] * 3,
            "caption": ["a green square", "another", "third"],
            "label": [1, 0, 1],
            "kind": ["shape", "shape", "colour"],
        },
        features=datasets.Features(
            {
                "uid": datasets.Value("string"),
                "img": datasets.Image(),
                "caption": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["no", "yes"]),
                "kind": datasets.Value("string"),
            }
        ),
    )


def test_proposed_mapping_inspects_features():
    assert propose_mapping(captioned().features) == {
        "image": "img",
        "question": "caption",
        "answer": "label",
        "category": "kind",
        "id": "uid",
    }


def test_examples_follow_the_mapping_with_class_label_names():
    first, second = generic_examples(captioned(), split="train", name="shapes", limit=2)
    assert first.example_id == "shapes/train/a" and first.source == "generic"
    assert first.question == "a green square" and first.answers == ("yes",) and first.category == "shape"
    assert second.answers == ("no",)
    assert first.load_image().getpixel((0, 0)) == GREEN


def test_user_mapping_and_offset():
    (ex,) = generic_examples(captioned(), {"image": "img", "question": "kind"}, split="test", offset=2, limit=1)
    assert ex.example_id == "generic/test/2" and ex.question == "colour" and ex.answers == ()


def test_no_image_column_says_which_columns_exist_and_how_to_fix():
    features = datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]}).features
    with pytest.raises(DatasetError) as err:
        propose_mapping(features)
    message = str(err.value)
    assert "no image column" in message and "question (string), answer (string)" in message
    assert "cast_column" in message


def test_mapping_to_unknown_column_or_role_is_an_error():
    features = captioned().features
    with pytest.raises(DatasetError, match="not in the dataset"):
        check_mapping(features, {"image": "picture"})
    with pytest.raises(DatasetError, match="unknown mapping roles"):
        check_mapping(features, {"image": "img", "colour": "kind"})
    with pytest.raises(DatasetError, match="needs an 'image' column"):
        check_mapping(features, {"question": "caption"})


def test_describe_features_names_types():
    assert describe_features(captioned().features)["label"] == "ClassLabel"


def test_image_folder_maps_to_examples(tmp_path):
    folder = tmp_path / "pics"
    for label, colour in (("cat", GREEN), ("dog", RED)):
        (folder / label).mkdir(parents=True)
        solid(colour=colour).save(folder / label / f"{label}.png")
    ds = load_source(SourceSpec(str(folder), kind="imagefolder", cache_dir=str(tmp_path / "cache")))
    examples = generic_examples(ds, split="train")
    assert sorted(e.answers for e in examples) == [("cat",), ("dog",)]
    cat = next(e for e in examples if e.answers == ("cat",))
    assert cat.question == "" and cat.image_path and cat.load_image().getpixel((0, 0)) == GREEN


def test_a_mapped_second_image_becomes_an_extra_image():
    ds = datasets.Dataset.from_dict(
        {"left": [solid((8, 8), RED)], "right": [solid((6, 4), BLUE)], "sentence": ["left is red"]},
        features=datasets.Features({"left": datasets.Image(), "right": datasets.Image(),
                                    "sentence": datasets.Value("string")}),
    )
    (ex,) = generic_examples(ds, {"image": "left", "image2": "right", "question": "sentence"})
    left, right = ex.load_images()
    assert left.size == (8, 8) and right.size == (6, 4) and right.getpixel((0, 0)) == BLUE
