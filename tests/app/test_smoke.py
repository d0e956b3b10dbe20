"""Every page renders with no exception (absolute paths, one test per page), on its own (how AppTest and a fresh
server open a page file) and through the entry point's navigation (how the server runs it afterwards)."""

from __future__ import annotations

import pytest

from tests.app.conftest import PAGES, open_page
from tests.app.entry_point import through_entry_point  # noqa: F401 (a fixture)


@pytest.mark.parametrize("page", [None, *PAGES])
def test_page_renders_without_exception(page):
    at = open_page(page)
    assert not at.exception, at.exception


@pytest.mark.usefixtures("through_entry_point")
@pytest.mark.parametrize("page", [None, *PAGES])
def test_page_renders_through_the_entry_point(page):
    at = open_page(page)
    assert not at.exception, at.exception
    assert at.title, "the page rendered nothing"
