"""Attention heatmaps page on the bundled demo model: queries change the maps, step-through, exports, bad links."""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from tests.app.conftest import open_page
from vlcore.trace import Trace

PAGE = "pages/4_Attention_Heatmaps.py"
EX = "easy_vqa/test/3"


def chart_data(element) -> tuple[dict, dict[str, pd.DataFrame]]:
    """A chart's spec and its Arrow datasets as DataFrames."""
    frames = {d.name: pa.ipc.open_stream(d.data.data).read_pandas() for d in element.proto.datasets}
    return json.loads(element.proto.spec), frames


def layer_data(spec: dict, frames: dict, i: int) -> pd.DataFrame:
    """Layer ``i``'s data (Altair hoists data that every layer shares to the top)."""
    return frames[(spec["layer"][i].get("data") or spec["data"])["name"]]


def is_strip(spec: dict) -> bool:
    """The layer strip: small maps of every layer, titled "Every layer: ..."."""
    return isinstance(spec.get("title"), str) and spec["title"].startswith("Every layer")


def overlay_heats(at) -> list[pd.DataFrame]:
    """The heat layer (patch rectangles coloured by value) of every image overlay on the page (not the strip)."""
    heats = []
    for element in at.get("vega_lite_chart"):
        spec, frames = chart_data(element)
        layers = spec.get("layer", [])
        if is_strip(spec) or not any(layer.get("mark", {}).get("type") == "image" for layer in layers):
            continue
        heat = next(layer for layer in layers if layer.get("encoding", {}).get("color", {}).get("field") == "value")
        heats.append(frames[heat["data"]["name"]])
    return heats


def peak(frame: pd.DataFrame) -> tuple[int, int, float]:
    top = frame.loc[frame["value"].idxmax()]
    return int(top["row"]), int(top["col"]), float(top["value"])


def test_token_and_patch_queries_change_the_maps_and_the_url():
    at = open_page(PAGE, {"ex": EX, "layer": "1", "head": "2"})
    assert not at.exception and not at.error
    assert at.selectbox(key="head").value == 2 and at.slider(key="layer").value == 1
    assert at.query_params["tok"] == "0"
    before = overlay_heats(at)[0]
    assert len(before) == 64  # the demo model's 8x8 grid

    at.pills(key="hm_tok").set_value(3).run()
    assert not at.exception and at.query_params["tok"] == "3"
    after_token = overlay_heats(at)[0]
    assert not np.allclose(before["value"], after_token["value"])

    at.multiselect(key="hm_patches").set_value(["2.5", "6.1"]).run()
    assert not at.exception and at.query_params["patch"] == "2.5,6.1" and "tok" not in at.query_params
    assert at.pills(key="hm_tok").value is None
    after_patch = overlay_heats(at)[0]
    assert not np.allclose(after_token["value"], after_patch["value"])
    assert "mean of 2 patches" in json.dumps(json.loads(at.get("vega_lite_chart")[0].proto.spec)["title"])

    at.segmented_control(key="hm_dir").set_value("to").run()
    assert not at.exception and at.query_params["dir"] == "to"
    assert not np.allclose(after_patch["value"], overlay_heats(at)[0]["value"])

    at.segmented_control(key="hm_view").set_value("heads").run()  # small multiples of every head, 64 cells each
    specs = [chart_data(e) for e in at.get("vega_lite_chart")]
    grid = next(frames[spec["data"]["name"]] for spec, frames in specs if "facet" in spec)
    assert sorted(grid["head"].unique()) == [0, 1, 2, 3] and len(grid) == 4 * 64


def test_matrices_step_through_and_exports():
    at = open_page(PAGE, {"ex": EX, "layer": "0", "head": "1"})
    spec, frames = next(c for c in map(chart_data, at.get("vega_lite_chart")) if c[0].get("title") == "layer 0, head 1: query × key")
    cells = layer_data(spec, frames, 0)
    trace_n = cells["query"].nunique()
    assert len(cells) == trace_n**2 and cells["key"].nunique() == trace_n
    image_cls = next(k for k in cells["key"].unique() if k.endswith(":[IMG]"))
    assert [layer_data(spec, frames, i).iloc[0, 0] for i in (1, 2)] == [image_cls] * 2  # text | image rules
    at.radio(key="hm_block").set_value("txt2img").run()
    spec, frames = next(c for c in map(chart_data, at.get("vega_lite_chart")) if c[0].get("title") == "text → image")
    block = layer_data(spec, frames, 0)
    assert block["key"].nunique() == 64 and len(block) == 64 * block["query"].nunique()
    assert not block["query"].str.contains(r"\[CLS\]|\[SEP\]").any()

    at.segmented_control(key="hm_view").set_value("step").run()
    assert not at.exception and at.slider(key="hm_step").value == 0
    first = overlay_heats(at)[-1]
    at.button(key="hm_next").click().run()
    assert at.slider(key="hm_step").value == 1
    at.button(key="hm_next").click().run()
    assert at.slider(key="hm_step").value == 2
    assert not np.allclose(first["value"], overlay_heats(at)[-1]["value"])
    at.toggle(key="hm_play").set_value(True).run()
    assert not at.exception

    at.segmented_control(key="hm_view").set_value("export").run()
    assert not at.exception
    options = at.selectbox(key="hm_export_what").options
    assert {"overlay", "text tokens", "matrix", "all heads"} <= set(options)
    at.selectbox(key="hm_export_what").set_value("overlay")
    at.segmented_control(key="hm_export_fmt").set_value("png")
    at.button(key="hm_export_go").click().run()
    assert at.session_state["hm_export"]["data"][:8] == b"\x89PNG\r\n\x1a\n"
    assert at.get("download_button")[0].proto.label.endswith(".png")
    at.selectbox(key="hm_export_what").set_value("block txt2img")
    at.segmented_control(key="hm_export_fmt").set_value("svg")
    at.button(key="hm_export_go").click().run()
    assert ET.fromstring(at.session_state["hm_export"]["data"]).tag.endswith("svg")
    at.selectbox(key="hm_export_what").set_value(options[-1]).run()  # the head's matrix as CSV
    at.button(key="hm_export_go").click().run()
    frame = pd.read_csv(io.BytesIO(at.session_state["hm_export"]["data"]), index_col=0)
    assert frame.shape == (trace_n, trace_n) and np.allclose(frame.sum(1), 1, atol=1e-2)


def test_explanations_side_by_side_with_faithfulness():
    at = open_page(PAGE, {"ex": EX, "view": "explain", "method": "relevancy"})
    assert not at.exception and not at.error
    assert len(overlay_heats(at)) == 4  # the relevancy query view and raw / rollout / relevancy side by side
    heats = overlay_heats(at)
    assert np.allclose(heats[0]["value"], heats[3]["value"])  # the query view shows the relevancy map
    at.toggle(key="hm_faith").set_value(True).run()
    assert not at.exception and not at.error
    assert [m.label for m in at.metric] == ["AUC, relevance order"] * 3
    curves = [chart_data(e) for e in at.get("vega_lite_chart")]
    lines = [frames[spec["data"]["name"]] for spec, frames in curves if spec.get("mark", {}).get("type") == "line"]
    assert len(lines) == 3 and all(set(f["order"]) == {"positive", "random"} for f in lines)


def text_only(trace: Trace) -> Trace:
    keep = np.flatnonzero(trace.modality == 0)
    att = trace.attentions[:, :, keep][:, :, :, keep].astype(np.float32)
    att /= att.sum(-1, keepdims=True)
    return Trace.from_arrays(trace.example_id, trace.model_id, tuple(trace.tokens[i] for i in keep), trace.modality[keep],
                 trace.special[keep], trace.patch_rc[keep], (0, 0), np.zeros((0, 0, 3), np.uint8), trace.patch_px,
                 att.astype(np.float16), None, trace.prediction, trace.gold, text=trace.text)


def test_text_only_example_gets_a_clear_message(monkeypatch):
    import vlcore.run.extract

    real = vlcore.run.extract.trace_for_example
    monkeypatch.setattr(vlcore.run.extract, "trace_for_example",
                        lambda *a, **k: (lambda tc: (text_only(tc[0]), tc[1]))(real(*a, **k)))
    at = open_page(PAGE, {"ex": EX})
    assert not at.exception and not at.error
    assert any("no image tokens" in i.value for i in at.info)
    assert not at.get("vega_lite_chart")


def test_malformed_link_opens_the_nearest_valid_view_with_notices():
    at = open_page(PAGE, {"ex": EX, "tok": "999", "dir": "sideways", "view": "nope", "layer": "x"})
    assert not at.exception and not at.error
    notices = " ".join(i.value for i in at.info)
    assert "tok=999" in notices and "dir=sideways" in notices and "view=nope" in notices and "layer=x" in notices
    n_text = len(at.pills(key="hm_tok").options)
    assert at.query_params["tok"] == str(n_text - 1) and at.query_params["dir"] == "from"
    assert overlay_heats(at)

    at = open_page(PAGE, {"ex": EX, "patch": "1.2,oops,12.3"})
    assert not at.exception
    assert "oops" in " ".join(i.value for i in at.info) and at.query_params["patch"] == "1.2,7.3"
    assert at.multiselect(key="hm_patches").value == ["1.2", "7.3"]

    at = open_page(PAGE, {"ex": EX, "patch": "zz"})  # nothing valid left: the [CLS] query
    assert not at.exception and at.query_params["tok"] == "0"


# ---------------------------------------------------------------------------------------
# Speed machinery: the page's charts are the builders' charts; traces stay in memory
# ---------------------------------------------------------------------------------------


def _render_both_ways():
    """AppTest script: each chart of a planted trace via ``show_parts`` then via ``show_chart`` (the builder)."""
    from tests.test_charts_heatmaps import parts_cases, planted_trace
    from vlcore.ui.heatmaps import show_chart, show_parts

    for parts, chart in parts_cases(planted_trace({(1, 2, 1): 7})):
        show_parts(parts)
        show_chart(chart)


def rendered(element) -> dict:
    """A chart element's spec with each dataset reference replaced by its rows (and no dataset names)."""
    from tests.test_charts_heatmaps import normalized

    rows = {d.name: pa.ipc.open_stream(d.data.data).read_all().to_pylist() for d in element.proto.datasets}
    return normalized(json.loads(element.proto.spec), rows)


def test_show_parts_sends_what_altair_chart_sends_for_the_builder():
    from streamlit.testing.v1 import AppTest

    from tests.test_charts_heatmaps import parts_cases, planted_trace

    at = AppTest.from_function(_render_both_ways, default_timeout=60).run()
    assert not at.exception
    charts = at.get("vega_lite_chart")
    assert len(charts) == 2 * len(parts_cases(planted_trace()))
    for fast, built in zip(charts[::2], charts[1::2]):
        assert rendered(fast) == rendered(built)
        assert fast.proto.theme == built.proto.theme and fast.proto.use_container_width == built.proto.use_container_width


def test_overlay_click_selection_and_trace_memory(monkeypatch):
    import vlcore.storage.store
    from vlcore.ui.context import trace_memory

    at = open_page(PAGE, {"ex": EX})
    assert not at.exception and not at.error
    overlay = next(e for e in at.get("vega_lite_chart") if "hm_click" in e.proto.id)
    assert list(overlay.proto.selection_mode) == ["patch"]
    assert [p["name"] for p in json.loads(overlay.proto.spec)["params"]] == ["patch"]
    # sized as built: under Streamlit's "fit" the chips and bars were squeezed and the image left its patches
    assert {json.loads(e.proto.spec)["autosize"]["type"] for e in at.get("vega_lite_chart")} == {"pad"}

    # a rerun takes the trace from memory: the store is not read; the same object comes back
    memory = trace_memory()
    assert len(memory) >= 1
    (root, key), (trace, _, _) = next(reversed(memory._entries.items()))
    reads = []
    real_get = vlcore.storage.store.Store.get_trace
    monkeypatch.setattr(vlcore.storage.store.Store, "get_trace", lambda self, k: reads.append(k) or real_get(self, k))
    at.selectbox(key="head").set_value(1).run()
    assert not at.exception and reads == []
    store = vlcore.storage.store.Store(root)
    assert memory.get(store, key) is trace
    assert memory.get(vlcore.storage.store.Store(root + "-other"), key) is None  # keyed by the store's folder too

    # a damaged file is not served from memory: the store drops it and the trace is recomputed
    path = store.trace_path(key)
    path.write_bytes(b"not a trace")
    at.pills(key="hm_tok").set_value(2).run()
    assert not at.exception and not at.error and reads == [key, key]  # read, then re-read under the lock
    assert any("damaged cache entry" in i.value for i in at.info)
    assert path.stat().st_size > 100 and memory.get(store, key) is not trace  # stored again, remembered again
    assert overlay_heats(at)


def test_trace_memory_keeps_the_last_few_traces_while_their_files_exist(tmp_path):
    from tests.test_charts_heatmaps import planted_trace
    from vlcore.storage.store import Store
    from vlcore.ui.context import TraceMemory

    store, memory = Store(tmp_path), TraceMemory(max_entries=2)
    traces = {key: planted_trace() for key in ("aa1", "bb2", "cc3")}
    for key, trace in traces.items():
        store.put_trace(key, trace)
        memory.put(store, key, trace)
    assert memory.get(store, "aa1") is None and memory.get(store, "cc3") is traces["cc3"]  # least recent left
    assert memory.get(store, "bb2") is traces["bb2"]
    store.trace_path("cc3").unlink()  # evicted or cleared on disk: not served from memory either
    assert memory.get(store, "cc3") is None and len(memory) == 1
    memory.put(store, "dd4", traces["aa1"])  # no file under that key: not remembered
    assert memory.get(store, "dd4") is None
    small = TraceMemory(max_bytes=100)  # a trace bigger than the budget is not kept
    small.put(store, "bb2", traces["bb2"])
    assert len(small) == 0


# ---------------------------------------------------------------------------------------
# Issue 14: colour scales, the image's share, the layer strip, titles, faithfulness curves, caches
# ---------------------------------------------------------------------------------------


def overlay_specs(at) -> list[dict]:
    """Specs of the image overlays (not the layer strip), in page order."""
    specs = [json.loads(e.proto.spec) for e in at.get("vega_lite_chart")]
    return [s for s in specs if not is_strip(s) and any(part.get("mark", {}).get("type") == "image"
                                                         for part in s.get("layer", []))]


def heat_scale(spec: dict, channel: str = "color") -> dict:
    heat = next(layer for layer in spec["layer"] if layer.get("encoding", {}).get("color", {}).get("field") == "value")
    return heat["encoding"][channel]["scale"]


def strip(at) -> tuple[dict, dict, object]:
    """The layer strip's spec, its datasets and its element."""
    element = next(e for e in at.get("vega_lite_chart") if is_strip(json.loads(e.proto.spec)))
    spec, frames = chart_data(element)
    return spec, frames, element


def test_colour_scale_per_map_shared_and_absolute_and_the_url():
    at = open_page(PAGE, {"ex": EX, "layer": "2", "head": "1", "view": "heads"})
    assert not at.exception and not at.error and at.query_params["scale"] == "map"
    heat = overlay_heats(at)[0]
    assert heat_scale(overlay_specs(at)[0])["domain"] == [heat["value"].min(), heat["value"].max()]  # its own range
    opacity = heat_scale(overlay_specs(at)[0], "opacity")
    assert opacity["domain"] == [0.0, heat["value"].max()] and opacity["range"][0] == 0  # zero weight: transparent

    at.segmented_control(key="hm_scale").set_value("shared").run()
    assert not at.exception and at.query_params["scale"] == "shared"
    spec, frames, _ = strip(at)
    cells = next(f for f in frames.values() if "level" in f)
    grid = next(frames[s["data"]["name"]] for s, frames in map(chart_data, at.get("vega_lite_chart")) if "facet" in s)
    top = max(overlay_heats(at)[0]["value"].max(), cells["value"].max(), grid["value"].max())
    domain = heat_scale(overlay_specs(at)[0])["domain"]
    assert domain == [0.0, pytest.approx(top, rel=1e-6)]  # one scale for the overlay, every layer and every head
    assert spec["layer"][1]["encoding"]["color"]["scale"]["domain"] == domain
    facet = next(s for s, _ in map(chart_data, at.get("vega_lite_chart")) if "facet" in s)
    facet_color = facet["spec"]["encoding"]["color"]
    assert facet_color["scale"]["domain"] == domain

    at.segmented_control(key="hm_scale").set_value("absolute").run()
    assert at.query_params["scale"] == "absolute"
    assert heat_scale(overlay_specs(at)[0])["domain"] == [0.0, 1.0]
    reopened = open_page(PAGE, dict(at.query_params))  # a shared link keeps the scale
    assert reopened.segmented_control(key="hm_scale").value == "absolute"
    assert open_page(PAGE, {"ex": EX, "scale": "log"}).segmented_control(key="hm_scale").value == "map"


def test_every_overlay_says_how_much_of_the_map_is_on_the_image():
    at = open_page(PAGE, {"ex": EX, "view": "explain"})
    assert not at.exception and not at.error
    subtitles = [spec["title"]["subtitle"] for spec in overlay_specs(at)]
    assert len(subtitles) == 4
    pattern = r"image: (<0\.1|\d{1,3}\.\d)% of (this row|the relevance)"
    assert all(re.fullmatch(pattern, s) for s in subtitles), subtitles
    assert subtitles[-1].endswith("of the relevance")
    # the [CLS] row's patch total, as the special-token bars show it
    bars = next(frames[spec["data"]["name"]] for spec, frames in map(chart_data, at.get("vega_lite_chart"))
                if spec.get("title") == "Special tokens")
    patches = bars.set_index("token").loc["all patches"]
    assert subtitles[0] == f"image: {patches['label']} of this row" and 0 <= patches["value"] <= 1
    at.segmented_control(key="hm_view").set_value("step").run()
    assert overlay_specs(at)[-1]["title"]["subtitle"].startswith("image: ")
    at.segmented_control(key="hm_dir").set_value("to").run()
    assert "of their attention" in overlay_specs(at)[0]["title"]["subtitle"]


def test_relevancy_view_is_titled_as_relevancy():
    at = open_page(PAGE, {"ex": EX, "method": "relevancy"})
    assert not at.exception and not at.error
    heading = at.subheader[0].value
    assert heading.startswith("Gradient relevancy") and "Attention" not in heading
    assert overlay_specs(at)[0]["title"]["text"].startswith("gradient relevancy for “")
    at.segmented_control(key="hm_method").set_value("rollout").run()
    assert at.subheader[0].value.startswith("Attention rollout from the query")
    at.segmented_control(key="hm_method").set_value("raw").run()
    assert at.subheader[0].value.startswith("Attention from the query · layer ")


class ChartClick:
    """What a click on a chart with ``on_select`` sends (AppTest cannot click a chart): the next run gets
    ``event`` as that chart's selection state."""

    def __new__(cls, element, event: dict):
        from streamlit.proto.WidgetStates_pb2 import WidgetState
        from streamlit.testing.v1.element_tree import Widget

        class Clicked(Widget):
            def __init__(self):
                super().__init__(element.proto, element.root)
                self.type = "vega_lite_chart"

            @property
            def value(self):
                return event

            @property
            def _widget_state(self):
                state = WidgetState(id=self.proto.id)
                state.string_value = json.dumps(event)
                return state

        return Clicked()


def click_chart(at, element, event: dict) -> None:
    """Replace ``element`` in the app's tree by a `ChartClick` of it (for the next ``at.run()``)."""
    def walk(block) -> bool:
        for index, child in getattr(block, "children", {}).items():
            if child is element:
                block.children[index] = ChartClick(element, event)
                return True
            if walk(child):
                return True
        return False

    assert walk(at._tree)


def test_layer_strip_shows_every_layer_and_a_click_picks_the_layer():
    at = open_page(PAGE, {"ex": EX, "head": "1", "tok": "2"})
    assert not at.exception and not at.error
    assert at.slider(key="layer").value == 3  # the default: the last layer
    spec, frames, element = strip(at)
    cells = next(f for f in frames.values() if "level" in f)
    assert sorted(cells["layer"].unique()) == [0, 1, 2, 3] and len(cells) == 4 * 64
    labels = next(f for f in frames.values() if "caption" in f)
    assert labels.loc[labels["shown"], "layer"].tolist() == [3]
    assert all(c.startswith("img ") and c.endswith("%") for c in labels["caption"])
    # each small map is the raw map of this query and head in its layer
    from vlcore.ui.context import trace_memory

    trace = next(reversed(trace_memory()._entries.values()))[0]
    for layer, part in cells.groupby("layer"):
        expected = trace.head_attention(int(layer), 1)[2][trace.patch_positions()[0]]
        assert np.allclose(part.sort_values(["row", "col"])["value"], expected, atol=1e-3)
    assert list(element.proto.selection_mode) == ["pick_layer"]

    click_chart(at, element, {"selection": {"pick_layer": [{"layer": 2}]}})
    at.run()
    assert not at.exception and not at.error
    assert at.slider(key="layer").value == 2 and at.query_params["layer"] == "2"
    labels = next(f for f in strip(at)[1].values() if "caption" in f)
    assert labels.loc[labels["shown"], "layer"].tolist() == [2]
    assert "layer 2" in at.subheader[0].value
    at.slider(key="layer").set_value(0).run()  # the slider still works, and a second click on layer 2 counts again
    click_chart(at, strip(at)[2], {"selection": {"pick_layer": [{"layer": 2}]}})
    at.run()
    assert at.slider(key="layer").value == 2 and at.query_params["layer"] == "2"


def test_matrix_block_picker_is_beside_the_chart_not_under_its_toolbar():
    at = open_page(PAGE, {"ex": EX})
    assert not at.exception
    row = next(b for b in at.main.children.values()
               if any(hasattr(c, "children") and c.get("radio") for c in getattr(b, "children", {}).values()))
    picker, chart = list(row.children.values())  # one row of two columns
    assert picker.type == chart.type == "column"
    assert [r.key for r in picker.get("radio")] == ["hm_block"] and not picker.get("vega_lite_chart")
    assert len(chart.get("vega_lite_chart")) == 1 and not chart.get("radio")
    assert "image → image" in [o for o in at.radio(key="hm_block").options]


def test_faithfulness_curves_are_drawn_at_their_own_size_with_ticks_and_legend():
    at = open_page(PAGE, {"ex": EX, "view": "explain"})
    at.toggle(key="hm_faith").set_value(True).run()
    assert not at.exception and not at.error
    lines = [s for s, _ in map(chart_data, at.get("vega_lite_chart")) if s.get("mark", {}).get("type") == "line"]
    assert len(lines) == 3
    for spec in lines:
        assert spec["autosize"] == {"type": "pad", "contains": "padding"}  # not stretched and fitted by Streamlit
        assert spec["encoding"]["y"]["axis"]["ticks"] and spec["encoding"]["color"]["legend"]["labelLimit"] == 0
        assert len(spec["encoding"]["color"]["scale"]["domain"]) == 2


# ---------------------------------------------------------------------------------------
# Derived caches are keyed on the trace's content and the model, not on its example id and text
# ---------------------------------------------------------------------------------------


def test_same_example_id_and_text_with_other_content_never_gets_a_stale_rollout():
    from tests.test_charts_heatmaps import patch_index, planted_trace
    from vlcore.attribution.relevance import compute_rollout
    from vlcore.ui.heatmaps import Query, method_map, trace_fingerprint

    first = planted_trace({(0, 0, 1): patch_index(0, 2), (1, 0, 1): patch_index(0, 2)})
    second = planted_trace({(0, 0, 1): patch_index(1, 0), (1, 0, 1): patch_index(1, 0)})  # same id, model, text
    assert (first.example_id, first.model_id, first.text) == (second.example_id, second.model_id, second.text)
    assert trace_fingerprint(first) != trace_fingerprint(second)
    assert trace_fingerprint(first) == trace_fingerprint(planted_trace({(0, 0, 1): patch_index(0, 2),
                                                                        (1, 0, 1): patch_index(0, 2)}))
    query = Query(np.array([1]), [], "a")
    for trace in (first, second, first):
        shown = method_map("rollout", trace, 1, 0, query, "from")
        assert np.allclose(shown, compute_rollout(trace, 0)[1], atol=1e-6)


def test_same_example_id_and_text_from_another_dataset_or_model_never_gets_a_stale_relevancy_or_curve(
        tiny_tokenizer_dir):
    from tests.conftest import grey_image, make_tiny_adapter
    from vlcore.data.example import Example
    from vlcore.run.extract import extract_trace
    from vlcore.attribution.faithfulness import compute_perturbation_curve
    from vlcore.attribution.relevance import extract_relevancy
    from vlcore.ui.heatmaps import Query, cached_curve, method_map, model_fingerprint, trace_fingerprint

    model_a = make_tiny_adapter(tiny_tokenizer_dir, seed=0)
    model_b = make_tiny_adapter(tiny_tokenizer_dir, seed=1)
    model_b.model_id = model_a.model_id  # e.g. a local folder retrained under the same name
    question = "what color is the shape ?"
    red = Example("upload/x/0", question, image=grey_image(32, 32, red_cell=(1, 2)))
    blue = Example("upload/x/0", question, image=grey_image(32, 32, red_cell=(3, 0)))  # same id, another dataset
    cls = Query(np.array([0]), [], "[CLS]")
    seen = []
    for adapter, example in ((model_a, red), (model_a, blue), (model_b, red), (model_a, red)):
        trace = extract_trace(adapter, example.load_image(), question, example.example_id)
        shown = method_map("relevancy", trace, 0, None, cls, "from", adapter, example, None)
        expected = extract_relevancy(adapter, example.load_image(), question).values
        assert np.allclose(shown, expected, atol=1e-6)
        curve = cached_curve(adapter, example, trace_fingerprint(trace), model_fingerprint(adapter),
                             np.asarray(shown, np.float32), None, "positive")
        direct = compute_perturbation_curve(adapter, example.load_image(), question, shown, order="positive")
        assert np.allclose(curve.probabilities, direct.probabilities, atol=1e-6)
        seen.append(shown)
    assert not np.allclose(seen[0], seen[1]) and not np.allclose(seen[0], seen[2])  # the cases really differ
