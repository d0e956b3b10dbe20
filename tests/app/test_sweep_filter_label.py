"""The run page's "only the examples matching the browser's filters" names the filters and the count (issue 14)."""

from __future__ import annotations

from tests.app.conftest import open_page
from vlcore.data.browse import filter_index
from vlcore.data.sources import easy_vqa_source

RUNNER = "pages/2_Run_Model.py"


def test_sweep_filter_option_names_the_filters_and_how_many_examples_they_keep():
    n = len(filter_index(easy_vqa_source("test").index, "blue", ["shape"]))
    assert 0 < n < 9673
    at = open_page(RUNNER, {"q": "blue", "cat": "shape"})
    assert not at.exception and not at.error
    box = at.checkbox(key="sweep_filtered")
    assert box.label == (f"Only the {n:,} of 9,673 examples matching the browser's filters: "
                         'search "blue"; question type shape')
    assert box.value and at.number_input(key="sweep_n").max == n  # and the sweep is over exactly those


def test_without_filters_there_is_no_filter_option():
    at = open_page(RUNNER)
    assert not at.exception and not [c for c in at.checkbox if c.key == "sweep_filtered"]
    assert at.number_input(key="sweep_n").max == 9673
