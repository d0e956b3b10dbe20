"""WebQA (Chang et al. 2022) mapped into `Example`.

The official JSON is keyed by Guid; each record has ``Q``, ``A`` (a list), ``Qcate``, ``split``,
``topic``, image facts ``img_posFacts`` / ``img_negFacts`` (``image_id``, ``title``, ``caption``,
``url``, ``imgUrl``) and text facts ``txt_posFacts`` / ``txt_negFacts`` (``title``, ``fact``,
``url``, ``snippet_id``). ``Q`` and ``A`` keep literal surrounding quotes, stripped here for display.
Texts also hold HTML character references (``Tom &amp; Jerry``, ``&quot;``, ``&#39;``), decoded here into
the characters they stand for (`unescape_entities`); whoever renders a text as HTML escapes it again.

Images ship as base64 lines ``image_id<TAB>base64`` in a large ``imgs.tsv``; ``imgs.lineidx``
lists each line's byte offset. `WebQAImages` seeks straight to one line (line number
``image_id % 10_000_000`` in the official files, checked against the line's id), so the TSV is
never read whole. An example's image is its first positive image fact, read only when shown.

``Example.meta`` keys: ``guid``, ``split``, ``topic``, ``image_id`` (main image, or None),
``image_urls`` (image_id -> imgUrl), ``snippet_ids`` (of the text facts, in fact order),
``keywords`` (``Keywords_A`` when present), ``fact_counts``. Example ids are ``webqa/{split}/{Guid}``.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

from vlcore.data.example import Example, Fact
from vlcore.data.generic import (
    answers_value,
    decode_image_bytes,
    find_column,
    image_column,
    image_value,
    is_text_feature,
    map_rows,
    require_columns,
    row_id,
    rows_of,
    text_value,
)
from vlcore.errors import DatasetError, InputError

SPLITS = ("train", "val", "test")
LINE_MODULUS = 10_000_000  # official image ids: line number = image_id % 10_000_000
FACT_KEYS = (
    ("img_posFacts", "image", True),
    ("txt_posFacts", "text", True),
    ("img_negFacts", "image", False),
    ("txt_negFacts", "text", False),
)
# A complete character reference: named (``&amp;``), decimal (``&#39;``) or hex (``&#x27;``), with its ``;``.
# Bare ampersands ("AT&T", "&copy2") are left alone, unlike `html.unescape` alone.
ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")


def unescape_entities(text: str) -> str:
    r"""WebQA text with its HTML character references decoded, once (``&amp;lt;`` gives ``&lt;``).

    >>> unescape_entities("Tom &amp; Jerry &#8211; &quot;Cat&#x27;s&quot; at AT&T")
    'Tom & Jerry – "Cat\'s" at AT&T'
    >>> unescape_entities("&amp;lt;b&amp;gt; &nosuch;")
    '&lt;b&gt; &nosuch;'
    """
    return ENTITY.sub(lambda m: html.unescape(m.group(0)), text)


def strip_webqa_quotes(text: Any) -> str:
    """WebQA text for display: without its literal surrounding quotes, HTML entities decoded.

    Quotes are stripped before entities are decoded, so an escaped quote (``&quot;``) at either end stays.

    >>> strip_webqa_quotes('"What color is the belly of a Green Tree Frog?"')
    'What color is the belly of a Green Tree Frog?'
    >>> strip_webqa_quotes('He said "hi"')
    'He said "hi"'
    >>> strip_webqa_quotes('"&quot;Cats&quot; &amp; dogs"')
    '"Cats" & dogs'
    """
    text = "" if text is None else str(text).strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return unescape_entities(text)


# -- images -----------------------------------------------------------------------------------
class WebQAImages:
    """Random access to WebQA's ``imgs.tsv`` through ``imgs.lineidx``; one seek per image.

    Args:
        tsv_path: ``imgs.tsv`` (lines ``image_id<TAB>base64``).
        lineidx_path: ``imgs.lineidx`` (one byte offset per line) or ``imgs.lineidx.new``
            (``image_id<TAB>offset`` lines); None looks beside the TSV.

    Raises:
        DatasetError: a file is missing.
    """

    def __init__(self, tsv_path: str | Path, lineidx_path: str | Path | None = None) -> None:
        self.tsv_path = Path(tsv_path).expanduser()
        if lineidx_path is None:
            candidates = [self.tsv_path.with_suffix(".lineidx"), self.tsv_path.with_suffix(".lineidx.new")]
            lineidx_path = next((p for p in candidates if p.is_file()), candidates[0])
        self.lineidx_path = Path(lineidx_path).expanduser()
        for path, what in ((self.tsv_path, "imgs.tsv"), (self.lineidx_path, "imgs.lineidx")):
            if not path.is_file():
                raise DatasetError(
                    f"WebQA {what} not found at {path}; download it with the WebQA images, or build "
                    "imgs.lineidx from imgs.tsv with `build_lineidx`"
                )
        self._offsets: list[int] | None = None
        self._by_id: dict[str, int] | None = None

    def _load_lineidx(self) -> None:
        offsets, by_id = [], {}
        for n, line in enumerate(self.lineidx_path.read_text().splitlines(), start=1):
            fields = line.split("\t")
            try:
                if len(fields) == 2:
                    by_id[fields[0].strip()] = int(fields[1])
                elif line.strip():
                    offsets.append(int(line))
            except ValueError as exc:
                raise DatasetError(
                    f"{self.lineidx_path.name} line {n} should be a byte offset; got {line!r:.60}"
                ) from exc
        self._offsets, self._by_id = offsets, (by_id or None)

    def _read_line(self, offset: int) -> tuple[str, bytes]:
        with self.tsv_path.open("rb") as f:
            f.seek(offset)
            image_id, _, data = f.readline().rstrip(b"\r\n").partition(b"\t")
        return image_id.decode("ascii", "replace").strip(), data

    def _scan_ids(self) -> dict[str, int]:
        """image_id -> offset, reading only each line's first bytes (for TSVs not in official order)."""
        by_id = {}
        with self.tsv_path.open("rb") as f:
            for offset in self._offsets or []:
                f.seek(offset)
                by_id[f.read(40).split(b"\t")[0].decode("ascii", "replace").strip()] = offset
        return by_id

    def offset_of(self, image_id: Any) -> int:
        """Byte offset of an image's line.

        Raises:
            InputError: the image is not in the TSV.
        """
        if self._offsets is None:
            self._load_lineidx()
        key = str(image_id).strip()
        if self._by_id is None and key.isdigit() and int(key) % LINE_MODULUS < len(self._offsets):
            offset = self._offsets[int(key) % LINE_MODULUS]
            if self._read_line(offset)[0] == key:
                return offset
        if self._by_id is None:
            self._by_id = self._scan_ids()
        if key not in self._by_id:
            raise InputError(
                f"WebQA image {key} is not in {self.tsv_path.name}; this TSV holds other images "
                "(use the imgs.tsv of the same WebQA release as the questions)"
            )
        return self._by_id[key]

    def load(self, image_id: Any) -> Image.Image:
        """The image with this id, as RGB.

        Raises:
            InputError: the id is not in the TSV, or its base64 is not a readable image.
        """
        key = str(image_id).strip()
        _, data = self._read_line(self.offset_of(key))
        try:
            raw = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"WebQA image {key} holds invalid base64 ({exc}); the imgs.tsv is damaged") from exc
        return decode_image_bytes(raw, name=f"WebQA image {key}")

    def loader(self, image_id: Any) -> Callable[[], Image.Image]:
        """A callable that loads ``image_id`` when called (for `Example.image_loader`)."""
        return lambda: self.load(image_id)


def build_lineidx(tsv_path: str | Path, out_path: str | Path | None = None) -> Path:
    """Write ``imgs.lineidx`` (one byte offset per line) for an ``imgs.tsv``, streaming it once.

    Returns:
        The path written (``imgs.lineidx`` beside the TSV by default).
    """
    tsv_path = Path(tsv_path)
    out = Path(out_path) if out_path else tsv_path.with_suffix(".lineidx")
    offsets, position = [], 0
    with tsv_path.open("rb") as f:
        for line in f:
            offsets.append(position)
            position += len(line)
    out.write_text("".join(f"{o}\n" for o in offsets))
    return out


def _missing_images_loader(image_id: str) -> Callable[[], Image.Image]:
    def fail() -> Image.Image:
        raise InputError(
            f"WebQA image {image_id} lives in imgs.tsv, which was not given; "
            "pass the imgs.tsv path (with imgs.lineidx beside it) to see images"
        )

    return fail


# -- records ----------------------------------------------------------------------------------
def webqa_facts(record: Mapping[str, Any]) -> tuple[tuple[Fact, ...], list[str | None]]:
    """The record's image and text facts (positives first) and the text facts' snippet ids."""
    facts, snippet_ids = [], []
    for key, kind, positive in FACT_KEYS:
        for item in rows_of(record.get(key)):
            image_id = item.get("image_id")
            facts.append(
                Fact(
                    kind=kind,
                    title=unescape_entities(text_value(item.get("title"))),
                    text=unescape_entities(text_value(item.get("caption") if kind == "image" else item.get("fact"))),
                    positive=positive,
                    image_id=None if image_id is None else str(image_id),
                    url=item.get("url") or None,
                )
            )
            if kind == "text":
                snippet_ids.append(item.get("snippet_id"))
    return tuple(facts), snippet_ids


def build_webqa_example(
    guid: str,
    record: Mapping[str, Any],
    *,
    split: str,
    image: Mapping[str, Any] | None = None,
    images: WebQAImages | None = None,
) -> Example:
    """An `Example` from a record in the official schema.

    Args:
        guid: the record's Guid.
        record: ``Q``, ``A``, ``Qcate``, ``topic`` and fact lists.
        split: split name for the id.
        image: `Example` image keyword arguments, when the row carries its image (hub mirrors).
        images: the ``imgs.tsv`` reader; None leaves images unreadable with a clear `InputError`.
    """
    facts, snippet_ids = webqa_facts(record)
    main_id = next((f.image_id for f in facts if f.kind == "image" and f.positive and f.image_id), None)
    if image is None:
        image = {}
        if main_id is not None:
            image = {"image_loader": images.loader(main_id) if images else _missing_images_loader(main_id)}
    urls = {
        str(i.get("image_id")): i.get("imgUrl")
        for k in ("img_posFacts", "img_negFacts")
        for i in rows_of(record.get(k))
    }
    answers = record.get("A")
    meta = {
        "guid": guid,
        "split": split,
        "topic": record.get("topic"),
        "image_id": main_id,
        "image_urls": urls,
        "snippet_ids": snippet_ids,
        "fact_counts": {k: len(rows_of(record.get(k))) for k, _, _ in FACT_KEYS},
    }
    if record.get("Keywords_A"):
        meta["keywords"] = strip_webqa_quotes(record["Keywords_A"])
    return Example(
        example_id=f"webqa/{split}/{guid}",
        question=strip_webqa_quotes(record.get("Q")),
        answers=tuple(strip_webqa_quotes(a) for a in answers_value(answers) if strip_webqa_quotes(a)),
        facts=facts,
        category=unescape_entities(text_value(record.get("Qcate"))) or None,
        source="webqa",
        meta=meta,
        **image,
    )


def webqa_record_to_example(
    guid: str, record: Mapping[str, Any], *, images: WebQAImages | None = None, split: str | None = None
) -> Example:
    """Map one official WebQA record into an `Example`.

    Args:
        guid: the record's key in the JSON.
        record: the record.
        images: reader for ``imgs.tsv``; without it, opening the image raises `InputError` saying so.
        split: split name; None uses the record's ``split`` field.

    Raises:
        DatasetError: the record has no ``Q``.
    """
    if not isinstance(record, Mapping) or "Q" not in record:
        keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
        raise DatasetError(f"WebQA record {guid} lacks 'Q'; got {keys}. Expected the official WebQA JSON.")
    return build_webqa_example(guid, record, split=split or str(record.get("split") or "unknown"), images=images)


@lru_cache(maxsize=2)
def _read_json(path: str, mtime: float) -> dict[str, dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"WebQA file {path} is unreadable ({exc}); expected WebQA_train_val.json") from exc
    if isinstance(data, list):
        data = {str(r.get("Guid", i)): r for i, r in enumerate(data) if isinstance(r, Mapping)}
    if not isinstance(data, dict):
        raise DatasetError(f"WebQA file {path} should map Guid -> record; got {type(data).__name__}")
    return data


def load_webqa_records(path: str | Path) -> dict[str, dict]:
    """The WebQA JSON as ``{Guid: record}`` (a list of records with ``Guid`` works too); cached per file version.

    Raises:
        DatasetError: the file is missing or not WebQA JSON.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"WebQA file not found: {path}; give WebQA_train_val.json (or WebQA_test.json)")
    return _read_json(str(path.resolve()), path.stat().st_mtime)


def _images_for(path: Path, images: WebQAImages | str | Path | None) -> WebQAImages | None:
    if isinstance(images, WebQAImages):
        return images
    if images is not None:
        return WebQAImages(images)
    beside = path.parent / "imgs.tsv"
    return WebQAImages(beside) if beside.is_file() and beside.with_suffix(".lineidx").is_file() else None


def load_webqa_examples(
    path: str | Path,
    *,
    split: str | None = None,
    images: WebQAImages | str | Path | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[Example]:
    """Examples from an official WebQA JSON file.

    Args:
        path: ``WebQA_train_val.json`` or any JSON of records keyed by Guid.
        split: keep records whose ``split`` is this ("train", "val", "test"); None keeps all.
        images: ``imgs.tsv`` path or reader; None uses ``imgs.tsv`` + ``imgs.lineidx`` beside the JSON if present.
        limit: at most this many examples.
        offset: skip this many (matching) records first.

    Raises:
        DatasetError: missing or malformed files.
    """
    path = Path(path).expanduser()
    records = load_webqa_records(path)
    reader = _images_for(path, images)
    chosen = [(g, r) for g, r in records.items() if split is None or r.get("split", split) == split]
    stop = None if limit is None else offset + limit
    return [webqa_record_to_example(g, r, images=reader, split=split) for g, r in chosen[offset:stop]]


# -- hub mirrors ------------------------------------------------------------------------------
HUB_ROLES: dict[str, tuple[str, ...]] = {
    "Q": ("Q", "question", "query"),
    "A": ("A", "answers", "answer"),
    "Guid": ("Guid", "guid", "id", "question_id", "qid"),
    "Qcate": ("Qcate", "qcate", "category", "question_category", "question_type"),
    "topic": ("topic",),
    "split": ("split",),
    "Keywords_A": ("Keywords_A", "keywords"),
    **{key: (key, key.lower()) for key, _, _ in FACT_KEYS},
}


def webqa_hub_columns(features: Mapping[str, Any]) -> dict[str, str]:
    """Find a WebQA mirror's columns from its features.

    Returns:
        Official key (``Q``, ``A``, ``Guid``, ``Qcate``, fact lists, ...) -> column, plus ``image``
        for the first Image column; only those found.

    Raises:
        DatasetError: no question column, or neither an image column nor fact lists; lists the columns found.
    """
    found = {key: find_column(features, names) for key, names in HUB_ROLES.items()}
    found["Q"] = find_column(features, HUB_ROLES["Q"], is_text_feature)
    found["image"] = image_column(features)
    require_columns(found, ("Q",), features, "WebQA")
    if not any(found.get(k) for k in ("image", "img_posFacts", "txt_posFacts")):
        require_columns(found, ("image",), features, "WebQA")
    return {key: col for key, col in found.items() if col}


def webqa_hub_row_to_example(
    row: Mapping[str, Any], columns: Mapping[str, str], *, split: str, index: int, images: WebQAImages | None = None
) -> Example:
    """Map one row of a WebQA mirror into an `Example` (columns from `webqa_hub_columns`).

    The image is the row's Image column when there is one, else the first positive image fact read from ``images``.
    """
    record = {key: row.get(col) for key, col in columns.items() if key != "image"}
    guid = row_id(row, columns.get("Guid"), index)
    image = image_value(row.get(columns["image"]), name=f"webqa/{split}/{guid}") if "image" in columns else None
    return build_webqa_example(guid, record, split=split, image=image or None, images=images)


def webqa_hub_examples(
    dataset: Any, *, split: str, limit: int | None = None, offset: int = 0, images: WebQAImages | None = None
) -> list[Example]:
    """Examples for rows ``offset .. offset+limit`` of a WebQA mirror (`datasets.Dataset` or stream).

    Raises:
        DatasetError: the dataset lacks WebQA columns (the message lists what it has).
    """
    columns = webqa_hub_columns(dataset.features or {})
    return map_rows(dataset, [columns["image"]] if "image" in columns else [], offset, limit,
                    lambda row, i: webqa_hub_row_to_example(row, columns, split=split, index=i, images=images))
