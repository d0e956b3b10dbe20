"""WebQA: quotes, facts, the imgs.tsv reader, lazy images, hub mirrors."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from tests.data._records import BLUE, GREEN, RED, png_bytes, solid, webqa_entities_record, webqa_record, write_imgs_tsv
from vlcore.data.webqa import (
    WebQAImages,
    build_lineidx,
    load_webqa_examples,
    strip_webqa_quotes,
    webqa_hub_examples,
    webqa_record_to_example,
)
from vlcore.errors import DatasetError, InputError

# Official ids: the line of image_id is image_id % 10_000_000.
OFFICIAL = {"30000000": solid(colour=RED), "30000001": solid(colour=GREEN), "30000002": solid(colour=BLUE)}


def colour_of(image) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[0, 0])


@pytest.fixture
def webqa_dir(tmp_path):
    (tmp_path / "WebQA_train_val.json").write_text(
        json.dumps({"g1": webqa_record("g1"), "g2": {**webqa_record("g2"), "split": "train"}})
    )
    write_imgs_tsv(tmp_path, OFFICIAL)
    return tmp_path


def test_record_maps_with_quotes_stripped_and_facts_marked(webqa_dir):
    (ex,) = load_webqa_examples(webqa_dir / "WebQA_train_val.json", split="val")
    assert ex.example_id == "webqa/val/g1" and ex.source == "webqa"
    assert ex.question == "What colour is the frog's belly?"
    assert ex.answers == ("The belly is white.",)
    assert ex.category == "color" and ex.meta["topic"] == "frog"
    assert len(ex.facts) == 6
    assert [(f.kind, f.positive) for f in ex.facts] == [
        ("image", True),
        ("image", True),
        ("text", True),
        ("image", False),
        ("text", False),
        ("text", False),
    ]
    assert [f.image_id for f in ex.facts if f.kind == "image"] == ["30000001", "30000002", "30000000"]
    assert ex.facts[0].title == "Frog A" and ex.facts[0].text == "Frog A caption"
    assert ex.facts[2].text == "fact 1" and ex.meta["snippet_ids"] == ["g1_1", "g1_2", "g1_3"]
    assert ex.meta["image_id"] == "30000001" and ex.meta["image_urls"]["30000000"] == "https://img/30000000.jpg"


def test_main_image_is_the_first_positive_image_read_lazily(webqa_dir):
    (ex,) = load_webqa_examples(webqa_dir / "WebQA_train_val.json", split="val")
    assert ex.image is None and ex.image_loader is not None
    assert colour_of(ex.load_image()) == GREEN


def test_lineidx_lookup_returns_each_image_without_scanning(tmp_path):
    reader = WebQAImages(write_imgs_tsv(tmp_path, OFFICIAL))
    for image_id, image in OFFICIAL.items():
        assert colour_of(reader.load(int(image_id))) == colour_of(image)
    assert reader._by_id is None  # official ids: one seek per image, no scan of the TSV


def test_tsv_in_any_order_falls_back_to_an_id_index(tmp_path):
    reader = WebQAImages(write_imgs_tsv(tmp_path, {"777": solid(colour=BLUE), "42": solid(colour=RED)}))
    assert colour_of(reader.load("42")) == RED and colour_of(reader.load(777)) == BLUE


def test_lineidx_new_format_maps_ids_to_offsets(tmp_path):
    reader = WebQAImages(write_imgs_tsv(tmp_path, {"5": solid(colour=GREEN), "9": solid(colour=RED)}, lineidx="new"))
    assert colour_of(reader.load("9")) == RED


def test_unknown_image_id_is_an_input_error(tmp_path):
    reader = WebQAImages(write_imgs_tsv(tmp_path, OFFICIAL))
    with pytest.raises(InputError, match="not in imgs.tsv"):
        reader.load(30000009)


def test_missing_lineidx_is_a_dataset_error_and_can_be_built(tmp_path):
    tsv = write_imgs_tsv(tmp_path, OFFICIAL, lineidx="none")
    with pytest.raises(DatasetError, match="imgs.lineidx"):
        WebQAImages(tsv)
    build_lineidx(tsv)
    assert colour_of(WebQAImages(tsv).load("30000002")) == BLUE


def test_without_imgs_tsv_loading_the_image_says_what_is_missing(tmp_path):
    ex = webqa_record_to_example("g1", webqa_record())
    assert ex.example_id == "webqa/val/g1"
    with pytest.raises(InputError, match="imgs.tsv"):
        ex.load_image()


def test_text_only_record_has_no_image(tmp_path):
    record = {**webqa_record(), "img_posFacts": [], "img_negFacts": []}
    ex = webqa_record_to_example("g3", record)
    assert ex.meta["image_id"] is None and ex.image_loader is None
    with pytest.raises(InputError):
        ex.load_image()


def test_quotes_inside_text_are_kept():
    assert strip_webqa_quotes('"A "big" frog"') == 'A "big" frog'
    assert strip_webqa_quotes("plain") == "plain"


def test_malformed_record_and_missing_file_are_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="lacks 'Q'"):
        webqa_record_to_example("x", {"A": []})
    with pytest.raises(DatasetError, match="not found"):
        load_webqa_examples(tmp_path / "nope.json")


# -- hub mirrors ------------------------------------------------------------------------------
def test_hub_mirror_with_image_column_and_fact_structs():
    record = webqa_record()
    fact = {
        "image_id": datasets.Value("int64"),
        "title": datasets.Value("string"),
        "caption": datasets.Value("string"),
        "url": datasets.Value("string"),
        "imgUrl": datasets.Value("string"),
    }
    features = datasets.Features(
        {
            "Guid": datasets.Value("string"),
            "Q": datasets.Value("string"),
            "A": datasets.List(datasets.Value("string")),
            "Qcate": datasets.Value("string"),
            "img_posFacts": datasets.List(fact),
            "image": datasets.Image(),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "Guid": ["g1"],
            "Q": [record["Q"]],
            "A": [record["A"]],
            "Qcate": ["color"],
            "img_posFacts": [record["img_posFacts"]],
            "image": [{"bytes": png_bytes(solid(colour=BLUE)), "path": None}],
        },
        features=features,
    )
    (ex,) = webqa_hub_examples(ds, split="val")
    assert ex.example_id == "webqa/val/g1" and ex.question == "What colour is the frog's belly?"
    assert ex.answers == ("The belly is white.",) and ex.category == "color"
    assert [f.image_id for f in ex.facts] == ["30000001", "30000002"] and all(f.positive for f in ex.facts)
    assert colour_of(ex.load_image()) == BLUE


def test_hub_mirror_facts_as_json_text_read_images_from_tsv(tmp_path):
    record = webqa_record()
    ds = datasets.Dataset.from_dict(
        {"id": ["g9"], "question": [record["Q"]], "img_posFacts": [json.dumps(record["img_posFacts"])]}
    )
    (ex,) = webqa_hub_examples(ds, split="test", images=WebQAImages(write_imgs_tsv(tmp_path, OFFICIAL)))
    assert ex.example_id == "webqa/test/g9" and ex.answers == ()
    assert colour_of(ex.load_image()) == GREEN


def test_hub_mirror_without_question_lists_columns():
    ds = datasets.Dataset.from_dict({"title": ["x"], "image_url": ["y"]})
    with pytest.raises(DatasetError, match=r"WebQA.*\['Q'\].*title \(string\)"):
        webqa_hub_examples(ds, split="val")


def test_html_entities_in_questions_answers_captions_and_facts_are_decoded(tmp_path):
    ex = webqa_record_to_example("g9", webqa_entities_record("g9"))
    assert ex.question == "Is Tom & Jerry's frog \"green\"?"
    assert ex.answers == ("Yes \u2013 it's green & white.",)
    image_fact, _, text_fact = ex.facts[:3]
    assert image_fact.title == "Tom & Jerry"
    assert image_fact.text == "A frog <img src=x onerror=alert(1)> on a leaf & a twig"
    assert text_fact.title == "Frogs & toads"
    assert text_fact.text == "Frogs \"croak\" at AT&T's pond; &amp; stays &amp;"  # decoded once, bare & kept


def test_decoded_webqa_text_is_escaped_again_when_rendered_as_html():
    from vlcore.data.browse import answers_html, fact_html, highlight_mentions

    ex = webqa_record_to_example("g9", webqa_entities_record("g9"))
    fact = fact_html(ex.facts[0])
    assert "<img" not in fact and "&lt;img src=x onerror=alert(1)&gt;" in fact and "Tom &amp; Jerry" in fact
    assert "&amp;amp;" not in fact  # escaped once for the page, not twice
    assert answers_html(ex.answers).endswith("Yes \u2013 it&#x27;s green &amp; white.")
    assert highlight_mentions(ex.question, []) == "Is Tom &amp; Jerry&#x27;s frog &quot;green&quot;?"


def test_hub_mirror_text_is_decoded_too():
    record = webqa_entities_record("g9")
    ds = datasets.Dataset.from_dict({"question": [record["Q"]], "answers": [record["A"]], "guid": ["g9"],
                                     "image": [solid(colour=RED)]})
    (ex,) = webqa_hub_examples(ds, split="val")
    assert ex.question == "Is Tom & Jerry's frog \"green\"?" and ex.answers == ("Yes \u2013 it's green & white.",)
