"""Named dataset sources, mapped to `Example` lists."""

from __future__ import annotations

from vlcore.data.easy_vqa import SPLITS as EASY_VQA_SPLITS
from vlcore.data.easy_vqa import easy_vqa_examples
from vlcore.errors import DatasetError

SOURCES = {"easy_vqa": EASY_VQA_SPLITS}


def load_examples(dataset: str, split: str, limit: int | None = None) -> list:
    """Examples of a named dataset split.

    Args:
        dataset: a name in ``SOURCES``.
        split: a split of that dataset.
        limit: keep only the first ``limit`` examples.

    Raises:
        DatasetError: unknown dataset or split.
    """
    if dataset not in SOURCES:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of: {', '.join(SOURCES)}")
    if dataset == "easy_vqa":
        return easy_vqa_examples(split, limit)
    raise DatasetError(f"dataset {dataset!r} has no loader")  # pragma: no cover
