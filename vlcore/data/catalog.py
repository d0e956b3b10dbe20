"""Named dataset sources, mapped to `Example` lists.

``easy_vqa`` is bundled. The others read what the user points at (``location``):

- ``vcr``: the original ``{split}.jsonl`` (file or folder) with ``vcr1images/``, or a VCR mirror
  (hub id, parquet / JSON file, ``save_to_disk`` folder).
- ``webqa``: the official JSON keyed by Guid (images from ``imgs.tsv``), or a WebQA mirror.
- ``vqa``: a VQAv2-style dataset (hub id or local).
- ``generic``: any dataset with an image column, through a column mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlcore.data.easy_vqa import easy_vqa_examples
from vlcore.errors import DatasetError


@dataclass(frozen=True)
class SourceInfo:
    """What a UI needs to offer a source.

    Attributes:
        name: key for `load_examples`.
        title: display name.
        description: one sentence on what it is.
        splits: known splits (the first is the default); empty when the data decides.
        needs_location: whether the user must give a hub id or a path.
        location_help: what to type as the location.
        uses_mapping: whether a column mapping applies (``generic``).
    """

    name: str
    title: str
    description: str
    splits: tuple[str, ...]
    needs_location: bool
    location_help: str = ""
    uses_mapping: bool = False


SOURCE_INFO: dict[str, SourceInfo] = {
    "easy_vqa": SourceInfo(
        "easy_vqa",
        "easy-VQA (bundled)",
        "Synthetic shapes and colours; 13 answers; ships with the app.",
        ("test", "train"),
        needs_location=False,
    ),
    "vcr": SourceInfo(
        "vcr",
        "VCR",
        "Visual Commonsense Reasoning: movie stills, multiple-choice answers and rationales, object boxes.",
        ("val", "train", "test"),
        needs_location=True,
        location_help="folder with val.jsonl and vcr1images/, a VCR .jsonl file, or a VCR mirror (hub id or parquet)",
    ),
    "webqa": SourceInfo(
        "webqa",
        "WebQA",
        "Open-domain questions answered from image and text facts.",
        ("val", "train", "test"),
        needs_location=True,
        location_help="WebQA_train_val.json (imgs.tsv and imgs.lineidx beside it), or a WebQA mirror",
    ),
    "vqa": SourceInfo(
        "vqa",
        "VQAv2-style",
        "Questions about COCO-style images with ten human answers each.",
        ("validation", "train", "test"),
        needs_location=True,
        location_help="hub id or local parquet / save_to_disk folder with question, answers and image columns",
    ),
    "generic": SourceInfo(
        "generic",
        "Any image dataset",
        "Any dataset with an image column; pick which columns hold the text.",
        (),
        needs_location=True,
        location_help="hub id, parquet / JSON file, save_to_disk folder, or image folder",
        uses_mapping=True,
    ),
}
SOURCES = {name: info.splits for name, info in SOURCE_INFO.items()}  # name -> known splits


def list_sources() -> list[SourceInfo]:
    """Every source a UI can offer, bundled first."""
    return list(SOURCE_INFO.values())


def load_examples(
    dataset: str,
    split: str,
    limit: int | None = None,
    *,
    location: str | None = None,
    offset: int = 0,
    config: str | None = None,
    streaming: bool = False,
    mapping: Mapping[str, str] | None = None,
    images: Any = None,
    cache_dir: str | None = None,
) -> list:
    """Examples of a named dataset split, ``limit`` of them from ``offset``.

    Args:
        dataset: a name in ``SOURCE_INFO``.
        split: a split of that dataset.
        limit: keep at most ``limit`` examples; None for all (avoid on large sets).
        location: hub id or local path, for every source but ``easy_vqa``.
        offset: skip this many examples first.
        config: hub configuration (subset) name.
        streaming: stream a hub dataset instead of downloading the split.
        mapping: column mapping for ``generic`` (see `vlcore.data.generic`); None proposes one.
        images: VCR: the ``vcr1images`` folder; WebQA: the ``imgs.tsv`` path or a `WebQAImages`.
        cache_dir: `datasets` cache folder; None for its default.

    Raises:
        DatasetError: unknown dataset or split, a missing location, or any loading / mapping failure.
    """
    if dataset not in SOURCE_INFO:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of: {', '.join(SOURCE_INFO)}")
    if dataset == "easy_vqa":
        examples = easy_vqa_examples(split, None if limit is None else offset + limit)
        return examples[offset:]
    if not location:
        raise DatasetError(f"dataset {dataset!r} needs a location: {SOURCE_INFO[dataset].location_help}")
    if dataset == "vcr" and _is_vcr_original(location):
        from vlcore.data.vcr import load_vcr_examples

        # strict=False: a record whose metadata does not match its objects keeps loading, without boxes
        return load_vcr_examples(location, split=split, images_root=images, limit=limit, offset=offset, strict=False)
    if dataset == "webqa" and Path(location).suffix.lower() == ".json" and Path(location).is_file():
        from vlcore.data.webqa import load_webqa_examples

        return load_webqa_examples(location, split=split, images=images, limit=limit, offset=offset)
    ds = _open(location, split, config, streaming, cache_dir)
    return _map_rows(dataset, ds, split=split, limit=limit, offset=offset, mapping=mapping, images=images)


def _is_vcr_original(location: str) -> bool:
    path = Path(location).expanduser()
    return path.suffix.lower() == ".jsonl" or (path.is_dir() and any(path.glob("*.jsonl")))


def _open(location: str, split: str, config: str | None, streaming: bool, cache_dir: str | None) -> Any:
    from vlcore.data.hub import SourceSpec, load_source

    return load_source(SourceSpec(location, split=split, config=config, streaming=streaming, cache_dir=cache_dir))


def _map_rows(dataset: str, ds: Any, *, split: str, limit: int | None, offset: int, mapping: Any, images: Any) -> list:
    """Map a page of a loaded `datasets` split with the source's mapper."""
    if dataset == "vcr":
        from vlcore.data.vcr_hub import vcr_hub_examples

        return vcr_hub_examples(ds, split=split, limit=limit, offset=offset, images_root=images)
    if dataset == "webqa":
        from vlcore.data.webqa import WebQAImages, webqa_hub_examples

        reader = images if isinstance(images, WebQAImages) or images is None else WebQAImages(images)
        return webqa_hub_examples(ds, split=split, limit=limit, offset=offset, images=reader)
    if dataset == "vqa":
        from vlcore.data.vqa import vqa_examples

        return vqa_examples(ds, split=split, limit=limit, offset=offset)
    from vlcore.data.generic import generic_examples

    return generic_examples(ds, mapping, split=split, limit=limit, offset=offset)
