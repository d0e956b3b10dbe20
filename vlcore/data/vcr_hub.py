"""VCR hub mirrors (parquet / `datasets` copies of VCR) mapped into `Example`.

A mirror's column names and feature types vary, so they are read from its features at run time
(`vcr_hub_columns`); token lists may be real lists, JSON text or ``"[0]"`` strings. Rendering,
names and boxes are shared with the original format (`vlcore.data.vcr`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlcore.data.example import Example
from vlcore.data.generic import (
    find_column,
    image_column,
    image_value,
    is_list_feature,
    is_text_feature,
    json_value,
    map_rows,
    require_columns,
    row_id,
)
from vlcore.data.vcr import REFERENCE_TEXT, build_vcr_example, check_metadata
from vlcore.errors import DatasetError


def _int_feature(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    )


def _list_or_text(feature: Any) -> bool:
    return is_list_feature(feature) or is_text_feature(feature)


HUB_ROLES: dict[str, tuple[tuple[str, ...], Any]] = {
    "question": (("question", "question_tokens", "query"), _list_or_text),
    "answer_choices": (("answer_choices", "answers", "choices", "answer_options"), _list_or_text),
    "rationale_choices": (("rationale_choices", "rationales", "rationale_options"), _list_or_text),
    "answer_label": (("answer_label", "label", "answer_idx", "answer_index"), _int_feature),
    "rationale_label": (("rationale_label", "rationale_idx", "rationale_index"), _int_feature),
    "objects": (("objects", "object_names", "object_labels", "names"), _list_or_text),
    "boxes": (("boxes", "bboxes", "object_boxes"), _list_or_text),
    "metadata": (("metadata", "metadata_json"), lambda f: is_text_feature(f) or isinstance(f, dict)),
    "width": (("width", "image_width", "img_width"), None),
    "height": (("height", "image_height", "img_height"), None),
    "id": (("annot_id", "id", "question_id", "qid"), None),
    "image_path": (("img_fn", "image_path", "file_name"), is_text_feature),
    "movie": (("movie",), None),
}


def vcr_hub_columns(features: Mapping[str, Any]) -> dict[str, str]:
    """Find a VCR mirror's columns from its features, whatever their names.

    Args:
        features: ``dataset.features`` of a VCR mirror (parquet on the hub, or local).

    Returns:
        Role -> column for each role found: ``question``, ``answer_choices``, ``image`` (an Image
        column) or ``image_path``, and when present ``rationale_choices``, labels, ``objects``,
        ``boxes``, ``metadata``, ``width``, ``height``, ``id``, ``movie``.

    Raises:
        DatasetError: no question, answer choices or image column; the message lists the columns found.
    """
    found = {role: find_column(features, names, accept) for role, (names, accept) in HUB_ROLES.items()}
    found["image"] = image_column(features)
    require_columns(found, ("question", "answer_choices"), features, "VCR")
    if not (found["image"] or found["image_path"]):
        require_columns(found, ("image",), features, "VCR")
    return {role: col for role, col in found.items() if col}


def coerce_tokens(value: Any) -> list:
    """A VCR token list from a mirror's cell: a real token list, JSON text of one, or plain text.

    >>> coerce_tokens('["Is", [0], "ok", "?"]')
    ['Is', [0], 'ok', '?']
    >>> coerce_tokens(["Is", "[0, 1]", 2, "ok"])
    ['Is', [0, 1], [2], 'ok']
    >>> coerce_tokens("Is it ok?")
    ['Is it ok?']
    """
    value = json_value(value)
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise DatasetError(
            f"expected VCR tokens (a list of words and [object indexes]); got {type(value).__name__}: {value!r:.80}"
        )
    tokens: list = []
    for token in value:
        if isinstance(token, str) and REFERENCE_TEXT.match(token.strip()):
            tokens.append(json.loads(token))
        elif isinstance(token, int) and not isinstance(token, bool):
            tokens.append([token])
        elif isinstance(token, (list, tuple)):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in token):
                raise DatasetError(f"a VCR reference should be a list of object indexes; got {list(token)!r:.80}")
            tokens.append(list(token))
        else:
            tokens.append(str(token))
    return tokens


def coerce_choices(value: Any, column: str) -> list[list]:
    """Four (or any number of) choices, each a token list, from a mirror's cell.

    Raises:
        DatasetError: the cell is neither a list of choices nor JSON text of one.
    """
    value = json_value(value)
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise DatasetError(
            f"column {column!r} should hold a list of choices; got {type(value).__name__}: {value!r:.80}"
        )
    return [coerce_tokens(choice) for choice in value]


def _hub_metadata(row: Mapping[str, Any], columns: Mapping[str, str], objects: list[str], where: str) -> dict | None:
    """Boxes (and size) of a mirror row, checked against its objects; None when the row has none."""
    metadata: dict[str, Any] = {}
    if "metadata" in columns:
        parsed = json_value(row.get(columns["metadata"]))
        metadata = dict(parsed) if isinstance(parsed, Mapping) else {}
    if "boxes" in columns:
        metadata["boxes"] = json_value(row.get(columns["boxes"])) or []
    for key in ("width", "height"):
        if key in columns and row.get(columns[key]):
            metadata[key] = row[columns[key]]
    if not metadata.get("boxes"):
        return None
    check_metadata(metadata, objects, where)
    return metadata


def vcr_hub_row_to_example(
    row: Mapping[str, Any],
    columns: Mapping[str, str],
    *,
    split: str,
    index: int,
    images_root: str | Path | None = None,
) -> Example:
    """Map one row of a VCR mirror into an `Example`, with columns from `vcr_hub_columns`.

    Args:
        row: ``dataset[i]`` (Image columns may be undecoded ``{"bytes", "path"}`` dicts).
        columns: role -> column.
        split: split name, for the id.
        index: row index, the id when there is no id column.
        images_root: folder that an ``image_path`` column is relative to.

    Raises:
        DatasetError: a cell cannot be read as VCR tokens, or boxes do not match objects.
    """
    get = lambda role: row.get(columns[role]) if role in columns else None  # noqa: E731
    objects = json_value(get("objects")) or []
    record = {
        "question": coerce_tokens(get("question")),
        "answer_choices": coerce_choices(get("answer_choices"), columns["answer_choices"]),
        "rationale_choices": coerce_choices(get("rationale_choices"), columns.get("rationale_choices", "")),
        "objects": [str(o) for o in objects] if isinstance(objects, (list, tuple)) else [],
        "answer_label": get("answer_label"),
        "rationale_label": get("rationale_label"),
        "annot_id": row_id(row, columns.get("id"), index),
        "movie": get("movie"),
        "img_fn": get("image_path"),
    }
    key = record["annot_id"]
    metadata = _hub_metadata(row, columns, record["objects"], f"row {index} ({key})")
    if "image" in columns:
        image = image_value(get("image"), name=f"vcr/{split}/{key}")
    else:
        path = Path(str(get("image_path") or ""))
        image = {"image_path": str(Path(images_root) / path if images_root else path)} if str(path) != "." else {}
    return build_vcr_example(
        record,
        split=split,
        index=index,
        metadata=metadata,
        image=image,
        extra_meta={"columns": dict(columns), "row": index, "warnings": []},
    )


def vcr_hub_examples(
    dataset: Any, *, split: str, limit: int | None = None, offset: int = 0, images_root: str | Path | None = None
) -> list[Example]:
    """Examples for rows ``offset .. offset+limit`` of a VCR mirror (`datasets.Dataset` or stream).

    Raises:
        DatasetError: the dataset lacks VCR columns (the message lists what it has), or a row is malformed.
    """
    columns = vcr_hub_columns(dataset.features or {})
    return map_rows(dataset, [columns["image"]] if "image" in columns else [], offset, limit,
                    lambda row, i: vcr_hub_row_to_example(row, columns, split=split, index=i, images_root=images_root))
