"""An image file that cannot be decoded gets a message saying what the file is and what to do (issue 14, 4.10)."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from vlcore.data.example import open_image, open_image_bytes, sniff_format
from vlcore.data.webqa import WebQAImages
from vlcore.errors import InputError


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


NOISE = Image.effect_noise((64, 64), 60).convert("RGB")  # incompressible, so half a file is half the pixels
PNG, JPEG = encoded(NOISE, "PNG"), encoded(NOISE, "JPEG")


def message(data: bytes, name: str) -> str:
    with pytest.raises(InputError) as err:
        open_image_bytes(data, name)
    text = str(err.value)
    assert "BytesIO" not in text and not re.search(r"0x[0-9a-f]{6,}", text)  # no Python object reprs
    return text


@pytest.mark.parametrize("data, name, expect", [
    (PNG[: len(PNG) // 2], "photo.png", (f"photo.png is not a readable image: the PNG data ends early, so the file is "
                                         f"truncated ({len(PNG) // 2:,} bytes). Export or download it again.")),
    (PNG[:60], "photo.png", "the PNG data ends early, so the file is truncated (60 bytes)"),
    (JPEG[:300], "holiday.jpg", "the JPEG data ends early, so the file is truncated (300 bytes)"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "photo.png", "its PNG data is damaged"),
], ids=["png-half", "png-60-bytes", "jpeg-300-bytes", "png-zeroed-header"])
def test_a_damaged_image_says_it_is_damaged_and_not_to_use_another_format(data, name, expect):
    text = message(data, name)
    assert expect in text
    assert "use a PNG" not in text and "Choose a PNG" not in text  # it is a PNG (or JPEG): re-export, not re-format


@pytest.mark.parametrize("data, expect", [
    (b"just some notes, not pixels\n", ('notes.png is not a readable image: it holds text ("just some notes, not '
                                        'pixels"), not image data. Choose a PNG, JPEG, GIF, WebP or BMP file.')),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "notes.png is not a readable image: it is a PDF document."),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "it is a HEIC photo. Convert it to a PNG, JPEG, GIF, WebP or BMP"),
    (bytes(range(200, 256)), "it holds bytes c8 c9 ca cb cc cd ce cf …, not image data"),
], ids=["text", "pdf", "heic", "binary"])
def test_a_file_that_is_no_image_says_what_it_is(data, expect):
    assert expect in message(data, "notes.png")


def test_every_readable_format_is_recognised_by_its_first_bytes():
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    for fmt, label in (("PNG", "PNG"), ("JPEG", "JPEG"), ("GIF", "GIF"), ("WEBP", "WebP"), ("BMP", "BMP"),
                       ("TIFF", "TIFF")):
        data = encoded(image, fmt)
        assert sniff_format(data) == (label, True)
        assert open_image_bytes(data, f"x.{fmt.lower()}").size == (8, 8)  # and PIL does read it


def test_files_on_disk_and_webqa_tsv_lines_get_the_same_message(tmp_path, monkeypatch):
    import base64

    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))
    (tmp_path / "cut.png").write_bytes(PNG[:100])
    with pytest.raises(InputError, match=re.escape("cut.png is not a readable image: the PNG data ends early")):
        open_image(tmp_path / "cut.png")
    (tmp_path / "imgs.tsv").write_bytes(b"30000000\t" + base64.b64encode(b"<html>not found</html>") + b"\n")
    (tmp_path / "imgs.lineidx").write_text("0\n")
    with pytest.raises(InputError, match=re.escape('WebQA image 30000000 is not a readable image: it holds text '
                                                   '("<html>not found</html>")')):
        WebQAImages(tmp_path / "imgs.tsv").load("30000000")
