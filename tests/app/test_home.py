"""The home page on the bundled model, offline."""

from __future__ import annotations

import json

from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT
from vlcore.app_files import GENERATIVE_DEMO_DIR

HOME = str(ROOT / "streamlit_app.py")


def heatmaps(at: AppTest) -> list[dict]:
    specs = [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]
    return [s for s in specs if any(layer.get("mark", {}).get("type") == "image" for layer in s.get("layer", []))]


def test_home_renders_both_demos_prediction_and_map():
    at = AppTest.from_file(HOME, default_timeout=120).run()
    assert not at.exception and not at.error
    bundled = (GENERATIVE_DEMO_DIR / "config.json").is_file()
    assert len(heatmaps(at)) == 1 + bundled  # ViLT's [CLS] map, and the generated answer token's map
    predictions = [m.value for m in at.markdown if m.value.startswith("**Prediction:**")]
    assert len(predictions) == 1 + bundled and all("gold:" in p for p in predictions)
    titles = [m.value for m in at.markdown if m.value.startswith("#### ")]
    assert titles == ["#### Bundled ViLT (answer classifier)", "#### Bundled LLaVA-style model (generates)"]
    if not bundled:
        assert any("scripts/train_demo_lvlm.py" in i.value for i in at.info)
    links = [link.proto.query_string for link in at.get("page_link") if link.proto.label.startswith("Open Bundled")]
    assert len(links) == 1 + bundled and "model=demo&" in links[0]


def test_picking_another_sample_changes_the_question_and_map():
    at = AppTest.from_file(HOME, default_timeout=120).run()
    first = (at.subheader[0].value, json.dumps(heatmaps(at)[0]["layer"]))
    at.selectbox(key="sample").set_value(3).run()
    assert not at.exception
    second = (at.subheader[0].value, json.dumps(heatmaps(at)[0]["layer"]))
    assert first[0] != second[0] and first[1] != second[1]


def test_overlay_keeps_its_pixel_size_so_the_grid_stays_on_the_image():
    # Streamlit's theme asks Vega-Lite to "fit" charts, which shrinks the plot but not the image mark;
    # the overlay must opt out (the real-browser test saw the grid drift off the image).
    at = AppTest.from_file(HOME, default_timeout=120).run()
    spec = heatmaps(at)[0]
    assert spec["autosize"]["type"] == "pad"
