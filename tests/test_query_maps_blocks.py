"""Maps and charts on a hand-built two-stream trace (BLIP's shape): a vision tower, a text encoder and text-to-image
cross-attention, with planted weights, so every placement is checked against a known answer."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from vlcore.analysis import query_maps as hm
from vlcore.charts import heatmaps as ch
from vlcore.charts import multiples as cm
from vlcore.charts.parts import layout_key
from vlcore.charts.stats import build_head_heatmap_chart
from vlcore.trace import (ROLE_IMAGE_SUMMARY, ROLE_PATCH, ROLE_SPECIAL, ROLE_TEXT, AttentionBlock, ImageGrid,
                          TokenLayout, Trace, patch_token)

ROWS, COLS, PX = 2, 3, 4
TEXT = ["[CLS]", "red", "cat", "[SEP]"]


def vision_layout() -> TokenLayout:
    cells = [(-1, -1)] + [(r, c) for r in range(ROWS) for c in range(COLS)]
    image = ImageGrid.regular(np.zeros((ROWS * PX, COLS * PX, 3), np.uint8), (ROWS, COLS), PX)
    return TokenLayout.build(["[IMG]"] + [patch_token(r, c) for r, c in cells[1:]],
                             [ROLE_IMAGE_SUMMARY] + [ROLE_PATCH] * (ROWS * COLS), [0] * (1 + ROWS * COLS), cells, [image])


def uniform(n_layers: int, n_heads: int, q: int, k: int) -> np.ndarray:
    return np.full((n_layers, n_heads, q, k), 1.0 / k, np.float32)


def two_stream_trace(planted: dict[tuple[int, int, int], int] | None = None) -> Trace:
    """BLIP-like: vision.self [2, 3, 7, 7], text.self [2, 4, 4, 4], text.cross [2, 4, 4, 7]; ``planted`` maps
    (layer, head, text query) of the cross block to the vision key that gets all its weight."""
    text = TokenLayout.build(TEXT, [ROLE_SPECIAL, ROLE_TEXT, ROLE_TEXT, ROLE_SPECIAL])
    vision = vision_layout()
    cross = uniform(2, 4, 4, 7)
    for (layer, head, query), key in (planted or {}).items():
        cross[layer, head, query] = 0.0
        cross[layer, head, query, key] = 1.0
    blocks = {"vision.self": AttentionBlock(uniform(2, 3, 7, 7).astype(np.float16), "vision", "vision"),
              "text.self": AttentionBlock(uniform(2, 4, 4, 4).astype(np.float16), "text", "text"),
              "text.cross": AttentionBlock(cross.astype(np.float16), "text", "vision")}
    return Trace("ex/0", "tiny-blip", {"vision": vision, "text": text}, blocks, {"vision": None, "text": None},
                 "text.cross", text="red cat")


def test_sides_of_a_cross_block_are_its_streams_and_a_self_blocks_are_itself():
    trace = two_stream_trace()
    keys, queries = hm.side_trace(trace, "key"), hm.side_trace(trace, "query")
    assert keys.tokens == trace.streams["vision"].tokens and queries.tokens == tuple(TEXT)
    assert hm.side_trace(trace, "key") is keys  # one object per trace and side
    assert hm.map_trace(trace, "from") is keys and hm.map_trace(trace, "to") is queries
    assert hm.image_side(trace) == "key" and hm.has_patches(keys) and not hm.has_patches(queries)
    vision = trace.select("vision.self")
    assert hm.side_trace(vision, "key") is vision and hm.image_side(vision) == "query"
    assert hm.image_side(trace.select("text.self")) is None
    assert hm.query_direction(trace, "query", "to") == "from" and hm.query_direction(trace, "key", "from") == "to"
    assert hm.query_direction(vision, "query", "to") == "to"
    with pytest.raises(ValueError):
        hm.side_trace(trace, "rows")


def test_a_planted_cross_weight_lands_on_its_patch_of_the_image():
    key = 1 + 1 * COLS + 2  # patch (1, 2) of the vision stream
    trace = two_stream_trace({(1, 3, 2): key})
    values = hm.compute_query_map(trace.head_attention(1, 3), [2], "from")  # "cat" reads ...
    on = hm.map_trace(trace, "from")
    frame = ch.overlay_frames(on, values)["patches"]
    assert len(frame) == ROWS * COLS
    top = frame.loc[frame["value"].idxmax()]
    assert (top["row"], top["col"], top["value"]) == (1, 2, 1.0)
    assert (top["x"], top["y"]) == (2 * PX, 1 * PX)  # the cell's pixel box on the image
    # what reads patch (1, 2): its column, over the text tokens
    column = hm.compute_query_map(trace.head_attention(1, 3), hm.patch_token_indices(on, [(1, 2)]), "to")
    assert column.tolist() == pytest.approx([1 / 7, 1 / 7, 1.0, 1 / 7], abs=1e-3)
    chips = ch.token_chips_frame(hm.map_trace(trace, "to"), column)
    assert chips.set_index("text").loc["cat", "value"] == pytest.approx(1.0, abs=1e-3)


def test_query_choices_defaults_and_the_backdrop_of_a_patch_query():
    trace = two_stream_trace({(0, 0, 0): 3})
    assert hm.query_choices(trace).tolist() == [0, 1, 2, 3]
    vision = trace.select("vision.self")
    assert hm.query_choices(vision).tolist() == [0]  # an image tower: its CLS
    assert hm.step_tokens(vision).tolist() == list(range(7))  # CLS and every patch
    assert hm.default_query(trace, 0).tolist() == [0] and hm.default_query(trace, None).tolist() == [0]
    pooled = TokenLayout.build(vision.tokens[1:], [ROLE_PATCH] * 6, [0] * 6, vision.layout.cell[1:],
                               vision.layout.images)  # a tower without a CLS (SigLIP's, read by a pooling head)
    patches_only = Trace.single("e", "m", pooled, uniform(1, 1, 6, 6), None)
    assert hm.query_choices(patches_only).size == 0 and hm.default_query(patches_only, None).tolist() == list(range(6))
    backdrop = hm.context_map(trace, trace.head_attention(0, 0))  # mean of every text row over the vision keys
    assert backdrop.shape == (7,) and backdrop[3] == pytest.approx((1 + 3 / 7) / 4, abs=1e-3)


def test_modality_quadrants_and_the_no_image_line():
    trace = two_stream_trace()
    assert hm.available_quadrants(trace) == ["txt2img"]
    assert hm.available_quadrants(trace.select("vision.self")) == ["img2img"]
    assert hm.available_quadrants(trace.select("text.self")) == ["txt2txt"]
    assert hm.no_image_reason(trace.select("text.self")) == "text.self has no image tokens: pick vision.self or text.cross"
    assert hm.trace_has_images(trace)


def test_cross_matrix_rows_are_text_columns_are_vision_and_its_csv():
    trace = two_stream_trace()
    att = trace.head_attention(0, None)
    cells = ch.matrix_frame(trace, att, np.arange(4), np.arange(7))
    assert list(cells["query"].cat.categories) == [f"{i}:{t}" for i, t in enumerate(TEXT)]
    assert list(cells["key"].cat.categories)[:2] == ["0:[IMG]", "1:<patch 0,0>"]
    chart = ch.build_matrix_chart(trace, att, size=70).to_dict()
    assert (chart["width"], chart["height"]) == (70, 40)  # 7 keys wide, 4 queries high, square cells
    block = ch.build_block_chart(trace, att, "txt2img").to_dict()
    assert block["title"] == "text → image"
    frame = pd.read_csv(io.StringIO(ch.matrix_csv(trace, att)), index_col=0)
    assert frame.shape == (4, 7) and frame.index[1] == "1:red" and frame.columns[1] == "1:<patch 0,0>"


def test_layout_keys_tell_blocks_with_the_same_queries_apart():
    trace = two_stream_trace()
    assert layout_key(trace) != layout_key(trace.select("text.self"))


def test_token_maps_chart_one_row_per_layer_and_a_click_selection():
    trace = two_stream_trace().select("text.self")
    maps = hm.compute_layer_maps(trace, None, [0], "from")
    frame = cm.token_maps_frame(trace, maps, "layer", selected=1)
    assert len(frame) == 2 * 4 and frame.loc[frame["shown"], "layer"].unique().tolist() == [1]
    spec = cm.build_token_maps_chart(trace, maps, "layer", selected=1, select_name="pick_layer").to_dict()
    assert spec["params"][0]["name"] == "pick_layer" and spec["encoding"]["y"]["field"] == "layer"
    parts = cm.token_maps_parts(trace, maps, "layer", selected=1, select_name="pick_layer")
    assert parts.spec()["encoding"]["x"]["sort"] == [f"{i}:{t}" for i, t in enumerate(TEXT)]


def test_special_bars_leave_out_a_total_the_layout_cannot_have():
    trace = two_stream_trace()
    vision = hm.map_trace(trace, "from")
    bars = ch.special_weights_frame(vision, np.full(7, 1 / 7))
    assert bars["token"].tolist() == ["0:[IMG]", "all patches"]
    words = ch.special_weights_frame(trace.select("text.self"), np.full(4, 0.25))
    assert words["token"].tolist() == ["0:[CLS]", "3:[SEP]", "all text (no specials)"]


def test_head_heatmap_takes_its_grid_from_the_block_and_marks_na_cells():
    rows = [(layer, head, "m", np.nan if (layer, head) == (1, 2) else 0.1 * head) for layer in range(2)
            for head in range(3)]
    agg = pd.DataFrame(rows, columns=["layer", "head", "metric", "mean"])
    spec = build_head_heatmap_chart(agg, "m", n_layers=2, n_heads=4).to_dict()
    heat = spec["hconcat"][0]
    assert heat["layer"][0]["encoding"]["x"]["scale"]["domain"] == [0, 1, 2, 3]  # a head with no rows still drawn
    na = heat["layer"][1]
    assert na["mark"]["type"] == "text" and na["encoding"]["text"] == {"value": "n/a"}
    assert [r["head"] for r in spec["datasets"][na["data"]["name"]]] == [2]
    plain = build_head_heatmap_chart(agg.fillna(0.0), "m").to_dict()
    assert "layer" not in plain["hconcat"][0]  # no n/a: the chart as before
