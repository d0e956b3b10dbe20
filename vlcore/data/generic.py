"""Any `datasets.Dataset` with an image column, mapped into `Example` through a column mapping.

A mapping names, for each role, the column that fills it::

    {"image": "img", "question": "caption", "answer": "label", "category": "kind", "id": "uid"}

Only ``image`` is required. `propose_mapping` guesses one from the features at run time; the
helpers here (`find_column`, `image_value`, ...) are shared by the VCR, WebQA and VQA hub mappers.
Example ids are ``{name}/{split}/{id or row index}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from vlcore.data.example import Example, open_image_bytes
from vlcore.errors import DatasetError

ROLES = ("image", "question", "answer", "category", "id", "image2")  # image2: NLVR2's second image
QUESTION_NAMES = ("question", "questions", "query", "prompt", "text", "caption", "captions", "sentence", "instruction")
ANSWER_NAMES = ("answer", "answers", "multiple_choice_answer", "label", "labels", "target", "gold", "output")
CATEGORY_NAMES = ("category", "answer_type", "question_type", "type", "kind", "qcate", "task")
ID_NAMES = ("id", "question_id", "qid", "uid", "guid", "annot_id", "example_id", "image_id")
IMAGE_PATH_NAMES = ("image_path", "image_file", "img_path", "img_fn", "file_name", "filename", "filepath", "path")


# -- features ---------------------------------------------------------------------------------
def describe_features(features: Mapping[str, Any]) -> dict[str, str]:
    """Column name -> a short type description, for error messages and the UI.

    >>> import datasets
    >>> describe_features(datasets.Features({"q": datasets.Value("string"), "img": datasets.Image()}))
    {'q': 'string', 'img': 'Image'}
    """
    return {name: _describe(feature) for name, feature in features.items()}


def _describe(feature: Any) -> str:
    import datasets

    if isinstance(feature, datasets.Value):
        return str(feature.dtype)
    if isinstance(feature, (datasets.Image, datasets.ClassLabel)):
        return type(feature).__name__
    if isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
        return f"list[{_describe(feature.feature)}]"
    if isinstance(feature, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in feature.items()) + "}"
    return type(feature).__name__


def columns_message(features: Mapping[str, Any]) -> str:
    """``"a (string), b (Image)"``: the columns a dataset has, for error messages."""
    described = describe_features(features)
    return ", ".join(f"{k} ({v})" for k, v in described.items()) or "no columns"


def is_image_feature(feature: Any) -> bool:
    """True for a `datasets.Image` feature."""
    import datasets

    return isinstance(feature, datasets.Image)


def is_image_list_feature(feature: Any) -> bool:
    """True for a list of `datasets.Image` (one row, several images)."""
    import datasets

    return isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)) and is_image_feature(
        feature.feature
    )


def is_text_feature(feature: Any) -> bool:
    """True for a string `datasets.Value`."""
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def is_list_feature(feature: Any) -> bool:
    """True for `List`, `LargeList` or `Sequence` features."""
    import datasets

    return isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence))


def find_column(
    features: Mapping[str, Any], names: Iterable[str], accept: Callable[[Any], bool] | None = None
) -> str | None:
    """The first column whose name matches one of ``names`` (case-insensitive) and passes ``accept``.

    Args:
        features: a dataset's ``.features``.
        names: candidate names, most specific first.
        accept: optional test on the column's feature type.

    Returns:
        The column name as the dataset spells it, or None.
    """
    by_lower = {name.lower(): name for name in features}
    for candidate in names:
        column = by_lower.get(candidate.lower())
        if column is not None and (accept is None or accept(features[column])):
            return column
    return None


def image_column(features: Mapping[str, Any]) -> str | None:
    """The first `datasets.Image` column, else the first list-of-Image column, else None."""
    for test in (is_image_feature, is_image_list_feature):
        for name, feature in features.items():
            if test(feature):
                return name
    return None


# -- values -----------------------------------------------------------------------------------
def decode_image_bytes(data: bytes, name: str = "image") -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, ...) into an RGB image.

    Raises:
        InputError: the bytes are empty or not a readable image.
    """
    return open_image_bytes(data, name)


def image_value(value: Any, name: str = "image") -> dict[str, Any]:
    """Turn an image cell into `Example` keyword arguments, decoding nothing yet.

    Args:
        value: a PIL image (decoded `datasets.Image`), a ``{"bytes", "path"}`` dict (``decode=False``),
            a file path, or a list of those (the first is used).
        name: what to call the image in error messages.

    Returns:
        ``{"image": ...}``, ``{"image_loader": ...}``, ``{"image_path": ...}``, or ``{}`` when empty.
    """
    if isinstance(value, (list, tuple)):
        return image_value(value[0], name) if value else {}
    if isinstance(value, Image.Image):
        return {"image": value}
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return {"image_loader": lambda: decode_image_bytes(data, name=path or name)}
        return {"image_path": str(path)} if path else {}
    if isinstance(value, (str, Path)) and str(value):
        return {"image_path": str(value)}
    return {}


def undecoded(dataset: Any, columns: Iterable[str]) -> Any:
    """The dataset with its Image columns cast to ``decode=False``, so rows decode only when shown.

    A damaged image then fails when its example is opened (`InputError`), not while a page is mapped.
    """
    import datasets

    for column in columns:
        feature = dataset.features.get(column) if dataset.features else None
        if is_image_feature(feature):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        elif is_image_list_feature(feature):
            dataset = dataset.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return dataset


def map_rows(dataset: Any, image_columns: Iterable[str], offset: int, limit: int | None, to_example) -> list:
    """``to_example(row, index)`` for rows ``offset .. offset+limit``, images left undecoded.

    The one loop every `datasets`-backed adapter shares: cast image columns to ``decode=False``, read the
    page with `vlcore.data.hub.load_rows` (map-style or streamed), map each row with its index.
    """
    from vlcore.data.hub import load_rows

    rows = load_rows(undecoded(dataset, image_columns), offset, None if limit is None else offset + limit)
    return [to_example(row, i) for i, row in enumerate(rows, start=offset)]


def text_value(value: Any) -> str:
    """A cell as display text: strings stripped, lists joined with "; ", None as ""."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "; ".join(text_value(v) for v in value)
    return str(value).strip()


def answers_value(value: Any, feature: Any = None) -> tuple[str, ...]:
    """Gold answers from a cell: a string, a ClassLabel id, a list of strings or of ``{"answer": ...}`` dicts.

    >>> answers_value([{"answer": "red"}, {"answer": "blue"}])
    ('red', 'blue')
    >>> answers_value({"answer": ["yes", "no"]})
    ('yes', 'no')
    """
    if value is None:
        return ()
    if isinstance(value, Mapping):
        if "answer" in value:
            return answers_value(value["answer"])
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(a for v in value for a in answers_value(v, getattr(feature, "feature", None)))
    if isinstance(value, int) and hasattr(feature, "int2str"):
        return (feature.int2str(value),) if value >= 0 else ()
    text = str(value).strip()
    return (text,) if text else ()


def json_value(value: Any) -> Any:
    """A cell that may hold JSON text: decoded when it is a JSON list or object, returned as is otherwise."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def rows_of(value: Any) -> list[dict]:
    """A list of records from a list of dicts, a dict of lists (old ``Sequence`` of structs) or JSON text."""
    value = json_value(value)
    if value is None:
        return []
    if isinstance(value, Mapping):
        keys = list(value)
        n = max((len(v) for v in value.values() if isinstance(v, (list, tuple))), default=0)
        return [{k: value[k][i] if isinstance(value[k], (list, tuple)) else None for k in keys} for i in range(n)]
    if isinstance(value, (list, tuple)):
        return [dict(v) for v in value if isinstance(v, Mapping)]
    return []


def row_id(row: Mapping[str, Any], column: str | None, index: int) -> str:
    """The row's id from ``column`` when set and non-empty, else its index."""
    if column:
        value = row.get(column)
        if value is not None and str(value).strip():
            return str(value).strip()
    return str(index)


# -- mapping ----------------------------------------------------------------------------------
def propose_mapping(features: Mapping[str, Any]) -> dict[str, str]:
    """Guess a column mapping from a dataset's features.

    Args:
        features: ``dataset.features``.

    Returns:
        Role -> column, with ``image`` always set; other roles only when a column looks right.

    Raises:
        DatasetError: no image column (no `datasets.Image` feature and no image-path column).
    """
    image = image_column(features) or find_column(features, IMAGE_PATH_NAMES, is_text_feature)
    if image is None:
        raise DatasetError(
            f"no image column found; the dataset has: {columns_message(features)}. "
            "Expected a `datasets.Image` column or a string column of image paths (e.g. 'image_path'). "
            "Cast the right column with `dataset.cast_column(name, datasets.Image())` or pick another dataset."
        )
    mapping = {"image": image}
    text = find_column(features, QUESTION_NAMES, is_text_feature) or find_column(
        features, QUESTION_NAMES, lambda f: is_list_feature(f) and is_text_feature(f.feature)
    )
    guesses = {
        "question": text,
        "answer": find_column(features, ANSWER_NAMES),
        "category": find_column(features, CATEGORY_NAMES),
        "id": find_column(features, ID_NAMES),
    }
    mapping.update({role: col for role, col in guesses.items() if col and col not in mapping.values()})
    return mapping


def check_mapping(features: Mapping[str, Any], mapping: Mapping[str, str]) -> dict[str, str]:
    """Validate a user's column mapping against the dataset's features.

    Args:
        features: ``dataset.features``.
        mapping: role -> column, roles from ``ROLES``; ``image`` required.

    Returns:
        The mapping with empty roles dropped.

    Raises:
        DatasetError: unknown role, missing image role, or a column the dataset does not have.
    """
    clean = {role: col for role, col in mapping.items() if col}
    unknown = sorted(set(clean) - set(ROLES))
    if unknown:
        raise DatasetError(f"unknown mapping roles {unknown}; expected roles among {ROLES}. Rename or drop them.")
    if "image" not in clean:
        raise DatasetError(
            f"the column mapping needs an 'image' column; got {dict(mapping)}. "
            f"Pick one of the dataset's columns: {columns_message(features)}"
        )
    missing = {role: col for role, col in clean.items() if col not in features}
    if missing:
        raise DatasetError(
            f"mapped columns not in the dataset: {missing}; it has: {columns_message(features)}. "
            "Choose existing columns."
        )
    return clean


def generic_row_to_example(
    row: Mapping[str, Any],
    mapping: Mapping[str, str],
    *,
    split: str,
    index: int,
    name: str = "generic",
    features: Mapping[str, Any] | None = None,
) -> Example:
    """Map one dataset row into an `Example` with a checked mapping.

    Args:
        row: the row as a dict (``dataset[i]``).
        mapping: role -> column (see `check_mapping`).
        split: split name, for the example id.
        index: row index, the id when no ``id`` column is mapped.
        name: dataset label, the first part of the example id.
        features: the dataset's features, to turn ClassLabel ids into names.

    Returns:
        An `Example` whose image decodes only when loaded.
    """
    features = features or {}
    column = mapping.get
    answer_col, category_col = column("answer"), column("category")
    answers = answers_value(row.get(answer_col), features.get(answer_col)) if answer_col else ()
    category = answers_value(row.get(category_col), features.get(category_col)) if category_col else ()
    key = row_id(row, column("id"), index)
    return Example(
        example_id=f"{name}/{split}/{key}",
        question=text_value(row.get(column("question"))) if column("question") else "",
        answers=answers,
        category=category[0] if category else None,
        source="generic",
        meta={"dataset": name, "split": split, "row": index, "mapping": dict(mapping)},
        extra_images=_extra_images(row, mapping, f"{name}/{split}/{key}"),
        **image_value(row.get(mapping["image"]), name=f"{name}/{split}/{key}"),
    )


def _extra_images(row: Mapping[str, Any], mapping: Mapping[str, str], name: str) -> tuple:
    """The mapped second image (``image2``) as an `Example.extra_images` entry, or ``()``."""
    if not mapping.get("image2"):
        return ()
    value = image_value(row.get(mapping["image2"]), name=f"{name} (second image)")
    extra = value.get("image") or value.get("image_loader") or value.get("image_path")
    return (extra,) if extra is not None else ()


def generic_examples(
    dataset: Any,
    mapping: Mapping[str, str] | None = None,
    *,
    split: str = "train",
    name: str = "generic",
    limit: int | None = None,
    offset: int = 0,
) -> list[Example]:
    """Examples for rows ``offset .. offset+limit`` of any dataset with an image column.

    Args:
        dataset: a `datasets.Dataset` or `datasets.IterableDataset`.
        mapping: role -> column; None proposes one with `propose_mapping`.
        split: split name, for example ids.
        name: dataset label, for example ids.
        limit: how many rows; None for all (avoid on large datasets).
        offset: first row.

    Raises:
        DatasetError: no image column, or a mapping naming columns the dataset lacks.
    """
    features = dataset.features or {}
    mapping = check_mapping(features, mapping) if mapping else propose_mapping(features)
    return map_rows(
        dataset, [mapping[r] for r in ("image", "image2") if mapping.get(r)], offset, limit,
        lambda row, i: generic_row_to_example(row, mapping, split=split, index=i, name=name, features=features),
    )


def require_columns(
    found: Mapping[str, str | None], required: Sequence[str], features: Mapping[str, Any], what: str
) -> None:
    """Raise a `DatasetError` naming the roles a mapper could not find a column for.

    Args:
        found: role -> column or None, as a mapper detected them.
        required: the roles the mapper cannot work without.
        features: the dataset's features, listed in the message.
        what: the schema's name ("VCR", "WebQA", ...).
    """
    missing = [role for role in required if not found.get(role)]
    if missing:
        raise DatasetError(
            f"this does not look like a {what} dataset: no column for {missing}. "
            f"Found columns: {columns_message(features)}. "
            f"Rename the columns, or load it as 'generic' with a column mapping."
        )
