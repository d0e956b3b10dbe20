"""The browser's caches are keyed on the dataset's version, not its path: a file rewritten under the same path
is shown as it is now (issue 14, item 3: UI caches keyed on names)."""

from __future__ import annotations

import os

from tests.app.conftest import open_page
from tests.app.test_browser import BROWSER, vqa_parquet


def rewrite(make, path) -> None:
    """Build a new version of ``path`` beside it and move it over (same path, new content)."""
    tmp = make(path.with_name("next-" + path.name))
    os.replace(tmp, path)


def test_a_dataset_rewritten_under_the_same_path_is_indexed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))
    path = vqa_parquet(tmp_path / "vqa.parquet", n=30)
    at = open_page(BROWSER, {"ds": "vqa", "loc": str(path), "split": "train"})
    assert not at.exception and any(c.value.endswith("30 of 30 examples match.") for c in at.caption)
    rewrite(lambda p: vqa_parquet(p, n=7), path)
    at.run()  # the same session, the same URL: the new file, not the cached index of the old one
    assert not at.exception and not at.error
    assert any(c.value.endswith("7 of 7 examples match.") for c in at.caption)
    assert len([b for b in at.button if b.key and b.key.startswith("open_")]) == 7


def test_an_image_replaced_under_the_same_path_gets_a_new_thumbnail(tmp_path, monkeypatch):
    from PIL import Image

    from tests.data._records import VCR_RECORD, write_vcr

    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))
    write_vcr(tmp_path)
    at = open_page(BROWSER, {"ds": "vcr", "loc": str(tmp_path), "split": "val", "img": str(tmp_path / "vcr1images")})
    assert not at.exception and not at.error, at.error
    before = at.get("image")[0].proto.imgs[0].url
    image = tmp_path / "vcr1images" / VCR_RECORD["img_fn"]
    Image.new("RGB", (80, 60), (0, 0, 0)).save(image.with_name("next.jpg"), format="JPEG")
    os.replace(image.with_name("next.jpg"), image)
    at.run()
    assert not at.exception and at.get("image")[0].proto.imgs[0].url != before
