"""The app in a real browser: `streamlit run` driven by Playwright in headless Debian Chromium.

One flow, a screenshot per step: home page (first in the navigation: "Home") -> dataset browser -> open an
example -> "Interpret this example" (the Run Model page runs the bundled demo model) -> the sidebar's link to the
heatmaps (the same example) -> attention heatmaps of that example -> click an image patch on the Altair overlay
(the heat layer changes, one browser history entry) -> open the "Share this view" link in a new page (the same
view).
AppTest never renders Vega nor clicks a chart; this does. Skips with the reason when Chromium or Playwright is
missing (see conftest.py). ``VLSCOPE_E2E_ARTIFACTS`` keeps the screenshots; ``VLSCOPE_E2E_SCREENSHOT=path``
also saves the heatmaps page there (the README's picture, docs/img/heatmaps.png).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

WAIT_MS = 60_000  # per wait: a loaded 2-core machine, torch imported inside the server on first use
CHART = '[data-testid="stVegaLiteChart"]'
RENDERED_CHART = f"{CHART} canvas, {CHART} svg"
OVERLAY = ".st-key-hm_click"  # the clickable overlay chart of the heatmaps page (key ``hm_click``)
NAV = '[data-testid="stSidebarNav"]'  # the sidebar's page links
README_WIDTH = 1400  # the README picture is resized to at most this width

pytestmark = pytest.mark.e2e

_IDLE_JS = """([selector, quiet]) => {
    const busy = document.querySelector('[data-testid="stStatusWidget"]')
        || document.querySelector('[data-stale="true"]')
        || document.querySelector('[data-testid="stSkeleton"]')
        || !document.querySelector('[data-testid="stApp"]')
        || (selector && !document.querySelector(selector));
    window.__vlscopeQuiet = busy ? 0 : (window.__vlscopeQuiet || 0) + 1;
    return window.__vlscopeQuiet >= quiet;
}"""


def wait_for_render(page, selector: str | None = RENDERED_CHART, timeout: int = WAIT_MS) -> None:
    """Wait until Streamlit has finished this run: no "Running…" status widget, no stale (greyed) elements,
    no skeletons, and ``selector`` (by default a Vega chart's canvas or svg) present, for 3 polls in a row.

    The quiet polls cover the moment between a navigation or click and the start of the rerun it causes.
    """
    page.evaluate("window.__vlscopeQuiet = 0")
    page.wait_for_function(_IDLE_JS, arg=[selector, 3], polling=200, timeout=timeout)


def query(url: str) -> dict[str, str]:
    """A URL's query parameters, one value each."""
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def changed_fraction(a: bytes, b: bytes) -> float:
    """Share of pixels that differ by more than a rounding error (1.0 when the sizes differ)."""
    x, y = pixels(a), pixels(b)
    if x.shape != y.shape:
        return 1.0
    return float((np.abs(x - y).max(axis=-1) > 8).mean())


class Shots:
    """Numbered full-page screenshots of each step."""

    def __init__(self, folder: Path):
        self.folder, self.n = folder, 0

    def __call__(self, page, name: str) -> Path:
        self.n += 1
        path = self.folder / f"{self.n:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path


def overlay_chart_png(page) -> bytes:
    """The overlay chart's pixels, with the mouse moved away (no tooltip) first."""
    page.mouse.move(0, 0)
    return page.locator(OVERLAY).locator(RENDERED_CHART).first.screenshot()


def patch_chips(page) -> list[str]:
    """The selected query patches shown in the patch multiselect (``row.col`` each)."""
    tags = page.locator(".st-key-hm_patches .react-aria-ComboBox [data-tag]")
    return sorted(tags.nth(i).get_attribute("aria-label") for i in range(tags.count()))


def save_readme_picture(page, target: str, max_bytes: int = 400_000) -> None:
    """The page's first screen as an optimised PNG of at most README_WIDTH pixels wide; reduced to 256 colours
    only when the full-colour file would pass ``max_bytes``."""
    image = Image.open(io.BytesIO(page.screenshot(full_page=False))).convert("RGB")
    if image.width > README_WIDTH:
        image = image.resize((README_WIDTH, round(image.height * README_WIDTH / image.width)), Image.LANCZOS)
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    if path.stat().st_size > max_bytes:
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def test_browse_run_click_patch_and_share(browser, app_url, artifacts_dir):
    shot = Shots(artifacts_dir)
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
    context.set_default_timeout(WAIT_MS)
    console = open(artifacts_dir / "console.log", "w")  # the browser's errors and warnings, for CI's artifacts
    context.on("console", lambda m: m.type in ("error", "warning")
               and console.write(f"{m.type}: {m.text} ({m.location.get('url', '')})\n"))
    context.on("weberror", lambda e: console.write(f"page error: {e.error}\n"))
    page = context.new_page()
    try:
        # 1. Home: the demo model's answer and [CLS] attention over the image.
        page.goto(app_url, wait_until="domcontentloaded")
        wait_for_render(page)
        assert page.get_by_role("heading", name="VLScope").first.is_visible()
        assert page.locator(CHART).count() >= 2  # prediction bars and the overlay
        assert page.locator(f"{NAV} a").first.inner_text().strip() == "Home"  # not the file name, "streamlit app"
        shot(page, "home")

        # 2. Dataset browser: the bundled easy-VQA test split; open the first example.
        page.goto(f"{app_url}/Dataset_Browser", wait_until="domcontentloaded")
        wait_for_render(page, selector="[data-testid='stImage'] img")
        shot(page, "browser")
        page.locator("[class*='st-key-open_'] button").first.click()
        wait_for_render(page, selector=".st-key-interpret button")
        example_id = query(page.url).get("ex")
        assert example_id and example_id.startswith("easy_vqa/")
        assert page.get_by_text(f"Example {example_id}").count() or page.locator("code", has_text=example_id).count()
        shot(page, "browser-example")

        # 3. "Interpret this example": switches to Run Model with ``ex``; the demo model runs on it.
        page.locator(".st-key-interpret button").click()
        page.wait_for_url("**/Run_Model?**", timeout=WAIT_MS)
        wait_for_render(page)
        assert query(page.url)["ex"] == example_id
        assert page.get_by_text("Prediction:").count() >= 1
        shot(page, "run-model")

        # 3b. The sidebar's link to the heatmaps opens the same example (Streamlit's navigation drops the query
        # string; the app carries the view across pages).
        page.locator(f"{NAV} a", has_text="Attention Heatmaps").click()
        page.wait_for_url("**/Attention_Heatmaps?**", timeout=WAIT_MS)
        wait_for_render(page, selector=f"{OVERLAY} canvas, {OVERLAY} svg")
        assert query(page.url)["ex"] == example_id
        assert page.locator("code", has_text=example_id).count()
        shot(page, "heatmaps-from-sidebar")

        # 4. Attention heatmaps of the same example (the default query is [CLS], no patch). The page writes its
        # view into the URL in one update: the link's entry plus one (was one per parameter, 7 in all).
        entries = page.evaluate("history.length")
        page.goto(f"{app_url}/Attention_Heatmaps?ex={example_id}", wait_until="domcontentloaded")
        wait_for_render(page, selector=f"{OVERLAY} canvas, {OVERLAY} svg")
        assert page.evaluate("history.length") - entries <= 2
        assert "patch" not in query(page.url)
        assert patch_chips(page) == []
        before = overlay_chart_png(page)
        shot(page, "heatmaps")

        # 5. Click a patch of the image (right of centre, below the title) on the overlay: it becomes the query.
        box = page.locator(OVERLAY).locator(RENDERED_CHART).first.bounding_box()
        entries = page.evaluate("history.length")
        page.mouse.click(box["x"] + box["width"] * 0.62, box["y"] + box["height"] * 0.55)
        page.wait_for_url("**patch=**", timeout=WAIT_MS)
        wait_for_render(page, selector=f"{OVERLAY} canvas, {OVERLAY} svg")
        assert page.evaluate("history.length") - entries == 1  # one rerun, one history entry (tok and patch at once)
        params = query(page.url)
        assert "patch" in params and "tok" not in params, page.url
        assert patch_chips(page) == [params["patch"]]
        after = overlay_chart_png(page)
        # An unchanged render differs in 0 pixels; on the demo model a patch's map and the [CLS] map both peak
        # on the shape, so only some patches change colour (0.9 % of the chart's pixels in the first run).
        assert changed_fraction(before, after) > 0.002, "the heat layer did not change after the patch click"
        shot(page, "heatmaps-patch-clicked")
        if os.environ.get("VLSCOPE_E2E_SCREENSHOT"):
            save_readme_picture(page, os.environ["VLSCOPE_E2E_SCREENSHOT"])

        # 6. "Share this view": read the link from the sidebar, open it in a new page, same view.
        page.locator("[data-testid='stSidebar'] [data-testid='stExpander'] summary",
                     has_text="Share this view").click()
        code = page.locator("[data-testid='stSidebar'] [data-testid='stCode'] code").first
        code.wait_for(state="visible")
        link = code.inner_text().strip()
        assert link.startswith(f"{app_url}/Attention_Heatmaps?"), link
        assert query(link) == params
        shot(page, "share-link")
        shared = context.new_page()
        shared.goto(link, wait_until="domcontentloaded")
        wait_for_render(shared, selector=f"{OVERLAY} canvas, {OVERLAY} svg")
        assert query(shared.url) == params
        assert patch_chips(shared) == patch_chips(page)
        assert changed_fraction(after, overlay_chart_png(shared)) < 0.01, "the shared link shows another map"
        shot(shared, "shared-view")

    except Exception:
        for i, p in enumerate(context.pages):  # what the browser showed when it failed
            p.screenshot(path=str(artifacts_dir / f"failure-{i}.png"), full_page=True)
            (artifacts_dir / f"failure-{i}.html").write_text(p.content())
        raise
    finally:
        context.close()
        console.close()
