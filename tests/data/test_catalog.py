"""The source catalog: listing for the UI, and `load_examples` for every source."""

from __future__ import annotations

import json

import datasets
import pytest

from tests.data._records import png_bytes, solid, webqa_record, write_imgs_tsv, write_vcr
from vlcore.data.catalog import SOURCES, list_sources, load_examples
from vlcore.errors import DatasetError


def test_sources_are_listed_for_the_ui():
    infos = list_sources()
    assert [s.name for s in infos] == ["easy_vqa", "vcr", "webqa", "vqa", "generic"]
    assert not infos[0].needs_location and all(s.needs_location and s.location_help for s in infos[1:])
    assert SOURCES["easy_vqa"] == ("test", "train")


def test_easy_vqa_still_loads_with_limit_and_offset():
    first_three = load_examples("easy_vqa", "test", 3)
    assert [e.example_id for e in first_three] == ["easy_vqa/test/0", "easy_vqa/test/1", "easy_vqa/test/2"]
    assert [e.example_id for e in load_examples("easy_vqa", "test", 1, offset=2)] == ["easy_vqa/test/2"]


def test_unknown_dataset_and_missing_location_are_errors():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_examples("coco", "val")
    with pytest.raises(DatasetError, match="needs a location"):
        load_examples("vcr", "val")


def test_vcr_and_webqa_originals_load_by_location(tmp_path):
    (tmp_path / "vcr").mkdir()
    write_vcr(tmp_path / "vcr")
    (ex,) = load_examples("vcr", "val", location=str(tmp_path / "vcr"))
    assert ex.question == "Are Casey and Riley friends?" and ex.load_image().size == (80, 60)
    (tmp_path / "WebQA_train_val.json").write_text(json.dumps({"g1": webqa_record()}))
    write_imgs_tsv(tmp_path, {"30000000": solid(), "30000001": solid(), "30000002": solid()})
    (wq,) = load_examples("webqa", "val", location=str(tmp_path / "WebQA_train_val.json"))
    assert wq.example_id == "webqa/val/g1" and wq.load_image().size == (40, 30)


def test_vqa_and_generic_load_through_datasets(tmp_path):
    ds = datasets.Dataset.from_dict(
        {
            "question": ["Is it red?", "Is it blue?"],
            "multiple_choice_answer": ["yes", "no"],
            "image": [{"bytes": png_bytes(solid()), "path": None}] * 2,
        },
        features=datasets.Features(
            {
                "question": datasets.Value("string"),
                "multiple_choice_answer": datasets.Value("string"),
                "image": datasets.Image(),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    (vqa,) = load_examples("vqa", "train", 1, location=str(tmp_path / "saved"), offset=1)
    assert vqa.example_id == "vqa/train/1" and vqa.answers == ("no",)
    (gen,) = load_examples(
        "generic", "train", 1, location=str(tmp_path / "saved"), mapping={"image": "image", "answer": "question"}
    )
    assert gen.answers == ("Is it red?",) and gen.question == ""
