"""Bad input in the core: broken and odd images, odd text, out-of-memory. Each gives a specific message or a
stated conversion (`image_notes`), never a traceback."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import vlcore.data.example as example_mod
from vlcore.data.example import (MAX_ASPECT_RATIO, Example, image_notes, open_image, open_image_bytes, to_rgb)
from vlcore.errors import DeviceMemoryError, InputError
from vlcore.run.extract import extract_trace, trace_for_example
from vlcore.run.sweep import run_sweep
from vlcore.storage.sweeps import load_sweep
from vlcore.storage.store import Store


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` grey pixels, with a few bytes of data: a bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


# -- unreadable files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    (b"", "empty (0 bytes)"),
    (b"just some notes, not pixels\n", "not a readable image"),
    (encoded(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], "not a readable image"),  # cut mid-stream
])
def test_unreadable_bytes_are_input_errors(data, message):
    with pytest.raises(InputError, match=re.escape(message)):
        open_image_bytes(data, "photo.png")


def test_corrupt_and_text_files_named_png_on_disk(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="notes.png is not a readable image"):
        open_image(tmp_path / "notes.png")
    with pytest.raises(InputError, match="empty.png is empty"):
        Example("x", "q", image_path=str(tmp_path / "empty.png")).load_image()


def test_decompression_bomb_is_refused_with_pixel_count_and_limit():
    with pytest.raises(InputError) as err:
        open_image_bytes(png_header_only(20_000, 20_000), "bomb.png")
    assert "400,000,000 pixels" in str(err.value) and "89,478,485" in str(err.value)


def test_image_between_the_limit_and_twice_it_is_refused_not_just_warned(monkeypatch):
    monkeypatch.setattr(example_mod, "MAX_IMAGE_PIXELS", 10_000)  # PIL only warns between 1x and 2x the limit
    try:
        with pytest.raises(InputError, match="15,000 pixels, over the limit of 10,000"):
            open_image_bytes(encoded(Image.new("L", (150, 100))), "big.png")
    finally:
        Image.MAX_IMAGE_PIXELS = example_mod.MAX_IMAGE_PIXELS = 89_478_485
    assert open_image_bytes(encoded(Image.new("L", (150, 100)))).size == (150, 100)


def test_oversized_upload_is_refused_before_decoding(monkeypatch, tmp_path):
    monkeypatch.setattr(example_mod, "MAX_IMAGE_BYTES", 1000)
    data = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(InputError, match="over 0 MB are refused"):
        open_image_bytes(data, "huge.png")
    (tmp_path / "huge.png").write_bytes(data)
    with pytest.raises(InputError, match="huge.png is"):
        open_image(tmp_path / "huge.png")


# -- modes and odd shapes -------------------------------------------------------------------------------
def test_palette_with_transparency_composites_on_white_and_says_so():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((0, 0), 1)
    im.info["transparency"] = 1  # palette index 1 (blue) is transparent
    out = open_image_bytes(encoded(im))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)
    assert any("composited on white" in n for n in image_notes(out))


def test_rgba_half_transparent_red_becomes_pink_on_white():
    out = open_image_bytes(encoded(Image.new("RGBA", (4, 4), (255, 0, 0, 128))))
    assert out.getpixel((0, 0)) == (255, 127, 127)
    assert "composited on white" in " ".join(image_notes(out))
    opaque = open_image_bytes(encoded(Image.new("RGBA", (40, 40), (255, 0, 0, 255))))
    assert image_notes(opaque) == ()  # nothing to say when nothing is transparent


def test_cmyk_is_converted_and_said():
    out = open_image_bytes(encoded(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"))
    r, g, b = out.getpixel((5, 5))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60
    assert any("CMYK" in n for n in image_notes(out))


def test_16_bit_grey_is_scaled_not_clipped_to_white():
    arr = np.array([[0, 257 * 64, 32896, 65535]], dtype=np.uint16).repeat(40, 0).repeat(10, 1)
    im = Image.fromarray(arr)  # mode I;16
    assert im.mode.startswith("I;16")
    out = open_image_bytes(encoded(im))  # through a 16-bit PNG
    row = np.asarray(out)[0, ::10, 0]
    assert row.tolist() == [0, 64, 128, 255]
    assert any("16-bit" in n for n in image_notes(out))


def test_animated_gif_uses_the_first_frame_and_says_so():
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    out = open_image_bytes(buf.getvalue(), "anim.gif")
    assert out.getpixel((0, 0))[0] > 200 and out.getpixel((0, 0))[2] < 50
    assert "3 frames: the first frame is used" in " ".join(image_notes(out))


def test_exif_rotation_is_honoured():
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    out = open_image_bytes(encoded(im, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)  # upright: portrait
    assert np.asarray(out)[2, 10, 0] > 200  # the red half is now on top
    assert any("EXIF orientation (6)" in n for n in image_notes(out))


def test_plain_rgb_image_has_no_notes_and_is_not_copied():
    im = Image.new("RGB", (40, 40), (1, 2, 3))
    assert to_rgb(im) is im and image_notes(im) == ()


def test_one_pixel_image_runs_upscaled(tiny_adapter):
    image = open_image_bytes(encoded(Image.new("RGB", (1, 1), (255, 0, 0))))
    assert any("tiny 1×1" in n for n in image_notes(image))
    trace = extract_trace(tiny_adapter, image, "what is the color?", "one")
    assert trace.grid == (4, 4) and trace.image.shape == (32, 32, 3)  # shorter side -> 32, patch 8
    assert (trace.image[..., 0] > 200).all()


@pytest.mark.parametrize("size", [(10_000, 200), (200, 10_000)])
def test_extreme_strip_is_padded_so_the_model_sees_a_row_of_patches(size):
    from vlcore.models.registry import load_adapter

    image = open_image_bytes(encoded(Image.new("RGB", size, (200, 0, 0))), "strip.png")
    w, h = image.size
    assert max(w, h) / min(w, h) <= MAX_ASPECT_RATIO and max(w, h) == 10_000
    assert any("padded with white" in n for n in image_notes(image))
    demo = load_adapter("demo", device="cpu")  # shortest edge 64, longer edge capped at 106, divisor 8
    trace = extract_trace(demo, image, "what color is the shape?", "strip")
    assert min(trace.grid) == 1 and max(trace.grid) == 13


def test_processor_alone_fails_on_the_strip_which_is_why_it_is_padded():
    from transformers import ViltImageProcessorPil

    with pytest.raises(ValueError):  # ViLT-B/32 settings: 384 short side, 639 cap -> height rounds to 0
        ViltImageProcessorPil()(Image.new("RGB", (10_000, 200)), return_tensors="pt")
    out = ViltImageProcessorPil()(to_rgb(Image.new("RGB", (10_000, 200))), return_tensors="pt")
    assert out["pixel_values"].shape[-2:] == (32, 608)  # one row of 19 patches of 32 px


def test_input_notes_of_an_example_and_an_upload(tmp_path):
    from vlcore.storage.uploads import get_input, put_input

    gif = io.BytesIO()
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    (tmp_path / "a.gif").write_bytes(gif.getvalue())
    ex = Example("x", "q", image_path=str(tmp_path / "a.gif"))
    assert ex.input_notes() == ("an animated image with 2 frames: the first frame is used",)
    store = Store(tmp_path / "store")
    input_id = put_input(store, open_image_bytes(gif.getvalue()), "what color?")
    again = get_input(store, input_id)  # the stored PNG is plain; the notes come from the upload
    assert again.input_notes() == ex.input_notes()


# -- text ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "   ", "\t\n "])
def test_empty_or_blank_text_is_refused(tiny_adapter, noise_image, text):
    with pytest.raises(InputError, match="text is empty: type a question"):
        trace_for_example(tiny_adapter, Example("x", text, image=noise_image), Store())


def test_500_tokens_are_truncated_and_flagged(tiny_adapter, noise_image):
    text = " ".join(["what", "is", "the", "color", "of", "the", "cat"] * 72)[:-1]  # 504 words
    trace = extract_trace(tiny_adapter, noise_image, text, "long")
    assert trace.text_truncated and trace.meta["n_text_tokens_full"] >= 500
    assert int((trace.modality == 0).sum()) == trace.meta["max_text_len"] == 40


@pytest.mark.parametrize("text", [
    "what colour is the café’s façade?",
    "is there a 🐱 or a 🐶 in the image? 👀",
    "ما لون الشكل؟",  # Arabic, right to left
    "מה הצבע של הצורה?",  # Hebrew, right to left
    "这是什么颜色？",
])
def test_non_ascii_emoji_and_right_to_left_text_run(tiny_adapter, noise_image, text):
    trace = extract_trace(tiny_adapter, noise_image, text, "intl")
    text_tokens = [t for t, m in zip(trace.tokens, trace.modality) if m == 0]
    assert text_tokens[0] == "[CLS]" and text_tokens[-1] == "[SEP]" and len(text_tokens) >= 3
    assert trace.text == text and np.isfinite(trace.attentions.astype(np.float32)).all()


def test_right_to_left_text_on_the_demo_vocabulary_keeps_known_words():
    from vlcore.models.registry import load_adapter

    demo = load_adapter("demo", device="cpu")
    trace = extract_trace(demo, Image.new("RGB", (64, 64), (255, 0, 0)), "what color ما لون 🐱?", "mixed")
    tokens = [t for t, m in zip(trace.tokens, trace.modality) if m == 0]
    assert tokens[1:3] == ["what", "color"] and "[UNK]" in tokens


# -- out of memory ------------------------------------------------------------------------------------
def _oom_forward(adapter, fail_above: int = 0, calls: list | None = None, error=None):
    """Make ``adapter.forward`` raise out-of-memory for batches larger than ``fail_above``."""
    real = adapter.forward

    def forward(batch, *args, **kwargs):
        if calls is not None:
            calls.append(len(batch))
        if len(batch) > fail_above:
            raise error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch, *args, **kwargs)

    adapter.forward = forward


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 123456789 bytes"),
    MemoryError(),
])
def test_out_of_memory_on_one_example_says_what_to_reduce(tiny_adapter, noise_image, error):
    _oom_forward(tiny_adapter, error=error)
    store = Store()
    with pytest.raises(DeviceMemoryError) as err:
        trace_for_example(tiny_adapter, Example("x", "what is it?", image=noise_image), store)
    message = str(err.value)
    assert "out of memory" in message and "image" in message and "float16" in message
    assert not list(store.root.glob("traces/*/*.safetensors"))  # nothing half-stored


def test_other_runtime_errors_are_not_mistaken_for_out_of_memory(tiny_adapter, noise_image):
    _oom_forward(tiny_adapter, error=RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        trace_for_example(tiny_adapter, Example("x", "what is it?", image=noise_image), Store())


def _examples(n: int) -> list[Example]:
    rng = np.random.default_rng(1)
    return [Example(f"m/{i}", "what is the color?", image=Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                    answers=("red",)) for i in range(n)]


def test_sweep_halves_the_batch_on_out_of_memory_and_reports_it(tiny_adapter, tmp_path):
    exs = _examples(10)
    reference = load_sweep(run_sweep(tiny_adapter, exs, tmp_path / "ref", batch_size=8))
    calls: list[int] = []
    _oom_forward(tiny_adapter, fail_above=2, calls=calls)
    out = run_sweep(tiny_adapter, exs, tmp_path / "oom", batch_size=8)
    assert calls[:3] == [8, 4, 2]  # 8 failed, 4 failed, 2 fits, and 2 stays
    assert max(c for c in calls[3:]) == 2
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["batch_size"] == 2
    assert any("batch size went from 8 to 2" in n for n in manifest["notices"])
    preds, heads = load_sweep(out)
    assert preds["example_id"].tolist() == reference[0]["example_id"].tolist()
    assert np.allclose(heads["value"].to_numpy(), reference[1]["value"].to_numpy(), atol=1e-5)


def test_sweep_out_of_memory_at_batch_one_keeps_finished_work_and_says_what_to_reduce(tiny_adapter, tmp_path):
    exs = _examples(6)
    real = tiny_adapter.forward
    seen: list[int] = []

    def forward(batch, *args, **kwargs):
        seen.append(len(batch))
        if len(seen) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(batch, *args, **kwargs)

    tiny_adapter.forward = forward
    with pytest.raises(DeviceMemoryError, match="batch size 1"):
        run_sweep(tiny_adapter, exs, tmp_path / "s", batch_size=3)
    preds, _ = load_sweep(tmp_path / "s")
    assert len(preds) == 3  # the first batch is kept; the next start resumes after it
    tiny_adapter.forward = real
    run_sweep(tiny_adapter, exs, tmp_path / "s", batch_size=3)
    assert len(load_sweep(tmp_path / "s")[0]) == 6


# -- the command line ------------------------------------------------------------------------------------
def _cli(argv, capsys) -> tuple[int, list[str]]:
    from vlcore.cli import main

    code = main(argv)
    err = capsys.readouterr().err.replace("\r", "\n")
    err = re.sub(r"extract:[^\n]*?ex/s\]", "", err)  # tqdm's progress bar shares stderr
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("image, text, out, message", [
    ("notes.png", "what is it?", "t.safetensors", "notes.png is not a readable image"),
    ("empty.png", "what is it?", "t.safetensors", "empty.png is empty (0 bytes)"),
    ("bomb.png", "what is it?", "t.safetensors", "400,000,000 pixels, over the limit of 89,478,485"),
    ("ok.png", "   ", "t.safetensors", "the text is empty"),
    ("ok.png", "what is it?", "/proc/no-such/t.safetensors", "could not write t.safetensors"),
])
def test_cli_bad_images_text_and_paths_are_one_line_and_exit_2(tmp_path, capsys, image, text, out, message):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(png_header_only(20_000, 20_000))
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "ok.png")
    out_path = out if out.startswith("/") else str(tmp_path / out)
    code, lines = _cli(["trace", "--image", str(tmp_path / image), "--text", text, "--out", out_path], capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_cli_unwritable_sweep_folder_and_out_of_memory_are_one_line(tmp_path, capsys, monkeypatch):
    code, lines = _cli(["extract", "--limit", "2", "--out", "/proc/no-such-dir/sweep"], capsys)
    assert code == 2 and len(lines) == 1 and "/proc/no-such-dir" in lines[0]
    from vlcore.models.vilt import ViltAdapter

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ViltAdapter, "forward", oom)
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    code, lines = _cli(["trace", "--image", str(tmp_path / "ok.png"), "--text", "what?", "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and len(lines) == 1 and "ran out of memory" in lines[0]
    code, lines = _cli(["extract", "--limit", "2", "--out", str(tmp_path / "sweep")], capsys)
    assert code == 2 and len(lines) == 1 and "ran out of memory" in lines[0] and "batch size 1" in lines[0]
