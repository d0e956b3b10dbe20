"""Dataset browser flows on the bundled source."""

from __future__ import annotations

from tests.app.conftest import open_page

BROWSER = "pages/1_Dataset_Browser.py"


def test_filter_open_and_interpret_hands_over_through_the_url():
    at = open_page(BROWSER)
    assert not at.exception and len(at.get("image")) == 24
    at.text_input(key="q").set_value("circle").run()
    shown = [c.value for c in at.caption if "examples match" in c.value][0]
    from vlcore.data.easy_vqa import load_easy_vqa

    expect = sum("circle" in r.question.lower() for r in load_easy_vqa("test"))
    assert shown == f"easy-VQA (test): {expect:,} of 9,673 examples match."
    questions = [c.value for c in at.caption if "circle" in c.value]
    assert len(questions) == 24
    first = next(b for b in at.button if b.key and b.key.startswith("open_"))
    first.click().run()
    ex = at.query_params["ex"]
    assert ex == f"easy_vqa/test/{first.key.removeprefix('open_')}"
    assert at.subheader[0].value == f"Example `{ex}`"
    at.button(key="interpret").click().run()
    assert not at.exception
    assert at.title[0].value == "Run model" and at.query_params["ex"] == ex
    assert any(m.value.startswith("**Prediction:**") for m in at.markdown)


def test_category_filter_and_paging():
    at = open_page(BROWSER)
    at.multiselect(key="cat").set_value(["shape"]).run()
    caption = next(c.value for c in at.caption if "examples match" in c.value)
    n = int(caption.split(": ")[1].split(" of")[0].replace(",", ""))
    assert 0 < n < 9673
    at.number_input(key="pg").set_value(10_000).run()  # out of range: refused, the page stays in range
    assert not at.exception and at.number_input(key="pg").value <= at.number_input(key="pg").max
    page, _, n_pages = next(c.value for c in at.caption if c.value.startswith("Page ")).split()[1:]
    assert 1 <= int(page) <= int(n_pages)


def test_page_box_and_page_link_are_clamped_to_the_pages_there_are():
    at = open_page(BROWSER, {"cat": "shape", "pg": "99"})  # 1,257 shape questions: 53 pages of 24
    assert not at.exception and not at.error
    assert "`pg=99` is out of range (1–53); showing 53." in [i.value for i in at.info]
    box = at.number_input(key="pg")
    assert (box.min, box.max, box.value) == (1, 53, 53) and at.query_params["pg"] == "53"
    assert "Page 53 of 53" in [c.value for c in at.caption]
    box.set_value(99).run()  # typed past the end: never shown as "99 of 53"
    assert not at.exception and at.number_input(key="pg").value <= 53 and int(at.query_params["pg"]) <= 53
    at.number_input(key="pg").set_value(3).run()
    assert "Page 3 of 53" in [c.value for c in at.caption] and at.query_params["pg"] == "3"
    at.multiselect(key="cat").set_value(["color"]).run()  # 1,280 questions: the box's limit follows the filter
    assert at.number_input(key="pg").max == 54 and "Page 3 of 54" in [c.value for c in at.caption]


def test_no_match_gives_a_message():
    at = open_page(BROWSER)
    at.text_input(key="q").set_value("zebra crossing").run()
    assert not at.exception and any("No example matches" in i.value for i in at.info)


def vqa_parquet(path, n: int = 30, with_image: bool = True):
    import datasets

    from tests.data._records import BLUE, RED, solid

    data = {
        "question": [f"what color is thing {i}?" for i in range(n)],
        "multiple_choice_answer": ["red" if i % 2 else "blue" for i in range(n)],
        "answer_type": ["other" if i % 3 else "yes/no" for i in range(n)],
        "question_id": list(range(1000, 1000 + n)),
    }
    features = {k: datasets.Value("string") for k in ("question", "multiple_choice_answer", "answer_type")}
    features["question_id"] = datasets.Value("int64")
    if with_image:
        data["image"] = [solid((48, 32), RED if i % 2 else BLUE) for i in range(n)]
        features["image"] = datasets.Image()
    datasets.Dataset.from_dict(data, features=datasets.Features(features)).to_parquet(str(path))
    return path


def test_vqa_parquet_source_filters_opens_and_interprets(tmp_path, monkeypatch):
    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))
    path = vqa_parquet(tmp_path / "vqa.parquet")
    at = open_page(BROWSER, {"ds": "vqa", "loc": str(path), "split": "train"})
    assert not at.exception and not at.error
    assert any(c.value.endswith("30 of 30 examples match.") for c in at.caption)
    at.multiselect(key="cat").set_value(["yes/no"]).run()
    assert any(c.value.endswith("10 of 30 examples match.") for c in at.caption)
    at.button(key="open_3").click().run()
    assert at.query_params["ex"] == "vqa/train/1003"
    assert any("<b>Gold answer:</b> red" in h.proto.body for h in at.get("html"))
    at.button(key="interpret").click().run()
    assert not at.exception and not at.error, at.error
    assert at.title[0].value == "Run model" and at.query_params["loc"] == str(path)
    assert at.subheader[0].value == "what color is thing 3?"


def test_vcr_source_draws_boxes_and_colours_mentions(tmp_path, monkeypatch):
    from tests.data._records import write_vcr

    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))
    write_vcr(tmp_path)
    at = open_page(BROWSER, {"ds": "vcr", "loc": str(tmp_path), "split": "val"})
    at.text_input(key="images").set_value(str(tmp_path / "vcr1images")).run()
    assert not at.exception and not at.error, at.error
    assert at.multiselect(key="objects").options == ["car", "person"]
    at.multiselect(key="objects").set_value(["car", "person"]).run()
    assert any(c.value.endswith("1 of 1 examples match.") for c in at.caption)
    at.button(key="open_0").click().run()
    html = " ".join(h.proto.body for h in at.get("html"))
    # "Are Casey and Riley friends?": each name in its own object's box colour
    assert '<b style="color:#e6194b">Casey</b> and <b style="color:#3cb44b">Riley</b>' in html
    assert "(gold)" in html


def test_local_path_outside_the_roots_is_refused():
    at = open_page(BROWSER, {"ds": "vqa", "loc": "/etc", "split": "train"})
    assert not at.exception and "not under a configured data folder" in at.error[0].value


def test_offline_hub_dataset_is_one_clear_line():
    at = open_page(BROWSER, {"ds": "vqa", "loc": "lmms-lab/VQAv2", "split": "validation"})
    assert not at.exception and len(at.error) == 1
    assert "bundled" in at.error[0].value
    at.button(key="to_bundled").click().run()
    assert not at.exception and not at.error and at.query_params["ds"] == "easy_vqa"
    assert len(at.get("image")) == 24


def test_dataset_without_image_column_names_its_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))
    path = vqa_parquet(tmp_path / "noimg.parquet", with_image=False)
    at = open_page(BROWSER, {"ds": "vqa", "loc": str(path), "split": "train"})
    assert not at.exception and "multiple_choice_answer" in at.error[0].value


def test_record_missing_its_image_keeps_the_page_working(tmp_path, monkeypatch):
    from tests.data._records import write_vcr

    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))
    write_vcr(tmp_path, image=False)
    at = open_page(BROWSER, {"ds": "vcr", "loc": str(tmp_path), "split": "val"})
    at.text_input(key="images").set_value(str(tmp_path / "vcr1images")).run()
    assert not at.exception and any("image unavailable" in w.value for w in at.warning)
    at.button(key="open_0").click().run()
    assert not at.exception and any("No image to show" in w.value for w in at.warning)
    assert any("(gold)" in h.proto.body for h in at.get("html"))


def test_generic_dataset_uses_the_column_mapping_picked_in_the_ui(tmp_path, monkeypatch):
    import datasets

    from tests.data._records import RED, solid

    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))
    datasets.Dataset.from_dict(
        {"picture": [solid((32, 32), RED)] * 4, "caption": [f"a red square {i}" for i in range(4)],
         "prompt": [f"what is shown {i}?" for i in range(4)], "label": ["red"] * 4},
        features=datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string"),
                                    "prompt": datasets.Value("string"), "label": datasets.Value("string")}),
    ).save_to_disk(str(tmp_path / "captions"))
    at = open_page(BROWSER, {"ds": "generic", "loc": str(tmp_path / "captions"), "split": "train"})
    assert not at.exception and not at.error, at.error
    assert at.selectbox(key="map_image").value == "picture"
    at.selectbox(key="map_question").set_value("prompt").run()
    at.button(key="open_2").click().run()
    assert not at.exception
    assert any("what is shown 2?" in h.proto.body for h in at.get("html"))


def test_uploaded_parquet_file_is_browsable(tmp_path):
    at = open_page(BROWSER, {"ds": "vqa", "split": "train"})
    path = vqa_parquet(tmp_path / "up.parquet", n=5)
    at.file_uploader(key="data_upload").upload("up.parquet", path.read_bytes(), "application/octet-stream").run()
    assert not at.exception and not at.error, at.error
    assert any(c.value.endswith("5 of 5 examples match.") for c in at.caption)


def test_metadata_not_matching_objects_is_a_warning_and_the_page_keeps_working(tmp_path, monkeypatch):
    from tests.data._records import VCR_BOXES, write_vcr

    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))
    bad = {"boxes": VCR_BOXES[:2], "segms": [], "names": ["person", "person"], "width": 80, "height": 60}
    write_vcr(tmp_path, metadata=bad)
    at = open_page(BROWSER, {"ds": "vcr", "loc": str(tmp_path), "split": "val", "img": str(tmp_path / "vcr1images")})
    assert not at.exception and not at.error, at.error
    at.button(key="open_0").click().run()
    assert not at.exception
    assert any("no boxes shown" in w.value for w in at.warning)
    assert any("(gold)" in h.proto.body for h in at.get("html"))


def test_filters_live_in_the_url_and_come_back_from_it():
    at = open_page(BROWSER)
    at.text_input(key="q").set_value("circle").run()
    at.multiselect(key="cat").set_value(["yes/no"]).run()
    assert at.query_params["q"] == "circle" and at.query_params["cat"] == "yes/no"
    fresh = open_page(BROWSER, {"q": "circle", "cat": "yes/no"})
    assert fresh.text_input(key="q").value == "circle" and fresh.multiselect(key="cat").value == ["yes/no"]
    assert [c.value for c in fresh.caption if "examples match" in c.value] == \
        [c.value for c in at.caption if "examples match" in c.value]


def test_webqa_entities_show_as_characters_and_dataset_html_stays_escaped(tmp_path, monkeypatch):
    import json

    from tests.data._records import OFFICIAL_WEBQA_IMAGES, webqa_entities_record, write_imgs_tsv

    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))
    (tmp_path / "WebQA_train_val.json").write_text(json.dumps({"g9": webqa_entities_record("g9")}))
    write_imgs_tsv(tmp_path, OFFICIAL_WEBQA_IMAGES)
    at = open_page(BROWSER, {"ds": "webqa", "loc": str(tmp_path / "WebQA_train_val.json"), "split": "val"})
    assert not at.exception and not at.error, at.error
    assert any(c.value.startswith("Is Tom & Jerry's frog") for c in at.caption)  # the thumbnail's caption
    at.button(key="open_0").click().run()
    assert not at.exception and not at.error
    html = " ".join(h.proto.body for h in at.get("html"))
    assert "Is Tom &amp; Jerry&#x27;s frog &quot;green&quot;?" in html
    assert "<b>Gold answer:</b> Yes \u2013 it&#x27;s green &amp; white." in html
    assert "<b>Tom &amp; Jerry</b> — A frog &lt;img src=x onerror=alert(1)&gt; on a leaf &amp; a twig" in html
    assert "at AT&amp;T&#x27;s pond; &amp;amp; stays" in html  # "&amp;amp;" in the data is "&amp;" on screen
    assert "<img" not in html and "&amp;amp; Jerry" not in html and "&#39;" not in html
