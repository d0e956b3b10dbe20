"""Attention heatmaps and head statistics on every family's attention blocks.

ViLT (the bundled demo: one joint block, no picker), BLIP (``vision.self``, ``text.self``, ``text.cross``), CLIP and
SigLIP (``vision.self``, ``text.self``; SigLIP's ``vision.pool``) from tiny checkpoint folders opened as the app's
local folder. Each flow picks blocks in the sidebar and checks the charts' data against the trace: the cross
block's overlay places the key layout's values on the image's grid, a text-only block shows token views and says
in one line why there is no overlay, metrics that do not apply read "n/a" with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from tests.app.conftest import HOME
from tests.app.test_heatmaps_page import chart_data, layer_data, overlay_heats
from vlcore.ui.blocks import BLOCK_WIDGET
from vlcore.ui.widgets import LOCAL_FOLDER_KEY

HEATMAPS = "pages/4_Attention_Heatmaps.py"
STATS = "pages/3_Head_Statistics.py"
EX = "easy_vqa/test/0"
GRID = (4, 4)  # the tiny BLIP / CLIP checkpoints: 32-px images, 8-px patches


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny BLIP-ITM, CLIP and SigLIP folders (written once for the module)."""
    from tests.models.tiny_blip import TINY_CHECKPOINTS as BLIP
    from tests.models.tiny_clip import TINY_CHECKPOINTS as CLIP

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {"blip": BLIP["blip-itm"](root / "blip-itm"), "clip": CLIP["clip"](root / "clip"),
            "siglip": CLIP["siglip"](root / "siglip")}


def open_folder(page: str, folder: Path | None, params: dict | None = None) -> AppTest:
    """The page on a local checkpoint folder (the session's local-folder key), or on the demo (None), run once."""
    at = AppTest.from_file(HOME, default_timeout=300)
    if folder is not None:
        at.session_state[LOCAL_FOLDER_KEY] = str(folder)
    for key, value in (params or {}).items():
        at.query_params[key] = value
    at.switch_page(page)
    return at.run()


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def pick_block(at: AppTest, block: str) -> AppTest:
    at.selectbox(key=BLOCK_WIDGET).set_value(block).run()
    assert at.query_params["block"] == block
    return ok(at)


def last_trace():
    """The trace the page last read (the server's trace memory; the flows run in this process)."""
    from vlcore.ui.context import trace_memory

    return next(reversed(trace_memory()._entries.values()))[0]


def charts(at: AppTest) -> list[tuple[dict, dict[str, pd.DataFrame]]]:
    return [chart_data(e) for e in at.get("vega_lite_chart")]


def titled(at: AppTest, start: str) -> tuple[dict, dict[str, pd.DataFrame]]:
    """The chart whose title text starts with ``start``."""
    def text(spec):
        title = spec.get("title")
        return title.get("text", "") if isinstance(title, dict) else title or ""

    return next((spec, frames) for spec, frames in charts(at) if str(text(spec)).startswith(start))


def chips(at: AppTest) -> list[pd.DataFrame]:
    """The token-chip frames on the page (columns token, text, value, line...)."""
    return [frames[name] for spec, frames in charts(at) for name in frames
            if {"text", "line", "mid"} <= set(frames[name].columns)]


def block_names(at: AppTest) -> list[str]:
    """The block picker's options (labelled "name · title (L × H)")."""
    return [o.split(" · ")[0] for o in at.selectbox(key=BLOCK_WIDGET).options]


def infos(at: AppTest) -> str:
    return " | ".join(i.value for i in at.info)


# ---------------------------------------------------------------------------------------
# ViLT: one block, no picker, links unchanged
# ---------------------------------------------------------------------------------------


def test_vilt_has_one_block_no_picker_and_a_bad_block_link_gets_a_notice():
    for page in (HEATMAPS, STATS):
        at = ok(open_folder(page, None, {"ex": EX}))
        assert not [s for s in at.selectbox if s.key == BLOCK_WIDGET] and "block" not in at.query_params
        at = ok(open_folder(page, None, {"ex": EX, "block": "text.cross"}))
        assert "Ignored `block=text.cross` in the link: expected one of self." in infos(at)
        assert "block" not in at.query_params


# ---------------------------------------------------------------------------------------
# BLIP: cross-attention, the vision tower, the text encoder
# ---------------------------------------------------------------------------------------


def test_blip_cross_block_reads_patches_per_text_token_and_patches_per_column(checkpoints):
    at = ok(open_folder(HEATMAPS, checkpoints["blip"], {"ex": EX, "layer": "1", "head": "2"}))
    assert at.selectbox(key=BLOCK_WIDGET).value == "text.cross" and at.query_params["block"] == "text.cross"
    assert block_names(at) == ["vision.self", "text.self", "text.cross"]
    trace = last_trace().select("text.cross")
    assert at.query_params["tok"] == "0"  # the text [CLS], which the ITM head reads
    assert at.pills(key="hm_tok").options == list(trace.tokens)  # the query (text) stream
    heat = overlay_heats(at)[0]
    assert len(heat) == GRID[0] * GRID[1]  # the image's rows x cols cells, from the key layout
    expected = trace.key_layout.to_grid(trace.head_attention(1, 2)[0])
    assert np.allclose(heat.sort_values(["row", "col"])["value"], expected.ravel(), atol=1e-3)
    assert not chips(at)  # the map lies on the image: no text chips

    at.multiselect(key="hm_patches").set_value(["1.2"]).run()  # what reads this patch: its column
    ok(at)
    column = trace.head_attention(1, 2)[:, trace.key_layout.patch_positions()[0][1 * 4 + 2]]
    words = chips(at)[0].set_index("token")["value"]
    assert np.allclose(words.to_numpy(), column[words.index.to_numpy()], atol=1e-3)
    backdrop = overlay_heats(at)[0]  # the image stays, the picked patch outlined over what each patch receives
    assert len(backdrop) == 16
    spec = next(s for s, _ in charts(at) if s.get("layer") and s["layer"][-1].get("mark", {}).get("stroke"))
    assert spec

    at.segmented_control(key="hm_method").set_value("rollout").run()
    assert "Rollout does not apply to a cross block alone" in infos(ok(at))
    at.multiselect(key="hm_patches").set_value([]).run()
    at.segmented_control(key="hm_method").set_value("relevancy").run()  # the bi-modal text -> image map
    ok(at)
    assert overlay_heats(at) and "gradient relevancy for" in json.dumps(charts(at)[0][0]["title"])

    at.segmented_control(key="hm_method").set_value("raw").run()
    spec, frames = titled(at, "layer 1, head 2: query × key")
    cells = layer_data(spec, frames, 0)
    assert cells["query"].nunique() == trace.n_tokens and cells["key"].nunique() == trace.key_layout.n_tokens
    assert at.radio(key="hm_block").options == ["full query × key", "text → image"]

    at.segmented_control(key="hm_view").set_value("heads").run()
    grid = next(frames[spec["data"]["name"]] for spec, frames in charts(ok(at)) if "facet" in spec)
    assert sorted(grid["head"].unique()) == [0, 1, 2, 3] and len(grid) == 4 * 16
    at.segmented_control(key="hm_view").set_value("step").run()
    at.button(key="hm_next").click().run()
    assert ok(at).slider(key="hm_step").value == 1 and overlay_heats(at)
    at.segmented_control(key="hm_view").set_value("explain").run()
    assert "Rollout does not apply" in infos(ok(at)) and len(overlay_heats(at)) >= 3  # query view, raw, relevancy
    at.toggle(key="hm_faith").set_value(True).run()  # the maps lie on the image stream: patches can be removed
    assert [m.label for m in ok(at).metric] == ["AUC, relevance order"] * 2


def test_blip_text_and_vision_blocks(checkpoints):
    at = ok(open_folder(HEATMAPS, checkpoints["blip"], {"ex": EX, "tok": "2"}))
    pick_block(at, "text.self")
    trace = last_trace().select("text.self")
    assert "text.self has no image tokens: pick vision.self or text.cross" in infos(at)
    assert at.query_params["tok"] == "0"  # a new block opens on its default query, not the other block's token
    assert not overlay_heats(at)
    words = chips(at)[0].set_index("token")["value"]  # the token-to-token row, on the text chips
    assert np.allclose(words.to_numpy(), trace.head_attention(1, None)[0][words.index.to_numpy()], atol=1e-3)
    strip, frames = titled(at, "Every layer")
    cells = next(f for f in frames.values() if "layer" in f.columns)
    assert sorted(cells["layer"].unique()) == [0, 1] and cells["token"].nunique() == trace.n_tokens
    spec, frames = titled(at, "layer 1, mean over heads: query × key")
    assert layer_data(spec, frames, 0)["key"].nunique() == trace.n_tokens
    assert at.radio(key="hm_block").options == ["full query × key", "text → text"]
    for view in ("heads", "step", "explain", "export"):
        at.segmented_control(key="hm_view").set_value(view).run()
        ok(at)
        assert at.get("vega_lite_chart")
    assert {"text tokens", "matrix", "all heads"} <= set(at.selectbox(key="hm_export_what").options)

    pick_block(at, "vision.self")
    trace = last_trace().select("vision.self")
    assert at.selectbox(key="head").options == ["mean over heads", "head 0", "head 1", "head 2"]  # 3 vision heads
    assert at.query_params["tok"] == str(trace.layout.first(3))  # its image CLS
    heat = overlay_heats(at)[0]
    assert len(heat) == 16
    assert np.allclose(heat.sort_values(["row", "col"])["value"],
                       trace.to_grid(trace.head_attention(1, None)[0]).ravel(), atol=1e-3)
    at.segmented_control(key="hm_method").set_value("rollout").run()
    assert not at.info or "does not apply" not in infos(ok(at))
    at.segmented_control(key="hm_view").set_value("explain").run()
    assert len(overlay_heats(ok(at))) == 4  # raw, rollout and relevancy of the image CLS, and the query view


def test_blip_head_statistics_per_block_with_na_reasons(checkpoints):
    at = ok(open_folder(STATS, checkpoints["blip"], {"ex": EX, "metric": "txt2img"}))
    assert at.selectbox(key=BLOCK_WIDGET).value == "text.cross"
    (spec,) = [s for s, _ in charts(at) if "hconcat" in s]
    frames = dict(charts(at)[0][1])
    heat = next(f for f in frames.values() if {"layer", "head", "mean"} <= set(f.columns) and "column" not in f)
    assert len(heat) == 2 * 4 and heat["mean"].notna().all()  # text layers x heads, a text -> image share
    assert spec["hconcat"][0]["encoding"]["x"]["scale"]["domain"] == [0, 1, 2, 3]

    pick_block(at, "vision.self")
    assert "`txt2img` is n/a on vision.self: no text queries in this block." in infos(at)
    assert not [s for s, _ in charts(at) if "hconcat" in s]  # no empty chart
    assert any(o.startswith("txt2img:") and o.endswith("(n/a on this block)") for o in at.selectbox(key="metric").options)
    table = at.dataframe[-1].value
    assert len(table) == 2 * 3 and table["txt2img"].isna().all() and table["img2img"].notna().all()
    at.selectbox(key="metric").set_value("img2img").run()
    (spec,) = [s for s, _ in charts(ok(at)) if "hconcat" in s]
    assert spec["hconcat"][0]["encoding"]["x"]["scale"]["domain"] == [0, 1, 2]  # the vision tower's 3 heads
    at.selectbox(key="head").set_value(1).run()
    row = next(d.value for d in ok(at).dataframe if "why n/a" in d.value.columns)
    assert row.loc["txt2img", "why n/a"] == "no text queries in this block"


# ---------------------------------------------------------------------------------------
# CLIP and SigLIP: two towers (and SigLIP's pooling probe)
# ---------------------------------------------------------------------------------------


def test_clip_towers_on_both_pages(checkpoints):
    at = ok(open_folder(HEATMAPS, checkpoints["clip"], {"ex": EX}))
    assert block_names(at) == ["vision.self", "text.self"]
    assert len(overlay_heats(at)[0]) == 16
    at.segmented_control(key="hm_method").set_value("rollout").run()
    assert "does not apply" not in infos(ok(at))
    pick_block(at, "text.self")
    assert "text.self has no image tokens: pick vision.self" in infos(at) and chips(at)
    at.segmented_control(key="hm_view").set_value("explain").run()
    assert chips(ok(at))  # raw, rollout and relevancy of the pooled token, on the text

    at = ok(open_folder(STATS, checkpoints["clip"], {"ex": EX, "metric": "cross_modal", "block": "text.self"}))
    assert at.selectbox(key=BLOCK_WIDGET).value == "text.self"
    assert "`cross_modal` is n/a on text.self" in infos(at)
    at.selectbox(key="metric").set_value("entropy").run()
    (spec,) = [s for s, _ in charts(ok(at)) if "hconcat" in s]
    assert spec["hconcat"][0]["encoding"]["y"]["scale"]["domain"] == [0, 1]


def test_siglip_vision_tower_without_cls_and_its_pooling_probe(checkpoints):
    at = ok(open_folder(HEATMAPS, checkpoints["siglip"], {"ex": EX, "view": "explain"}))
    assert "block" in at.query_params and "tok" not in at.query_params  # the query: every patch (mean)
    assert "every patch (mean)" in json.dumps(charts(at)[0][0]["title"])
    assert len(overlay_heats(at)) >= 3  # raw and rollout into the pooling head (and relevancy) on the image
    pick_block(at, "vision.pool")
    assert len(overlay_heats(at)[0]) == 16


def test_a_bad_block_link_opens_the_default_block_with_one_line(checkpoints):
    at = ok(open_folder(HEATMAPS, checkpoints["blip"], {"ex": EX, "block": "nope"}))
    assert "Ignored `block=nope` in the link: expected one of vision.self, text.self, text.cross." in infos(at)
    assert at.query_params["block"] == "text.cross"


def test_blip_sweep_scope_shows_the_viewed_blocks_sweep(checkpoints):
    from vlcore.data.easy_vqa import easy_vqa_examples
    from vlcore.models.registry import load_adapter
    from vlcore.run.sweep import run_sweep, sweep_key
    from vlcore.storage.store import Store

    adapter = load_adapter(str(checkpoints["blip"]))
    examples = easy_vqa_examples("test", limit=4)
    ids = [e.example_id for e in examples]
    store = Store()
    key = sweep_key(adapter, "easy_vqa/test", ids, block="vision.self")
    run_sweep(adapter, examples, store.sweep_dir(key), dataset="easy_vqa/test", block="vision.self",
              vector_patches=None)
    at = ok(open_folder(STATS, checkpoints["blip"], {"scope": "sweep", "block": "vision.self", "metric": "txt2img"}))
    assert "`txt2img` is n/a on vision.self" in infos(at)  # NaN in every example: n/a, never 0
    at.selectbox(key="metric").set_value("entropy").run()
    (spec,) = [s for s, _ in charts(ok(at)) if "hconcat" in s]
    heat = next(f for f in charts(at)[0][1].values() if {"layer", "head", "mean", "n"} <= set(f.columns))
    assert len(heat) == 2 * 3 and set(heat["n"]) == {4}  # the vision tower's layers x heads, over 4 examples
    pick_block(at, "text.cross")
    assert "No sweep of" in infos(at) and "on block text.cross" in infos(at)
