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

    def input_notes(self) -> tuple[str, ...]:
        """What loading changed on the example's images (`image_notes`: frames, rotation, modes,
        padding), after notes kept with an upload (``meta["image_notes"]``). Loads the images.

        Raises:
            InputError: as `load_images`.
        """
        notes = list(self.meta.get("image_notes", ()))
        images = self.load_images()
        for k, image in enumerate(images):
            prefix = f"image {k + 1}: " if len(images) > 1 else ""
            notes += [prefix + n for n in image_notes(image) if prefix + n not in notes]
        return tuple(notes)


# The most pixels PIL may decode (its own default, stated here so that it is never switched off), and the
# largest image file or upload read at all.
MAX_IMAGE_PIXELS = 89_478_485
MAX_IMAGE_BYTES = 50 * 1024**2
# The widest aspect ratio handed to a model. ViLT's processor scales the shorter side to
# ``shortest_edge`` (384) but caps the longer side at 1333/800 of that (639 px) and rounds both down to
# ``size_divisor`` (32): past about 20:1 the shorter side rounds to 0 and the processor fails. Wider
# images are padded with white to 12:1, which keeps at least one row of patches for every ViLT setting.
MAX_ASPECT_RATIO = 12.0
TINY_SIDE = 32
_NOTES = "vlscope_notes"


def image_notes(image: Image.Image) -> tuple[str, ...]:
    """What `to_rgb` changed on the way in (rotation, frames, modes, padding), for the UI to show."""
    return tuple(image.info.get(_NOTES, ()))


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as the model should read it, each change recorded for `image_notes`.

    In order: the first frame of an animation; EXIF orientation applied; 16-bit and 32-bit grey
    scaled to 8 bits (not clipped); transparency composited on white; any mode (palette, CMYK, ...)
    converted to RGB; an aspect ratio past `MAX_ASPECT_RATIO` padded with white (centred).

    >>> image_notes(to_rgb(Image.new("I;16", (4, 4), 65535)))[0]
    '16-bit greyscale scaled to 8 bits (÷257)'
    """
    original, notes = image, []
    n_frames = getattr(image, "n_frames", 1)
    if n_frames > 1:
        image.seek(0)
        notes.append(f"an animated image with {n_frames} frames: the first frame is used")
    orientation = image.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        image = ImageOps.exif_transpose(image) or image
        notes.append(f"rotated upright from its EXIF orientation ({orientation})")
    image = _grey_to_8bit(image, notes)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("transparent pixels were composited on white")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if image.mode != "RGB":
        if image.mode == "CMYK":
            notes.append("converted from CMYK to RGB without a colour profile: colours may shift")
        image = image.convert("RGB")
    image = _pad_aspect(image, notes)
    if min(image.size) < TINY_SIDE:
        notes.append(f"a tiny {image.width}×{image.height} image: the model's processor enlarges it, "
                     "so each patch shows a few enlarged pixels")
    if notes:
        image = image.copy() if image is original else image
        image.info[_NOTES] = tuple(notes)
    return image


def _grey_to_8bit(image: Image.Image, notes: list[str]) -> Image.Image:
    """16-bit grey divided by 257 (65535 -> 255); 32-bit integer or float grey stretched min..max."""
    if image.mode.startswith("I;16"):
        arr = np.asarray(image, dtype=np.float64) / 257.0
        notes.append("16-bit greyscale scaled to 8 bits (÷257)")
    elif image.mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / ((hi - lo) or 1.0) * 255.0
        notes.append(f"{'32-bit integer' if image.mode == 'I' else 'floating-point'} greyscale stretched "
                     f"from {lo:g}..{hi:g} to 0..255")
    else:
        return image
    return Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), mode="L")


def _pad_aspect(image: Image.Image, notes: list[str]) -> Image.Image:
    """Pad an image wider (or taller) than `MAX_ASPECT_RATIO` with white, centred."""
    w, h = image.size
    if max(w, h) <= MAX_ASPECT_RATIO * min(w, h):
        return image
    size = (w, int(np.ceil(w / MAX_ASPECT_RATIO))) if w > h else (int(np.ceil(h / MAX_ASPECT_RATIO)), h)
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(image, ((size[0] - w) // 2, (size[1] - h) // 2))
    notes.append(f"a {w}×{h} image is narrower than {MAX_ASPECT_RATIO:g}:1: padded with white to "
                 f"{size[0]}×{size[1]} so that the model sees at least one row of patches")
    return canvas


def open_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB.

    Only files inside a data root (`vlcore.data.paths.data_roots`) are read: dataset rows and
    links cannot point at arbitrary local files.

    Raises:
        InputError: the file is outside the data roots, missing, empty, over `MAX_IMAGE_BYTES`, not an
            image, or over PIL's pixel limit.
    """
    from vlcore.data.paths import check_local_file

    path = check_local_file(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path.name}")
    _check_bytes(path.stat().st_size, path.name)
    return open_image_bytes(path.read_bytes(), path.name)


def _check_bytes(n_bytes: int, name: str) -> None:
    if n_bytes > MAX_IMAGE_BYTES:
        raise InputError(f"{name} is {n_bytes / 2**20:.1f} MB; images over {MAX_IMAGE_BYTES // 2**20} MB are "
                         "refused. Resize or recompress it.")


def open_image_bytes(data: bytes, name: str = "upload") -> Image.Image:
    """Open an uploaded image from its bytes as RGB (see `open_image` for the errors; `to_rgb` for the
    conversions, which `image_notes` lists)."""
    import io
    import warnings

    if not data:
        raise InputError(f"{name} is empty (0 bytes); choose an image file")
    _check_bytes(len(data), name)
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refuse, not warn
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                out = to_rgb(im)
                return out.copy() if out is im else out  # a plain image, detached from the closed file
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(_bomb_message(name, exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(unreadable_image_message(name, data, exc)) from exc


# Leading bytes of the image formats PIL reads, and of files often picked by mistake: (magic, label, readable).
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG", True),
    (b"\xff\xd8\xff", "JPEG", True),
    (b"GIF87a", "GIF", True),
    (b"GIF89a", "GIF", True),
    (b"BM", "BMP", True),
    (b"II*\x00", "TIFF", True),
    (b"MM\x00*", "TIFF", True),
    (b"%PDF", "PDF document", False),
    (b"PK\x03\x04", "ZIP archive (or an Office document)", False),
    (b"\x1f\x8b", "gzip archive", False),
)
IMAGE_FILE_TYPES = "PNG, JPEG, GIF, WebP or BMP"


def sniff_format(data: bytes) -> tuple[str, bool] | None:
    r"""What a file's first bytes say it is: ``(label, PIL reads this format)``, or None when they match nothing.

    >>> sniff_format(b"\x89PNG\r\n\x1a\n..."), sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 "), sniff_format(b"%PDF-1.7")
    (('PNG', True), ('WebP', True), ('PDF document', False))
    >>> sniff_format(b"\x00\x00\x00\x18ftypheic"), sniff_format(b"hello")
    (('HEIC photo', False), None)
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP", True
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"avif"):
        return ("AVIF photo" if data[8:12] == b"avif" else "HEIC photo"), False
    return next(((label, readable) for magic, label, readable in SIGNATURES if data.startswith(magic)), None)


def _first_bytes(data: bytes) -> str:
    r"""The start of a file, as quoted text when it is text, else as hex bytes.

    >>> _first_bytes(b"just some notes,\nnot pixels at all, or ever"), _first_bytes(bytes(range(10)))
    ('text ("just some notes, not pixels at a …")', 'bytes 00 01 02 03 04 05 06 07 …')
    """
    import codecs

    head = data[:32]
    try:  # a character cut at the 32nd byte is left out, not taken for binary
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        text = ""
    if text.strip() and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f'text ("{" ".join(text.split())}{" …" if len(data) > len(head) else ""}")'
    return "bytes " + " ".join(f"{b:02x}" for b in data[:8]) + (" …" if len(data) > 8 else "")


def unreadable_image_message(name: str, data: bytes, exc: Exception) -> str:
    r"""Why ``data`` (the file ``name``) could not be decoded, in one line: what the file is and what to do.

    A file in an image format whose data fails is damaged or truncated (export it again); anything else is no
    image at all, and its first bytes are named (a text file or a PDF saved as ``.png`` shows as what it is).

    >>> unreadable_image_message("photo.png", b"\x89PNG\r\n\x1a\n" + bytes(40), OSError("image file is truncated"))
    'photo.png is not a readable image: the PNG data ends early, so the file is truncated (48 bytes). Export or download it again.'
    >>> unreadable_image_message("notes.png", b"just some notes", OSError("cannot identify image file <_io.BytesIO>"))
    'notes.png is not a readable image: it holds text ("just some notes"), not image data. Choose a PNG, JPEG, GIF, WebP or BMP file.'
    """
    import re

    found = sniff_format(data)
    detail = re.sub(r"\s*<_io\.BytesIO[^>]*>", "", str(exc)).strip()
    if found and found[1]:
        if "truncat" in detail.lower() or isinstance(exc, EOFError):
            what = f"the {found[0]} data ends early, so the file is truncated ({len(data):,} bytes)"
        else:
            why = "no decoder accepts it" if detail.startswith("cannot identify") else detail or type(exc).__name__
            what = f"its {found[0]} data is damaged ({why})"
        return f"{name} is not a readable image: {what}. Export or download it again."
    if found:
        return f"{name} is not a readable image: it is a {found[0]}. Convert it to a {IMAGE_FILE_TYPES} file."
    return f"{name} is not a readable image: it holds {_first_bytes(data)}, not image data. Choose a {IMAGE_FILE_TYPES} file."


def _bomb_message(name: str, exc: Exception) -> str:
    import re

    found = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return (f"{name} has {pixels}, over the limit of {MAX_IMAGE_PIXELS:,} that guards against decompression "
            "bombs; resize it below 89 megapixels")


def content_hash(image: Image.Image, text: str, answers: tuple[str, ...] = ()) -> str:
    """sha256 hex of an image's size, mode and pixels plus the text and answers."""
    digest = hashlib.sha256()
    digest.update(f"{image.size}|{image.mode}|".encode())
    digest.update(np.asarray(image).tobytes())
    digest.update(b"\x00" + text.encode("utf-8"))
    digest.update(b"\x00" + "\x1f".join(answers).encode("utf-8"))
    return digest.hexdigest()
