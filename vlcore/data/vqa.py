"""VQAv2-style datasets (parquet on the hub or local) mapped into `Example`.

Columns: ``question``, ``multiple_choice_answer``, ``answers`` (ten human answers, as
``{"answer": ...}`` dicts or strings), ``image`` (a `datasets.Image`), and optionally
``question_id``, ``answer_type``, ``question_type``, ``image_id``. Columns are found from the
features at run time; a missing question or image column is a `DatasetError` listing what exists.

``Example.answers`` is the multiple-choice answer first, then every other answer that at least
three annotators gave (those score 1.0 under VQA accuracy); ``meta["human_answers"]`` keeps all ten.
``category`` is ``answer_type`` ("yes/no", "number", "other") when present. Example ids are
``vqa/{split}/{question_id or row index}``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from vlcore.data.example import Example
from vlcore.data.generic import (
    IMAGE_PATH_NAMES,
    answers_value,
    find_column,
    image_column,
    image_value,
    is_text_feature,
    map_rows,
    require_columns,
    row_id,
    text_value,
)

MIN_AGREEING = 3  # annotators needed for an answer to count as fully correct in VQA accuracy
HUB_ROLES: dict[str, tuple[str, ...]] = {
    "question": ("question", "questions", "query"),
    "multiple_choice_answer": ("multiple_choice_answer", "answer", "mc_answer"),
    "answers": ("answers", "human_answers", "all_answers"),
    "question_id": ("question_id", "qid", "id"),
    "answer_type": ("answer_type",),
    "question_type": ("question_type",),
    "image_id": ("image_id",),
}


def gold_answers(multiple_choice: str | None, human: tuple[str, ...]) -> tuple[str, ...]:
    """The multiple-choice answer, then other answers given by at least three annotators.

    >>> gold_answers("2", ("2", "2", "two", "two", "two", "3"))
    ('2', 'two')
    >>> gold_answers(None, ("yes",))
    ('yes',)
    """
    counts = Counter(a.strip() for a in human if a.strip())
    first = (multiple_choice or "").strip() or (counts.most_common(1)[0][0] if counts else "")
    rest = [a for a, n in counts.items() if n >= MIN_AGREEING and a != first]
    return ((first,) if first else ()) + tuple(rest)


def vqa_columns(features: Mapping[str, Any]) -> dict[str, str]:
    """Find a VQAv2-style dataset's columns from its features.

    Returns:
        Role -> column: ``question`` and ``image`` (or ``image_path``) always, the others when present.

    Raises:
        DatasetError: no question column or no image column; lists the columns found.
    """
    found = {role: find_column(features, names) for role, names in HUB_ROLES.items()}
    found["question"] = find_column(features, HUB_ROLES["question"], is_text_feature)
    found["image"] = image_column(features) or find_column(features, IMAGE_PATH_NAMES, is_text_feature)
    require_columns(found, ("question", "image"), features, "VQAv2-style")
    return {role: col for role, col in found.items() if col}


def vqa_row_to_example(
    row: Mapping[str, Any],
    columns: Mapping[str, str],
    *,
    split: str,
    index: int,
    features: Mapping[str, Any] | None = None,
) -> Example:
    """Map one VQAv2-style row into an `Example` (columns from `vqa_columns`).

    Args:
        row: ``dataset[i]``; the image may be undecoded (``{"bytes", "path"}``).
        columns: role -> column.
        split: split name for the id.
        index: row index, the id when there is no ``question_id``.
        features: the dataset's features, to read ClassLabel answers.
    """
    features = features or {}
    get = lambda role: row.get(columns[role]) if role in columns else None  # noqa: E731
    human = answers_value(get("answers"), features.get(columns.get("answers", "")))
    mc = answers_value(get("multiple_choice_answer"), features.get(columns.get("multiple_choice_answer", "")))
    key = row_id(row, columns.get("question_id"), index)
    answer_type = text_value(get("answer_type")) or None
    meta = {
        "split": split,
        "row": index,
        "human_answers": list(human),
        "columns": dict(columns),
        "question_type": text_value(get("question_type")) or None,
        "answer_type": answer_type,
    }
    if get("image_id") is not None:
        meta["image_id"] = get("image_id")
    return Example(
        example_id=f"vqa/{split}/{key}",
        question=text_value(get("question")),
        answers=gold_answers(mc[0] if mc else None, human),
        category=answer_type,
        source="vqa",
        meta=meta,
        **image_value(get("image"), name=f"vqa/{split}/{key}"),
    )


def vqa_examples(dataset: Any, *, split: str, limit: int | None = None, offset: int = 0) -> list[Example]:
    """Examples for rows ``offset .. offset+limit`` of a VQAv2-style dataset (`datasets.Dataset` or stream).

    Raises:
        DatasetError: no question or image column (the message lists the columns found).
    """
    features = dataset.features or {}
    columns = vqa_columns(features)
    return map_rows(dataset, [columns["image"]], offset, limit,
                    lambda row, i: vqa_row_to_example(row, columns, split=split, index=i, features=features))
