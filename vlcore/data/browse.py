"""Browsing a dataset: a text-only index, filters, pages and thumbnails (no UI here).

The index holds one row per example with only light columns (id, question, category, answers,
objects), so search and filters run over a 100k-row set in milliseconds and images are decoded
only for the page on screen.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

INDEX_COLUMNS = ["example_id", "question", "category", "answers", "objects"]

# Colours for objects: box outlines and their mentions in the text share them.
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
           "#469990", "#800000", "#808000", "#000075"]


def object_colour(index: int) -> str:
    """Colour of object ``index`` (boxes and mentions alike).

    >>> object_colour(0), object_colour(12)
    ('#e6194b', '#e6194b')
    """
    return PALETTE[index % len(PALETTE)]


def filter_index(
    index: pd.DataFrame,
    query: str = "",
    categories: list[str] | None = None,
    answer: str = "",
    objects: list[str] | None = None,
) -> np.ndarray:
    """Positions of the rows that match every given filter.

    Args:
        index: a frame with `INDEX_COLUMNS`.
        query: case-insensitive substring of the question.
        categories: keep rows whose category is one of these (empty: all).
        answer: case-insensitive exact match against any gold answer.
        objects: keep rows that mention every one of these object classes.

    Returns:
        int64 row positions, in dataset order.
    """
    keep = np.ones(len(index), dtype=bool)
    if query.strip():
        keep &= index["question"].str.contains(query.strip(), case=False, regex=False, na=False).to_numpy()
    if categories:
        keep &= index["category"].isin(categories).to_numpy()
    if answer.strip():
        wanted = answer.strip().lower()
        keep &= np.fromiter((wanted in {str(a).lower() for a in row} for row in index["answers"]), bool, len(index))
    if objects:
        need = set(objects)
        keep &= np.fromiter((need <= set(row) for row in index["objects"]), bool, len(index))
    return np.flatnonzero(keep)


PAGE_SIZE = 24  # thumbnails per browser page


def count_pages(n_items: int, page_size: int = PAGE_SIZE) -> int:
    """How many pages ``n_items`` fill (at least 1, so that an empty result still has a page 1).

    >>> count_pages(0), count_pages(24), count_pages(25), count_pages(336)
    (1, 1, 2, 14)
    """
    return max(1, math.ceil(n_items / page_size))


def page_of(positions: np.ndarray, page: int, page_size: int = PAGE_SIZE) -> tuple[np.ndarray, int, int]:
    """One page of positions.

    Returns:
        ``(positions_on_page, page, n_pages)``; the page number is clamped to the valid range.

    >>> page_of(np.arange(50), 9, 24)[1:]
    (3, 3)
    """
    n_pages = count_pages(len(positions), page_size)
    page = min(max(int(page), 1), n_pages)
    return positions[(page - 1) * page_size : page * page_size], page, n_pages


def make_thumbnail(image: Image.Image, size: int = 160) -> Image.Image:
    """A copy of ``image`` fitted inside ``size`` × ``size`` (aspect kept)."""
    thumb = image.copy()
    thumb.thumbnail((size, size))
    return thumb


def draw_regions(image: Image.Image, regions, scale: float = 1.0, width: int = 3) -> Image.Image:
    """The image with each region's box outlined and labelled in its object's colour.

    Args:
        image: the image (already resized by ``scale`` if shown smaller).
        regions: `Region` records with boxes in original-image pixels.
        scale: factor from original pixels to ``image`` pixels.
        width: outline width in pixels.
    """
    out = image.copy()
    draw = ImageDraw.Draw(out)
    for region in regions:
        x1, y1, x2, y2 = (v * scale for v in region.box)
        colour = object_colour(region.index)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        draw.text((x1 + 3, y1 + 2), region.label, fill=colour)
    return out


def highlight_mentions(text: str, mentions: list[dict]) -> str:
    """HTML of ``text`` with each object's name coloured like its box.

    Args:
        text: the rendered sentence.
        mentions: ``{"start", "end", "objects"}`` character spans into ``text``; when a mention has
            ``"names"`` (``{"object", "start", "end"}`` per object, as VCR's "Casey and Riley"), each
            name gets its own object's colour.

    >>> highlight_mentions("Does Casey live here?", [{"start": 5, "end": 10, "objects": [0]}])
    'Does <b style="color:#e6194b">Casey</b> live here?'
    >>> highlight_mentions("Casey and Riley", [{"start": 0, "end": 15, "objects": [0, 1], "names": [
    ...     {"object": 0, "start": 0, "end": 5}, {"object": 1, "start": 10, "end": 15}]}])
    '<b style="color:#e6194b">Casey</b> and <b style="color:#3cb44b">Riley</b>'
    """
    spans = []
    for m in mentions:
        if m.get("names"):
            spans += [(n["start"], n["end"], n["object"]) for n in m["names"]]
        else:
            spans.append((m["start"], m["end"], m["objects"][0] if m.get("objects") else None))
    parts, cursor = [], 0
    for start, end, obj in sorted(spans):
        parts.append(html.escape(text[cursor:start]))
        colour = object_colour(obj) if obj is not None else "#000000"
        parts.append(f'<b style="color:{colour}">{html.escape(text[start:end])}</b>')
        cursor = end
    parts.append(html.escape(text[cursor:]))
    return "".join(parts)


def fact_html(fact) -> str:
    """HTML of one WebQA fact for the detail view: mark, kind, bold title and text, all dataset text escaped.

    Args:
        fact: a `vlcore.data.example.Fact` (its texts hold decoded characters, e.g. ``&`` or ``<``).

    >>> from vlcore.data.example import Fact
    >>> fact_html(Fact("text", "Tom & Jerry", "<b>cat</b> & mouse", True))
    '✅ 📄 <b>Tom &amp; Jerry</b> — &lt;b&gt;cat&lt;/b&gt; &amp; mouse'
    """
    tick = "✅" if fact.positive else "▫️"
    kind = "🖼️" if fact.kind == "image" else "📄"
    return f"{tick} {kind} <b>{html.escape(fact.title)}</b> — {html.escape(fact.text)}"


def answers_html(answers) -> str:
    """HTML of the gold answers, each escaped.

    >>> answers_html(["R&B", "<i>soul</i>"])
    '<b>Gold answer:</b> R&amp;B, &lt;i&gt;soul&lt;/i&gt;'
    """
    return "<b>Gold answer:</b> " + ", ".join(html.escape(str(a)) for a in answers)


def describe_filters(query: str = "", categories=None, answer: str = "", objects=None,
                     categories_label: str = "category") -> str:
    """The browser's active filters in words, for labels that act on "the examples matching the filters".

    Args:
        query, categories, answer, objects: as `filter_index` takes them (`vlcore.ui.state.get_filters`).
        categories_label: what a category is called in this source (``ExampleSource.categories_label``).

    >>> describe_filters("circle", ["shape", "color"], categories_label="question type")
    'search "circle"; question type shape or color'
    >>> describe_filters(answer=" red ", objects=["car", "person"])
    'answer "red"; objects car and person'
    """
    parts = []
    if query.strip():
        parts.append(f'search "{query.strip()}"')
    if categories:
        parts.append(f"{categories_label} {' or '.join(map(str, categories))}")
    if answer.strip():
        parts.append(f'answer "{answer.strip()}"')
    if objects:
        parts.append(f"objects {' and '.join(map(str, objects))}")
    return "; ".join(parts)


def filtered_label(filters: dict, n_matching: int, n_total: int, categories_label: str = "category") -> str:
    """A checkbox label naming the active filters and how many examples they keep.

    Markdown characters in the user's filter text are escaped (Streamlit renders labels as markdown).

    >>> filtered_label({"query": "circle", "categories": ["shape"], "answer": "", "objects": []}, 412, 9673,
    ...                "question type")
    'Only the 412 of 9,673 examples matching the browser\\'s filters: search "circle"; question type shape'
    """
    words = describe_filters(**filters, categories_label=categories_label)
    words = "".join("\\" + c if c in "\\`*_{}[]()#+-.!|~<>$:" else c for c in words)
    return f"Only the {n_matching:,} of {n_total:,} examples matching the browser's filters: {words}"
