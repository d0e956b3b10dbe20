"""Loading through `datasets`: kinds, clear errors (offline hub, scripts, splits, paths), lazy pages."""

from __future__ import annotations

import datasets
import pytest

from vlcore.data.hub import SourceSpec, load_row, load_rows, load_source, resolve_kind, row_count
from vlcore.errors import DatasetError


@pytest.fixture
def offline(monkeypatch):
    """Offline mode as tests run it, whatever the module-level constants read at import."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def numbers(n: int = 10) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"n": list(range(n)), "text": [f"row {i}" for i in range(n)]})


def spec(location, tmp_path, **kw) -> SourceSpec:
    return SourceSpec(str(location), cache_dir=str(tmp_path / "cache"), **kw)


def test_offline_hub_id_is_a_one_line_dataset_error(offline, tmp_path):
    with pytest.raises(DatasetError) as err:
        load_source(spec("someone/not-cached-anywhere", tmp_path, split="validation"))
    message = str(err.value)
    assert "unreachable" in message and "easy_vqa" in message and "\n" not in message


def test_offline_streaming_hub_id_is_a_dataset_error(offline, tmp_path):
    with pytest.raises(DatasetError, match="unreachable"):
        load_source(spec("someone/huge-set", tmp_path, streaming=True))


def test_script_based_dataset_is_explained(tmp_path, monkeypatch):
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "legacy.py").write_text("import datasets\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="script-based.*no longer runs loading scripts"):
        load_source(spec(folder, tmp_path, kind="hub"))


def test_missing_split_lists_available_splits_from_disk(tmp_path):
    datasets.DatasetDict(train=numbers(), test=numbers(2)).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DatasetError, match=r"split 'validation' not found.*available splits: train, test"):
        load_source(spec(tmp_path / "saved", tmp_path, split="validation"))


def test_missing_split_lists_available_splits_from_a_parquet_folder(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    numbers().to_parquet(str(folder / "train-00000.parquet"))
    numbers(3).to_parquet(str(folder / "test-00000.parquet"))
    with pytest.raises(DatasetError) as err:
        load_source(spec(folder, tmp_path, split="validation"))
    assert "available splits" in str(err.value) and "train" in str(err.value) and "test" in str(err.value)
    assert row_count(load_source(spec(folder, tmp_path, split="test"))) == 3


def test_nonexistent_local_path_is_a_dataset_error(tmp_path):
    for location in (tmp_path / "nope", "./no/such/data.parquet", "~/no-such-file.jsonl"):
        with pytest.raises(DatasetError, match="local path not found"):
            load_source(spec(location, tmp_path))


def test_kinds_are_resolved_from_the_location(tmp_path):
    numbers().save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "rows.jsonl").write_text('{"n": 1}\n')
    (tmp_path / "notes.txt").write_text("hi")
    assert resolve_kind(spec(tmp_path / "saved", tmp_path)) == "disk"
    assert resolve_kind(spec(tmp_path / "rows.jsonl", tmp_path)) == "json"
    assert resolve_kind(spec("owner/name", tmp_path)) == "hub"
    with pytest.raises(DatasetError, match="expected a"):
        resolve_kind(spec(tmp_path / "notes.txt", tmp_path))
    with pytest.raises(DatasetError, match="unknown source kind"):
        resolve_kind(spec("x", tmp_path, kind="ftp"))


def test_save_to_disk_parquet_and_json_load(tmp_path):
    numbers().save_to_disk(str(tmp_path / "saved"))
    numbers(4).to_parquet(str(tmp_path / "rows.parquet"))
    numbers(3).to_json(str(tmp_path / "rows.jsonl"))
    assert row_count(load_source(spec(tmp_path / "saved", tmp_path))) == 10
    assert row_count(load_source(spec(tmp_path / "rows.parquet", tmp_path, split="validation"))) == 4
    assert load_row(load_source(spec(tmp_path / "rows.jsonl", tmp_path)), 2)["text"] == "row 2"


def test_pages_are_read_lazily_from_datasets_and_streams():
    ds = numbers()
    assert [r["n"] for r in load_rows(ds, 3, 6)] == [3, 4, 5]
    assert [r["n"] for r in load_rows(ds, 8, 50)] == [8, 9]
    assert load_rows(ds, 12, 20) == []
    stream = ds.to_iterable_dataset()
    assert row_count(stream) is None
    assert [r["n"] for r in load_rows(stream, 3, 6)] == [3, 4, 5]


def test_bad_row_ranges_are_errors():
    with pytest.raises(DatasetError, match="0 <= start <= stop"):
        load_rows(numbers(), 5, 2)
    with pytest.raises(DatasetError, match="outside the dataset"):
        load_row(numbers(), 10)


def test_unknown_hub_id_is_explained(tmp_path, monkeypatch):
    from datasets.exceptions import DatasetNotFoundError

    def not_found(*args, **kwargs):
        raise DatasetNotFoundError("Dataset 'owner/missing' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(DatasetError, match="no dataset 'owner/missing' on the Hugging Face Hub"):
        load_source(spec("owner/missing", tmp_path))
