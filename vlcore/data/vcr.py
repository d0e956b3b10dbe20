"""VCR (Visual Commonsense Reasoning, Zellers et al. 2019) mapped into `Example`.

The original ``train.jsonl`` / ``val.jsonl`` hold token lists in which an object reference is a list of
0-based indexes into ``objects``: ``["Does", [0], "live", "in", "this", "house", "?"]``. Images and
per-image metadata (``boxes`` as ``[x1, y1, x2, y2, score]``, ``segms``, ``names``, ``width``,
``height``) live under a ``vcr1images/`` root at ``img_fn`` / ``metadata_fn``.

References render as the VCR authors' r2c code renders them: a person becomes a gender-neutral
name, other objects their class name (here with a number, so two cars stay apart). Unlike r2c,
which numbers only the objects a question mentions, names follow each object's order in
``objects``, so one person keeps one name across the question, answers and rationales.

``Example.meta["mentions"]`` keeps every reference::

    {"question": [mention, ...],
     "answer_choices": [[mention, ...] per choice],
     "rationale_choices": [[mention, ...] per choice]}

    mention = {"start": 5, "end": 20, "objects": [0, 1],
               "names": [{"object": 0, "start": 5, "end": 10}, {"object": 1, "start": 15, "end": 20}]}

``start``/``end`` are character offsets into the rendered string (``text[start:end]`` is the whole
reference, "Casey and Riley"); ``names`` locate each object's own name. ``meta["object_names"][i]`` is
the name of object ``i``, also the label of ``Example.regions[i]``. Example ids are
``vcr/{split}/{annot_id}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlcore.data.example import Example, Region
from vlcore.errors import DatasetError, InputError

SPLITS = ("train", "val", "test")
# r2c's list (rowanz/r2c, dataloaders/vcr.py) without its repeated "Peyton", so names stay unique.
GENDER_NEUTRAL_NAMES = (
    "Casey",
    "Riley",
    "Jessie",
    "Jackie",
    "Avery",
    "Jaime",
    "Peyton",
    "Kerry",
    "Jody",
    "Kendall",
    "Skyler",
    "Frankie",
    "Pat",
    "Quinn",
)
NO_SPACE_BEFORE = frozenset({".", ",", "!", "?", ";", ":", "%", ")", "]", "}", "...", "n't", "'"})
NO_SPACE_AFTER = frozenset({"(", "[", "{", "$", "#"})
# VCR splits contractions and possessives into three tokens ("she", "'", "ll"; [4], "'", "s"): an apostrophe
# followed by one of these joins both neighbours ("she'll", "Avery's").
CONTRACTION_SUFFIXES = frozenset({"s", "t", "ll", "re", "ve", "d", "m"})
REFERENCE_TEXT = re.compile(r"^\[\s*\d+(\s*,\s*\d+)*\s*\]$")
REQUIRED_KEYS = ("question", "answer_choices", "objects", "img_fn")


# -- rendering (pure) -------------------------------------------------------------------------
def compute_object_names(objects: Sequence[str]) -> list[str]:
    """Display names for VCR objects: people get gender-neutral names, others "class n".

    Args:
        objects: class names in the record's order (``record["objects"]``).

    Returns:
        One name per object; the k-th person gets ``GENDER_NEUTRAL_NAMES[k]`` (with a number after
        the 14th), the k-th object of another class ``f"{class} {k}"``, counting from 1.

    >>> compute_object_names(["person", "car", "person", "car", "dog"])
    ['Casey', 'car 1', 'Riley', 'car 2', 'dog 1']
    """
    counts: dict[str, int] = {}
    names = []
    for cls in objects:
        k = counts.get(cls, 0)
        counts[cls] = k + 1
        if cls == "person":
            base, lap = GENDER_NEUTRAL_NAMES[k % len(GENDER_NEUTRAL_NAMES)], k // len(GENDER_NEUTRAL_NAMES)
            names.append(base if lap == 0 else f"{base} {lap + 1}")
        else:
            names.append(f"{cls} {k + 1}")
    return names


def join_names(names: Sequence[str]) -> str:
    """Names joined as in prose.

    >>> join_names(["Casey"]), join_names(["Casey", "Riley"]), join_names(["Casey", "Riley", "Jessie"])
    ('Casey', 'Casey and Riley', 'Casey, Riley and Jessie')
    """
    if len(names) <= 2:
        return " and ".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _render_reference(indexes: Sequence[Any], names: Sequence[str]) -> tuple[str, list[dict]]:
    """The text of one reference and each name's span within it."""
    bad = [i for i in indexes if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(names)]
    if bad or not indexes:
        raise DatasetError(
            f"VCR reference {list(indexes)} must hold 0-based indexes into the record's {len(names)} objects; "
            "the annotation does not match its objects list (check that the files come from one VCR release)"
        )
    parts, text = [], ""
    for k, i in enumerate(indexes):
        text += "" if k == 0 else ", " if k < len(indexes) - 1 else " and "
        parts.append({"object": i, "start": len(text), "end": len(text) + len(names[i])})
        text += names[i]
    return text, parts


def _space_before(text: str, prev: str | None, token: str, after_open_quote: bool) -> bool:
    """Whether detokenised text needs a space before ``token``."""
    if not text or prev in NO_SPACE_AFTER or after_open_quote or token in NO_SPACE_BEFORE:
        return False
    if token == "-" or prev == "-":
        return False
    if prev == "'" and token.lower() in CONTRACTION_SUFFIXES:
        return False
    return not (token.startswith("'") and 1 < len(token) <= 4 and token[1:].isalpha())


def render_tokens(tokens: Sequence[Any], names: Sequence[str]) -> tuple[str, list[dict]]:
    """Detokenise a VCR token list, replacing references by object names.

    Args:
        tokens: strings and references (lists of 0-based object indexes).
        names: one display name per object (`compute_object_names`).

    Returns:
        ``(text, mentions)``; each mention is ``{"start", "end", "objects", "names"}`` (module docstring).

    Raises:
        DatasetError: a reference holds an index outside ``names``.

    >>> render_tokens(["Is", [0, 1], "happy", "?"], ["Casey", "Riley"])[0]
    'Is Casey and Riley happy?'
    >>> render_tokens(["she", "'", "ll", "see", [1], "'", "s", "hat", "."], ["Casey", "Riley"])[0]
    "she'll see Riley's hat."
    >>> render_tokens(["No", ",", [1], "is", "n't", "."], ["Casey", "Riley"])
    ("No, Riley isn't.", [{'start': 4, 'end': 9, 'objects': [1], 'names': [{'object': 1, 'start': 4, 'end': 9}]}])
    """
    text, mentions, prev, quote_open, after_open_quote = "", [], None, False, False
    for token in tokens:
        if isinstance(token, (list, tuple)):
            piece, parts = _render_reference(token, names)
        else:
            piece, parts = str(token), None
        closing = piece == '"' and quote_open
        if not closing and _space_before(text, prev, piece, after_open_quote):
            text += " "
        start = len(text)
        text += piece
        if parts is not None:
            shifted = [{"object": p["object"], "start": start + p["start"], "end": start + p["end"]} for p in parts]
            mentions.append({"start": start, "end": len(text), "objects": list(token), "names": shifted})
        after_open_quote = piece == '"' and not quote_open
        quote_open = quote_open != (piece == '"')
        prev = piece if parts is None else None
    return text, mentions


def render_record(record: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Render a VCR record's question, answer and rationale choices.

    Returns:
        ``{"question": str, "answer_choices": [str], "rationale_choices": [str], "mentions": {...}}``.

    Raises:
        DatasetError: a reference outside the objects list.
    """
    question, q_mentions = render_tokens(record["question"], names)
    out: dict[str, Any] = {"question": question, "mentions": {"question": q_mentions}}
    for key in ("answer_choices", "rationale_choices"):
        rendered = [render_tokens(choice, names) for choice in record.get(key) or ()]
        out[key] = [text for text, _ in rendered]
        out["mentions"][key] = [mentions for _, mentions in rendered]
    return out


# -- boxes ------------------------------------------------------------------------------------
def scale_box(
    box: Sequence[float], from_size: tuple[int, int], to_size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Map an ``(x1, y1, x2, y2)`` box from an image of ``from_size`` onto the same image resized to ``to_size``.

    Args:
        box: pixel box on the original image; a fifth value (score) is ignored.
        from_size: original ``(width, height)``.
        to_size: resized ``(width, height)``.

    Returns:
        The box in resized-image pixels.

    Raises:
        InputError: a size is not positive.

    >>> scale_box((10, 20, 30, 40, 0.9), from_size=(100, 200), to_size=(50, 100))
    (5.0, 10.0, 15.0, 20.0)
    """
    if min(*from_size, *to_size) <= 0:
        raise InputError(f"image sizes must be positive (width, height); got from {from_size} to {to_size}")
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def scale_regions(
    regions: Sequence[Region], from_size: tuple[int, int], to_size: tuple[int, int]
) -> tuple[Region, ...]:
    """`scale_box` applied to every region (labels, indexes and scores kept)."""
    return tuple(Region(r.index, r.label, scale_box(r.box, from_size, to_size), r.score) for r in regions)


def check_metadata(metadata: Mapping[str, Any], objects: Sequence[str], where: str) -> None:
    """Check that VCR metadata has one box (and name) per object.

    Args:
        metadata: parsed metadata JSON (or a hub row's boxes as ``{"boxes": ...}``).
        objects: the record's ``objects``.
        where: the file or row, named in the message.

    Raises:
        DatasetError: counts or names differ from ``objects``, or a box is not 4 or 5 numbers.
    """
    boxes, names = metadata.get("boxes") or [], metadata.get("names")
    if len(boxes) != len(objects) or (names is not None and list(names) != list(objects)):
        raise DatasetError(
            f"{where}: expected one box and name per object of the record ({len(objects)}: {list(objects)}); "
            f"got {len(boxes)} boxes and names {names}. The metadata belongs to another record or release: "
            "check metadata_fn, or re-extract vcr1images from the same VCR download as the annotations."
        )
    for i, box in enumerate(boxes):
        if not isinstance(box, (list, tuple)) or len(box) not in (4, 5):
            raise DatasetError(f"{where}: box {i} should be [x1, y1, x2, y2] or [x1, y1, x2, y2, score]; got {box!r}")


def load_vcr_metadata(path: str | Path, objects: Sequence[str]) -> dict[str, Any]:
    """Read and check one per-image VCR metadata JSON.

    Raises:
        DatasetError: the file is not JSON, or its boxes/names do not match ``objects``.
    """
    from vlcore.data.paths import is_allowed

    path = Path(path)
    if not is_allowed(path):
        raise DatasetError(f"VCR metadata {path.name} lies outside the folders VLScope may read (VLSCOPE_DATA_ROOTS)")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"VCR metadata {path} is unreadable ({exc}); expected the JSON from vcr1images") from exc
    if not isinstance(metadata, Mapping):
        raise DatasetError(
            f"VCR metadata {path} should be a JSON object with 'boxes' and 'names'; got {type(metadata).__name__}"
        )
    check_metadata(metadata, objects, str(path))
    return dict(metadata)


def regions_from_metadata(metadata: Mapping[str, Any], names: Sequence[str]) -> tuple[Region, ...]:
    """One `Region` per checked metadata box, labelled with the object's rendered name."""
    return tuple(
        Region(i, names[i], tuple(float(v) for v in box[:4]), float(box[4]) if len(box) > 4 else None)
        for i, box in enumerate(metadata.get("boxes") or [])
    )


# -- records ----------------------------------------------------------------------------------
def _split_of(record: Mapping[str, Any], split: str | None) -> str:
    if split:
        return split
    prefix = str(record.get("annot_id", "")).split("-")[0]
    return prefix if prefix in SPLITS else "unknown"


def _label(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        label = int(value)
    except (TypeError, ValueError):
        return None
    return label if label >= 0 else None


def build_vcr_example(
    record: Mapping[str, Any],
    *,
    split: str,
    index: int,
    metadata: Mapping[str, Any] | None,
    image: Mapping[str, Any],
    extra_meta: Mapping[str, Any] | None = None,
) -> Example:
    """An `Example` from a record in the original schema and its already checked metadata.

    Args:
        record: keys as in ``val.jsonl`` (``question``, ``answer_choices``, ``objects``, ...).
        split: split name for the id.
        index: position in the file, the id when the record has no ``annot_id``.
        metadata: checked metadata (``boxes``, optional ``width``/``height``), or None.
        image: `Example` image keyword arguments (``image``, ``image_path`` or ``image_loader``).
        extra_meta: more JSON-able metadata to keep.
    """
    objects = [str(o) for o in record.get("objects") or []]
    names = compute_object_names(objects)
    rendered = render_record(record, names)
    answer_label, rationale_label = _label(record.get("answer_label")), _label(record.get("rationale_label"))
    answers = rendered["answer_choices"]
    meta = {
        "split": split,
        "annot_id": record.get("annot_id"),
        "objects": objects,
        "object_names": names,
        "mentions": rendered["mentions"],
        "movie": record.get("movie"),
        "img_fn": record.get("img_fn"),
        "metadata_fn": record.get("metadata_fn"),
        **dict(extra_meta or {}),
    }
    if metadata and metadata.get("width") and metadata.get("height"):
        meta["image_size"] = [int(metadata["width"]), int(metadata["height"])]
    return Example(
        example_id=f"vcr/{split}/{record.get('annot_id') or index}",
        question=rendered["question"],
        answers=(answers[answer_label],) if answer_label is not None and answer_label < len(answers) else (),
        answer_choices=tuple(answers),
        rationale_choices=tuple(rendered["rationale_choices"]),
        answer_label=answer_label,
        rationale_label=rationale_label,
        regions=regions_from_metadata(metadata, names) if metadata else (),
        source="vcr",
        meta=meta,
        **image,
    )


def vcr_record_to_example(
    record: Mapping[str, Any], *, images_root: str | Path, split: str | None = None, index: int = 0,
    strict: bool = True,
) -> Example:
    """Map one record of the original VCR jsonl into an `Example`.

    The image is not opened: a missing image file fails later, in `Example.load_image` (`InputError`).
    A missing metadata file leaves the example without regions and notes it in ``meta["warnings"]``.

    Args:
        record: one parsed line of ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl``.
        images_root: the ``vcr1images`` folder that ``img_fn`` and ``metadata_fn`` are relative to.
        split: split name; None infers it from ``annot_id`` ("val-1" -> "val").
        index: line index, the id when the record has no ``annot_id``.
        strict: raise on metadata that does not match ``objects``; when False (the browser), keep
            the example without boxes and put the message in ``meta["warnings"]``.

    Raises:
        DatasetError: required keys are missing, a reference points outside ``objects``, or (strict)
            the metadata's names/boxes do not match ``objects`` (the message names the file).
    """
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise DatasetError(
            f"VCR record {index} lacks {missing}; it has keys {sorted(record)}. "
            "Expected a line of the original VCR train/val/test.jsonl."
        )
    root = Path(images_root)
    metadata, warnings = None, []
    if record.get("metadata_fn"):
        metadata_path = root / record["metadata_fn"]
        if metadata_path.is_file():
            try:
                metadata = load_vcr_metadata(metadata_path, record["objects"])
            except DatasetError as exc:
                if strict:
                    raise
                warnings.append(f"{exc}; no boxes shown")
        else:
            warnings.append(f"metadata file not found: {metadata_path}; no boxes shown")
    return build_vcr_example(
        record,
        split=_split_of(record, split),
        index=index,
        metadata=metadata,
        image={"image_path": str(root / record["img_fn"])},
        extra_meta={"warnings": warnings},
    )


def iter_vcr_records(path: str | Path) -> Iterator[dict]:
    """Parsed lines of a VCR jsonl file, read one at a time.

    Raises:
        DatasetError: the file is missing, or a line is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"VCR annotations not found: {path}; expected train.jsonl / val.jsonl from vcr1annots.zip")
    with path.open(encoding="utf-8") as lines:
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{path.name} line {n} is not JSON ({exc}); expected one VCR record per line"
                ) from exc
            if not isinstance(record, dict):
                raise DatasetError(f"{path.name} line {n} should be a JSON object; got {type(record).__name__}")
            yield record


def resolve_vcr_files(location: str | Path, split: str, images_root: str | Path | None = None) -> tuple[Path, Path]:
    """The jsonl file and ``vcr1images`` root for a VCR location.

    Args:
        location: a ``.jsonl`` file, or a folder holding ``{split}.jsonl``.
        split: the split, to find ``{split}.jsonl`` in a folder.
        images_root: the ``vcr1images`` folder; None looks for ``vcr1images/`` beside the jsonl.

    Raises:
        DatasetError: the location does not exist or the folder has no ``{split}.jsonl``.
    """
    location = Path(location).expanduser()
    if location.is_dir():
        jsonl = location / f"{split}.jsonl"
        if not jsonl.is_file():
            found = sorted(p.name for p in location.glob("*.jsonl"))
            raise DatasetError(
                f"no {split}.jsonl in {location}; it has {found or 'no .jsonl files'}. Pick a split that exists."
            )
    elif location.is_file():
        jsonl = location
    else:
        raise DatasetError(f"VCR location not found: {location}; give a VCR .jsonl file or the folder holding it")
    if images_root is None:
        beside = jsonl.parent / "vcr1images"
        images_root = beside if beside.is_dir() else jsonl.parent
    return jsonl, Path(images_root)


def load_vcr_examples(
    location: str | Path,
    *,
    split: str | None = None,
    images_root: str | Path | None = None,
    limit: int | None = None,
    offset: int = 0,
    strict: bool = True,
) -> list[Example]:
    """Examples from the original VCR annotations, reading only the lines needed.

    Args:
        location: a VCR ``.jsonl`` file or the folder holding ``{split}.jsonl``.
        split: "train", "val" or "test"; None infers it from the file name or each ``annot_id``.
        images_root: the ``vcr1images`` folder; None uses ``vcr1images/`` beside the jsonl.
        limit: at most this many examples; None for all.
        offset: skip this many records first.

    Raises:
        DatasetError: missing files, malformed lines, or metadata that does not match a record.
    """
    jsonl, root = resolve_vcr_files(location, split or "val", images_root)
    split = split or (jsonl.stem if jsonl.stem in SPLITS else None)
    examples = []
    for index, record in enumerate(iter_vcr_records(jsonl)):
        if index < offset:
            continue
        if limit is not None and len(examples) >= limit:
            break
        examples.append(vcr_record_to_example(record, images_root=root, split=split, index=index, strict=strict))
    return examples
