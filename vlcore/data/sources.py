"""Resolve an example id (from a URL or the browser) to an `Example`."""

from __future__ import annotations

from vlcore.data.easy_vqa import load_easy_vqa, to_example
from vlcore.errors import DatasetError


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
