"""The examples of a sweep as a Ray dataset, and the mapping of its rows back to `Example` on the workers.

easy-VQA rows are positions (`ray.data.from_items`; the ``easy-vqa`` package ships the images to every worker).
The rows of anything `vlcore.data.hub.load_source` opens (hub ids, parquet shards, ``save_to_disk`` folders, JSON,
image folders) go over with `ray.data.from_arrow`, which is what `ray.data.from_huggingface` does with a selection
of a split. Workers format each batch with `vlcore.data.hub.load_rows` and map rows with the dataset's own
``*_row_to_example``, so a row becomes the same `Example` as in `vlcore.data.catalog.load_examples`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlcore.errors import DatasetError

ROW = "__vlscope_row"  # the example's position in its split, carried through Ray


@dataclass(frozen=True)
class RowMapper:
    """Turns a row of the Ray dataset into the `Example` the in-process loader makes of the same row.

    Attributes:
        dataset: ``easy_vqa``, ``vqa``, ``generic``, ``vcr`` or ``webqa``.
        split: the split, for example ids.
        columns: role -> column (the column mapping for ``generic``), found on the driver.
        features: the `datasets.Features` of the rows (None for easy-VQA).
        images: VCR images folder or WebQA ``imgs.tsv``, a path the workers can read.
    """

    dataset: str
    split: str
    columns: dict | None = None
    features: Any = None
    images: str | None = None

    def examples(self, batch) -> list:
        """The `Example` of every row of a pyarrow batch, in order (rows formatted as `vlcore.data.hub.load_rows`)."""
        if self.dataset == "easy_vqa":
            from vlcore.data.easy_vqa import load_easy_vqa, to_example

            records = load_easy_vqa(self.split)
            return [to_example(records[i]) for i in batch.column(ROW).to_pylist()]
        return [self.example(row) for row in self.rows(batch)]

    def rows(self, batch) -> list[dict]:
        import datasets
        from datasets.table import InMemoryTable

        from vlcore.data.generic import undecoded
        from vlcore.data.hub import load_rows

        hf = datasets.Dataset(InMemoryTable(batch.select(list(self.features))),
                              info=datasets.DatasetInfo(features=self.features))
        return load_rows(undecoded(hf, list(self.features)))

    def example(self, row: dict):
        """One formatted row as an `Example` (the image stays undecoded)."""
        index, c, split = int(row[ROW]), self.columns, self.split
        if self.dataset == "vqa":
            from vlcore.data.vqa import vqa_row_to_example

            return vqa_row_to_example(row, c, split=split, index=index, features=self.features)
        if self.dataset == "generic":
            from vlcore.data.generic import generic_row_to_example

            return generic_row_to_example(row, c, split=split, index=index, features=self.features)
        if self.dataset == "vcr":
            from vlcore.data.vcr_hub import vcr_hub_row_to_example

            return vcr_hub_row_to_example(row, c, split=split, index=index, images_root=self.images)
        from vlcore.data.webqa import WebQAImages, webqa_hub_row_to_example

        images = WebQAImages(self.images) if self.images else None
        return webqa_hub_row_to_example(row, c, split=split, index=index, images=images)


@dataclass
class RayInput:
    """The examples of a Ray sweep.

    Attributes:
        ids: every example id, in split order (the in-process sweep's list for the same arguments).
        mapper: rows -> examples, run on the workers.
        table: for ``datasets`` sources, the selected rows (with the ``ROW`` column); None for easy-VQA.
        offset: position of the first example in its split.
    """

    ids: list[str]
    mapper: RowMapper
    table: Any = None
    offset: int = 0

    def to_ray(self, positions: Sequence[int], batch_size: int):
        """The Ray dataset of the examples at ``positions`` (indexes into ``ids``), one block per batch."""
        import ray.data

        blocks = max(1, math.ceil(len(positions) / batch_size))
        if self.table is None:
            items = [{ROW: self.offset + int(p)} for p in positions]
            return ray.data.from_items(items, override_num_blocks=blocks)
        # from_huggingface would hand this selection to from_arrow too, after trying to reload the whole
        # split from the hub to compare fingerprints (and it needs aiohttp): hand it over directly.
        table = self.table.select(positions).with_format("arrow")[:]
        return ray.data.from_arrow(table, override_num_blocks=blocks)


def ray_input(
    dataset: str, split: str, limit: int | None = None, *, location: str | None = None, offset: int = 0,
    config: str | None = None, mapping: dict | None = None, images: str | None = None,
) -> RayInput:
    """The examples `vlcore.data.catalog.load_examples` would give for the same arguments, for Ray.

    Only ids are mapped on the driver (without image columns); workers map rows and decode images.

    Raises:
        DatasetError: an unknown dataset, a missing location, or a source only the in-process sweep reads
            (the original VCR ``.jsonl`` and WebQA ``.json`` files).
    """
    from vlcore.data.catalog import SOURCE_INFO, _is_vcr_original

    if dataset not in SOURCE_INFO:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of: {', '.join(SOURCE_INFO)}")
    if dataset == "easy_vqa":
        from vlcore.data.easy_vqa import load_easy_vqa

        records = load_easy_vqa(split)[offset : None if limit is None else offset + limit]
        return RayInput([r.example_id for r in records], RowMapper(dataset, split), offset=offset)
    if not location:
        raise DatasetError(f"dataset {dataset!r} needs a location: {SOURCE_INFO[dataset].location_help}")
    webqa_json = dataset == "webqa" and Path(location).suffix.lower() == ".json" and Path(location).is_file()
    if (dataset == "vcr" and _is_vcr_original(location)) or webqa_json:
        raise DatasetError(f"the Ray engine reads datasets through `datasets` (hub ids, parquet, save_to_disk, "
                           f"JSON lines, image folders); {location} is read in this process: drop --engine ray")
    from vlcore.data.hub import SourceSpec, load_source

    ds = load_source(SourceSpec(location, split=split, config=config))
    stop = len(ds) if limit is None else min(len(ds), offset + limit)
    page = ds.select(range(offset, max(offset, stop)))
    columns = _columns(dataset, page.features, mapping)  # before the row column exists: never mapped to a role
    page = page.add_column(ROW, list(range(offset, max(offset, stop))))
    mapper = RowMapper(dataset, split, columns, page.features, images)
    image_cols = [c for c in page.column_names if _is_image(page.features[c])]
    ids = [mapper.example(row).example_id for row in page.remove_columns(image_cols)]
    return RayInput(ids, mapper, page, offset)


def _columns(dataset: str, features, mapping: dict | None) -> dict:
    if dataset == "vqa":
        from vlcore.data.vqa import vqa_columns

        return vqa_columns(features)
    if dataset == "vcr":
        from vlcore.data.vcr_hub import vcr_hub_columns

        return vcr_hub_columns(features)
    if dataset == "webqa":
        from vlcore.data.webqa import webqa_hub_columns

        return webqa_hub_columns(features)
    from vlcore.data.generic import check_mapping, propose_mapping

    return check_mapping(features, mapping) if mapping else propose_mapping(features)


def _is_image(feature) -> bool:
    from vlcore.data.generic import is_image_feature, is_image_list_feature

    return is_image_feature(feature) or is_image_list_feature(feature)
