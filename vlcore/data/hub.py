"""Load datasets through the `datasets` library: hub ids, ``save_to_disk`` folders, parquet / JSON files,
image folders. Every failure a user can cause becomes a one-line `DatasetError`.

Rows stay on disk (Arrow memory maps) or in the stream: read a page with `load_rows`, never the
whole set. Dataset loading scripts are not run (``datasets`` 4+ dropped them; no remote code).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from vlcore.errors import DatasetError

KINDS = ("auto", "hub", "disk", "parquet", "json", "imagefolder")
FILE_KINDS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".ndjson": "json"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SAMPLES_HINT = "pick a bundled sample (easy_vqa) or a local folder / parquet / JSON file instead"


@dataclass(frozen=True)
class SourceSpec:
    """Where a dataset lives and which part of it to open.

    Attributes:
        location: a hub id (``"owner/name"``) or a local path (folder or file).
        split: split to open ("train", "validation", ...).
        config: hub configuration (subset) name, if the dataset has several.
        kind: one of ``KINDS``; "auto" decides from the location.
        streaming: stream rows instead of downloading the split (hub only; for large sets).
        revision: hub branch, tag or commit.
        cache_dir: where `datasets` keeps its Arrow cache; None for its default.
    """

    location: str
    split: str = "train"
    config: str | None = None
    kind: str = "auto"
    streaming: bool = False
    revision: str | None = None
    cache_dir: str | None = None


def resolve_kind(spec: SourceSpec) -> str:
    """The concrete kind of a spec: "hub", "disk", "parquet", "json", "imagefolder" or "folder".

    Raises:
        DatasetError: an unknown kind, a local path that does not exist, or an unsupported file type.
    """
    if spec.kind not in KINDS:
        raise DatasetError(f"unknown source kind {spec.kind!r}; expected one of {KINDS}")
    if spec.kind != "auto":
        return spec.kind
    path = Path(spec.location).expanduser()
    if path.is_dir():
        return "disk" if _is_saved_dataset(path) else "folder"
    if path.is_file():
        kind = FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise DatasetError(
                f"cannot load {path.name}: expected a {', '.join(FILE_KINDS)} file, a folder, or a hub id; "
                "convert the file to parquet or JSON lines"
            )
        return kind
    if _looks_local(spec.location):
        raise DatasetError(f"local path not found: {path.resolve()}; check the path (it is read on this machine)")
    return "hub"


def _is_saved_dataset(path: Path) -> bool:
    names = ("dataset_info.json", "state.json", "dataset_dict.json")
    return any((path / name).is_file() for name in names)


def _looks_local(location: str) -> bool:
    """True when ``location`` can only be meant as a path (not a hub id)."""
    if not location or location.startswith(("/", ".", "~", "\\")) or ":" in location:
        return True
    return Path(location).suffix.lower() in FILE_KINDS or location.count("/") > 1 or not HUB_ID.match(location)


def load_source(spec: SourceSpec) -> Any:
    """Open one split of a dataset without reading its rows.

    Args:
        spec: where and what to open.

    Returns:
        A `datasets.Dataset` (memory-mapped) or, with ``streaming=True`` on the hub, a `datasets.IterableDataset`.

    Raises:
        DatasetError: the hub is unreachable or the id unknown, the dataset needs a loading script,
            the split or config does not exist (the message lists those that do), or a local path is missing.
    """
    kind = resolve_kind(spec)
    try:
        if kind == "disk":
            return _pick_split(_load_from_disk(spec), spec)
        return _load_dataset(spec, kind)
    except DatasetError:
        raise
    except Exception as exc:  # `datasets` raises many types; map the known ones, re-raise the rest
        raise explain_load_error(exc, spec, kind) from exc


def _load_from_disk(spec: SourceSpec) -> Any:
    import datasets

    return datasets.load_from_disk(str(Path(spec.location).expanduser()))


def _pick_split(loaded: Any, spec: SourceSpec) -> Any:
    """A split of a loaded `DatasetDict`, or the `Dataset` itself."""
    if not isinstance(loaded, Mapping):
        return loaded
    if spec.split not in loaded:
        raise DatasetError(
            f"split {spec.split!r} not found in {spec.location}; "
            f"available splits: {', '.join(loaded)}. Pick one of those."
        )
    return loaded[spec.split]


def _load_dataset(spec: SourceSpec, kind: str) -> Any:
    import datasets

    kwargs: dict[str, Any] = {"split": spec.split, "cache_dir": spec.cache_dir}
    location = str(Path(spec.location).expanduser())
    if kind in ("parquet", "json"):
        return datasets.load_dataset(kind, data_files={spec.split: location}, **kwargs)
    if kind == "imagefolder":
        return datasets.load_dataset("imagefolder", data_dir=location, **kwargs)
    if kind == "folder":
        return datasets.load_dataset(location, **kwargs)
    return datasets.load_dataset(spec.location, spec.config, revision=spec.revision, streaming=spec.streaming, **kwargs)


def explain_load_error(exc: Exception, spec: SourceSpec, kind: str) -> Exception:
    """Turn an exception from `datasets` into a one-line `DatasetError`; unknown ones are returned unchanged.

    Args:
        exc: what `datasets.load_dataset` / `load_from_disk` raised.
        spec: what was asked for.
        kind: the resolved kind.

    Returns:
        A `DatasetError` for known failures, else ``exc`` itself (a bug to surface).
    """
    from datasets.exceptions import DatasetNotFoundError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = spec.location
    if "scripts are no longer supported" in text or "trust_remote_code" in text:
        return DatasetError(
            f"{where} is a script-based dataset: `datasets` 4+ no longer runs loading scripts ({text}). "
            "Use a parquet mirror of it (the hub's 'refs/convert/parquet' branch) or local files."
        )
    split_names = _split_names(text)
    if split_names is not None:
        return DatasetError(
            f"split {spec.split!r} not found in {where}; available splits: {', '.join(split_names)}. Pick one of those."
        )
    if _is_unreachable(exc):
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "no network"
        return DatasetError(
            f"the Hugging Face Hub is unreachable ({why}), so {where!r} cannot be loaded; {SAMPLES_HINT}"
        )
    if isinstance(exc, DatasetNotFoundError) or type(exc).__name__ in ("RepositoryNotFoundError", "HFValidationError"):
        return DatasetError(
            f"no dataset {where!r} on the Hugging Face Hub (or it is private/gated): {text}. "
            f"Check the id, or {SAMPLES_HINT}"
        )
    if ("config" in text.lower() and spec.config is not None) or "Config name is missing" in text:
        return DatasetError(f"{where}: {text}. Set the config (subset) to one of the names listed.")
    if isinstance(exc, FileNotFoundError):
        return DatasetError(f"{where}: {text}. Check the path, or for a hub id check its spelling.")
    return exc


def _split_names(text: str) -> list[str] | None:
    """Split names from `datasets`' unknown-split messages, or None when it is not one."""
    if not re.search(r"Unknown split|Bad split", text):
        return None
    found = re.search(r"\[(.*?)\]", text)
    return re.findall(r"'([^']+)'", found.group(1)) if found else []


def _is_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is a network or offline-mode failure."""
    seen = 0
    while exc is not None and seen < 5:
        name = type(exc).__name__
        if (
            isinstance(exc, (ConnectionError, TimeoutError))
            or "Offline" in name
            or "Connect" in name
            or "Timeout" in name
        ):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def hub_offline() -> bool:
    """True when `HF_HUB_OFFLINE` (or `HF_DATASETS_OFFLINE`) is set: the hub is not contacted."""
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def row_count(dataset: Any) -> int | None:
    """Number of rows, or None for a stream whose length is unknown."""
    try:
        return len(dataset)
    except TypeError:
        return None


def load_rows(dataset: Any, start: int = 0, stop: int | None = None) -> list[dict]:
    """Rows ``start .. stop`` (exclusive) as dicts, reading only those rows.

    Args:
        dataset: a `datasets.Dataset` (rows picked with ``select``) or an `IterableDataset` (streamed past ``start``).
        start: first row index, >= 0.
        stop: end index; None for the end (avoid on large streams).

    Returns:
        A list of row dicts, shorter when the dataset ends first.

    Raises:
        DatasetError: a negative start or stop before start.
    """
    if start < 0 or (stop is not None and stop < start):
        raise DatasetError(f"row range must satisfy 0 <= start <= stop; got start={start}, stop={stop}")
    n = row_count(dataset)
    if n is None:
        return [dict(row) for row in islice(iter(dataset), start, stop)]
    stop = n if stop is None else min(stop, n)
    if start >= stop:
        return []
    return [dict(row) for row in dataset.select(range(start, stop))]


def load_row(dataset: Any, index: int) -> dict:
    """One row by index.

    Raises:
        DatasetError: the index is outside the dataset.
    """
    rows = load_rows(dataset, index, index + 1) if index >= 0 else []
    if not rows:
        raise DatasetError(f"row {index} is outside the dataset ({row_count(dataset)} rows); pick a smaller index")
    return rows[0]
