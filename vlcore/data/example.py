"""`Example`: the one record every dataset adapter produces and every page reads."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vlcore.errors import InputError

# PIL's decompression-bomb guard stays on; images over this many pixels are refused.
Image.MAX_IMAGE_PIXELS = 89_478_485


@dataclass(frozen=True)
class Region:
    """A labelled box on the example's image, in original image pixels ``(x1, y1, x2, y2)``."""

    index: int
    label: str
    box: tuple[float, float, float, float]
    score: float | None = None


@dataclass(frozen=True)
class Fact:
    """A WebQA-style fact: an image with a caption, or a text snippet."""

    kind: str  # "image" or "text"
    title: str
    text: str
    positive: bool
    image_id: str | None = None
    url: str | None = None


@dataclass(frozen=True, eq=False)
class Example:
    """One dataset record, whatever its source.

    Attributes:
        example_id: stable id, ``{source}/{split}/{key}``.
        question: the question or caption, as the model should read it.
        image: the image, or None when it is loaded lazily from ``image_path``.
        image_path: a file to read the image from when ``image`` is None.
        answers: gold answer strings (VQA), empty when unknown.
        answer_choices / rationale_choices: VCR-style multiple choice, rendered text.
        answer_label / rationale_label: index of the gold choice, if known.
        regions: labelled boxes (VCR objects).
        facts: WebQA image and text facts.
        category: question category (WebQA ``Qcate``, VQAv2 ``answer_type``, ...).
        source: adapter name ("easy_vqa", "vcr", "webqa", "vqa", "generic", "upload").
        meta: source metadata, JSON-able.
        extra_images: further images (NLVR2's second image): PIL images, paths or loaders.
        image_loader: for sources read lazily (WebQA ``imgs.tsv``, undecoded hub bytes), a callable
            returning the image when ``image`` is None; it raises `InputError` when it cannot.
    """

    example_id: str
    question: str
    image: Image.Image | None = None
    image_path: str | None = None
    answers: tuple[str, ...] = ()
    answer_choices: tuple[str, ...] = ()
    rationale_choices: tuple[str, ...] = ()
    answer_label: int | None = None
    rationale_label: int | None = None
    regions: tuple[Region, ...] = ()
    facts: tuple[Fact, ...] = ()
    category: str | None = None
    source: str = "generic"
    meta: dict = field(default_factory=dict)
    image_loader: Callable[[], Image.Image] | None = field(default=None, repr=False, compare=False)
    extra_images: tuple = field(default=(), repr=False, compare=False)

    def load_image(self) -> Image.Image:
        """The example's image as RGB, EXIF rotation applied.

        Raises:
            InputError: no image, a missing file, or a file PIL cannot read.
        """
        if self.image is not None:
            return to_rgb(self.image)
        if self.image_loader is not None:
            return to_rgb(self.image_loader())
        if not self.image_path:
            raise InputError(f"example {self.example_id} has no image; pick another example or add an image")
        return open_image(self.image_path)

    def load_images(self) -> list[Image.Image]:
        """Every image of the example: the main one, then ``extra_images`` (NLVR2's right image).

        Each extra image is a PIL image, a file path, or a callable returning an image.
        """
        images = [self.load_image()]
        for extra in self.extra_images:
            if isinstance(extra, Image.Image):
                images.append(to_rgb(extra))
            elif callable(extra):
                images.append(to_rgb(extra()))
            else:
                images.append(open_image(extra))
        return images

    def content_hash(self) -> str:
        """sha256 over the pixels, the text and the gold answers: the store's example key."""
        return content_hash(self.load_image(), self.question, self.answers)


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation, take the first frame, and convert any mode to RGB."""
    image = ImageOps.exif_transpose(image) or image
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max() or 1.0
        image = Image.fromarray(np.uint8(np.clip(arr / top * 255.0, 0, 255)), mode="L")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def open_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB.

    Only files inside a data root (`vlcore.data.paths.data_roots`) are read: dataset rows and
    links cannot point at arbitrary local files.

    Raises:
        InputError: the file is outside the data roots, missing, empty, not an image, or larger
            than PIL's pixel limit.
    """
    from vlcore.data.paths import check_local_file

    path = check_local_file(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path.name}")
    return open_image_bytes(path.read_bytes(), path.name)


def open_image_bytes(data: bytes, name: str = "upload") -> Image.Image:
    """Open an uploaded image from its bytes as RGB (see `open_image` for the errors)."""
    import io

    if not data:
        raise InputError(f"{name} is empty (0 bytes); choose an image file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb(im)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{name} is too large to open safely ({exc}); resize it below 89 megapixels") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{name} is not a readable image ({exc}); use a PNG, JPEG, GIF or WebP file") from exc


def content_hash(image: Image.Image, text: str, answers: tuple[str, ...] = ()) -> str:
    """sha256 hex of an image's size, mode and pixels plus the text and answers."""
    digest = hashlib.sha256()
    digest.update(f"{image.size}|{image.mode}|".encode())
    digest.update(np.asarray(image).tobytes())
    digest.update(b"\x00" + text.encode("utf-8"))
    digest.update(b"\x00" + "\x1f".join(answers).encode("utf-8"))
    return digest.hexdigest()
