"""`local_fingerprint`: the version of a dataset's local files that the UI's caches are keyed on (issue 14)."""

from __future__ import annotations

import os

from vlcore.data.paths import local_fingerprint


def replace_file(path, data: bytes) -> None:
    """Write ``data`` to a new file and move it over ``path`` (as editors and `datasets` writers do)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_a_file_rewritten_with_other_bytes_of_the_same_size_gets_a_new_fingerprint(tmp_path):
    path = tmp_path / "vqa.parquet"
    path.write_bytes(b"a" * 100)
    first = local_fingerprint(path)
    assert first and local_fingerprint(path) == first and local_fingerprint(str(path)) == first  # stable
    replace_file(path, b"b" * 100)
    assert local_fingerprint(path) not in ("", first)
    with path.open("r+b") as f:  # rewritten in place, same size and inode
        second = local_fingerprint(path)
        f.write(b"c" * 100)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    assert local_fingerprint(path) != second


def test_a_folder_changes_with_a_file_in_it_or_in_a_split_subfolder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "data-00000-of-00001.arrow").write_bytes(b"x" * 10)
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train"]}')
    before = local_fingerprint(tmp_path)
    replace_file(tmp_path / "train" / "data-00000-of-00001.arrow", b"y" * 10)
    after = local_fingerprint(tmp_path)
    assert before and after != before
    (tmp_path / "train" / "state.json").write_text("{}")
    assert local_fingerprint(tmp_path) != after


def test_hub_ids_and_missing_paths_have_no_local_fingerprint(tmp_path):
    assert local_fingerprint("lmms-lab/VQAv2") == "" and local_fingerprint(tmp_path / "absent.json") == ""
    assert local_fingerprint(None) == "" and local_fingerprint("") == ""


def test_a_huge_image_folder_is_listed_only_up_to_the_cap(tmp_path, monkeypatch):
    from vlcore.data import paths

    monkeypatch.setattr(paths, "FINGERPRINT_MAX_ENTRIES", 50)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(500):
        (images / f"{i}.jpg").write_bytes(b"")
    (tmp_path / "val.jsonl").write_text("{}\n")
    listed = paths._folder_entries(tmp_path)
    assert len(listed) == 50 and tmp_path / "val.jsonl" in listed and sum(p.parent == images for p in listed) == 47
    before = local_fingerprint(tmp_path)
    replace_file(tmp_path / "val.jsonl", b"[]\n")
    assert local_fingerprint(tmp_path) != before
