"""The layer strip in a real browser: Streamlit's Vega-Lite draws it (the image looked up from one data row by
every map, cells placed by Vega expressions) and a click on a map shows that layer. Skips like
test_browser_e2e.py when Chromium or Playwright is missing."""

from __future__ import annotations

import numpy as np
import pytest

from .test_browser_e2e import WAIT_MS, pixels, query, wait_for_render

pytestmark = pytest.mark.e2e


def strip_canvas(page, layer: int):
    """The strip's rendered chart (its element key is ``hm_layers_<shown layer>``)."""
    return page.locator(f".st-key-hm_layers_{layer}").locator("svg.marks").first  # Vega's own SVG (not the toolbar's icons)


def test_layer_strip_renders_and_a_click_shows_that_layer(browser, app_url):
    page = browser.new_page(viewport={"width": 1500, "height": 1400})
    try:
        page.goto(f"{app_url}/Attention_Heatmaps?layer=3", wait_until="domcontentloaded")
        wait_for_render(page, selector=".st-key-hm_layers_3 svg.marks")
        chart = strip_canvas(page, 3)
        chart.scroll_into_view_if_needed()
        page.mouse.move(0, 0)
        png = pixels(chart.screenshot())
        box = chart.bounding_box()
        assert box["width"] > 300 and box["height"] > 60
        # every map shows the image (the demo's pale background, never the page's white), looked up by each map
        for layer in range(4):  # 110-px maps, 12 px apart, after Vega's 5-px padding
            cols = png[:, 15 + layer * 122: 105 + layer * 122]
            filled = (np.abs(cols - 255).max(-1) > 6).mean(1) > 0.9  # rows where the map covers the column band
            assert filled.sum() >= 60, f"map {layer} is blank ({filled.sum()} filled rows)"
        bottom = int(np.flatnonzero((np.abs(png[:, 15:105] - 255).max(-1) > 6).mean(1) > 0.9).max())
        # a click inside the second map (layer 1) shows layer 1: URL, slider and the strip's outline follow
        page.mouse.click(box["x"] + 5 + 1 * (110 + 12) + 55, box["y"] + bottom - 20)
        page.wait_for_url("**layer=1**", timeout=WAIT_MS)
        wait_for_render(page, selector=".st-key-hm_layers_1 svg.marks")
        assert query(page.url)["layer"] == "1"
        assert "layer 1" in page.locator("h3").first.inner_text()
    finally:
        page.close()
