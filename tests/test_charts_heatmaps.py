"""Heatmap views on hand-made traces: planted attention lands on its patch, matrices, chips, exports."""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import altair as alt
import numpy as np
import pandas as pd
import pytest

from vlcore.charts import heatmaps as ch
from vlcore.charts import parts as cp
from vlcore.charts import multiples as cm
from vlcore.analysis import query_maps as hm
from vlcore.charts.export import chart_spec_json
from vlcore.trace import Trace

# [CLS] a b [SEP] | [IMG] p(0,0) p(0,1) p(0,2) p(1,0) p(1,1) p(1,2): a NON-square 2x3 grid
TOKENS = ("[CLS]", "a", "b", "[SEP]", "[IMG]") + tuple(f"<patch {r},{c}>" for r in range(2) for c in range(3))
N = len(TOKENS)


def patch_index(r: int, c: int) -> int:
    return 5 + 3 * r + c


def planted_trace(plants: dict[tuple[int, int, int], int] | None = None, n_layers: int = 2, n_heads: int = 3) -> Trace:
    """Near-uniform attention; ``plants[(layer, head, query)] = key`` puts 0.9 of that row on ``key``."""
    att = np.full((n_layers, n_heads, N, N), 0.1 / (N - 1), dtype=np.float32)
    np.einsum("lhii->lhi", att)[...] = 0.9
    for (layer, head, query), key in (plants or {}).items():
        att[layer, head, query] = 0.1 / (N - 1)
        att[layer, head, query, key] = 0.9
    rc = np.full((N, 2), -1, dtype=np.int16)
    rc[5:] = [(r, c) for r in range(2) for c in range(3)]
    return Trace.from_arrays("hand/0", "hand-model", TOKENS, np.array([0] * 4 + [1] * 7, np.int8),
                 np.array([1, 0, 0, 1, 1] + [0] * 6, bool), rc, (2, 3), np.full((16, 24, 3), 90, np.uint8), 8,
                 att.astype(np.float16), None, prediction=(("red", 0.9),), text="a b")


def layer_frames(chart) -> list[pd.DataFrame]:
    """Each layer's data (Altair hoists data shared by every layer to the layer chart)."""
    return [layer.data if isinstance(layer.data, pd.DataFrame) else chart.data for layer in chart.layer]


def heat_frame(chart) -> pd.DataFrame:
    """The heat layer: the first layer whose data has a ``value`` column and a colour encoding."""
    for layer in chart.layer:
        if isinstance(layer.data, pd.DataFrame) and "value" in layer.data and layer.to_dict().get("encoding", {}).get(
                "color"):
            return layer.data
    raise AssertionError("no heat layer")


@pytest.mark.parametrize("cell", [(0, 2), (1, 0), (1, 2), (0, 1)])
def test_planted_attention_peaks_at_its_patch_not_its_transpose(cell):
    t = planted_trace({(1, 2, 1): patch_index(*cell)})  # token "a" attends to the patch
    values = hm.compute_query_map(t.head_attention(1, 2), [1], "from")
    heat = heat_frame(ch.build_attention_overlay_chart(t, values))
    top = heat.loc[heat["value"].idxmax()]
    assert (top["row"], top["col"]) == cell
    assert (top["x"], top["y"]) == (cell[1] * 8, cell[0] * 8)  # x from the column, y from the row
    smooth = heat_frame(ch.build_attention_overlay_chart(t, values, smooth=True))
    assert len(smooth) == 6 * 16  # 4x4 sub-rectangles per patch
    peak = smooth.loc[smooth["value"].idxmax()]
    assert (peak["row"], peak["col"]) == cell
    assert cell[1] * 8 <= peak["x"] < (cell[1] + 1) * 8 and cell[0] * 8 <= peak["y"] < (cell[0] + 1) * 8


def test_attention_to_a_patch_is_its_column_and_several_patches_average():
    t = planted_trace({(0, 0, 2): patch_index(1, 1)})  # token "b" attends to patch (1, 1)
    att = t.head_attention(0, 0)
    to = hm.compute_query_map(att, [patch_index(1, 1)], "to")
    assert to[2] == pytest.approx(0.9, abs=1e-3) and to[1] < 0.02  # "b" gives it 0.9, "a" almost nothing
    chips = ch.token_chips_frame(t, to)
    assert chips.set_index("text").loc["b", "value"] == pytest.approx(0.9, abs=1e-3)
    both = hm.compute_query_map(att, [patch_index(0, 0), patch_index(1, 2)], "from")
    assert np.allclose(both, (att[patch_index(0, 0)] + att[patch_index(1, 2)]) / 2)


def test_selected_patches_are_outlined_and_overlay_has_a_click_selection():
    t = planted_trace()
    chart = ch.build_attention_overlay_chart(t, t.head_attention(0, 0)[0], selected=[(1, 2)])
    spec = chart.to_dict()
    assert [p["name"] for p in spec.get("params", [])] == ["patch"]
    outline = layer_frames(chart)[-1]
    assert outline[["row", "col"]].values.tolist() == [[1, 2]]
    assert "params" not in ch.build_attention_overlay_chart(t, t.head_attention(0, 0)[0], select_name=None).to_dict()


def test_upsample_bilinear_keeps_constants_and_corners():
    g = np.arange(6, dtype=np.float64).reshape(2, 3)
    up = hm.upsample_bilinear(g, 4)
    assert up.shape == (8, 12)
    assert up[0, 0] == g[0, 0] and up[-1, -1] == g[-1, -1]
    assert np.allclose(hm.upsample_bilinear(np.full((2, 3), 0.5), 3), 0.5)


def test_token_chips_leave_out_specials_and_flag_the_query():
    t = planted_trace()
    values = np.linspace(0, 1, N)
    frame = ch.token_chips_frame(t, values, selected=[2])
    assert frame["text"].tolist() == ["a", "b"]
    assert frame["selected"].tolist() == [False, True]
    assert frame["value"].tolist() == pytest.approx([values[1], values[2]])
    special = layer_frames(ch.build_special_weights_chart(t, values))[0]
    assert special["token"].tolist()[:3] == ["0:[CLS]", "3:[SEP]", "4:[IMG]"]
    assert special["value"].tolist()[:3] == pytest.approx([values[0], values[3], values[4]])
    assert special["value"].iloc[-1] == pytest.approx(values[5:].sum())  # all patches


def test_matrix_has_n_by_n_cells_named_by_token_and_a_modality_separator():
    t = planted_trace({(0, 1, 1): patch_index(0, 2)})
    att = t.head_attention(0, 1)
    chart = ch.build_matrix_chart(t, att)
    cells = layer_frames(chart)[0]
    assert len(cells) == N * N
    hit = cells[(cells["query"] == "1:a") & (cells["key"] == "7:<patch 0,2>")]
    assert hit["value"].item() == pytest.approx(0.9, abs=1e-3)
    assert chart.layer[1].data["key"].tolist() == ["4:[IMG]"] and chart.layer[2].data["query"].tolist() == ["4:[IMG]"]
    tooltip = [t_["field"] for t_ in chart.to_dict()["layer"][0]["encoding"]["tooltip"]]
    assert tooltip == ["query", "key", "value"]


@pytest.mark.parametrize("block,shape", [("txt2txt", (2, 2)), ("txt2img", (2, 6)), ("img2txt", (6, 2)),
                                         ("img2img", (6, 6))])
def test_each_block_has_its_cells(block, shape):
    t = planted_trace()
    cells = layer_frames(ch.build_block_chart(t, t.head_attention(0, 0), block))[0]
    assert (cells["query"].nunique(), cells["key"].nunique()) == shape and len(cells) == shape[0] * shape[1]


def test_all_heads_grid_puts_each_heads_peak_at_its_patch():
    plants = {(1, 0, 1): patch_index(0, 2), (1, 1, 1): patch_index(1, 0), (1, 2, 1): patch_index(1, 1)}
    t = planted_trace(plants)
    chart = cm.build_all_heads_chart(t, hm.compute_head_maps(t, 1, [1]))
    frame = chart.data
    peaks = frame.loc[frame.groupby("head")["value"].idxmax(), ["row", "col"]].values.tolist()
    assert peaks == [[0, 2], [1, 0], [1, 1]]
    assert np.allclose(hm.compute_head_maps(t, 1, [1], "to")[0], t.head_attention(1, 0)[:, 1])


def test_parse_patches_drops_bad_syntax_and_moves_cells_into_the_grid():
    cells, problems = hm.parse_patches("1.2, 0.0,1.2,abc,5.-1,", (2, 3))
    assert cells == [(1, 2), (0, 0), (1, 0)]
    assert len(problems) == 2 and "abc" in problems[0] and "outside the 2×3 grid" in problems[1]
    assert hm.parse_patches(None, (2, 3)) == ([], [])
    assert hm.format_patches(cells) == "1.2,0.0,1.0"
    t = planted_trace()
    assert hm.patch_token_indices(t, cells).tolist() == [10, 5, 8]


def test_text_only_trace_has_no_image_tokens():
    t = planted_trace()
    assert hm.has_image_tokens(t)
    text = Trace.from_arrays("t", "m", TOKENS[:4], np.zeros(4, np.int8), np.array([1, 0, 0, 1], bool),
                 np.full((4, 2), -1, np.int16), (0, 0), np.zeros((0, 0, 3), np.uint8), 8,
                 np.full((1, 1, 4, 4), 0.25, np.float16), None)
    assert not hm.has_image_tokens(text)


def test_perturbation_chart_has_both_orders_and_their_auc():
    fr = np.linspace(0, 0.9, 10)
    curves = {"positive": SimpleNamespace(fractions=fr, probabilities=1 - fr, auc=0.4),
              "random": SimpleNamespace(fractions=fr, probabilities=1 - fr / 2, auc=0.7)}
    frame = cm.build_perturbation_chart(curves).data
    assert sorted(frame["label"].unique()) == ["positive (AUC 0.400)", "random (AUC 0.700)"]
    assert len(frame) == 20


def test_exports_parse():
    t = planted_trace({(1, 2, 1): patch_index(1, 0)})
    att = t.head_attention(1, 2)
    overlay = ch.build_attention_overlay_chart(t, hm.compute_query_map(att, [1]))
    assert cp.export_chart(overlay, "png")[:8] == b"\x89PNG\r\n\x1a\n"
    root = ET.fromstring(cp.export_chart(ch.build_matrix_chart(t, att), "svg"))
    assert root.tag.endswith("svg")
    frame = pd.read_csv(io.StringIO(ch.matrix_csv(t, att)), index_col=0)
    assert frame.shape == (N, N) and frame.loc["1:a", "8:<patch 1,0>"] == pytest.approx(0.9, abs=1e-3)
    assert json.loads(chart_spec_json(ch.build_matrix_chart(t, att)))["datasets"]  # data inline, no row limit
    with pytest.raises(ValueError, match="png"):
        cp.export_chart(overlay, "gif")


# ---------------------------------------------------------------------------------------
# ChartParts: the cached layout plus this call's data is the builder's chart
# ---------------------------------------------------------------------------------------


def normalized(spec: dict, datasets: dict[str, list]) -> dict:
    """A spec with every data reference replaced by its records, Altair's view names numbered in order,
    and the theme's ``config`` and ``$schema`` left out."""
    text = json.dumps(spec, sort_keys=True)
    for i, name in enumerate(dict.fromkeys(re.findall(r'"(view_[0-9a-f]+(?:_\d+)?)"', text))):
        text = text.replace(f'"{name}"', f'"view#{i}"')

    def walk(o):
        if isinstance(o, dict):
            if set(o) == {"name"} and o["name"] in datasets:
                return {"values": datasets[o["name"]]}
            return {k: walk(v) for k, v in o.items() if k not in ("datasets", "config", "$schema")}
        return [walk(v) for v in o] if isinstance(o, list) else o

    return walk(json.loads(text))


def same_chart(parts: cp.ChartParts, chart) -> bool:
    built = chart.to_dict()  # validated against the Vega-Lite schema
    assert built.get("config", {}) == alt.theme.get()().get("config", {})  # layouts add no config of their own
    fast = parts.to_dict()
    assert "config" not in fast
    return normalized(fast, fast["datasets"]) == normalized(built, built["datasets"])


def parts_cases(t: Trace) -> list[tuple[cp.ChartParts, object]]:
    att = t.head_attention(1, 2)
    v = hm.compute_query_map(att, [1])
    p = hm.compute_query_map(att, [patch_index(1, 2), patch_index(0, 0)])
    cases = [
        (ch.overlay_parts(t, v, title="raw"), ch.build_attention_overlay_chart(t, v, title="raw")),
        (ch.overlay_parts(t, p, [(1, 2), (0, 0)], 0.3, True, "two", 200, None),
         ch.build_attention_overlay_chart(t, p, [(1, 2), (0, 0)], 0.3, True, "two", 200, None)),
        (ch.token_chips_parts(t, v, [1], "chips", 90), ch.build_token_chips_chart(t, v, [1], "chips", 90)),
        (ch.token_chips_parts(t, p), ch.build_token_chips_chart(t, p)),
        (ch.special_weights_parts(t, v), ch.build_special_weights_chart(t, v)),
        (ch.matrix_parts(t, att, title="m", size=200), ch.build_matrix_chart(t, att, title="m", size=200)),
        (cm.all_heads_parts(t, hm.compute_head_maps(t, 1, [1]), title="h"),
         cm.build_all_heads_chart(t, hm.compute_head_maps(t, 1, [1]), title="h")),
    ]
    layers = hm.compute_layer_maps(t, 2, [1])
    cases += [
        (ch.overlay_parts(t, v, domain=(0.0, 1.0), subtitle="image: 90.0% of this row"),
         ch.build_attention_overlay_chart(t, v, domain=(0.0, 1.0), subtitle="image: 90.0% of this row")),
        (ch.special_weights_parts(t, v, shares=True), ch.build_special_weights_chart(t, v, shares=True)),
        (cm.all_heads_parts(t, hm.compute_head_maps(t, 1, [1]), domain=(0.0, 0.5)),
         cm.build_all_heads_chart(t, hm.compute_head_maps(t, 1, [1]), domain=(0.0, 0.5))),
        (cm.layer_strip_parts(t, layers, selected=1, captions=["a", "b"], title="every layer"),
         cm.build_layer_strip_chart(t, layers, selected=1, captions=["a", "b"], title="every layer")),
        (cm.layer_strip_parts(t, layers, domain=(0.0, 0.9), select_name=None),
         cm.build_layer_strip_chart(t, layers, domain=(0.0, 0.9), select_name=None)),
    ]
    return cases + [(ch.block_parts(t, att, b), ch.build_block_chart(t, att, b)) for b in ch.BLOCK_TITLES]


def test_chart_parts_are_the_builders_charts():
    t = planted_trace({(1, 2, 1): patch_index(0, 2)})
    for parts, chart in parts_cases(t):
        assert same_chart(parts, chart), parts.spec()


def test_chart_parts_reuse_the_layout_and_swap_title_and_data():
    t = planted_trace({(1, 2, 1): patch_index(0, 2), (0, 0, 2): patch_index(1, 1)})
    cp._TEMPLATES.clear()
    first = ch.overlay_parts(t, hm.compute_query_map(t.head_attention(1, 2), [1]), title="layer 1, head 2")
    second = ch.overlay_parts(t, hm.compute_query_map(t.head_attention(0, 0), [2]), title="layer 0, “head” 0")
    assert len(cp._TEMPLATES) == 1  # one layout for both
    assert second.spec()["title"]["text"] == "layer 0, “head” 0" and first.spec()["title"]["text"] == "layer 1, head 2"
    peaks = [parts.datasets["patches"].loc[parts.datasets["patches"]["value"].idxmax(), ["row", "col"]].tolist()
             for parts in (first, second)]
    assert peaks == [[0, 2], [1, 1]]
    assert same_chart(second, ch.build_attention_overlay_chart(t, hm.compute_query_map(t.head_attention(0, 0), [2]),
                                                               title="layer 0, “head” 0"))
    # what the layout draws is in its key: another opacity, an outline or another trace is another layout
    ch.overlay_parts(t, first.datasets["patches"]["value"].reindex(range(N), fill_value=0).to_numpy(), opacity=0.2)
    ch.overlay_parts(t, np.zeros(N), selected=[(0, 1)])
    wide = planted_trace()
    wide = wide.with_arrays(image=np.zeros((16, 40, 3), np.uint8))
    ch.overlay_parts(wide, np.zeros(N))
    assert len(cp._TEMPLATES) == 4
    names = {"patches": "heat-1", "image": "img-1"}
    refs = re.findall(r'"data": \{"name": "([^"]+)"\}', json.dumps(first.spec(names)))
    assert set(refs) <= set(names.values()) and "heat-1" in refs


def test_image_uri_is_remembered_for_a_read_only_array_only():
    image = np.full((16, 24, 3), 7, np.uint8)
    uri = cp.cached_image_uri(image)
    image[0, 0] = 200  # writable: looked up by its pixels, so a change is seen
    assert cp.cached_image_uri(image) != uri
    image.setflags(write=False)
    assert cp.cached_image_uri(image) == cp.cached_image_uri(image.copy())


# ---------------------------------------------------------------------------------------
# An honest heatmap (issue 14): scales, transparency at zero, the image's share, every layer
# ---------------------------------------------------------------------------------------


def white_trace(plants: dict[tuple[int, int, int], int] | None = None, image_weight: float | None = None) -> Trace:
    """`planted_trace` on a white image; ``image_weight`` sets token "a"'s row (layer 0, head 0) to put that
    much on each patch and the rest on [CLS]."""
    t = planted_trace(plants)
    att = t.attentions.astype(np.float32)
    if image_weight is not None:
        att[0, 0, 1] = 0.0
        att[0, 0, 1, 5:] = image_weight
        att[0, 0, 1, 0] = 1.0 - 6 * image_weight
    return t.with_arrays(attentions=att.astype(np.float16), image=np.full((16, 24, 3), 255, np.uint8))


def overlay_pixels(t: Trace, values: np.ndarray, width: int = 240, **kwargs) -> np.ndarray:
    """The overlay's plot (the image and its heat, without the legend) rendered by vl-convert."""
    from PIL import Image

    chart = ch.build_attention_overlay_chart(t, values, select_name=None, width=width, **kwargs)
    png = cp.export_chart(chart, "png", scale=1)
    height = round(width * t.image.shape[0] / t.image.shape[1])
    pad = 5  # Vega's default padding; no title
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)[pad:pad + height, pad:pad + width]


def changed_share(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((np.abs(a - b).max(-1) > 8).mean())


def test_a_query_that_gives_the_image_almost_nothing_is_faint_on_a_shared_or_absolute_scale():
    t = white_trace(image_weight=5e-6)  # every patch < 1e-5 of the row
    values = hm.compute_query_map(t.head_attention(0, 0), [1])
    assert hm.patch_values(t, values).max() < 1e-5
    assert hm.image_share_caption(t, values) == "image: <0.1% of this row"
    values[5] += 4e-6  # a little structure, so the per-map scale has something to stretch
    bare = overlay_pixels(t, values, opacity=0.0, domain=(0.0, 1.0))  # the image alone
    per_map = overlay_pixels(t, values, opacity=0.8, domain=None)
    absolute = overlay_pixels(t, values, opacity=0.8, domain=(0.0, 1.0))
    shared = overlay_pixels(t, values, opacity=0.8, domain=hm.compute_domain([hm.patch_values(t, values),
                                                                             np.array([0.0, 0.5])], "shared"))
    assert changed_share(bare, absolute) == 0 and changed_share(bare, shared) == 0  # drawn as the image it is
    assert changed_share(bare, per_map) > 0.9  # stretched min to max: looks like signal
    spec = ch.build_attention_overlay_chart(t, values, domain=(0.0, 1.0)).to_dict()
    heat = next(layer for layer in spec["layer"] if layer.get("encoding", {}).get("color"))
    assert heat["encoding"]["color"]["scale"]["domain"] == [0.0, 1.0] and heat["encoding"]["color"]["scale"]["clamp"]


def test_zero_weight_is_transparent_and_alpha_grows_with_the_weight():
    t = white_trace({(1, 2, 1): patch_index(0, 2)})
    values = np.zeros(N)
    values[patch_index(0, 2)], values[patch_index(1, 1)] = 0.9, 0.45
    spec = ch.build_attention_overlay_chart(t, values, opacity=0.6).to_dict()
    heat = next(layer for layer in spec["layer"] if layer.get("encoding", {}).get("color"))
    opacity = heat["encoding"]["opacity"]  # on a copy of the weight (its own field keeps the colour legend)
    assert heat["transform"] == [{"calculate": "datum.value", "as": opacity["field"]}]
    assert opacity["scale"] == {"domain": [0.0, 0.9], "range": [0, 0.6], "clamp": True} and opacity["legend"] is None
    bare, drawn = overlay_pixels(t, values, opacity=0.0), overlay_pixels(t, values, opacity=0.6)
    diff = np.abs(bare - drawn).max(-1) > 8
    assert 0 < diff.mean() < 0.5  # only the two weighted patches are painted; the 4 zero patches show the image
    # the smooth layer too: a sub-rectangle's alpha follows its own (interpolated) weight
    smooth = ch.build_attention_overlay_chart(t, values, smooth=True).to_dict()
    smooth_heat = next(layer for layer in smooth["layer"] if layer.get("encoding", {}).get("color"))
    assert smooth_heat["transform"] == [{"calculate": "datum.value", "as": smooth_heat["encoding"]["opacity"]["field"]}]


def test_compute_domain_and_the_image_share():
    t = planted_trace({(1, 2, 1): patch_index(0, 2)})
    row = hm.compute_query_map(t.head_attention(1, 2), [1])
    assert hm.compute_image_share(t, row) == pytest.approx(0.9 + 5 * 0.01, abs=2e-3)
    assert hm.image_share_caption(t, row) == "image: 95.0% of this row"
    to = hm.compute_query_map(t.head_attention(1, 2), [patch_index(0, 2)], "to")
    assert hm.compute_image_share(t, to, "to") == pytest.approx(to[5:].mean())
    assert "of their attention" in hm.image_share_caption(t, to, "to")
    relevance = np.zeros(N)
    relevance[[1, 6]] = [3.0, 1.0]  # not a distribution: the share is of the map's total
    assert hm.image_share_caption(t, relevance, relevance=True) == "image: 25.0% of the relevance"
    maps = [np.array([0.1, 0.3]), np.array([0.05, 0.6])]
    assert hm.compute_domain(maps, "shared") == (0.0, 0.6)
    assert hm.compute_domain(maps, "absolute") == (0.0, 1.0) and hm.compute_domain(maps, "map") is None
    assert ch.overlay_scale(t, row)["lo"] == pytest.approx(hm.patch_values(t, row).min())
    with pytest.raises(ValueError, match="scale"):
        hm.compute_domain(maps, "log")


def test_shares_are_never_printed_above_100_percent():
    t = planted_trace()
    values = np.zeros(N)
    values[5:] = np.float16(1 / 6 + 2e-4)  # a float16 row whose patches sum to 1.0012
    assert values[5:].sum() > 1.001
    frame = ch.special_weights_frame(t, values, shares=True)
    patches = frame.set_index("token").loc["all patches"]
    assert patches["value"] == 1.0 and patches["label"] == "100.0%"
    assert frame["value"].between(0, 1).all() and hm.format_share(1.00001) == "100.0%"
    assert hm.image_share_caption(t, values) == "image: 100.0% of this row"
    spec = ch.build_special_weights_chart(t, values, shares=True).to_dict()
    assert spec["layer"][1]["encoding"]["text"]["field"] == "label"
    weights = ch.special_weights_frame(t, values * 3)  # not shares ("to" maps, relevancy): printed as they are
    assert weights.set_index("token").loc["all patches", "label"] == f"{values[5:].sum() * 3:.3f}"


def test_layer_maps_are_each_layers_query_map():
    t = planted_trace({(0, 1, 1): patch_index(1, 0), (1, 1, 1): patch_index(0, 2)})
    for head in (1, None):
        for direction in ("from", "to"):
            maps = hm.compute_layer_maps(t, head, [1, 2], direction)
            for layer in range(2):
                expected = hm.compute_query_map(t.head_attention(layer, head), [1, 2], direction)
                assert np.allclose(maps[layer], expected, atol=1e-6)


def test_layer_strip_has_one_map_per_layer_with_its_peak_and_picks_a_layer_on_click():
    t = planted_trace({(0, 1, 1): patch_index(1, 0), (1, 1, 1): patch_index(0, 2)})
    maps = hm.compute_layer_maps(t, 1, [1])
    chart = cm.build_layer_strip_chart(t, maps, selected=1, captions=["img 10.0%", "img 95.0%"], panel=60)
    spec = chart.to_dict()
    cells = chart.layer[1].data
    assert len(cells) == 2 * 6 and sorted(cells["layer"].unique()) == [0, 1]
    peaks = cells.loc[cells.groupby("layer")["value"].idxmax(), ["row", "col"]].values.tolist()
    assert peaks == [[1, 0], [0, 2]]
    assert [p["name"] for p in spec["params"]] == ["pick_layer"] and spec["params"][0]["select"]["fields"] == ["layer"]
    panels = chart.layer[2].data
    assert panels["caption"].tolist() == ["img 10.0%", "img 95.0%"]
    assert panels["shown"].tolist() == [False, True] and panels["x"].tolist() == [0, 60 + cm.STRIP_GAP]
    # rendered: the outline (#00e5ff) is drawn around layer 1's map only
    from PIL import Image

    png = np.asarray(Image.open(io.BytesIO(cp.export_chart(chart, "png", scale=1))).convert("RGB"), dtype=np.int16)
    cyan = np.abs(png - np.array([0, 229, 255])).max(-1) < 40
    cols = np.flatnonzero(cyan.any(0)) - 5  # Vega's padding
    assert cols.size and cols.min() >= 60 + cm.STRIP_GAP - 4 and cols.max() <= 2 * 60 + cm.STRIP_GAP + 4
    # each layer's peak is drawn at its cell, in its own 60 x 40 map (20-px cells; layer 1 right of layer 0),
    # under the label "layer N"
    grey = np.abs(png - 90).max(-1) < 12  # the image (grey 90) where the heat is transparent
    for layer, (row, col) in enumerate(peaks):
        left, top = 5 + layer * (60 + cm.STRIP_GAP), 5 + cm.STRIP_LABEL
        assert not grey[top + row * 20 + 10, left + col * 20 + 10], (layer, row, col)  # the peak: coloured
        others = [(r, c) for r in range(2) for c in range(3) if (r, c) != (row, col)]
        assert all(grey[top + r * 20 + 10, left + c * 20 + 10] for r, c in others), layer
    texts = [el.text for el in ET.fromstring(cp.export_chart(chart, "svg")).iter() if el.tag.endswith("text")]
    assert "layer 0" in texts and "layer 1" in texts and "img 95.0%" in texts
    # per map: each map from its min (0) to its max (1); shared: the real weights on one scale
    assert cells.groupby("layer")["level"].max().tolist() == [1.0, 1.0]
    shared = cm.build_layer_strip_chart(t, maps, domain=(0.0, 1.0))
    assert shared.to_dict()["layer"][1]["encoding"]["color"]["field"] == "value"
    assert np.allclose(shared.layer[1].data["alpha"], shared.layer[1].data["value"], atol=1e-6)  # alpha = weight on 0–1
    assert "params" not in cm.build_layer_strip_chart(t, maps, select_name=None).to_dict()


def test_layer_strip_wraps_many_layers_into_rows():
    t = planted_trace(n_layers=2)
    maps = np.tile(hm.compute_layer_maps(t, 0, [1]), (12, 1))  # 24 layers
    frames = cm.layer_strip_frames(t, maps, panel=cm.strip_panel(24), per_row=10)
    tops = frames["panels"].groupby(frames["panels"]["y"]).size().tolist()
    assert tops == [10, 10, 4]
    spec = cm.build_layer_strip_chart(t, maps).to_dict()
    assert spec["width"] <= cm.STRIP_WIDTH


def test_faithfulness_curves_show_their_y_ticks_and_a_legend_entry_per_order():
    fr = np.linspace(0, 0.9, 10)
    curves = {"positive": SimpleNamespace(fractions=fr, probabilities=0.3 - fr / 4, auc=0.15),
              "random": SimpleNamespace(fractions=fr, probabilities=0.3 - fr / 8, auc=0.21),
              "negative": SimpleNamespace(fractions=fr, probabilities=0.3 - fr / 16, auc=0.26)}
    chart = cm.build_perturbation_chart(curves, title="faithfulness")
    spec = chart.to_dict()
    # sized as built: the plot keeps its height; axes, legend and title come on top (Streamlit's "fit" squashed it)
    assert spec["autosize"] == {"type": "pad", "contains": "padding"} and spec["height"] >= 150
    y = spec["encoding"]["y"]
    assert y["axis"]["ticks"] and y["axis"]["labels"] and y["axis"]["tickCount"] >= 4
    color = spec["encoding"]["color"]
    labels = ["positive (AUC 0.150)", "random (AUC 0.210)", "negative (AUC 0.260)"]
    assert color["scale"]["domain"] == labels and len(set(color["scale"]["range"])) == 3
    assert color["legend"]["labelLimit"] == 0  # no label cut short
    # rendered: the y axis has tick labels and the legend names every order
    root = ET.fromstring(cp.export_chart(chart, "svg"))
    texts = [el.text for el in root.iter() if el.tag.endswith("text") and el.text]
    assert all(label in texts for label in labels)
    ticks = [float(x) for x in texts if re.fullmatch(r"0\.\d\d", x or "")]
    assert len(set(ticks)) >= 4


def test_explanations_side_by_side_export():
    t = planted_trace({(1, 2, 0): patch_index(1, 1)})
    maps = {"raw": hm.compute_query_map(t.head_attention(1, 2), [0]), "flat": np.full(N, 1 / N)}
    chart = cm.build_explanations_chart(t, maps, domain=(0.0, 1.0), subtitles={"raw": "image: 95.0% of this row"})
    spec = chart.to_dict()
    assert len(spec["hconcat"]) == 2 and spec["autosize"]["type"] == "pad"
    assert spec["hconcat"][0]["title"]["subtitle"] == "image: 95.0% of this row"
    assert cp.export_chart(chart, "png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_layer_strip_draws_the_image_under_every_map_from_one_copy_outside_the_spec():

    from PIL import Image

    t = planted_trace().with_arrays(image=np.tile(np.array([200, 30, 30], np.uint8), (16, 24, 1)))
    maps = hm.compute_layer_maps(t, 1, [1])
    parts = cm.layer_strip_parts(t, maps, selected=0, opacity=0.0, panel=60, title="Every layer")
    spec_text = parts.spec_json
    assert "base64" not in spec_text and "url" not in parts.spec()["layer"][0]["mark"]  # not inside the spec
    images = [f for f in parts.datasets.values() if "url" in f]
    assert len(images) == 1 and len(images[0]) == 1 and images[0]["url"][0].startswith("data:image/png;base64,")
    # the same frame object on the next run (the page converts it to Arrow once)
    assert cm.layer_strip_parts(t, maps, selected=1, panel=60).datasets["image"] is parts.datasets["image"]
    # rendered: the (red) image fills each 60 x 40 map, heat fully transparent
    chart = cm.build_layer_strip_chart(t, maps, selected=0, opacity=0.0, panel=60, select_name=None)
    png = np.asarray(Image.open(io.BytesIO(cp.export_chart(chart, "png", scale=1))).convert("RGB"), dtype=np.int16)
    red = np.abs(png - np.array([200, 30, 30])).max(-1) < 30
    for layer in range(2):
        left = 5 + layer * (60 + cm.STRIP_GAP)  # Vega's padding
        box = red[5 + cm.STRIP_LABEL + 4: 5 + cm.STRIP_LABEL + 36, left + 4: left + 56]
        assert box.mean() > 0.95, (layer, box.mean())
