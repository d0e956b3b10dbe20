"""Every page renders with no exception (absolute paths, one test per page)."""

from __future__ import annotations

import pytest

from tests.app.conftest import PAGES, open_page


@pytest.mark.parametrize("page", [None, *PAGES])
def test_page_renders_without_exception(page):
    at = open_page(page)
    assert not at.exception, at.exception
