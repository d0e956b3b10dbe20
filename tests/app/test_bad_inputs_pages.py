"""Bad input and cache faults on the home, browser and runner pages: a specific message, and the session keeps
working (no exception, the page still renders)."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.app.conftest import heatmap_specs, open_page
from tests.app.test_browser import BROWSER, vqa_parquet
from tests.app.test_run_model import RUNNER, upload
from tests.test_bad_inputs import png_header_only


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def infos(at) -> str:
    return " | ".join(i.value for i in at.info)


# -- runner: images -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, data, note", [
    ("anim.gif", gif_bytes(), "2 frames: the first frame is used"),
    ("print.jpg", encoded(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"), "from CMYK to RGB"),
    ("scan.png", encoded(Image.fromarray(np.full((64, 64), 40000, np.uint16))), "16-bit greyscale"),
    ("strip.png", encoded(Image.new("RGB", (2000, 40), (255, 0, 0))), "padded with white"),
    ("dot.png", encoded(Image.new("RGB", (1, 1), (255, 0, 0))), "tiny 1×1"),
])
def test_converted_uploads_run_and_say_what_changed(name, data, note):
    at = upload(open_page(RUNNER), name, data, "what color is the shape?")
    assert not at.exception and not at.error
    assert note in infos(at) and len(heatmap_specs(at)) == 1
    if name == "anim.gif":
        reopened = open_page(RUNNER, {"ex": at.query_params["ex"]})  # a shared link says it too
        assert note in infos(reopened)


def test_decompression_bomb_upload_is_refused_and_the_page_keeps_working():
    at = upload(open_page(RUNNER), "bomb.png", png_header_only(20_000, 20_000), "what is it?")
    assert not at.exception and "400,000,000 pixels, over the limit of 89,478,485" in at.error[0].value
    assert "ex" not in at.query_params
    at = upload(at, "ok.png", encoded(Image.new("RGB", (64, 64), (0, 0, 255))), "what color is the shape?")
    assert not at.exception and not at.error and at.query_params["ex"].startswith("upload/")


@pytest.mark.parametrize("name, cut, expect", [
    ("photo.png", "half", "photo.png is not a readable image: the PNG data ends early, so the file is truncated"),
    ("notes.png", "text", 'notes.png is not a readable image: it holds text ("my shopping list: eggs, milk'),
], ids=["truncated-png", "text-named-png"])
def test_corrupt_upload_says_what_is_wrong_with_the_file(name, cut, expect):
    whole = encoded(Image.effect_noise((64, 64), 60).convert("RGB"))
    data = whole[: len(whole) // 2] if cut == "half" else b"my shopping list: eggs, milk, bread\n"
    at = upload(open_page(RUNNER), name, data, "what is it?")
    assert not at.exception and len(at.error) == 1
    said = at.error[0].value
    assert said.startswith(expect), said
    assert "BytesIO" not in said and " at 0x" not in said and "use a PNG" not in said
    assert "ex" not in at.query_params


# -- runner: text -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["ما لون الشكل؟", "what color is the 🔺? 👀", "quelle est la forme ? é à ç"])
def test_non_ascii_and_right_to_left_text_runs(text):
    at = upload(open_page(RUNNER), "ok.png", encoded(Image.new("RGB", (64, 64), (255, 0, 0))), text)
    assert not at.exception and not at.error and at.subheader[0].value == text


def test_500_token_text_is_cut_and_said():
    text = " ".join(["what color is the shape"] * 100)
    at = upload(open_page(RUNNER), "ok.png", encoded(Image.new("RGB", (64, 64), (255, 0, 0))), text)
    assert not at.exception and not at.error
    assert any("cut to the model's 40 text positions (502 tokens given)" in w.value for w in at.warning)


# -- runner: models ---------------------------------------------------------------------------------------
def test_out_of_memory_is_one_message_saying_what_to_reduce(monkeypatch):
    from vlcore.models.vilt import ViltAdapter

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ViltAdapter, "forward", oom)
    at = open_page(RUNNER, {"ex": "easy_vqa/test/3"})
    assert not at.exception and len(at.error) == 1
    assert "ran out of memory" in at.error[0].value and "float16" in at.error[0].value
    at.number_input(key="sweep_n").set_value(4).run()
    at.button(key="sweep_start").click().run()
    assert not at.exception
    assert any("The sweep stopped" in e.value and "batch size 1" in e.value for e in at.error)


def test_sweep_that_had_to_shrink_its_batch_says_so(monkeypatch):
    from vlcore.models.vilt import ViltAdapter

    real = ViltAdapter.forward

    def forward(self, batch, *args, **kwargs):
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(ViltAdapter, "forward", forward)
    at = open_page(RUNNER)
    at.number_input(key="sweep_n").set_value(6).run()
    at.button(key="sweep_start").click().run()
    assert not at.exception and not at.error
    assert "the batch size went from 8 to 2" in infos(at)
    assert any("6/6 examples done" in m.value for m in at.markdown)


# -- cache faults on the pages -------------------------------------------------------------------------------
def trace_files():
    from vlcore.storage.store import Store

    return list((Store().root / "traces").glob("*/*.safetensors"))


def test_damaged_cache_entry_is_recomputed_with_a_notice_on_the_runner_and_home():
    open_page(RUNNER, {"ex": "easy_vqa/test/7"})
    open_page()  # home: easy_vqa/test/0
    for path in trace_files():
        path.write_bytes(path.read_bytes()[:500])
    at = open_page(RUNNER, {"ex": "easy_vqa/test/7"})
    assert not at.exception and not at.error and "dropped a damaged cache entry" in infos(at)
    assert any("Computed now" in c.value for c in at.caption)
    home = open_page()
    assert not home.exception and "dropped a damaged cache entry" in infos(home)


def test_full_disk_shows_the_result_and_says_it_was_not_stored(monkeypatch):
    real_replace = os.replace

    def disk_full_for_traces(src, dst, *args, **kwargs):  # a trace is not fsynced: the disk fills before the rename
        if Path(dst).suffix == ".safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", disk_full_for_traces)
    at = open_page(RUNNER, {"ex": "easy_vqa/test/8"})
    assert not at.exception and not at.error and len(heatmap_specs(at)) == 1
    assert "not stored: the disk is full" in infos(at)
    from vlcore.storage.store import Store

    assert [p for p in (Store().root / "traces").rglob("*") if p.is_file()] == []  # no trace, no temp file


# -- browser: datasets -----------------------------------------------------------------------------------------
def test_missing_split_names_the_splits_there_are(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))
    parquet = vqa_parquet(tmp_path / "v.parquet", n=4)
    datasets.DatasetDict(train=datasets.Dataset.from_parquet(str(parquet))).save_to_disk(str(tmp_path / "saved"))
    at = open_page(BROWSER, {"ds": "vqa", "loc": str(tmp_path / "saved"), "split": "validation"})
    assert not at.exception and len(at.error) == 1
    assert "split 'validation' not found" in at.error[0].value and "train" in at.error[0].value


def test_local_path_that_does_not_exist_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))
    at = open_page(BROWSER, {"ds": "vqa", "loc": str(tmp_path / "nope.parquet"), "split": "train"})
    assert not at.exception and len(at.error) == 1 and "local path not found" in at.error[0].value


def test_hub_id_that_does_not_exist_is_named(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def not_found(*args, **kwargs):
        raise DatasetNotFoundError("Dataset 'owner/missing' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    at = open_page(BROWSER, {"ds": "vqa", "loc": "owner/missing", "split": "train"})
    assert not at.exception and len(at.error) == 1
    assert "no dataset 'owner/missing' on the Hugging Face Hub" in at.error[0].value
    at.button(key="to_bundled").click().run()
    assert not at.exception and not at.error and at.query_params["ds"] == "easy_vqa"


def test_browser_says_how_an_opened_image_was_converted(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))
    data = {"question": ["what color?"], "multiple_choice_answer": ["red"], "answer_type": ["other"],
            "question_id": [1], "image": [{"bytes": gif_bytes(), "path": None}]}
    features = datasets.Features({"question": datasets.Value("string"), "multiple_choice_answer": datasets.Value("string"),
                                  "answer_type": datasets.Value("string"), "question_id": datasets.Value("int64"),
                                  "image": datasets.Image(decode=False)})
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "gif.parquet"))
    at = open_page(BROWSER, {"ds": "vqa", "loc": str(tmp_path / "gif.parquet"), "split": "train"})
    at.button(key="open_0").click().run()
    assert not at.exception and not at.error
    assert any("first frame is used" in c.value for c in at.caption)
