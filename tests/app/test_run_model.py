"""Model runner flows: a browser example, an uploaded image reloaded by id, sweeps, bad input."""

from __future__ import annotations

import io

import pandas as pd

from tests.app.conftest import heatmap_specs, open_page
from tests.conftest import grey_image

RUNNER = "pages/2_Run_Model.py"


def test_browser_example_runs_then_loads_from_the_store():
    at = open_page(RUNNER, {"ex": "easy_vqa/test/5"})
    assert not at.exception and not at.error
    assert any("Computed now" in c.value for c in at.caption)
    assert len(heatmap_specs(at)) == 1
    again = open_page(RUNNER, {"ex": "easy_vqa/test/5"})
    assert any("Loaded from the store" in c.value for c in again.caption)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def upload(at, name: str, data: bytes, text: str):
    at.file_uploader(key="upload").upload(name, data, "image/png")
    at.text_input(key="upload_text").set_value(text)
    return at.button(key="run_upload").click().run()


def test_uploaded_png_runs_and_reloads_from_the_store_by_id():
    at = upload(open_page(RUNNER), "shape.png", png_bytes(grey_image(64, 64, red_cell=(1, 2))), "what color is the shape?")
    assert not at.exception and not at.error
    ex_id = at.query_params["ex"]
    assert ex_id.startswith("upload/") and at.subheader[0].value == "what color is the shape?"
    assert any("Computed now" in c.value for c in at.caption)
    fresh = open_page(RUNNER, {"ex": ex_id})
    assert fresh.subheader[0].value == "what color is the shape?"
    assert any("Loaded from the store" in c.value for c in fresh.caption)


def test_bad_uploads_get_clear_messages():
    at = upload(open_page(RUNNER), "notes.png", b"this is not an image", "what is it?")
    assert not at.exception and "not a readable image" in at.error[0].value
    at = upload(open_page(RUNNER), "empty.png", b"", "what is it?")
    assert not at.exception and "empty (0 bytes)" in at.error[0].value
    at = upload(open_page(RUNNER), "ok.png", png_bytes(grey_image(32, 32)), "   ")
    assert not at.exception and "text is empty" in at.error[0].value
    assert "ex" not in at.query_params


def test_unknown_example_id_is_a_clear_message():
    at = open_page(RUNNER, {"ex": "upload/0123456789abcdef"})
    assert not at.exception and "unknown example" in at.error[0].value


def test_offline_hub_id_is_a_clear_message():
    at = open_page(RUNNER, {"model": "dandelin/vilt-b32-finetuned-vqa", "ex": "easy_vqa/test/1"})
    assert not at.exception
    assert "could not load 'dandelin/vilt-b32-finetuned-vqa'" in at.error[0].value


def test_sweep_from_the_page_matches_the_cli(tmp_path):
    from vlcore.cli import main

    at = open_page(RUNNER)
    at.number_input(key="sweep_n").set_value(20).run()
    at.button(key="sweep_start").click().run()
    assert not at.exception
    assert any("20/20 examples done" in m.value for m in at.markdown)
    from vlcore.storage.store import Store

    sweeps = Store().list_sweeps()
    assert len(sweeps) == 1 and sweeps[0]["complete"]
    assert main(["extract", "--limit", "20", "--out", str(tmp_path / "cli")]) == 0
    for name in ("predictions.parquet", "head_stats.parquet"):
        page_df = pd.read_parquet(f"{sweeps[0]['path']}/{name}")
        cli_df = pd.read_parquet(tmp_path / "cli" / name)
        pd.testing.assert_frame_equal(page_df, cli_df)


def test_vcr_example_with_an_itm_checkpoint_scores_every_choice(tmp_path, monkeypatch, tiny_tokenizer_dir):
    from tests.conftest import make_tiny_adapter
    from tests.data._records import write_vcr

    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))
    (tmp_path / "vcr").mkdir()
    write_vcr(tmp_path / "vcr")
    itm = make_tiny_adapter(tiny_tokenizer_dir, arch="ViltForImageAndTextRetrieval")
    for part in (itm.model, itm.tokenizer, itm.image_processor):
        part.save_pretrained(tmp_path / "itm")
    at = open_page(RUNNER, {"ds": "vcr", "loc": str(tmp_path / "vcr"), "img": str(tmp_path / "vcr" / "vcr1images"),
                            "split": "val", "ex": "vcr/val/val-7"})
    at.radio(key="model_kind").set_value("Local folder").run()
    at.text_input(key="model_dir").set_value(str(tmp_path / "itm")).run()
    assert not at.exception and not at.error, at.error
    tables = [d.value for d in at.dataframe if "match probability" in d.value.columns]
    assert len(tables) == 2 and all(len(t) == 4 for t in tables)
    q2a = tables[0]
    assert q2a["text as scored"].iloc[0].startswith("Are Casey and Riley friends?")
    assert q2a["gold"].tolist() == [True, False, False, False]
    picked = [m.value for m in at.markdown if m.value.startswith("**Q→A:**")][0]
    assert f"picked {'ABCD'[int(q2a['match probability'].idxmax())]}" in picked


def test_sweep_over_the_browsers_filtered_set():
    from vlcore.data.easy_vqa import load_easy_vqa

    at = open_page(RUNNER, {"ds": "easy_vqa", "split": "test", "q": "circle", "cat": "yes/no"})
    assert at.checkbox(key="sweep_filtered").value
    at.number_input(key="sweep_n").set_value(6).run()
    at.button(key="sweep_start").click().run()
    assert not at.exception
    table = next(d.value for d in at.dataframe if "prediction" in d.value.columns)
    expect = [r.example_id for r in load_easy_vqa("test")
              if "circle" in r.question.lower() and r.answer in ("yes", "no")][:6]
    assert table["example_id"].tolist() == expect


def test_nlvr2_checkpoint_runs_on_two_uploaded_images(tmp_path, tiny_tokenizer_dir):
    from tests.conftest import make_tiny_adapter

    nlvr2 = make_tiny_adapter(tiny_tokenizer_dir, arch="ViltForImagesAndTextClassification", num_images=2,
                              modality_type_vocab_size=3,
                              num_labels=2, id2label={0: "False", 1: "True"}, label2id={"False": 0, "True": 1})
    for part in (nlvr2.model, nlvr2.tokenizer, nlvr2.image_processor):
        part.save_pretrained(tmp_path / "nlvr2")
    at = open_page(RUNNER)
    at.radio(key="model_kind").set_value("Local folder").run()
    at.text_input(key="model_dir").set_value(str(tmp_path / "nlvr2")).run()
    at.file_uploader(key="upload").upload("a.png", png_bytes(grey_image(32, 32)), "image/png")
    at.file_uploader(key="upload2").upload("b.png", png_bytes(grey_image(48, 32, red_cell=(1, 1))), "image/png")
    at.text_input(key="upload_text").set_value("there is a red cat")
    at.button(key="run_upload").click().run()
    assert not at.exception and not at.error, at.error
    assert len(at.tabs) == 2 and len(heatmap_specs(at)) == 2
    assert any(m.value.startswith("**Prediction:** ") for m in at.markdown)


def test_a_link_cannot_name_a_local_model_folder():
    at = open_page(RUNNER, {"model": "/etc", "ex": "easy_vqa/test/1"})
    assert not at.exception and not at.error
    assert any("links can name hub ids only" in w.value for w in at.sidebar.warning)
    assert at.query_params["model"] == "demo"
