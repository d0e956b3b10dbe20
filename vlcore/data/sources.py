"""Browsable example sources, and resolving an example id (from a URL) back to an `Example`.

A source has a light text-only ``index`` (see `vlcore.data.browse.INDEX_COLUMNS`) and a way to
build the `Example` at a position; images are read only when an example is built. Example ids
are ``{source}/{split}/{position}``, so a link resolves in O(1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vlcore.data.easy_vqa import answer_category, load_easy_vqa, to_example
from vlcore.data.paths import is_allowed
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
        fingerprint: the version of the local files it was read from (`vlcore.data.paths.local_fingerprint`
            of the location and the images), "" for the bundled set and hub ids; caches of anything derived
            from the source are keyed on it, so a file rewritten under the same path is never served stale.
    """

    key: str
    split: str
    label: str
    index: pd.DataFrame
    build: Callable[[int], object]
    categories_label: str = "category"
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.index)

    def example(self, position: int):
        """The `Example` at a position; DatasetError when out of range."""
        if not 0 <= int(position) < len(self.index):
            raise DatasetError(f"{self.label} has {len(self.index)} examples; position {position} is out of range")
        return self.build(int(position))

    def position_of(self, example_id: str) -> int | None:
        """Position of an example id, or None when the source has no such example."""
        lookup = self.__dict__.get("_lookup")
        if lookup is None:
            lookup = {eid: i for i, eid in enumerate(self.index["example_id"])}
            object.__setattr__(self, "_lookup", lookup)
        return lookup.get(example_id)

    def find(self, example_id: str):
        """The `Example` with this id.

        Raises:
            DatasetError: no such example in this source.
        """
        position = self.position_of(example_id)
        if position is None:
            raise DatasetError(f"{self.label} has no example {example_id!r}; open one from the browser")
        return self.example(position)


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


# Sources read from `datasets` are materialised up to this many rows when they cannot be indexed lazily.
MAX_EAGER_ROWS = 20_000
STREAM_ROWS = 1_000


def examples_source(key: str, split: str, label: str, examples: list, categories_label: str = "category") -> ExampleSource:
    """A source over a list of `Example` records (images stay lazy)."""
    index = pd.DataFrame({
        "example_id": [e.example_id for e in examples],
        "question": [e.question for e in examples],
        "category": [e.category for e in examples],
        "answers": [list(e.answers) for e in examples],
        "objects": [sorted(set(e.meta.get("objects") or [])) for e in examples],
    })
    return ExampleSource(key, split, label, index, examples.__getitem__, categories_label)


def open_source(
    dataset: str,
    location: str,
    split: str,
    config: str | None = None,
    streaming: bool = False,
    images: str | None = None,
    mapping: dict | None = None,
) -> ExampleSource:
    """Open a VCR / WebQA / VQAv2-style / generic dataset as a browsable source.

    VQAv2-style and generic map-style datasets are indexed lazily, column by column, so a
    100k-row set indexes in well under a second and only the rows on screen are decoded. VCR and
    WebQA (whose text needs rendering) and streams are materialised (images stay lazy), up to
    `MAX_EAGER_ROWS` (streams: the first `STREAM_ROWS`).

    Raises:
        DatasetError: anything `vlcore.data.hub.load_source` or the adapters refuse.
    """
    from vlcore.data.catalog import SOURCE_INFO, load_examples

    if dataset not in SOURCE_INFO or dataset == "easy_vqa":
        raise DatasetError(f"unknown dataset kind {dataset!r}; choose one of: {', '.join(SOURCE_INFO)}")
    key = f"{dataset}:{location}" + (f":{config}" if config else "") + (f":img={images}" if images else "")
    key += f":map={sorted(mapping.items())}" if mapping else ""
    label = f"{SOURCE_INFO[dataset].title}: {location} ({split})"
    categories = {"webqa": "Qcate", "vqa": "answer type"}.get(dataset, "category")
    if dataset in ("vqa", "generic") and not streaming:
        from vlcore.data.hub import SourceSpec, load_source

        ds = load_source(SourceSpec(location, split=split, config=config))
        return _lazy_source(dataset, key, split, label, ds, mapping, categories)
    limit = STREAM_ROWS if streaming else MAX_EAGER_ROWS
    examples = load_examples(dataset, split, limit, location=location, config=config, streaming=streaming,
                             mapping=mapping, images=images)
    return examples_source(key, split, label, examples, categories)


def _lazy_source(dataset, key, split, label, ds, mapping, categories) -> ExampleSource:
    """Index a map-style `datasets.Dataset` column-wise; build examples row by row on demand."""
    from vlcore.data.generic import answers_value, check_mapping, generic_row_to_example, propose_mapping, undecoded
    from vlcore.data.vqa import vqa_columns, vqa_row_to_example

    if getattr(ds, "_indices", None) is not None:  # a selected/shuffled view: index the rows it shows
        ds = ds.flatten_indices()
    features = ds.features
    if dataset == "vqa":
        cols = vqa_columns(features)
        roles = {"question": cols.get("question"), "answer": cols.get("multiple_choice_answer"),
                 "category": cols.get("answer_type"), "id": cols.get("question_id")}
        build_row = lambda row, i: vqa_row_to_example(row, cols, split=split, index=i, features=features)  # noqa: E731
        prefix = "vqa"
    else:
        cols = check_mapping(features, mapping) if mapping else propose_mapping(features)
        roles = {r: cols.get(r) for r in ("question", "answer", "category", "id")}
        build_row = lambda row, i: generic_row_to_example(row, cols, split=split, index=i, features=features)  # noqa: E731
        prefix = "generic"
    table = ds.data

    def column(role: str) -> list:
        return table.column(roles[role]).to_pylist() if roles.get(role) else [None] * len(ds)

    ids = column("id")
    if len(set(ids)) != len(ids):  # a mapped id column that repeats (e.g. image ids): use row positions
        ids = [None] * len(ids)
    index = pd.DataFrame({
        "example_id": [f"{prefix}/{split}/{i if v is None else v}" for i, v in enumerate(ids)],
        "question": [str(q) if q is not None else "" for q in column("question")],
        "category": [str(c) if c is not None else None for c in column("category")],
        "answers": [list(answers_value(a, features.get(roles["answer"] or ""))) if a is not None else []
                    for a in column("answer")],
        "objects": [[] for _ in range(len(ds))],
    })
    rows = undecoded(ds, [cols[r] for r in ("image", "image2") if cols.get(r)])
    return ExampleSource(key, split, label, index, lambda i: build_row(rows[i], i), categories)


def check_location(location: str) -> str:
    """Accept a hub id, or a local path inside `data_roots`.

    Raises:
        DatasetError: a local path outside the configured roots (links must not read arbitrary files).
    """
    from vlcore.data.hub import HUB_ID

    location = (location or "").strip()
    if HUB_ID.match(location) and not Path(location).exists():
        return location
    if is_allowed(location):
        return str(Path(location).expanduser().resolve())
    raise DatasetError(
        f"{location!r} is not a hub id and not under a configured data folder. Whoever runs the app can "
        "allow a folder by adding it to VLSCOPE_DATA_ROOTS (the configured folders are not shown here, so "
        "a link cannot reveal the server's paths)."
    )


def resolve_example(example_id: str, store=None, source: ExampleSource | None = None):
    """The `Example` behind an id such as ``easy_vqa/test/12``, ``upload/<hash>``, or any id of ``source``.

    Raises:
        DatasetError: the id is malformed or names nothing known.
    """
    kind, _, rest = (example_id or "").partition("/")
    if kind not in ("easy_vqa", "upload") and source is not None:
        return source.find(example_id)
    if kind == "easy_vqa":
        split, _, index = rest.partition("/")
        records = load_easy_vqa(split) if split in ("train", "test") else ()
        if index.isdigit() and int(index) < len(records):
            return to_example(records[int(index)])
    elif kind == "upload" and store is not None:
        example = store.get_input(example_id)
        if example is not None:
            return example
    raise DatasetError(f"unknown example {example_id!r}; open one from the dataset browser or upload an image")
