"""Only files inside the data roots are read, whatever a dataset row or a link names."""

from __future__ import annotations

import os

import pytest

from tests.data._records import RED, solid
from vlcore.data.example import Example, open_image
from vlcore.data.paths import data_roots, is_allowed
from vlcore.data.sources import check_location
from vlcore.errors import DatasetError, InputError


def test_a_row_naming_a_file_outside_the_roots_is_refused(tmp_path):
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    solid((8, 8), RED).save(outside)
    try:
        with pytest.raises(InputError, match="outside the folders"):
            Example("x", "q", image_path=str(outside)).load_image()
        with pytest.raises(InputError, match="outside the folders"):
            open_image(str(tmp_path / ".." / outside.name))  # traversal resolves outside too
    finally:
        outside.unlink()


def test_a_symlink_inside_a_root_pointing_outside_is_refused(tmp_path):
    link = tmp_path / "innocent.png"
    os.symlink("/etc/hostname", link)
    assert not is_allowed(link)
    with pytest.raises(InputError):
        open_image(link)


def test_files_inside_a_root_are_read(tmp_path):
    solid((8, 8), RED).save(tmp_path / "ok.png")
    assert open_image(tmp_path / "ok.png").size == (8, 8)
    assert tmp_path.resolve() in data_roots()


@pytest.mark.parametrize("location", ["/etc", "../../etc/passwd", "/root/.ssh"])
def test_dataset_locations_outside_the_roots_are_refused(location):
    with pytest.raises(DatasetError, match="VLSCOPE_DATA_ROOTS"):
        check_location(location)


def test_hub_ids_pass_the_location_check():
    assert check_location("merve/vqav2-small") == "merve/vqav2-small"
