"""The notebook API (`vlcore.notebook`) on the bundled demo model: known answers, clear errors, the same data as
the pages (AppTest) for the same trace, and examples/quickstart.ipynb executed top to bottom with nbclient."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

import vlcore.notebook as vn
from tests.app.conftest import open_page
from tests.conftest import ROOT
from vlcore.errors import InputError
from vlcore.analysis.stats import compute_trace_summaries

EX = "easy_vqa/test/3"


@pytest.fixture(scope="module")
def trace():
    return vn.run(example=EX)


def chart_frames(chart) -> tuple[dict, dict[str, pd.DataFrame]]:
    """A notebook chart's spec and its datasets as data frames."""
    spec = chart.to_dict()
    return spec, {name: pd.DataFrame(rows) for name, rows in spec.get("datasets", {}).items()}


def page_frames(element) -> tuple[dict, dict[str, pd.DataFrame]]:
    """A page chart's spec and its Arrow datasets as data frames."""
    frames = {d.name: pa.ipc.open_stream(d.data.data).read_pandas() for d in element.proto.datasets}
    return json.loads(element.proto.spec), frames


def heat_layer(spec: dict, frames: dict) -> pd.DataFrame:
    """The overlay's heat layer: patch rectangles coloured by ``value`` (Altair may hoist shared data to the top)."""
    layer = next(x for x in spec["layer"] if x.get("encoding", {}).get("color", {}).get("field") == "value")
    return frames[(layer.get("data") or spec["data"])["name"]]


def same_rows(page: pd.DataFrame, mine: pd.DataFrame, columns: list[str], rtol: float = 1e-6) -> None:
    """The two frames agree on ``columns`` (strings compared as strings, numbers within ``rtol``)."""
    a, b = page[columns].reset_index(drop=True), mine[columns].reset_index(drop=True)
    for col in columns:
        if a[col].dtype == object or isinstance(a[col].dtype, (pd.CategoricalDtype, pd.StringDtype)):
            a[col], b[col] = a[col].astype(str), b[col].astype(str)
    pd.testing.assert_frame_equal(a, b, check_dtype=False, check_exact=False, rtol=rtol, atol=1e-9)


# ---------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------


def test_run_reads_paths_pil_images_and_arrays_alike(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "noise.png")
    traces = [vn.run(image=x, text="what color is the shape?")
              for x in (tmp_path / "noise.png", str(tmp_path / "noise.png"), Image.fromarray(pixels), pixels,
                        pixels / 255.0)]
    assert len({t.example_id for t in traces}) == 1 and traces[0].example_id.startswith("upload/")
    for other in traces[1:]:
        np.testing.assert_array_equal(other.attentions, traces[0].attentions)
    assert traces[0].text == "what color is the shape?" and traces[0].n_layers == 4


def test_query_map_is_the_querys_row_column_or_the_mean_of_its_patches(trace):
    att = trace.head_attention(2, 1)
    np.testing.assert_array_equal(vn.query_map(trace, 5, layer=2, head=1), att[5])
    np.testing.assert_array_equal(vn.query_map(trace, 5, layer=2, head=1, direction="to"), att[:, 5])
    word = trace.tokens[4]
    np.testing.assert_array_equal(vn.query_map(trace, word, layer=-1), trace.head_attention(3, None)[4])
    idx, rc = trace.patch_positions()
    cells = [tuple(int(v) for v in rc[0]), tuple(int(v) for v in rc[9])]
    np.testing.assert_allclose(vn.query_map(trace, cells, layer=0), (trace.head_attention(0, None)[idx[[0, 9]]]).mean(0),
                               rtol=1e-6)
    rollout = vn.query_map(trace, 0, method="rollout")
    assert rollout.shape == (trace.n_tokens,) and abs(float(rollout.sum()) - 1) < 1e-3


def test_charts_draw_those_numbers(trace):
    _, frames = chart_frames(vn.heatmap(trace, query=0, layer=1, head=2))
    heat = next(f for f in frames.values() if {"row", "col", "token", "value"} <= set(f.columns))
    expected = trace.head_attention(1, 2)[0]
    np.testing.assert_allclose(heat["value"], expected[heat["token"].to_numpy()], rtol=1e-6)
    spec, frames = chart_frames(vn.matrix(trace, block="txt2img", layer=1, head=2))
    cells = frames[(spec["layer"][0].get("data") or spec["data"])["name"]]
    np.testing.assert_allclose(cells["value"], trace.block_attention(1, 2, "txt2img").ravel(), rtol=1e-6)
    assert spec["title"] == "text → image · layer 1, head 2"


def test_head_summary_of_several_traces_is_the_mean_of_each(trace):
    other = vn.run(example="easy_vqa/test/4")
    spec, frames = chart_frames(vn.head_summary([trace, other], metric="txt2img"))
    heat = frames[spec["hconcat"][0]["data"]["name"]].set_index(["layer", "head"])["mean"]
    each = [compute_trace_summaries(t).query("metric == 'txt2img'").set_index(["layer", "head"])["value"]
            for t in (trace, other)]
    np.testing.assert_allclose(heat.sort_index(), ((each[0] + each[1]) / 2).sort_index(), rtol=1e-6)
    assert spec["hconcat"][0]["title"] == "txt2img · 2 traces"


def test_a_sweep_gives_the_same_head_summary_as_its_traces_and_pools_its_tokens(tmp_path, trace):
    path = vn.sweep(limit=4, out=tmp_path / "sweep", batch_size=2)
    traces = [vn.run(example=f"easy_vqa/test/{i}") for i in range(4)]
    sweep_spec, sweep_frames = chart_frames(vn.head_summary(path, metric="txt2img"))
    trace_spec, trace_frames = chart_frames(vn.head_summary(traces, metric="txt2img"))
    a = sweep_frames[sweep_spec["hconcat"][0]["data"]["name"]].set_index(["layer", "head"])["mean"].sort_index()
    b = trace_frames[trace_spec["hconcat"][0]["data"]["name"]].set_index(["layer", "head"])["mean"].sort_index()
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)  # batched sweep vs one trace at a time
    assert sweep_spec["hconcat"][0]["title"] == "txt2img · all (n = 4)"
    spec, frames = chart_frames(vn.projection(path, layer=2))
    points = frames[spec["data"]["name"]]
    assert set(points["example_id"]) == {f"easy_vqa/test/{i}" for i in range(4)} and (points["layer"] == 2).all()
    correct = vn.head_summary(path, metric="entropy", slice="correct").to_dict()["hconcat"][0]["title"]
    assert re.fullmatch(r"entropy · correct \(n = \d\)", correct)


def test_bad_inputs_are_one_line_errors(trace, tmp_path):
    from vlcore.storage.store import trace_from_bytes, trace_to_bytes

    cases = [
        (lambda: vn.run(), "needs image="),
        (lambda: vn.run(image=tmp_path / "nope.png", text="what?"), "image file not found"),
        (lambda: vn.run(image=np.zeros((4, 4, 7)), text="what?"), "array"),
        (lambda: vn.run(image=np.full((8, 8), 300.0), text="what?"), "[0, 1]"),
        (lambda: vn.run(image=np.full((8, 8), -1), text="what?"), "[0, 255]"),
        (lambda: vn.run(image=np.zeros((8, 8, 3), np.uint8), text=" "), "non-empty"),
        (lambda: vn.run(example=EX, text="what?"), "not both"),
        (lambda: vn.heatmap(trace, method="saliency"), "method must be one of"),
        (lambda: vn.heatmap(trace, layer=4), "outside the model's 4 layers"),
        (lambda: vn.heatmap(trace, head=9), "outside the model's 4 heads"),
        (lambda: vn.heatmap(trace, query="zebra"), "no text token 'zebra'"),
        (lambda: vn.heatmap(trace, query=(8, 0)), "8×8 grid"),
        (lambda: vn.heatmap(trace, direction="sideways"), "direction"),
        (lambda: vn.heatmap(trace_from_bytes(trace_to_bytes(trace)), method="relevancy"), "made by vlcore.notebook.run"),
        (lambda: vn.matrix(trace, block="txt2sound"), "block must be"),
        (lambda: vn.head_summary(trace, metric="nope"), "unknown metric 'nope'"),
        (lambda: vn.head_summary(tmp_path), "no sweep in"),
        (lambda: vn.projection(trace, method="mds"), "method must be one of"),
        (lambda: vn.projection(trace, layer=5), "outside 0 (embeddings) to 4"),
    ]
    for call, message in cases:
        with pytest.raises(InputError) as caught:
            call()
        assert message in str(caught.value) and "\n" not in str(caught.value), (message, str(caught.value))


# ---------------------------------------------------------------------------------------
# The same data as the pages
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, kwargs", [
    ({"layer": "2", "head": "1", "tok": "4", "method": "raw"}, {"query": 4, "layer": 2, "head": 1, "method": "attention"}),
    ({"patch": "3.5", "dir": "to", "method": "rollout"}, {"query": (3, 5), "direction": "to", "method": "rollout"}),
    ({"method": "relevancy"}, {"method": "relevancy"}),
])
def test_heatmap_draws_what_the_heatmaps_page_draws(trace, params, kwargs):
    at = open_page("pages/4_Attention_Heatmaps.py", {"ex": EX, **params})
    assert not at.exception and not at.error
    overlays = [page_frames(e) for e in at.get("vega_lite_chart")]
    overlays = [(s, f) for s, f in overlays
                if any(x.get("mark", {}).get("type") == "image" for x in s.get("layer", []))
                and "layer" not in str(s.get("title", "")).lower()]
    page = heat_layer(*overlays[0])
    mine = heat_layer(*chart_frames(vn.heatmap(trace, **kwargs)))
    same_rows(page, mine, ["row", "col", "token", "value"])


@pytest.mark.parametrize("block", [None, "txt2img"])
def test_matrix_draws_what_the_heatmaps_page_draws(trace, block):
    at = open_page("pages/4_Attention_Heatmaps.py", {"ex": EX, "layer": "1", "head": "3"})
    if block:
        at.radio(key="hm_block").set_value(block).run()
    assert not at.exception and not at.error
    charts = [page_frames(e) for e in at.get("vega_lite_chart")]
    spec, frames = next(c for c in charts if c[0].get("layer", [{}])[0].get("encoding", {}).get("x", {}).get("field") == "key")
    page = frames[(spec["layer"][0].get("data") or spec["data"])["name"]]
    spec, frames = chart_frames(vn.matrix(trace, block=block, layer=1, head=3))
    mine = frames[(spec["layer"][0].get("data") or spec["data"])["name"]]
    same_rows(page, mine, ["query", "key", "value"])


@pytest.mark.parametrize("metric, norm", [("txt2img", "raw"), ("entropy", "z"), ("ablation_drop", "raw")])
def test_head_summary_draws_what_the_statistics_page_draws(trace, metric, norm):
    at = open_page("pages/3_Head_Statistics.py", {"ex": EX, "metric": metric, "norm": norm})
    assert not at.exception and not at.error
    spec, frames = next(c for c in map(page_frames, at.get("vega_lite_chart")) if "hconcat" in c[0])
    page = frames[spec["hconcat"][0]["data"]["name"]]
    spec, frames = chart_frames(vn.head_summary(trace, metric=metric, norm=norm))
    mine = frames[spec["hconcat"][0]["data"]["name"]]
    assert len(mine) == trace.n_layers * trace.n_heads
    same_rows(page.sort_values(["layer", "head"]), mine.sort_values(["layer", "head"]), ["layer", "head", "mean"],
              rtol=1e-5)


def test_projection_draws_what_the_embeddings_page_draws(trace):
    from vlcore.charts.embeddings import SELECT_PARAM

    at = open_page("pages/5_Embeddings.py", {"ex": EX, "layer": "2"})
    assert not at.exception and not at.error
    spec, frames = next(c for c in map(page_frames, at.get("vega_lite_chart"))
                        if any(p.get("name") == SELECT_PARAM for p in c[0].get("params", [])))
    page = frames[spec["data"]["name"]]
    spec, frames = chart_frames(vn.projection(trace, layer=2))
    mine = frames[spec["data"]["name"]]
    same_rows(page, mine, ["layer", "x", "y", "example_id", "token", "text", "kind", "modality", "correct", "uid",
                           "image"])


# ---------------------------------------------------------------------------------------
# The quickstart notebook
# ---------------------------------------------------------------------------------------


def vega_lite_specs(output: dict) -> list[dict]:
    """Vega-Lite specs in one notebook output: a ``vnd.vegalite`` mime bundle, or the HTML of Altair's default
    renderer (vega-embed called on the spec)."""
    data = output.get("data", {})
    specs = [v if isinstance(v, dict) else json.loads(v) for k, v in data.items() if "vnd.vegalite" in k]
    html = data.get("text/html", "")
    found = re.search(r"\}\)\((\{.*\}), (\{[^{}]*\})\);\s*</script>", html, re.DOTALL)
    if found and "vegaEmbed" in html:
        specs.append(json.loads(found.group(1)))
    return [s for s in specs if "vega-lite" in s.get("$schema", "")]


def test_quickstart_notebook_runs_and_shows_vega_lite_charts(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code")  # committed without outputs
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "examples")}}).execute()  # raises on an error
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    charts = [spec for c in code for o in c.outputs for spec in vega_lite_specs(o)]
    calls = [c.source for c in code if re.search(r"^vn\.(heatmap|head_summary|matrix|projection)\(", c.source.splitlines()[-1])]
    assert len(charts) == len(calls) >= 8
    assert any(s["$schema"].startswith("https://vega.github.io/schema/vega-lite/v6") for s in charts)
    first = next(o for o in code[1].outputs if o.output_type == "stream" and o.name == "stdout")
    assert "->" in first.text and "4 layers, 4 heads" in first.text


# ---------------------------------------------------------------------------------------
# Every family: a block by name, the model's default query, maps on the stream they lie on
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_traces(tmp_path_factory) -> dict:
    """``vn.run`` of one image and question on each tiny family checkpoint folder (BLIP ITM, CLIP, SigLIP)."""
    from tests.conftest import grey_image
    from tests.models.tiny_blip import TINY_CHECKPOINTS as BLIP
    from tests.models.tiny_clip import TINY_CHECKPOINTS as CLIP

    root = tmp_path_factory.mktemp("nb-families")
    image = grey_image(32, 32, red_cell=(1, 2))
    makers = {"blip-itm": BLIP["blip-itm"], "clip": CLIP["clip"], "siglip": CLIP["siglip"]}
    return {name: vn.run(str(make(root / name)), image=image, text="what color is the shape?")
            for name, make in makers.items()}


def overlay_values(chart) -> pd.DataFrame:
    return heat_layer(*chart_frames(chart)).sort_values("token", ignore_index=True)


def test_heatmap_reads_the_named_block_from_the_models_default_query(family_traces):
    blip = family_traces["blip-itm"]
    assert blip.view == "text.cross"
    cross = blip.select("text.cross")
    heat = overlay_values(vn.heatmap(blip))  # default: the view, [CLS] (row 0) over the 16 vision patches
    expected = cross.head_attention(cross.n_layers - 1, None)[0]
    assert len(heat) == 16 and (heat["token"] >= 1).all()  # vision tokens: the image CLS is 0, patches 1..16
    np.testing.assert_allclose(heat["value"], expected[heat["token"].to_numpy()], rtol=1e-6)
    vision = blip.select("vision.self")
    heat = overlay_values(vn.heatmap(blip, block="vision.self", layer=0, head=2))  # the image CLS row
    np.testing.assert_allclose(heat["value"], vision.head_attention(0, 2)[0][heat["token"].to_numpy()], rtol=1e-6)
    spec, frames = chart_frames(vn.matrix(blip, block="text.cross", layer=1))
    cells = frames[(spec["layer"][0].get("data") or spec["data"])["name"]]
    assert len(cells) == cross.n_tokens * cross.key_layout.n_tokens and spec["title"].startswith("text.cross · ")
    spec, frames = chart_frames(vn.head_summary(blip, block="text.cross", metric="entropy"))
    assert len(frames[spec["hconcat"][0]["data"]["name"]]) == 2 * 4  # text.cross: 2 layers x 4 heads


def test_cross_block_relevancy_and_tower_maps_lie_on_the_image(family_traces):
    blip, clip = family_traces["blip-itm"], family_traces["clip"]
    values = vn.query_map(blip, method="relevancy")  # the bi-modal rules: [CLS] over the vision tokens
    assert values.shape == (blip.streams["vision"].n_tokens,) and np.isfinite(values).all()
    heat = overlay_values(vn.heatmap(blip, method="relevancy"))
    np.testing.assert_allclose(heat["value"], values[heat["token"].to_numpy()], rtol=1e-6)
    assert clip.view == "vision.self" and clip.layout.tokens[0] == "[IMG]"
    heat = overlay_values(vn.heatmap(clip, method="rollout"))  # rollout from the image CLS
    from vlcore.attribution.relevance import compute_rollout

    np.testing.assert_allclose(heat["value"], compute_rollout(clip)[0][heat["token"].to_numpy()], rtol=1e-5)
    points = chart_frames(vn.projection(clip, stream="text", layer=1))[1]
    text = next(f for f in points.values() if "uid" in f.columns)
    assert text["text"].tolist() == list(clip.streams["text"].tokens)


def test_a_pooling_tower_defaults_to_every_patch_and_rolls_out_into_its_head(family_traces):
    from vlcore.attribution.towers import compute_tower_rollout

    siglip = family_traces["siglip"]
    assert siglip.view == "vision.self" and "[IMG]" not in siglip.layout.tokens
    raw = vn.query_map(siglip)  # no single token: the mean of every patch's row
    np.testing.assert_allclose(raw, siglip.head_attention(siglip.n_layers - 1, None).mean(0), rtol=1e-5)
    np.testing.assert_allclose(vn.query_map(siglip, method="rollout"),
                               compute_tower_rollout(siglip, "vision.self", None, 0), rtol=1e-6)
    title = vn.heatmap(siglip).to_dict()["title"]
    assert "mean of all 16 patches" in (title["text"] if isinstance(title, dict) else title)


def test_zero_shot_labels_and_family_errors_are_one_line(family_traces):
    clip = family_traces["clip"]
    adapter = vn._INPUTS[clip][0]
    zs = vn.run(adapter, example="easy_vqa/test/3", labels=["circle", "red", "no"])
    assert {label for label, _ in zs.prediction} == {"circle", "red", "no"} and zs.meta["task"] == "zero_shot"
    assert adapter.task == "similarity"  # the loaded adapter is unchanged: the labels are a view
    cases = [
        (lambda: vn.heatmap(family_traces["blip-itm"], block="text.self"),
         "text.self has no image tokens: pick vision.self or text.cross"),
        (lambda: vn.heatmap(clip, block="text.self"), "pick vision.self"),
        (lambda: vn.heatmap(clip, block="nope"), "its blocks: vision.self, text.self"),
        (lambda: vn.heatmap(family_traces["blip-itm"], query=(1, 1)),
         "patch queries need a block over the image: vision.self"),
        (lambda: vn.query_map(family_traces["blip-itm"], method="rollout"), "cross-attention block"),
        (lambda: vn.projection(clip, stream="probe"), "stream must be one of vision, text"),
        (lambda: vn.run(example="easy_vqa/test/3", labels=["a"]), "cannot classify over candidate labels"),
    ]
    for call, message in cases:
        with pytest.raises(InputError) as caught:
            call()
        assert message in str(caught.value) and "\n" not in str(caught.value), (message, str(caught.value))
