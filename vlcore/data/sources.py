"""Browsable example sources, and resolving an example id (from a URL) back to an `Example`.

A source has a light text-only ``index`` (see `vlcore.data.browse.INDEX_COLUMNS`) and a way to
build the `Example` at a position; images are read only when an example is built. Example ids
are ``{source}/{split}/{position}``, so a link resolves in O(1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from vlcore.data.easy_vqa import answer_category, load_easy_vqa, to_example
from vlcore.errors import DatasetError


@dataclass(frozen=True, eq=False)
class ExampleSource:
    """A dataset split that can be browsed and resolved by position.

    Attributes:
        key: source name used in ids and URLs (``easy_vqa``, ``hub:org/name``, ...).
        split: split name.
        label: what the UI shows.
        index: one row per example with `INDEX_COLUMNS`.
        build: position -> `Example`.
        categories_label: what "category" means for this source (e.g. "Qcate", "answer type").
    """

    key: str
    split: str
    label: str
    index: pd.DataFrame
    build: Callable[[int], object]
    categories_label: str = "category"

    def __len__(self) -> int:
        return len(self.index)

    def example(self, position: int):
        """The `Example` at a position; DatasetError when out of range."""
        if not 0 <= int(position) < len(self.index):
            raise DatasetError(f"{self.label} has {len(self.index)} examples; position {position} is out of range")
        return self.build(int(position))


def easy_vqa_source(split: str = "test") -> ExampleSource:
    """The bundled easy-VQA split as a source."""
    records = load_easy_vqa(split)
    index = pd.DataFrame({
        "example_id": [r.example_id for r in records],
        "question": [r.question for r in records],
        "category": [answer_category(r.answer) for r in records],
        "answers": [[r.answer] for r in records],
        "objects": [[] for _ in records],
    })
    return ExampleSource("easy_vqa", split, f"easy-VQA ({split})", index, lambda i: to_example(records[i]),
                         "question type")


def resolve_example(example_id: str, store=None):
    """The `Example` behind an id such as ``easy_vqa/test/12`` or ``upload/<hash>``.

    Raises:
        DatasetError: the id is malformed or names nothing known.
    """
    source, _, rest = (example_id or "").partition("/")
    if source == "easy_vqa":
        split, _, index = rest.partition("/")
        records = load_easy_vqa(split) if split in ("train", "test") else ()
        if index.isdigit() and int(index) < len(records):
            return to_example(records[int(index)])
    elif source == "upload" and store is not None:
        from vlcore.store import get_input

        example = get_input(store, example_id)
        if example is not None:
            return example
    raise DatasetError(f"unknown example {example_id!r}; open one from the dataset browser or upload an image")
