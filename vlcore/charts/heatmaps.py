"""Attention-heatmap views: overlays, token chips, special-token bars and matrices.

Pure functions: numpy/pandas in, Altair charts out. The maps they draw come from `vlcore.analysis.query_maps`;
each view has a ``build_*_chart`` (an Altair chart) and a ``*_parts`` twin (`vlcore.charts.parts.ChartParts`,
the same chart from a cached layout) that the heatmaps page (`pages/4_Attention_Heatmaps.py`) renders.
Small multiples (every head, every layer, explanations side by side) and the faithfulness curves are in
`vlcore.charts.multiples`.

Token positions come from the trace's layouts (`vlcore.trace.TokenLayout`), never from an assumed order. A map
is drawn on the trace it lies on (`vlcore.analysis.query_maps.map_trace`): the overlay places its patch values on
that layout's image, the chips colour its text tokens. A matrix's rows are the viewed block's queries and its
columns its keys (`Trace.layout` and `Trace.key_layout`: the same tokens on a self block, the image's on a cross
block).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import altair as alt
import numpy as np
import pandas as pd

from vlcore.charts.parts import ChartParts, cached_image_uri, chart_parts, fast_build, image_frame, layout_key
from vlcore.charts.base import patch_frame
from vlcore.analysis import query_maps as hm
from vlcore.analysis.query_maps import token_label, upsample_bilinear
from vlcore.trace import Trace

SCHEME = "inferno"
_AXIS_OFF = alt.Axis(title=None, labels=False, ticks=False, grid=False, domain=False)
# Width and height are the plot's, axes, legend and title come on top. (Streamlit's default for a single or
# layered chart, "fit" inside width x height, squeezed the 30-px chip rows and the bars to nothing and
# shrank the overlay's patches but not its image mark, which is sized in pixels.)
_PAD = alt.AutoSizeParams(type="pad", contains="padding")


# ---------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------


def smooth_frame(trace: Trace, values: np.ndarray, factor: int = 4) -> pd.DataFrame:
    """Bilinearly smoothed heat layer: ``factor²`` sub-rectangles per patch.

    Returns:
        Columns ``row, col, x, x2, y, y2, value`` where ``row, col`` name the patch each sub-rectangle
        lies in (pixels in the image as the model saw it).
    """
    fine = upsample_bilinear(trace.to_grid(np.asarray(values, dtype=np.float32)), factor)
    step = trace.patch_px / factor
    yy, xx = np.indices(fine.shape)
    return pd.DataFrame({
        "row": (yy // factor).ravel(), "col": (xx // factor).ravel(),
        "x": (xx * step).ravel(), "x2": ((xx + 1) * step).ravel(),
        "y": (yy * step).ravel(), "y2": ((yy + 1) * step).ravel(),
        "value": fine.ravel(),
    })


def overlay_frames(trace: Trace, values: np.ndarray, selected: Sequence[tuple[int, int]] = (),
                   smooth: bool = False) -> dict[str, pd.DataFrame]:
    """The overlay's data: ``image`` (its data URI), ``patches`` (`patch_frame`), ``smooth`` (when
    smoothing, `smooth_frame`) and ``selected`` (the outlined query patches, when there are any)."""
    patches = patch_frame(trace, values)
    frames = {"image": image_frame(cached_image_uri(trace.image)), "patches": patches}
    if smooth:
        frames["smooth"] = smooth_frame(trace, values)
    if len(selected):
        wanted = {(int(r), int(c)) for r, c in selected}
        frames["selected"] = patches[[(r, c) in wanted for r, c in zip(patches["row"], patches["col"])]]
    return frames


def overlay_scale(trace: Trace, values: np.ndarray, domain: tuple[float, float] | None = None) -> dict[str, float]:
    """The overlay's colour domain ``lo, hi`` (``domain``, or the map's own min to max) and ``alpha_lo``,
    where its opacity starts from 0 (0, or a lower minimum: zero weight is transparent)."""
    lo, hi = hm.safe_domain(*domain) if domain is not None else hm.map_domain(hm.patch_values(trace, values))
    alpha_lo = min(lo, 0.0)
    return {"lo": lo, "hi": hi, "alpha_lo": alpha_lo}


def _overlay_layout(trace: Trace, data: Mapping, opacity: float, smooth: bool, title: str, width: int,
                    select_name: str | None, lo, hi, alpha_lo, subtitle) -> alt.LayerChart:
    """The overlay's layers on ``data`` (frames or named data, roles of `overlay_frames`).

    The heat colour runs over ``[lo, hi]`` and its opacity from 0 at ``alpha_lo`` up to ``opacity`` at ``hi``
    (values outside are clamped), so weights near zero leave the image visible.
    """
    h, w = trace.image.shape[:2]
    height = max(1, int(round(width * h / max(w, 1))))
    xs = alt.Scale(domain=[0, w], nice=False, zero=False)
    ys = alt.Scale(domain=[0, h], nice=False, zero=False, reverse=True)
    pos = dict(x=alt.X("x:Q", scale=xs, axis=_AXIS_OFF), x2=alt.X2("x2"), y=alt.Y("y:Q", scale=ys, axis=_AXIS_OFF),
               y2=alt.Y2("y2"))
    image = alt.Chart(data["image"]).mark_image(
        width=width, height=height, align="left", baseline="top"
    ).encode(x=alt.X("x:Q", scale=xs, axis=_AXIS_OFF), y=alt.Y("y:Q", scale=ys, axis=_AXIS_OFF), url=alt.Url("url:N"))
    # the opacity reads a copy of the weight: on the same field, Streamlit's Vega-Lite merges the two legends and
    # the opacity's legend=None then hides the colour legend too
    heat = dict(color=alt.Color("value:Q", scale=alt.Scale(scheme=SCHEME, domain=[lo, hi], clamp=True), title="weight"),
                opacity=alt.Opacity("alpha_weight:Q", legend=None,
                                    scale=alt.Scale(domain=[alpha_lo, hi], range=[0, opacity], clamp=True)))
    tooltip = [alt.Tooltip("row:Q"), alt.Tooltip("col:Q"), alt.Tooltip("token:Q"), alt.Tooltip("value:Q", format=".4f")]
    layers = [image]
    if smooth:
        layers.append(alt.Chart(data["smooth"]).transform_calculate(alpha_weight="datum.value").mark_rect().encode(
            **pos, **heat))
        hit = alt.Chart(data["patches"]).mark_rect(opacity=0.001).encode(**pos, tooltip=tooltip)
    else:
        hit = alt.Chart(data["patches"]).transform_calculate(alpha_weight="datum.value").mark_rect().encode(
            **pos, **heat, tooltip=tooltip)
    if select_name:
        hit = hit.add_params(alt.selection_point(name=select_name, fields=["row", "col"], on="click", clear="dblclick"))
    layers.append(hit)
    if "selected" in data:
        layers.append(alt.Chart(data["selected"]).mark_rect(fill=None, stroke="#00e5ff", strokeWidth=2).encode(**pos))
    title = alt.TitleParams(text=title, subtitle=subtitle, subtitleFontSize=12)
    return alt.layer(*layers).properties(width=width, height=height, title=title, autosize=_PAD)


@fast_build
def build_attention_overlay_chart(
    trace: Trace,
    values: np.ndarray,
    selected: Sequence[tuple[int, int]] = (),
    opacity: float = 0.6,
    smooth: bool = False,
    title: str = "",
    width: int = 320,
    select_name: str | None = "patch",
    domain: tuple[float, float] | None = None,
    subtitle: str = "",
) -> alt.LayerChart:
    """The image as the model saw it, a heat layer per patch placed by ``patch_rc``, selected patches outlined.

    Args:
        trace: supplies the image, ``patch_rc`` and ``patch_px``.
        values: ``[N]`` per-token weights; only patch tokens are drawn (specials never set the scale).
        selected: (row, col) cells to outline (the query patches).
        opacity: the heat layer's opacity at the top of the scale; it falls to 0 at weight 0.
        smooth: draw a bilinear upsampling of the patch grid instead of flat patches.
        title: chart title.
        width: width in pixels; the height keeps the image's aspect.
        select_name: name of a point selection on the patch rectangles (fields ``row, col``; shift-click
            adds patches), or None for a static chart.
        domain: the colour scale's ``(lo, hi)`` (`vlcore.analysis.query_maps.compute_domain`: shared by several
            maps, or 0–1); None stretches this map from its min to its max.
        subtitle: a line under the title (the page puts the image's share of the map there).
    """
    frames = overlay_frames(trace, values, selected, smooth)
    return _overlay_layout(trace, frames, opacity, smooth, title, width, select_name,
                           subtitle=subtitle, **overlay_scale(trace, values, domain))


def overlay_parts(trace: Trace, values: np.ndarray, selected: Sequence[tuple[int, int]] = (), opacity: float = 0.6,
                  smooth: bool = False, title: str = "", width: int = 320, select_name: str | None = "patch",
                  domain: tuple[float, float] | None = None, subtitle: str = "") -> ChartParts:
    """`build_attention_overlay_chart` as `ChartParts` (the layout built once per trace and settings)."""
    frames = overlay_frames(trace, values, selected, smooth)
    key = ("overlay", layout_key(trace), float(opacity), bool(smooth), int(width), select_name)
    return chart_parts(key, frames, title,
                       lambda data, t, **v: _overlay_layout(trace, data, opacity, smooth, t, width, select_name, **v),
                       {**overlay_scale(trace, values, domain), "subtitle": subtitle})


# ---------------------------------------------------------------------------------------
# Text tokens
# ---------------------------------------------------------------------------------------


def token_chips_frame(trace: Trace, values: np.ndarray, selected: Sequence[int] = (), width: int = 640) -> pd.DataFrame:
    """Layout of the non-special text tokens as chips wrapped into lines.

    Returns:
        Columns ``token, text, value, x, x2, line, selected`` (x in pixels).
    """
    idx = trace.text_index()
    wanted = {int(s) for s in selected}
    x, line, rows = 0.0, 0, []
    for i in idx:
        text = trace.tokens[i]
        w = 12 + 7.5 * len(text)
        if x + w > width and x > 0:
            x, line = 0.0, line + 1
        rows.append((int(i), text, float(values[i]), x, x + w, line, int(i) in wanted))
        x += w + 4
    return pd.DataFrame(rows, columns=["token", "text", "value", "x", "x2", "line", "selected"])


def chips_frames(trace: Trace, values: np.ndarray, selected: Sequence[int] = (),
                 width: int = 640) -> dict[str, pd.DataFrame]:
    """The chips' data: ``chips`` (`token_chips_frame` plus the label position ``mid`` and ``dark``, a
    dark chip with white text) and ``selected`` (the query's chips, when it is a text token)."""
    frame = token_chips_frame(trace, values, selected, width)
    top = float(frame["value"].max()) if len(frame) else 1.0
    frame["mid"] = (frame["x"] + frame["x2"]) / 2
    frame["dark"] = frame["value"] > 0.55 * top
    frames = {"chips": frame}
    if frame["selected"].any():
        frames["selected"] = frame[frame["selected"]]
    return frames


def _chips_layout(data: Mapping, n_lines: int, title: str, width: int) -> alt.LayerChart:
    xs = alt.Scale(domain=[0, width], nice=False, zero=False)
    pos = dict(x=alt.X("x:Q", scale=xs, axis=None), x2=alt.X2("x2"), y=alt.Y("line:O", axis=None))
    chip = alt.Chart(data["chips"]).mark_rect(cornerRadius=4, height=22).encode(
        **pos, color=alt.Color("value:Q", scale=alt.Scale(scheme="blues", domainMin=0), title="weight"),
        tooltip=[alt.Tooltip("token:Q"), alt.Tooltip("text:N"), alt.Tooltip("value:Q", format=".4f")],
    )
    label = alt.Chart(data["chips"]).mark_text(fontSize=13).encode(
        x=alt.X("mid:Q", scale=xs, axis=None), y=alt.Y("line:O", axis=None), text=alt.Text("text:N"),
        color=alt.Color("dark:N", scale=alt.Scale(domain=[True, False], range=["white", "black"]), legend=None),
    )
    layers = [chip, label]
    if "selected" in data:
        layers.append(alt.Chart(data["selected"]).mark_rect(
            cornerRadius=4, height=22, fill=None, stroke="#d62728", strokeWidth=2.5).encode(**pos))
    return alt.layer(*layers).properties(width=width, height=30 * n_lines, title=title, autosize=_PAD)


def _n_lines(frames: Mapping[str, pd.DataFrame]) -> int:
    chips = frames["chips"]
    return int(chips["line"].max()) + 1 if len(chips) else 1


@fast_build
def build_token_chips_chart(
    trace: Trace, values: np.ndarray, selected: Sequence[int] = (), title: str = "", width: int = 640
) -> alt.LayerChart:
    """The text tokens (specials left out) as a row of chips coloured by the weight they get."""
    frames = chips_frames(trace, values, selected, width)
    return _chips_layout(frames, _n_lines(frames), title, width)


def token_chips_parts(trace: Trace, values: np.ndarray, selected: Sequence[int] = (), title: str = "",
                      width: int = 640) -> ChartParts:
    """`build_token_chips_chart` as `ChartParts`."""
    frames = chips_frames(trace, values, selected, width)
    n_lines = _n_lines(frames)
    return chart_parts(("chips", layout_key(trace), int(width), n_lines), frames, title,
                        lambda data, t: _chips_layout(data, n_lines, t, width))


def special_weights_frame(trace: Trace, values: np.ndarray, shares: bool = False) -> pd.DataFrame:
    """Weights on the special tokens, then the totals on text (no specials) and on patches.

    Args:
        shares: the values are shares of one row (attention *from* a query, or its rollout): each is shown
            clipped to [0, 1] and labelled as a percentage (a float16 row's total can pass 1 by 1e-3).

    Returns:
        Columns ``token, value, kind, label`` (``label``: the value as printed beside its bar).
    """
    v = np.asarray(values, dtype=np.float64)
    special = np.flatnonzero(trace.special & trace.layout.valid)
    rows = [(token_label(trace, int(i)), float(v[i]), "special token") for i in special]
    text, patches = trace.text_index(), trace.image_index()
    if len(text) or not len(patches):  # a layout without text (an image tower) shows no empty text total
        rows.append(("all text (no specials)", float(v[text].sum()), "total"))
    if len(patches) or not len(text):
        rows.append(("all patches", float(v[patches].sum()), "total"))
    frame = pd.DataFrame(rows, columns=["token", "value", "kind"])
    if shares:
        frame["value"] = frame["value"].map(hm.clip_share)
        frame["label"] = frame["value"].map(hm.format_share)
    else:
        frame["label"] = frame["value"].map("{:.3f}".format)
    return frame


def _special_layout(data: Mapping, n_rows: int, title: str, shares: bool) -> alt.LayerChart:
    axis_title = "share of the row" if shares else "weight"
    base = alt.Chart(data["bars"]).encode(
        y=alt.Y("token:N", sort=None, title=None), x=alt.X("value:Q", title=axis_title),
        tooltip=[alt.Tooltip("token:N"), alt.Tooltip("kind:N"), alt.Tooltip("label:N", title=axis_title)],
    )
    bars = base.mark_bar().encode(color=alt.Color("kind:N", scale=alt.Scale(range=["#ff7f0e", "#9e9e9e"]), legend=None))
    text = base.mark_text(align="left", dx=3).encode(text=alt.Text("label:N"))
    return alt.layer(bars, text).properties(height=22 * n_rows, width=220, title=title, autosize=_PAD)


@fast_build
def build_special_weights_chart(trace: Trace, values: np.ndarray, title: str = "Special tokens",
                                shares: bool = False) -> alt.LayerChart:
    """Weights on [CLS], [SEP] and the image CLS, and the total on text and on patches, as bars.

    Kept apart from the overlay and the chips so their (often large) weights do not wash out those scales.
    ``shares``: see `special_weights_frame`.
    """
    frame = special_weights_frame(trace, values, shares)
    return _special_layout({"bars": frame}, len(frame), title, shares)


def special_weights_parts(trace: Trace, values: np.ndarray, title: str = "Special tokens",
                          shares: bool = False) -> ChartParts:
    """`build_special_weights_chart` as `ChartParts`."""
    frame = special_weights_frame(trace, values, shares)
    n_rows = len(frame)
    return chart_parts(("special", layout_key(trace), n_rows, bool(shares)), {"bars": frame}, title,
                       lambda data, t: _special_layout(data, n_rows, t, shares))


# ---------------------------------------------------------------------------------------
# Matrices
# ---------------------------------------------------------------------------------------


def _labels(layout) -> np.ndarray:
    """``index:token`` names of a layout's tokens."""
    return np.array([f"{i}:{t}" for i, t in enumerate(layout.tokens)], dtype=object)


def _query_labels(trace: Trace) -> np.ndarray:
    return _labels(trace.layout)


def _key_labels(trace: Trace) -> np.ndarray:
    return _labels(trace.key_layout)


def matrix_frame(trace: Trace, attention: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> pd.DataFrame:
    """Long form of ``attention[rows][:, cols]``: ``query, key`` (``index:token`` names of the query and key
    layouts, categorical), ``value``."""
    q_labels, k_labels = _query_labels(trace), _key_labels(trace)
    sub = np.asarray(attention)[np.ix_(rows, cols)]
    return pd.DataFrame({
        "query": pd.Categorical.from_codes(np.repeat(np.arange(len(rows)), len(cols)), categories=q_labels[rows]),
        "key": pd.Categorical.from_codes(np.tile(np.arange(len(cols)), len(rows)), categories=k_labels[cols]),
        "value": sub.ravel().astype(np.float32),
    })


def matrix_frames(trace: Trace, attention: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                  separators: bool = True) -> dict[str, pd.DataFrame]:
    """The matrix's data: ``cells`` (`matrix_frame`), and with ``separators`` the rules where the modality
    changes along the keys (``key_rules``) and the queries (``query_rules``), when there are any."""
    frames = {"cells": matrix_frame(trace, attention, rows, cols)}
    if separators:
        for role, field, index, layout in (("key_rules", "key", cols, trace.key_layout),
                                           ("query_rules", "query", rows, trace.layout)):
            names = _boundaries(layout, index)
            if names:
                frames[role] = pd.DataFrame({field: names})
    return frames


def _matrix_layout(trace: Trace, data: Mapping, rows: np.ndarray, cols: np.ndarray, title: str, size: int,
                   fill: bool) -> alt.LayerChart:
    q_order, k_order = _query_labels(trace)[rows].tolist(), _key_labels(trace)[cols].tolist()
    cell = size / max(len(rows), len(cols), 1)
    cell_x, cell_y = (min(size / max(len(cols), 1), 28), min(size / max(len(rows), 1), 28)) if fill else (cell, cell)
    show_x, show_y = len(cols) <= 48, len(rows) <= 48
    x = alt.X("key:O", sort=k_order, title="key (attended to)",
              axis=alt.Axis(labels=show_x, ticks=show_x, labelAngle=-60, grid=False))
    y = alt.Y("query:O", sort=q_order, title="query (attending)", axis=alt.Axis(labels=show_y, ticks=show_y, grid=False))
    heat = alt.Chart(data["cells"]).mark_rect().encode(
        x=x, y=y, color=alt.Color("value:Q", scale=alt.Scale(scheme="viridis"), title="weight"),
        tooltip=[alt.Tooltip("query:N"), alt.Tooltip("key:N"), alt.Tooltip("value:Q", format=".4f")],
    )
    layers = [heat]
    if "key_rules" in data:
        layers.append(alt.Chart(data["key_rules"]).mark_rule(color="white", strokeWidth=1.5).encode(
            x=alt.X("key:O", sort=k_order, bandPosition=0)))
    if "query_rules" in data:
        layers.append(alt.Chart(data["query_rules"]).mark_rule(color="white", strokeWidth=1.5).encode(
            y=alt.Y("query:O", sort=q_order, bandPosition=0)))
    return alt.layer(*layers).properties(width=max(1, round(cell_x * len(cols))), height=max(1, round(cell_y * len(rows))),
                                         title=title, autosize=_PAD)


def _index(n_tokens: int, index: np.ndarray | None) -> np.ndarray:
    return np.arange(n_tokens) if index is None else np.asarray(index, dtype=np.int64)


@fast_build
def build_matrix_chart(
    trace: Trace,
    attention: np.ndarray,
    rows: np.ndarray | None = None,
    cols: np.ndarray | None = None,
    title: str = "",
    size: int = 360,
    separators: bool = True,
    fill: bool = False,
) -> alt.LayerChart:
    """A query×key heatmap (rows queries) with rules where the modality changes; tooltips name both tokens.

    Args:
        trace: names the tokens and their modality (rows: its query layout, columns: its key layout).
        attention: ``[Q, K]`` attention of the viewed block (one head or the mean).
        rows, cols: query and key token indices (default: every token).
        title: chart title.
        size: the larger side in pixels.
        separators: draw rules between text and image tokens.
        fill: stretch the cells to fill a ``size``×``size`` box (cells at most 28 px) instead of square cells.
    """
    rows, cols = _index(trace.n_tokens, rows), _index(trace.key_layout.n_tokens, cols)
    return _matrix_layout(trace, matrix_frames(trace, attention, rows, cols, separators), rows, cols, title, size, fill)


def matrix_parts(trace: Trace, attention: np.ndarray, rows: np.ndarray | None = None, cols: np.ndarray | None = None,
                 title: str = "", size: int = 360, separators: bool = True, fill: bool = False) -> ChartParts:
    """`build_matrix_chart` as `ChartParts`."""
    rows, cols = _index(trace.n_tokens, rows), _index(trace.key_layout.n_tokens, cols)
    key = ("matrix", layout_key(trace), rows.tobytes(), cols.tobytes(), int(size), bool(fill))
    return chart_parts(key, matrix_frames(trace, attention, rows, cols, separators), title,
                        lambda data, t: _matrix_layout(trace, data, rows, cols, t, size, fill))


def _boundaries(layout, index: np.ndarray) -> list[str]:
    """Names of the tokens of ``layout`` in ``index`` that start a new modality (text → image)."""
    mod = layout.modality[index]
    return [f"{int(index[i])}:{layout.tokens[int(index[i])]}" for i in range(1, len(index)) if mod[i] != mod[i - 1]]


BLOCK_TITLES = {"txt2txt": "text → text", "txt2img": "text → image", "img2txt": "image → text",
                "img2img": "image → image"}


@fast_build
def build_block_chart(trace: Trace, attention: np.ndarray, block: str, size: int = 260) -> alt.LayerChart:
    """One modality block of the matrix (specials left out), e.g. ``"txt2img"`` (text queries, patch keys)."""
    rows, cols = trace.block_index(block)
    return build_matrix_chart(trace, attention, rows, cols, title=BLOCK_TITLES[block], size=size,
                              separators=False, fill=True)


def block_parts(trace: Trace, attention: np.ndarray, block: str, size: int = 260) -> ChartParts:
    """`build_block_chart` as `ChartParts`."""
    rows, cols = trace.block_index(block)
    return matrix_parts(trace, attention, rows, cols, title=BLOCK_TITLES[block], size=size, separators=False,
                        fill=True)


def matrix_csv(trace: Trace, attention: np.ndarray) -> str:
    """The ``[Q, K]`` matrix of the viewed block as CSV, rows (queries) and columns (keys) named ``index:token``."""
    frame = pd.DataFrame(np.asarray(attention, dtype=np.float32), index=_query_labels(trace).tolist(),
                         columns=_key_labels(trace).tolist())
    frame.index.name = "query\\key"
    return frame.to_csv(float_format="%.6g")
