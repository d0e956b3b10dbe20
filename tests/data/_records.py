"""Tiny records in the real VCR / WebQA / VQAv2 schemas, with images drawn on the fly."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

RED, GREEN, BLUE, GREY = (220, 20, 20), (20, 200, 20), (20, 20, 220), (128, 128, 128)

VCR_OBJECTS = ["person", "person", "car", "person"]
# Boxes on an 80x60 image, [x1, y1, x2, y2, score], one per object.
VCR_BOXES = [[4, 6, 24, 50, 0.99], [30, 8, 50, 52, 0.98], [52, 30, 76, 56, 0.9], [60, 2, 78, 20, 0.8]]
VCR_RECORD = {
    "movie": "0001_Test_Movie",
    "objects": VCR_OBJECTS,
    "img_fn": "lsmdc_0001_Test_Movie/still@0.jpg",
    "metadata_fn": "lsmdc_0001_Test_Movie/still@0.json",
    "question": ["Are", [0, 1], "friends", "?"],
    "answer_choices": [
        ["Yes", ",", [0], "smiles", "at", [1], "."],
        ["No", ",", [3], "is", "alone", "."],
        ["Maybe", "."],
        [[2], "is", "red", "and", [0, 1, 3], "ignore", "it", "."],
    ],
    "answer_label": 0,
    "rationale_choices": [
        [[0], "'s", "hand", "is", "on", [1], "'s", "shoulder", "."],
        [[3], "looks", "away", "."],
        ["They", "are", "strangers", "."],
        [[2], "is", "parked", "."],
    ],
    "rationale_label": 0,
    "annot_id": "val-7",
    "img_id": "val-3",
}

# VCR's own tokenisation of contractions and possessives: the apostrophe is a token of its own ("she", "'",
# "ll"; [0], "'", "s"), as in 88 of the 159 lines of one real validation file.
VCR_CONTRACTIONS_RECORD = {
    **VCR_RECORD,
    "annot_id": "val-8",
    "question": ["What", "is", [0], "'", "s", "job", "?"],
    "answer_choices": [
        ["She", "'", "ll", "leave", "soon", "."],
        ["She", "'", "s", "a", "nurse", "at", "the", "nurses", "'", "station", "."],
        [[0], "'", "s", "clothing", "is", "a", "uniform", "."],
        [[0, 1], "don", "'", "t", "work", "here", "."],
    ],
    "rationale_choices": [
        ["They", "'", "re", "in", "a", "hospital", "and", "she", "'", "d", "wear", "a", "badge", "."],
        ["I", "'", "m", "sure", "we", "'", "ve", "seen", [1], "'", "s", "badge", "."],
        [[3], "looks", "away", "."],
        [[2], "is", "parked", "."],
    ],
}


def solid(size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = RED) -> Image.Image:
    """A one-colour RGB image."""
    return Image.new("RGB", size, colour)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def vcr_image() -> Image.Image:
    """80x60 grey image with each VCR box filled in its own colour (object 0 red, 1 green, 2 blue)."""
    image = solid((80, 60), GREY)
    draw = ImageDraw.Draw(image)
    for box, colour in zip(VCR_BOXES, (RED, GREEN, BLUE, (240, 240, 0))):
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=colour)
    return image


def write_vcr(root: Path, record: dict | None = None, metadata: dict | None = None, image: bool = True) -> Path:
    """Write ``val.jsonl`` and ``vcr1images/`` under ``root``; returns ``root``."""
    record = dict(record or VCR_RECORD)
    (root / "val.jsonl").write_text(json.dumps(record) + "\n")
    images = root / "vcr1images"
    (images / record["img_fn"]).parent.mkdir(parents=True, exist_ok=True)
    if metadata is None:
        metadata = {
            "boxes": VCR_BOXES,
            "segms": [[] for _ in VCR_BOXES],
            "names": VCR_OBJECTS,
            "width": 80,
            "height": 60,
        }
    (images / record["metadata_fn"]).write_text(json.dumps(metadata))
    if image:
        vcr_image().save(images / record["img_fn"], format="JPEG", quality=95)
    return root


def webqa_record(guid: str = "g1") -> dict:
    """One record in the official WebQA schema (quotes kept, as WebQA stores them)."""

    def fact(image_id: int, title: str) -> dict:
        return {
            "image_id": image_id,
            "title": title,
            "caption": f"{title} caption",
            "url": f"https://x/{image_id}",
            "imgUrl": f"https://img/{image_id}.jpg",
        }

    def text(n: int) -> dict:
        return {"title": f"T{n}", "fact": f"fact {n}", "url": f"https://w/{n}", "snippet_id": f"{guid}_{n}"}

    return {
        "Q": '"What colour is the frog\'s belly?"',
        "A": ['"The belly is white."'],
        "Qcate": "color",
        "split": "val",
        "topic": "frog",
        "Guid": guid,
        "img_posFacts": [fact(30000001, "Frog A"), fact(30000002, "Frog B")],
        "img_negFacts": [fact(30000000, "Toad")],
        "txt_posFacts": [text(1)],
        "txt_negFacts": [text(2), text(3)],
    }


def webqa_entities_record(guid: str = "g9") -> dict:
    """A WebQA record whose texts carry HTML character references, as real WebQA captions and facts do."""
    record = webqa_record(guid)
    record["Q"] = '"Is Tom &amp; Jerry&#39;s frog &quot;green&quot;?"'
    record["A"] = ['"Yes &ndash; it&#x27;s green &amp; white."']
    record["img_posFacts"][0] = {**record["img_posFacts"][0], "title": "Tom &amp; Jerry",
                                 "caption": "A frog &lt;img src=x onerror=alert(1)&gt; on a leaf &amp; a twig"}
    record["txt_posFacts"][0] = {**record["txt_posFacts"][0], "title": "Frogs &amp; toads",
                                 "fact": "Frogs &quot;croak&quot; at AT&T&#39;s pond; &amp;amp; stays &amp;amp;"}
    return record


def _official_webqa_images() -> dict:
    """The images of `webqa_record`'s facts, by official id (line = id % 10_000_000)."""
    return {"30000000": solid(colour=RED), "30000001": solid(colour=GREEN), "30000002": solid(colour=BLUE)}


def write_imgs_tsv(folder: Path, images: dict[str, Image.Image], lineidx: str = "plain") -> Path:
    """Write ``imgs.tsv`` (``id<TAB>base64`` lines) and its line index; returns the TSV path.

    ``lineidx``: "plain" (offset per line), "new" (``id<TAB>offset``) or "none".
    """
    tsv, offsets, position = folder / "imgs.tsv", [], 0
    with tsv.open("wb") as f:
        for image_id, image in images.items():
            line = f"{image_id}\t".encode() + base64.b64encode(png_bytes(image)) + b"\n"
            offsets.append((image_id, position))
            f.write(line)
            position += len(line)
    if lineidx == "plain":
        (folder / "imgs.lineidx").write_text("".join(f"{o}\n" for _, o in offsets))
    elif lineidx == "new":
        (folder / "imgs.lineidx.new").write_text("".join(f"{i}\t{o}\n" for i, o in offsets))
    return tsv


OFFICIAL_WEBQA_IMAGES = _official_webqa_images()
