"""VQAv2-style datasets: columns found from features, gold answers, lazy images, parquet round trip."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from tests.data._records import BLUE, RED, png_bytes, solid
from vlcore.data.hub import SourceSpec, load_source
from vlcore.data.vqa import vqa_columns, vqa_examples
from vlcore.errors import DatasetError, InputError

ANSWER = {
    "answer": datasets.Value("string"),
    "answer_confidence": datasets.Value("string"),
    "answer_id": datasets.Value("int64"),
}
FEATURES = datasets.Features(
    {
        "question_type": datasets.Value("string"),
        "multiple_choice_answer": datasets.Value("string"),
        "answers": datasets.List(ANSWER),
        "image_id": datasets.Value("int64"),
        "answer_type": datasets.Value("string"),
        "question_id": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "image": datasets.Image(),
    }
)


def human(*answers):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def vqa_dataset(image_bytes=None) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "question_type": ["how many", "what color is the"],
            "multiple_choice_answer": ["2", "red"],
            "answers": [human("2", "2", "2", "two", "two", "two", "3", "2", "2", "2"), human(*["red"] * 9, "maroon")],
            "image_id": [9, 10],
            "answer_type": ["number", "other"],
            "question_id": [9001, 10002],
            "question": ["How many cats are there?", "What color is the bus?"],
            "image": [
                {"bytes": image_bytes or png_bytes(solid(colour=BLUE)), "path": None},
                {"bytes": png_bytes(solid(colour=RED)), "path": None},
            ],
        },
        features=FEATURES,
    )


def test_rows_map_to_examples_with_gold_answers_and_category():
    first, second = vqa_examples(vqa_dataset(), split="validation")
    assert first.example_id == "vqa/validation/9001" and first.source == "vqa"
    assert first.question == "How many cats are there?"
    assert first.answers == ("2", "two")  # multiple-choice answer, then others given by >= 3 people
    assert first.category == "number" and first.meta["question_type"] == "how many"
    assert len(first.meta["human_answers"]) == 10 and first.meta["image_id"] == 9
    assert second.answers == ("red",) and second.category == "other"
    assert tuple(np.asarray(first.load_image())[0, 0]) == BLUE


def test_answers_as_plain_strings_and_no_optional_columns():
    ds = datasets.Dataset.from_dict(
        {
            "question": ["Is it red?"],
            "answers": [["yes", "yes", "no"]],
            "image": [{"bytes": png_bytes(solid()), "path": None}],
        },
        features=datasets.Features(
            {
                "question": datasets.Value("string"),
                "answers": datasets.List(datasets.Value("string")),
                "image": datasets.Image(),
            }
        ),
    )
    (ex,) = vqa_examples(ds, split="train")
    assert ex.example_id == "vqa/train/0" and ex.answers == ("yes",) and ex.category is None


def test_columns_are_found_from_features():
    columns = vqa_columns(FEATURES)
    assert columns["image"] == "image" and columns["answers"] == "answers" and columns["question_id"] == "question_id"


def test_no_image_column_is_a_clear_error():
    ds = datasets.Dataset.from_dict({"question": ["Why?"], "answers": [["because"]]})
    with pytest.raises(DatasetError) as err:
        vqa_examples(ds, split="train")
    assert "['image']" in str(err.value) and "question (string)" in str(err.value) and "generic" in str(err.value)


def test_broken_image_fails_on_load_not_on_mapping():
    first, _ = vqa_examples(vqa_dataset(image_bytes=b"garbage"), split="validation")
    with pytest.raises(InputError, match="not a readable image"):
        first.load_image()


def test_parquet_file_round_trip_with_offset(tmp_path):
    path = tmp_path / "vqa.parquet"
    vqa_dataset().to_parquet(str(path))
    ds = load_source(SourceSpec(str(path), split="validation", cache_dir=str(tmp_path / "cache")))
    (ex,) = vqa_examples(ds, split="validation", offset=1, limit=5)
    assert ex.example_id == "vqa/validation/10002" and tuple(np.asarray(ex.load_image())[0, 0]) == RED
