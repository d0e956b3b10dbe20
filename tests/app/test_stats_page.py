"""Head statistics page: one example, a sweep with slices, head selection into the URL, downloads."""

from __future__ import annotations

import io
import json
import xml.dom.minidom

import pandas as pd
import pytest

from tests.app.conftest import open_page
from vlcore.data.easy_vqa import easy_vqa_examples
from vlcore.charts.export import chart_to_png, chart_to_svg
from vlcore.storage.tables import frame_to_csv, frame_to_parquet
from vlcore.run.sweep import run_sweep, sweep_key
from vlcore.models.registry import load_adapter
from vlcore.storage.store import Store

PAGE = "pages/3_Head_Statistics.py"


def head_charts(at) -> list[dict]:
    """Specs of the layer x head charts, with their Arrow datasets decoded back into ``spec["datasets"]``."""
    import pyarrow as pa

    out = []
    for element in at.get("vega_lite_chart"):
        spec = json.loads(element.proto.spec)
        if "hconcat" not in spec:
            continue
        frames = {d.name: pa.ipc.open_stream(d.data.data).read_pandas() for d in element.proto.datasets}
        spec["datasets"] = {name: f.astype(object).where(f.notna(), None).to_dict("records") for name, f in frames.items()}
        out.append(spec)
    return out


def heat_rows(spec: dict) -> list[dict]:
    return spec["datasets"][spec["hconcat"][0]["data"]["name"]]


def heat_values(spec: dict) -> dict:
    return {(r["layer"], r["head"]): r["mean"] for r in heat_rows(spec)}


def test_one_example_renders_the_layer_head_summary_and_table():
    at = open_page(PAGE, {"ex": "easy_vqa/test/3", "metric": "txt2img"})
    assert not at.exception and not at.error
    specs = head_charts(at)
    assert len(specs) == 1
    spec = specs[0]
    adapter = load_adapter("demo")
    assert len(heat_values(spec)) == adapter.n_layers * adapter.n_heads
    assert any(p.get("name") == "head_pick" for p in spec.get("params", []))  # top-level, bound to the heatmap view
    table = at.dataframe[-1].value
    assert len(table) == adapter.n_layers * adapter.n_heads and "ablation_drop" in table.columns
    assert at.query_params["metric"] == "txt2img"


def test_choosing_a_head_updates_the_url_and_a_click_on_the_chart_selects_it():
    at = open_page(PAGE, {"ex": "easy_vqa/test/3"})
    at.selectbox(key="head").set_value(1).run()
    assert at.query_params["head"] == "1"
    at.session_state["head_chart"] = {"selection": {"head_pick": [{"layer": 0, "head": 0}]}}
    at.run()
    assert not at.exception
    assert at.query_params["layer"] == "0" and at.query_params["head"] == "0"


def test_malformed_head_and_metric_in_the_link_open_a_valid_view():
    at = open_page(PAGE, {"ex": "easy_vqa/test/3", "head": "-4", "layer": "x", "metric": "nope", "norm": "?"})
    assert not at.exception and not at.error
    notices = " ".join(i.value for i in at.info)
    assert "head=-4" in notices and "layer=x" in notices and "metric=nope" in notices
    assert head_charts(at)


@pytest.fixture
def demo_sweep():
    adapter = load_adapter("demo")
    examples = easy_vqa_examples("test", limit=12)
    ids = [e.example_id for e in examples]
    store = Store()
    out = run_sweep(adapter, examples, store.sweep_dir(sweep_key(adapter, "easy_vqa/test", ids)), dataset="easy_vqa/test")
    return out


def test_sweep_scope_aggregates_slices_and_compares_them(demo_sweep):
    at = open_page(PAGE, {"scope": "sweep", "metric": "entropy"})
    assert not at.exception and not at.error
    spec = head_charts(at)[0]
    ns = {r["n"] for r in heat_rows(spec)}
    assert ns == {12}
    options = at.selectbox(key="slice").options
    assert "correct" in options and any(o.startswith("cat:") for o in options)
    cat = next(o for o in options if o.startswith("cat:"))
    at.selectbox(key="slice").set_value(cat).run()
    spec = head_charts(at)[0]
    n_cat = {r["n"] for r in heat_rows(spec)}
    assert n_cat != {12} and at.query_params["slice"] == cat
    at.selectbox(key="cmp").set_value("all").run()
    spec = head_charts(at)[0]
    assert spec["hconcat"][0]["encoding"]["color"]["scale"]["scheme"] == "redblue"  # a diverging difference map
    side_by_side = head_charts(at)[1:]
    assert len(side_by_side) == 2 and {r["n"] for r in heat_rows(side_by_side[1])} == {12}
    assert at.query_params["cmp"] == "all"


def test_no_sweep_yet_says_how_to_make_one():
    at = open_page(PAGE, {"scope": "sweep"})
    assert not at.exception
    assert any("No sweep" in i.value for i in at.info)


def test_downloads_parse():
    at = open_page(PAGE, {"ex": "easy_vqa/test/5", "metric": "entropy"})
    spec = json.dumps(head_charts(at)[0])
    assert chart_to_png(spec)[:8] == b"\x89PNG\r\n\x1a\n"
    assert xml.dom.minidom.parseString(chart_to_svg(spec)).documentElement.tagName == "svg"
    table = at.dataframe[-1].value
    assert pd.read_csv(io.BytesIO(frame_to_csv(table))).shape == table.shape
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(frame_to_parquet(table))), table.reset_index(drop=True))
    labels = [b.proto.label for b in at.get("download_button")]
    assert {"PNG", "SVG", "CSV", "Parquet"} <= set(labels)


def test_a_deployments_custom_metric_module_shows_up_on_the_page(tmp_path, monkeypatch):
    import sys

    from vlcore.analysis.stats import unregister_metric

    (tmp_path / "vlscope_metrics.py").write_text(
        "import numpy as np\nfrom vlcore.analysis.stats import register_metric\n"
        "register_metric('diag_mass', lambda t: np.stack([np.diagonal(a, axis1=-2, axis2=-1).mean(-1) "
        "for a in t.attentions.astype(np.float32)]), 'mean self-attention')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("vlscope_metrics", None)
    try:
        at = open_page(PAGE, {"ex": "easy_vqa/test/2", "metric": "diag_mass"})
        assert not at.exception and not at.error
        assert "diag_mass: mean self-attention" in at.selectbox(key="metric").options
        assert at.selectbox(key="metric").value == "diag_mass"
        assert "diag_mass" in at.dataframe[-1].value.columns
    finally:
        unregister_metric("diag_mass")
        sys.modules.pop("vlscope_metrics", None)


def test_a_sweeps_notices_show_on_the_page(demo_sweep):
    import json as _json

    manifest = demo_sweep / "manifest.json"
    data = _json.loads(manifest.read_text())
    manifest.write_text(_json.dumps({**data, "notices": ["the batch size went from 8 to 4"]}))
    at = open_page(PAGE, {"scope": "sweep"})
    assert not at.exception
    assert any("the batch size went from 8 to 4" in i.value for i in at.info)
