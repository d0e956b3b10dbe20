"""The heatmaps page's sections, on any attention block: the query's views, the layer strip, matrices, every head,
the step-through, explanations and export.

Every map is drawn where it lies (`vlcore.analysis.query_maps.map_trace`): patch values on the image of their layout
(an overlay), text values as token chips, both for a joint stream of words and patches. A map over a stream without
an image (a text tower, or the text side of a cross block) gets chips and a one-line reason instead of an overlay,
and its small multiples are token heatmaps (`vlcore.charts.multiples.build_token_maps_chart`), never an empty chart.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import numpy as np
import streamlit as st

from vlcore.analysis import query_maps as hm
from vlcore.charts import heatmaps as ch
from vlcore.charts import multiples as cm
from vlcore.charts import parts as cp
from vlcore.errors import VLScopeError
from vlcore.trace import Trace
from vlcore.ui.heatmap_controls import METHODS, Display, Query, on_overlay_click
from vlcore.ui.heatmaps import (CHIPS_WIDTH, cached_curve, layer_strip_captions, method_map, method_reason,
                                model_fingerprint, show_chart, show_parts, trace_fingerprint)

STRIP_SELECTION = "pick_layer"


def show_query_views(trace: Trace, values: np.ndarray, query: Query, title: str, display: Display,
                     domain: tuple[float, float] | None, clickable: bool = True,
                     backdrop: np.ndarray | None = None) -> dict[str, Callable]:
    """Overlay (clickable patches; the image's share of the map under its title), token chips and
    special-token bars for one map.

    Args:
        trace: the trace viewing the block; the map lies on `map_trace(trace, display.direction)`.
        values: the map.
        query: the query (its patches are outlined; its text tokens marked on the chips).
        backdrop: values on the image side drawn under the picked patches when the map itself lies on text
            (a cross block's patch query: `vlcore.analysis.query_maps.context_map`).

    Returns:
        name → a function building the chart as an Altair object (for the export section).
    """
    select_name = "patch" if clickable else None
    direction = display.direction
    on = hm.map_trace(trace, direction)
    relevance = display.method == "relevancy"
    shares = not relevance and direction == "from"
    marked = query.tokens.tolist() if trace.block.is_self else []  # a cross map lies on the other stream
    builders: dict[str, Callable] = {}
    left, right = st.columns(2)
    with left:
        overlay = _overlay_source(trace, on, values, backdrop)
        if overlay is None:
            st.info(f"No image overlay: {hm.no_image_reason(trace)}.")
        else:
            image_trace, heat = overlay
            subtitle = (hm.image_share_caption(on, values, direction, relevance) if heat is values else
                        "under the picked patches: the mean attention each patch receives")
            args = dict(selected=query.cells, opacity=display.opacity, smooth=display.smooth, title=title, width=340,
                        select_name=select_name, domain=domain if heat is values else None, subtitle=subtitle)
            parts = ch.overlay_parts(image_trace, heat, **args)
            if clickable:
                show_parts(parts, key="hm_click", on_select=on_overlay_click, selection_mode="patch")
            else:
                show_parts(parts)
            builders["overlay"] = lambda: ch.build_attention_overlay_chart(image_trace, heat, **args)
    with right:
        if hm.has_text(on):
            chips_title = "Text tokens" if heat_is_map(overlay, values) else title
            show_parts(ch.token_chips_parts(on, values, marked, title=chips_title, width=CHIPS_WIDTH))
            builders["text tokens"] = lambda: ch.build_token_chips_chart(on, values, marked, title=chips_title,
                                                                         width=CHIPS_WIDTH)
        show_parts(ch.special_weights_parts(on, values, shares=shares))
        builders["special tokens"] = lambda: ch.build_special_weights_chart(on, values, shares=shares)
    return builders


def heat_is_map(overlay, values) -> bool:
    """Whether the overlay drawn shows the map itself (not a backdrop, and not absent)."""
    return overlay is not None and overlay[1] is values


def _overlay_source(trace: Trace, on: Trace, values: np.ndarray, backdrop: np.ndarray | None):
    """``(trace, values)`` the overlay draws: the map on its own image, else a backdrop on the block's image side,
    else None (a text-only block)."""
    if hm.has_patches(on):
        return on, values
    side = hm.image_side(trace)
    if backdrop is not None and side is not None:
        return hm.side_trace(trace, side), backdrop
    return None


def layer_from_event(event: dict | None) -> int | None:
    """The layer a click on the layer strip picked (the selection event Streamlit keeps), or None."""
    points = ((event or {}).get("selection") or {}).get(STRIP_SELECTION) or []
    layers = [int(p["layer"]) for p in points if isinstance(p, dict) and p.get("layer") is not None]
    return layers[-1] if layers else None


def _on_layer_click(key: str) -> None:
    """A click on a map of the layer strip selects that layer (the sidebar slider ``layer``, then the URL)."""
    layer = layer_from_event(st.session_state.get(key))
    if layer is not None:
        st.session_state["layer"] = layer


def show_layer_strip(trace: Trace, layer_maps: np.ndarray, layer: int, head_text: str, query: Query, display: Display,
                     domain: tuple[float, float] | None) -> Callable:
    """Every layer's raw map of the query (this head), side by side; a click on one shows that layer. Maps over a
    stream without an image are rows of a token heatmap (one per layer).

    Returns:
        A function building the strip as an Altair object (for the export section).
    """
    on = hm.map_trace(trace, display.direction)
    title = f"Every layer: raw attention {display.direction} {query.label}, {head_text} (click a map to show its layer)"
    key = f"hm_layers_{layer}"  # a new widget per shown layer: a click on a map picked before still registers
    click = dict(key=key, on_select=functools.partial(_on_layer_click, key), selection_mode=STRIP_SELECTION)
    if not hm.has_patches(on):
        args = dict(row="layer", selected=layer, title=title, domain=domain)
        show_parts(cm.token_maps_parts(on, layer_maps, select_name=STRIP_SELECTION, **args), **click)
        st.caption("One row per layer: the query's attention over the tokens (click a row to show its layer).")
        return lambda: cm.build_token_maps_chart(on, layer_maps, **args)
    args = dict(domain=domain, selected=layer, captions=layer_strip_captions(on, layer_maps, display.direction),
                opacity=display.opacity, title=title)
    show_parts(cm.layer_strip_parts(on, layer_maps, **args), **click)
    what = "of this row" if display.direction == "from" else "of each patch's row to the query (mean)"
    st.caption(f"Under each layer: the image's share {what}. The informative layer is often not the last.")
    return lambda: cm.build_layer_strip_chart(on, layer_maps, select_name=None, **args)


def head_maps_parts(trace: Trace, head_maps: np.ndarray, direction: str, domain, title: str) -> cp.ChartParts:
    """Every head's map: small patch grids on the image side, or a token heatmap (one row per head)."""
    on = hm.map_trace(trace, direction)
    if hm.has_patches(on):
        return cm.all_heads_parts(on, head_maps, domain=domain, title=title)
    return cm.token_maps_parts(on, head_maps, row="head", title=title, domain=domain)


def build_head_maps_chart(trace: Trace, head_maps: np.ndarray, direction: str, domain, title: str = ""):
    """`head_maps_parts` as an Altair chart (for the export section)."""
    on = hm.map_trace(trace, direction)
    if hm.has_patches(on):
        return cm.build_all_heads_chart(on, head_maps, domain=domain, title=title)
    return cm.build_token_maps_chart(on, head_maps, row="head", title=title, domain=domain)


def show_matrices(trace: Trace, att: np.ndarray, title: str) -> str:
    """The full matrix with modality separators, or one of the modality blocks the viewed block has (one chart
    per run keeps it fast).

    The block picker sits in a column of its own, left of the chart: above the chart it was covered by the
    chart's toolbar.

    Returns:
        The block shown (``"full"`` or a key of ``BLOCK_TITLES``).
    """
    options = ["full", *hm.available_quadrants(trace)]
    if st.session_state.get("hm_block") not in (None, *options):  # another attention block's quadrant
        del st.session_state["hm_block"]
    picker, chart = st.columns([1, 4])
    block = picker.radio("Matrix", options, key="hm_block", index=0,
                         format_func=lambda b: "full query × key" if b == "full" else ch.BLOCK_TITLES[b]) or "full"
    with chart:
        if block == "full":
            show_parts(ch.matrix_parts(trace, att, title=title, size=440))
        else:
            show_parts(ch.block_parts(trace, att, block, size=440))
        rows, cols = ("", "") if trace.block.is_self else (f": the {trace.block.query} tokens",
                                                            f": the {trace.block.key} tokens")
        st.caption(f"Rows are queries (attending){rows}; columns keys (attended to){cols}. Hover a cell for both tokens. "
                   "White rules separate text from image tokens; the blocks leave out special tokens and image "
                   "summaries ([CLS], [SEP], [IMG]).")
    return block


def _step(delta: int, n: int) -> None:
    st.session_state["hm_step"] = (int(st.session_state.get("hm_step", 0)) + delta) % n


def show_step_through(trace: Trace, layer: int, head: int | None, display: Display,
                      domain: tuple[float, float] | None, interval_s: float = 1.0) -> None:
    """Play through the query tokens one by one (a fragment timer), or step with buttons and a slider: the text
    tokens (`vlcore.analysis.query_maps.step_tokens`; an image tower's CLS and patches)."""
    tokens = hm.step_tokens(trace)
    n = len(tokens)
    if st.session_state.get("hm_step", 0) >= n:
        st.session_state["hm_step"] = 0
    c1, c2, c3 = st.columns([1, 1, 4])
    c1.button("◀ previous", key="hm_prev", on_click=_step, args=(-1, n))
    c2.button("next ▶", key="hm_next", on_click=_step, args=(1, n))
    playing = c3.toggle("Play", key="hm_play", help=f"advance one token every {interval_s:.1f} s")
    att = trace.head_attention(layer, head)
    direction = hm.query_direction(trace, "query", display.direction)
    on = hm.map_trace(trace, direction)

    @st.fragment(run_every=interval_s if playing else None)
    def frame() -> None:
        now = time.monotonic()
        if playing and now - st.session_state.get("hm_step_at", 0.0) >= 0.9 * interval_s:
            st.session_state["hm_step_at"] = now
            _step(1, n)
        if n > 1:
            st.slider("Token", 0, n - 1, key="hm_step")
        i = int(tokens[int(st.session_state.get("hm_step", 0))])
        values = hm.compute_query_map(att, [i], direction)
        title = f"attention {direction} token {i} “{trace.tokens[i]}”"
        if hm.has_patches(on):
            show_parts(ch.overlay_parts(on, values, opacity=display.opacity, smooth=display.smooth, select_name=None,
                                        width=300, title=title, domain=domain,
                                        subtitle=hm.image_share_caption(on, values, direction)))
        if hm.has_text(on):
            marked = [i] if on is trace else []
            show_parts(ch.token_chips_parts(on, values, marked, width=CHIPS_WIDTH,
                                            title="" if hm.has_patches(on) else title))

    frame()


def show_export(charts: dict[str, Callable], trace: Trace, att: np.ndarray, head_label: str) -> None:
    """PNG/SVG of any chart of the page, and the selected head's matrix as CSV; files are made on request."""
    csv_name = f"matrix of {head_label} (CSV)"
    names = list(charts) + [csv_name]
    c1, c2, c3 = st.columns([3, 1, 1])
    what = c1.selectbox("Export", names, key="hm_export_what")
    fmt = c2.segmented_control("Format", ["png", "svg"], key="hm_export_fmt", default="png") or "png"
    if c3.button("Prepare file", key="hm_export_go"):
        stem = f"{trace.example_id.replace('/', '_')}-{what.replace(' ', '_')}"
        try:
            if what == csv_name:
                data, name, mime = ch.matrix_csv(trace, att).encode(), f"{stem}.csv", "text/csv"
            else:
                data = cp.export_chart(charts[what](), fmt)
                name, mime = f"{stem}.{fmt}", "image/png" if fmt == "png" else "image/svg+xml"
        except (VLScopeError, ValueError) as exc:
            st.error(f"Could not export {what}: {exc}")
            return
        st.session_state["hm_export"] = {"name": name, "data": data, "mime": mime}
    ready = st.session_state.get("hm_export")
    if ready:
        st.download_button(f"Download {ready['name']}", ready["data"], ready["name"], ready["mime"],
                           key="hm_download", on_click="ignore")


def default_query(trace: Trace, preferred: int | None) -> Query:
    """The block's default query (`vlcore.analysis.query_maps.default_query`) as a `Query`."""
    tokens = hm.default_query(trace, preferred)
    label = f"“{trace.tokens[int(tokens[0])]}”" if len(tokens) == 1 else "every patch (mean)"
    return Query(tokens, [], label)


def explanation_maps(trace: Trace, layer: int, head: int | None, start_layer: int, adapter, example,
                     answer: str | None, preferred: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The default query's maps side by side: raw (this layer/head), rollout (from ``start_layer``), relevancy.

    Args:
        preferred: the block's default query token (`ModelAdapter.default_query`); None with a pooling block
            (a tower read through an attention-pooling head): rollout goes into that head (`vlcore.attribution.towers`).

    Returns:
        ``(maps, reasons)``: method → values over the keys, and method → why it does not apply here.
    """
    query = default_query(trace, preferred)
    maps, reasons = {}, {}
    for method in METHODS:
        reason = method_reason(method, trace, adapter)
        if reason is not None:
            reasons[method] = reason.replace(" Showing raw attention.", "")
            continue
        try:
            if method == "rollout" and preferred is None and len(query.tokens) != 1:
                from vlcore.attribution.towers import compute_tower_rollout

                maps[method] = compute_tower_rollout(trace, trace.view, None, start_layer)
            else:
                maps[method] = method_map(method, trace, layer, head, query, "from", adapter, example, answer,
                                          start_layer)
        except NotImplementedError as exc:  # an adapter without a gradient pass
            reasons[method] = f"{METHOD_NAMES[method]} does not apply: {exc}"
    return maps, reasons


METHOD_NAMES = {"raw": "Raw attention", "rollout": "Rollout", "relevancy": "Gradient relevancy"}


def explanation_captions(trace: Trace, maps: dict[str, np.ndarray]) -> dict[str, str]:
    """The image's share of each explanation map (default-query rows, and the relevance); empty on text."""
    on = hm.map_trace(trace, "from")
    if not hm.has_patches(on):
        return {method: "" for method in maps}
    return {method: hm.image_share_caption(on, values, "from", method == "relevancy") for method, values in maps.items()}


def faithfulness_reason(trace: Trace, adapter) -> str | None:
    """Why the maps of the viewed block cannot be scored by removing image tokens, or None when they can (they
    lie on the adapter's image stream)."""
    stream = hm.map_stream(trace, "from")
    if stream != adapter.image_stream:
        return (f"Faithfulness removes image tokens of {adapter.image_stream}; these maps lie on {stream}: "
                "open a block that reads the image to score them.")
    return None


def show_explanations(trace: Trace, maps: dict[str, np.ndarray], titles: dict[str, str], adapter, example,
                      answer: str | None, display: Display, domain: tuple[float, float] | None) -> None:
    """Each explanation's overlay and text colouring, and (on request) its perturbation curve and AUC."""
    on = hm.map_trace(trace, "from")
    not_faithful = faithfulness_reason(trace, adapter)
    score = not_faithful is None and st.toggle(
        "Score faithfulness: remove patches in order of each map and re-run the model "
        "(a few dozen forward passes per map, cached)", key="hm_faith")
    if not_faithful:
        st.caption(not_faithful)
    captions = explanation_captions(trace, maps)
    for col, (method, values) in zip(st.columns(max(len(maps), 1)), maps.items()):
        with col:
            if hm.has_patches(on):
                show_parts(ch.overlay_parts(on, values, opacity=display.opacity, smooth=display.smooth,
                                            title=titles[method], width=260, select_name=None, domain=domain,
                                            subtitle=captions[method]))
            if hm.has_text(on):
                show_parts(ch.token_chips_parts(on, values, width=260,
                                                title="" if hm.has_patches(on) else titles[method]))
            if not score:
                continue
            try:
                curves = {order: cached_curve(adapter, example, trace_fingerprint(trace), model_fingerprint(adapter),
                                              np.asarray(values, dtype=np.float32), answer, order)
                          for order in ("positive", "random")}
            except (VLScopeError, NotImplementedError) as exc:
                st.error(str(exc))
                continue
            show_chart(cm.build_perturbation_chart(curves, title=f"faithfulness of {method}", width=200, height=160),
                       width="content")
            drop = curves["random"].auc - curves["positive"].auc
            st.metric("AUC, relevance order", f"{curves['positive'].auc:.3f}", f"{-drop:+.3f} vs random",
                      delta_color="inverse")
    if score:
        st.caption("Lower AUC = the answer's probability falls faster when the map's top patches are removed: "
                   "a more faithful map. The random order is the baseline.")


def build_explanations_chart(trace: Trace, maps: dict[str, np.ndarray], display: Display, domain):
    """The explanations side by side as one Altair chart (overlays; chips on a stream without an image)."""
    on = hm.map_trace(trace, "from")
    if hm.has_patches(on):
        return cm.build_explanations_chart(on, maps, display.opacity, domain=domain,
                                           subtitles=explanation_captions(trace, maps))
    import altair as alt

    return alt.vconcat(*[ch.build_token_chips_chart(on, values, title=method, width=CHIPS_WIDTH)
                         for method, values in maps.items()])
