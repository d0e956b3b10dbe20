"""Helpers for page tests."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT

HOME = str(ROOT / "streamlit_app.py")
PAGES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pages").glob("*.py"))


def open_page(page: str | None = None, params: dict | None = None, timeout: int = 120) -> AppTest:
    """An AppTest of the multipage app, on ``page`` (relative path), with URL params, run once."""
    at = AppTest.from_file(HOME, default_timeout=timeout)
    for key, value in (params or {}).items():
        at.query_params[key] = value
    if page:
        at.switch_page(page)
    return at.run()


def chart_specs(at: AppTest) -> list[dict]:
    """Vega-Lite specs of every chart on the page."""
    return [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]


def heatmap_specs(at: AppTest) -> list[dict]:
    """Specs of the image-overlay heatmaps (layered charts with an image mark)."""
    return [s for s in chart_specs(at) if any(part.get("mark", {}).get("type") == "image" for part in s.get("layer", []))]


@pytest.fixture
def page():
    return open_page
