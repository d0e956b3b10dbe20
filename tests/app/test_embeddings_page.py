"""Embeddings page on the bundled demo model: one example, a sweep, the layer slider, token selection, cache, errors."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa

from tests.app.conftest import open_page
from vlcore.charts.embeddings import SELECT_PARAM

PAGE = "pages/5_Embeddings.py"
EX = "easy_vqa/test/3"


def scatter(at) -> pd.DataFrame:
    """The data of the token scatter (the chart with the point selection)."""
    for element in at.get("vega_lite_chart"):
        spec = json.loads(element.proto.spec)
        if any(p.get("name") == SELECT_PARAM for p in spec.get("params", [])):
            return pa.ipc.open_stream(element.proto.datasets[0].data.data).read_pandas()
    raise AssertionError("no scatter on the page")


def table_with(at, column: str) -> pd.DataFrame:
    """The page's one table that has ``column`` (the neighbours: ``similarity``; the fusion table: ``seeds``)."""
    tables = [d.value for d in at.dataframe if column in d.value.columns]
    assert len(tables) == 1, [list(d.value.columns) for d in at.dataframe]
    return tables[0]


def fusion_chart(at) -> tuple[dict, pd.DataFrame]:
    """The fusion chart's spec and its line data (the dataset with a ``seeds`` column)."""
    for element in at.get("vega_lite_chart"):
        spec = json.loads(element.proto.spec)
        if "Fusion degree" in json.dumps(spec.get("title", "")):
            frames = [pa.ipc.open_stream(d.data.data).read_pandas() for d in element.proto.datasets]
            return spec, next(f for f in frames if "seeds" in f.columns)
    raise AssertionError("no fusion chart on the page")


def make_sweep(n: int = 4):
    """A sweep of the demo model over the first n easy-VQA test questions, where the page looks for it."""
    from vlcore.data.easy_vqa import easy_vqa_examples
    from vlcore.models.registry import load_adapter
    from vlcore.storage.store import Store
    from vlcore.run.sweep import run_sweep, sweep_key

    adapter = load_adapter("demo")
    examples = easy_vqa_examples("test", limit=n)
    dataset = "easy_vqa/test"
    out = Store().sweep_dir(sweep_key(adapter, dataset, [e.example_id for e in examples]))
    return run_sweep(adapter, examples, out, dataset=dataset, batch_size=4), examples


def test_one_example_renders_every_token_and_the_slider_changes_the_data():
    from vlcore.ui import embeddings as emb

    emb.FITS.clear()
    at = open_page(PAGE, {"ex": EX})
    assert not at.exception and not at.error
    last = scatter(at)
    assert set(last["example_id"]) == {EX} and {"text", "patch", "special"} == set(last["kind"])
    assert last["token"].tolist() == list(range(len(last)))  # every token of the trace
    assert last["image"].str.startswith("data:image/png").sum() == (last["kind"] == "patch").sum()
    assert at.query_params["layer"] == "4" and at.query_params["proj"] == "pca"
    assert set(table_with(at, "similarity")["modality"]) == {"text", "image"}
    fits = emb.FITS["pca"]
    at.select_slider(key="emb_layer").set_value(1).run()
    first = scatter(at)
    assert at.query_params["layer"] == "1" and (first["layer"] == 1).all()
    assert not (first[["x", "y"]].to_numpy() == last[["x", "y"]].to_numpy()).all()
    at.select_slider(key="emb_layer").set_value(4).run()  # back to a layer already seen: no refit
    assert emb.FITS["pca"] == fits
    pd.testing.assert_frame_equal(scatter(at)[["x", "y"]], last[["x", "y"]])


def test_a_point_selection_updates_the_url_and_the_neighbours():
    at = open_page(PAGE, {"ex": EX})
    at.session_state["emb_scatter"] = {"selection": {SELECT_PARAM: [{"uid": f"{EX}#12"}]}}
    at.run()
    assert at.query_params["tok"] == "12" and at.query_params["ex"] == EX
    assert at.selectbox(key="emb_pick_tok").value == 12
    data = scatter(at)
    assert data.loc[data["uid"] == f"{EX}#12", "selected"].all() and data["selected"].sum() == 1
    assert "token 12 of" in at.subheader[0].value
    at.selectbox(key="emb_pick_tok").set_value(3).run()  # the non-chart way
    assert at.query_params["tok"] == "3"
    link = next(e.proto for e in at.get("page_link") if "Heatmaps" in e.proto.page)
    assert "tok=3" in link.query_string and "layer=3" in link.query_string  # layer 4's output comes from attention layer 3


def test_a_sweep_pools_examples_and_compares_slices():
    _, examples = make_sweep(4)
    at = open_page(PAGE, {"scope": "sweep", "color": "example"})
    assert not at.exception and not at.error, at.error
    data = scatter(at)
    assert set(data["example_id"]) == {e.example_id for e in examples}
    assert (data.groupby("example_id")["kind"].apply(lambda k: (k == "patch").sum()) == 16).all()
    assert set(data["correct"]) <= {"correct", "incorrect"}
    at.selectbox(key="emb_cmp").set_value("slice:correct").run()
    assert not at.exception
    at.selectbox(key="emb_pick_ex").set_value(examples[2].example_id).run()
    assert at.query_params["ex"] == examples[2].example_id


def test_too_few_tokens_for_tsne_is_a_clear_message():
    at = open_page(PAGE, {"ex": EX, "proj": "tsne"})
    assert not at.error  # one example of the demo model has enough tokens
    at.selectbox(key="emb_show").set_value("text").run()
    assert at.error and "t-SNE needs at least 31 tokens" in at.error[0].value and "lower the perplexity" in at.error[0].value
    assert not at.exception


def test_both_charts_download_as_png_and_svg_and_the_coordinates_as_csv():
    import xml.dom.minidom

    from vlcore.charts.embeddings import build_fusion_chart, build_projection_chart
    from vlcore.charts.export import chart_to_png, chart_to_svg

    at = open_page(PAGE, {"ex": EX})
    assert not at.exception and not at.error
    keys = {b.key for b in at.get("download_button")}
    assert {"emb_csv", "emb_scatter_dl_png", "emb_scatter_dl_svg", "emb_fusion_dl_png", "emb_fusion_dl_svg"} <= keys
    # the buttons render lazily what these builders make of the page's data
    points = scatter(at)
    assert chart_to_png(build_projection_chart(points, "modality", "x", "t"))[:8] == b"\x89PNG\r\n\x1a\n"
    fusion = pd.DataFrame({"layer": [0, 1], "nmi_modality": [1.0, 0.5], "nmi_kind": [1.0, 0.6], "n_tokens": 9})
    svg = chart_to_svg(build_fusion_chart(fusion, 1, {0: "embeddings"}))
    assert xml.dom.minidom.parseString(svg).documentElement.tagName == "svg"


def test_the_fusion_degree_is_the_best_partition_and_shows_its_spread_over_seeds():
    """easy_vqa/test/0 at layer 3: KMeans(n_init=4, random_state=0) stopped in a local minimum (NMI 0.0077,
    'fused'); the lowest-inertia partition gives 0.669. The table, caption and tooltip show the seed spread."""
    at = open_page(PAGE, {"ex": "easy_vqa/test/0"})
    assert not at.exception and not at.error
    table = table_with(at, "seeds").set_index("layer")
    assert table.loc[3, "NMI vs modality"] > 0.6  # not fused at layer 3
    assert {"min over seeds", "max over seeds"} <= set(table.columns) and (table["seeds"] == 8).all()
    assert (table["min over seeds"] <= table["NMI vs modality"]).all()
    assert (table["NMI vs modality"] <= table["max over seeds"]).all()
    assert any("8 seeds" in c.value and "same value with every seed" in c.value for c in at.caption)
    spec, lines = fusion_chart(at)
    layer3 = lines[(lines["layer"] == 3) & (lines["label"] == "vs modality")].iloc[0]
    assert layer3["seeds"].endswith("over 8 seeds") and layer3["nmi_min"] > 0.6
    assert "range over seeds" in json.dumps(spec["layer"][0]["encoding"]["tooltip"])


def test_neighbour_thumbnails_survive_a_sweep_over_the_scatter_cap(monkeypatch):
    """A sweep with more patches than the scatter's thumbnail cap drops the tooltips' thumbnails, never the
    neighbours' (the cap is lowered to 10 here: the 4-example sweep keeps 64 patches)."""
    import vlcore.charts.embeddings as charts

    monkeypatch.setattr(charts, "MAX_THUMBS", 10)
    make_sweep(4)
    at = open_page(PAGE, {"scope": "sweep"})
    assert not at.exception and not at.error, at.error
    points = scatter(at)
    assert (points["kind"] == "patch").sum() > 10 and (points["image"] == "").all()  # over the cap: no tooltips
    near = table_with(at, "similarity")
    image = near[near["modality"] == "image"]
    assert len(image) == 5 and all(str(u).startswith("data:image/png;base64,") for u in image["patch"])
    assert near.loc[near["modality"] == "text", "patch"].isna().all()
