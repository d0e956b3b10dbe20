"""Labels for probes: easy-VQA image facts and shape masks, VCR boxes, and the question words that name a region.

easy-VQA draws one shape of one of 8 colours on a light background whose colour is random per image (each
channel in 230–255, not white), at 2× scale, resized to 64 px with bilinear filtering (the generator,
``gen_data/images.py`` of vzhou842/easy-VQA). The shape mask is every pixel that differs from the border's
most frequent colour by more than a tolerance (`vlcore.data.easy_vqa.compute_shape_mask`); a patch's
coverage is the share of its pixels in the mask. The image's shape and colour come from the answers to its
questions (`easy_vqa_image_labels`): 944 of the 1,000 test images reveal their shape, 920 their colour.

VCR: a region is an object's box, scaled from the original image to the image the model saw; a word of the
question grounds in the box of the object its name refers to (``Example.meta["mentions"]``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from vlcore.analysis.probing import ProbingError

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "gray", "red", "green", "blue", "yellow", "teal", "brown")



def parse_easy_vqa_facts(question: str, answer: str) -> dict[str, str]:
    """What one easy-VQA question and its answer say about the image: ``shape`` and/or ``color``.

    >>> sorted(parse_easy_vqa_facts("what color is the triangle?", "red").items())
    [('color', 'red'), ('shape', 'triangle')]
    >>> parse_easy_vqa_facts("is there not a blue shape?", "no"), parse_easy_vqa_facts("is a circle present?", "no")
    ({'color': 'blue'}, {})
    """
    words = re.findall(r"[a-z]+", question.lower())
    named_shape = next((w for w in words if w in SHAPES), None)
    named_color = next((w for w in words if w in COLORS), None)
    facts: dict[str, str] = {}
    if answer in ("yes", "no"):
        negated = "not" in words or words[:2] == ["is", "no"]
        if (answer == "yes") != negated:  # the named shape or colour is in the image
            facts.update({k: v for k, v in (("shape", named_shape), ("color", named_color)) if v})
        return facts
    if answer in SHAPES:
        facts["shape"] = answer
    elif answer in COLORS:
        facts["color"] = answer
    if named_shape and "shape" not in facts:
        facts["shape"] = named_shape
    if named_color and "color" not in facts:
        facts["color"] = named_color
    return facts


@lru_cache(maxsize=2)
def easy_vqa_image_labels(split: str) -> dict[int, dict[str, str]]:
    """``{image_id: {"shape": ..., "color": ...}}`` of an easy-VQA split, from the answers to each image's
    questions (a fact no question reveals is left out)."""
    from vlcore.data.easy_vqa import load_easy_vqa

    labels: dict[int, dict[str, str]] = {}
    for record in load_easy_vqa(split):
        labels.setdefault(record.image_id, {}).update(parse_easy_vqa_facts(record.question, record.answer))
    return labels


def compute_mask_shape(mask: np.ndarray) -> str | None:
    """The shape a mask draws, from how much of its bounding box it fills: a rectangle about all of it, a
    circle π/4, an equilateral triangle (easy-VQA's, with one horizontal side) a half. None for an empty mask.

    >>> m = np.zeros((20, 20), bool); m[4:14, 2:18] = True
    >>> compute_mask_shape(m)
    'rectangle'
    """
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return None
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "rectangle" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"


def compute_box_mask(size_hw: tuple[int, int], boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """bool ``[h, w]``: pixels whose centre lies inside any ``(x1, y1, x2, y2)`` box (image pixels).

    >>> int(compute_box_mask((4, 6), [(1, 0, 3, 2)]).sum())
    4
    """
    h, w = size_hw
    mask = np.zeros((h, w), dtype=bool)
    cy, cx = np.arange(h) + 0.5, np.arange(w) + 0.5
    for x1, y1, x2, y2 in (tuple(b)[:4] for b in boxes):
        mask |= ((cy >= y1) & (cy < y2))[:, None] & ((cx >= x1) & (cx < x2))[None, :]
    return mask


def compute_cover_grid(mask: np.ndarray, grid: tuple[int, int], patch_px: int) -> np.ndarray:
    """Share of each patch's pixels inside ``mask``: float32 ``[rows, cols]`` (the mask covers the grid).

    >>> m = np.zeros((4, 4), bool); m[:2, :3] = True
    >>> compute_cover_grid(m, (2, 2), 2).tolist()
    [[1.0, 0.5], [0.0, 0.0]]
    """
    rows, cols = grid
    m = np.asarray(mask, dtype=np.float32)[: rows * patch_px, : cols * patch_px]
    if m.shape != (rows * patch_px, cols * patch_px):
        raise ProbingError(f"the mask is {np.shape(mask)}; the patch grid needs {(rows * patch_px, cols * patch_px)} pixels")
    return m.reshape(rows, patch_px, cols, patch_px).mean(axis=(1, 3))


def token_words(tokens: Sequence[str], positions: Sequence[int]) -> list[tuple[str, list[int]]]:
    """Whole words from word pieces: ``(lower-case word, token positions)``, a ``##`` piece joined to the
    word before it.

    >>> token_words(["[CLS]", "rect", "##angle", "?", "[SEP]"], [1, 2, 3])
    [('rectangle', [1, 2]), ('?', [3])]
    """
    words: list[tuple[str, list[int]]] = []
    for pos in positions:
        piece = tokens[pos]
        if piece.startswith("##") and words:
            words[-1] = (words[-1][0] + piece[2:].lower(), words[-1][1] + [int(pos)])
        else:
            words.append((piece.lower(), [int(pos)]))
    return words


def _name_words(name: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", name.lower())


@dataclass(frozen=True)
class GroundingWord:
    """A word of the question that names an image region: its text, token positions, role and region mask."""

    text: str
    positions: tuple[int, ...]
    role: str  # "shape", "color" (easy-VQA) or "object" (VCR)
    mask: np.ndarray  # bool [h, w] on the image as the model saw it


def example_regions(example, image_seen: np.ndarray, tokens: Sequence[str], text_positions: Sequence[int],
                    tolerance: int = 24) -> tuple[dict[str, str | None], np.ndarray | None, list[GroundingWord]]:
    """What the probes need of one example: its labels, its region mask and its grounding words.

    Labels include ``image``, the image's id, where examples share images (folds keep an image's questions on one
    side). easy-VQA: labels ``shape`` and ``color`` of the image (from its questions' answers), the region is the
    shape mask, and the words naming the image's shape or colour ground in it. VCR: the region is the union
    of the boxes of the objects the question names, each named object's word pieces ground in its own box
    (boxes are scaled from the original image to the image the model saw). Other sources: no region.

    Args:
        example: an `Example`.
        image_seen: uint8 ``[h, w, 3]`` as the model saw it.
        tokens: the example's token strings (padded batch positions).
        text_positions: positions of its question tokens (no [CLS]/[SEP]).
        tolerance: the shape mask's colour tolerance.

    Returns:
        ``(labels, region mask or None, grounding words)``.
    """
    from vlcore.data.easy_vqa import compute_shape_mask

    words = token_words(tokens, text_positions)
    if example.source == "easy_vqa":
        meta = example.meta or {}
        facts = easy_vqa_image_labels(meta["split"]).get(int(meta["image_id"]), {}) if "image_id" in meta else {}
        labels = {"shape": facts.get("shape"), "color": facts.get("color"),
                  "image": f"easy_vqa/{meta.get('split')}/{meta.get('image_id')}" if "image_id" in meta else None}
        mask = compute_shape_mask(image_seen, tolerance=tolerance)
        named = [GroundingWord(w, tuple(p), role, mask) for w, p in words
                 for role in ("shape", "color") if labels[role] is not None and w == labels[role]]
        return labels, mask, named
    if example.source == "vcr" and example.regions:
        return {"image": (example.meta or {}).get("img_fn")}, *_vcr_regions(example, image_seen.shape[:2], words)
    return {}, None, []


def _vcr_regions(example, size_hw: tuple[int, int], words: list[tuple[str, list[int]]]):
    """Union mask of the question's named objects and one `GroundingWord` per name found in the tokens."""
    from vlcore.data.vcr import scale_box

    size = (example.meta or {}).get("image_size") or example.load_image().size
    boxes = {r.index: scale_box(r.box, tuple(size), (size_hw[1], size_hw[0])) for r in example.regions}
    found, start = [], 0
    for mention in ((example.meta or {}).get("mentions") or {}).get("question", []):
        for name in mention.get("names", []):
            obj = name["object"]
            target = _name_words(example.question[name["start"] : name["end"]])
            if obj not in boxes or not target:
                continue
            for i in range(start, len(words) - len(target) + 1):
                if [w for w, _ in words[i : i + len(target)]] == target:
                    positions = tuple(p for _, ps in words[i : i + len(target)] for p in ps)
                    found.append(GroundingWord(" ".join(target), positions, "object",
                                               compute_box_mask(size_hw, [boxes[obj]])))
                    start = i + len(target)
                    break
    mentions = ((example.meta or {}).get("mentions") or {}).get("question", [])
    named = sorted({o for m in mentions for o in m.get("objects", []) if o in boxes})
    mask = compute_box_mask(size_hw, [boxes[o] for o in named]) if named else None
    return mask, found
