"""Small multiples of attention maps and the faithfulness curves of the heatmaps page.

Every head of a layer, every layer of a head (the layer strip, clickable), explanation maps side by side,
and answer-probability curves as patches are removed. Pure functions like `vlcore.charts.heatmaps`: a
``build_*_chart`` (an Altair chart) and, for what the page redraws on every rerun, a ``*_parts`` twin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import altair as alt
import numpy as np
import pandas as pd

from vlcore.analysis import query_maps as hm
from vlcore.charts.parts import ChartParts, cached_image_uri, chart_parts, fast_build, image_frame, layout_key
from vlcore.charts.heatmaps import SCHEME, build_attention_overlay_chart
from vlcore.trace import Trace

_PAD = alt.AutoSizeParams(type="pad", contains="padding")  # plot size as built; axes, legend and title on top


# ---------------------------------------------------------------------------------------
# Every head of a layer
# ---------------------------------------------------------------------------------------


def head_maps_frame(trace: Trace, head_maps: np.ndarray) -> pd.DataFrame:
    """Long form of ``head_maps`` ``[H, N]`` on the patches: ``head, row, col, value``."""
    idx, rc = trace.patch_positions()
    n_heads = head_maps.shape[0]
    return pd.DataFrame({
        "head": np.repeat(np.arange(n_heads), len(idx)),
        "row": np.tile(rc[:, 0].astype(int), n_heads), "col": np.tile(rc[:, 1].astype(int), n_heads),
        "value": np.asarray(head_maps)[:, idx].ravel().astype(np.float32),
    })


def _all_heads_layout(trace: Trace, data: Mapping, n_heads: int, columns: int, panel: int,
                      title: str, lo=None, hi=None) -> alt.FacetChart:
    rows, cols = trace.grid
    cell = panel / max(rows, cols, 1)
    scale = alt.Scale(scheme=SCHEME) if lo is None else alt.Scale(scheme=SCHEME, domain=[lo, hi], clamp=True)
    return alt.Chart(data["heads"]).mark_rect().encode(
        x=alt.X("col:O", axis=None), y=alt.Y("row:O", axis=None),
        color=alt.Color("value:Q", scale=scale, title="weight"),
        tooltip=[alt.Tooltip("head:Q"), alt.Tooltip("row:Q"), alt.Tooltip("col:Q"),
                 alt.Tooltip("value:Q", format=".4f")],
    ).properties(width=round(cell * cols), height=round(cell * rows)).facet(
        facet=alt.Facet("head:O", title=None, header=alt.Header(labelExpr="'head ' + datum.value")),
        columns=min(columns, n_heads),
    ).properties(title=title)


def _domain_values(domain: tuple[float, float] | None) -> dict[str, float]:
    if domain is None:
        return {}
    lo, hi = hm.safe_domain(*domain)
    return {"lo": lo, "hi": hi}


@fast_build
def build_all_heads_chart(trace: Trace, head_maps: np.ndarray, columns: int = 6, panel: int = 110,
                          title: str = "", domain: tuple[float, float] | None = None) -> alt.FacetChart:
    """Small multiples: one patch-grid heatmap per head (``head_maps`` ``[H, N]``), one shared colour scale:
    ``domain`` (values outside clamped), or by default the range of every head's map."""
    return _all_heads_layout(trace, {"heads": head_maps_frame(trace, head_maps)}, head_maps.shape[0], columns, panel,
                             title, **_domain_values(domain))


def all_heads_parts(trace: Trace, head_maps: np.ndarray, columns: int = 6, panel: int = 110,
                    title: str = "", domain: tuple[float, float] | None = None) -> ChartParts:
    """`build_all_heads_chart` as `ChartParts`."""
    n_heads = head_maps.shape[0]
    return chart_parts(("heads", layout_key(trace), n_heads, int(columns), int(panel)),
                       {"heads": head_maps_frame(trace, head_maps)}, title,
                       lambda data, t, **v: _all_heads_layout(trace, data, n_heads, columns, panel, t, **v),
                       _domain_values(domain))


# ---------------------------------------------------------------------------------------
# Maps over tokens (a text stream: no image to draw on), one row per head or layer
# ---------------------------------------------------------------------------------------

TOKEN_MAP_WIDTH = 900  # the grid's width at most; a cell is at most 24 px wide


def token_maps_frame(trace: Trace, maps: np.ndarray, row: str = "head", selected: int | None = None) -> pd.DataFrame:
    """Long form of ``maps`` ``[R, N]`` (one map per head or layer over the trace's tokens, padding left out):
    ``<row>, token`` (``index:token``, categorical in sequence order), ``value`` and ``shown`` (the ``selected``
    row, outlined)."""
    idx = np.flatnonzero(trace.layout.valid)
    labels = np.array([f"{i}:{trace.tokens[i]}" for i in idx], dtype=object)
    n_rows = maps.shape[0]
    rows = np.repeat(np.arange(n_rows), len(idx))
    return pd.DataFrame({
        row: rows.astype(np.int16),
        "token": pd.Categorical.from_codes(np.tile(np.arange(len(idx)), n_rows), categories=labels),
        "value": np.asarray(maps, dtype=np.float32)[:, idx].ravel(),
        "shown": rows == (-1 if selected is None else selected),
    })


def _token_maps_layout(trace: Trace, data: Mapping, n_rows: int, row: str, select_name: str | None, title: str,
                       lo=None, hi=None) -> alt.Chart:
    labels = [f"{i}:{trace.tokens[i]}" for i in np.flatnonzero(trace.layout.valid)]
    cell = max(6, min(24, TOKEN_MAP_WIDTH // max(len(labels), 1)))
    show = len(labels) <= 48
    scale = alt.Scale(scheme=SCHEME) if lo is None else alt.Scale(scheme=SCHEME, domain=[lo, hi], clamp=True)
    chart = alt.Chart(data["cells"]).mark_rect(strokeWidth=2).encode(
        x=alt.X("token:O", sort=labels, title=None, axis=alt.Axis(labels=show, ticks=show, labelAngle=-60)),
        y=alt.Y(f"{row}:O", title=row), color=alt.Color("value:Q", scale=scale, title="weight"),
        stroke=alt.condition("datum.shown", alt.value("#00e5ff"), alt.value(None)),
        tooltip=[alt.Tooltip(f"{row}:Q"), alt.Tooltip("token:N"), alt.Tooltip("value:Q", format=".4f")],
    )
    if select_name:
        chart = chart.add_params(alt.selection_point(name=select_name, fields=[row], on="click", clear=False))
    return chart.properties(width=cell * len(labels), height=22 * n_rows, title=title, autosize=_PAD)


@fast_build
def build_token_maps_chart(trace: Trace, maps: np.ndarray, row: str = "head", selected: int | None = None,
                           title: str = "", select_name: str | None = None,
                           domain: tuple[float, float] | None = None) -> alt.Chart:
    """One map over the tokens per head or layer (``maps`` ``[R, N]``, rows named ``row``), as a heatmap: the
    small multiples of a stream without an image (a text tower, or the text side of a cross block).

    Args:
        trace: the trace the maps lie on (`vlcore.analysis.query_maps.map_trace`).
        selected: the row outlined (the layer or head the page shows).
        select_name: a point selection on the field ``row`` (a click picks that layer or head), or None.
        domain: a shared colour domain; None: the maps' own range.
    """
    frame = token_maps_frame(trace, maps, row, selected)
    return _token_maps_layout(trace, {"cells": frame}, maps.shape[0], row, select_name, title, **_domain_values(domain))


def token_maps_parts(trace: Trace, maps: np.ndarray, row: str = "head", selected: int | None = None,
                     title: str = "", select_name: str | None = None,
                     domain: tuple[float, float] | None = None) -> ChartParts:
    """`build_token_maps_chart` as `ChartParts`."""
    n_rows = maps.shape[0]
    return chart_parts(("tokenmaps", layout_key(trace), n_rows, row, select_name),
                       {"cells": token_maps_frame(trace, maps, row, selected)}, title,
                       lambda data, t, **v: _token_maps_layout(trace, data, n_rows, row, select_name, t, **v),
                       _domain_values(domain))


# ---------------------------------------------------------------------------------------
# Every layer at once
# ---------------------------------------------------------------------------------------

STRIP_GAP = 12  # pixels between two maps
STRIP_LABEL = 30  # pixels above each map for its two-line label
STRIP_WIDTH = 1080  # the strip wraps to a new row past this width


def strip_panel(n_layers: int, width: int = STRIP_WIDTH) -> int:
    """A map's width in the layer strip: every layer on one row of ``width`` pixels when they fit at 64 px
    or more (at most 110 px each), else rows of 64-px maps.

    >>> strip_panel(4), strip_panel(12), strip_panel(32)
    (110, 79, 64)
    """
    return int(min(110, max(64, (width - STRIP_GAP * (n_layers - 1)) // max(n_layers, 1))))


def layer_strip_frames(trace: Trace, layer_maps: np.ndarray, domain: tuple[float, float] | None = None,
                       selected: int | None = None, captions: Sequence[str] = (), panel: int = 96,
                       per_row: int | None = None) -> dict[str, pd.DataFrame]:
    """The data of the layer strip: one small map per layer, side by side (``per_row`` a row), in pixels.

    Args:
        trace: the grid and the image's aspect.
        layer_maps: ``[L, N]``, e.g. `vlcore.analysis.query_maps.compute_layer_maps`.
        domain: the colour domain every map shares; None: each map from its own min to its max.
        selected: the layer outlined (the one the page shows).
        captions: a second label line per layer (e.g. the image's share).
        panel: one map's width in pixels.
        per_row: maps per row (default: every layer on one row).

    Returns:
        ``cells`` (``layer, row, col`` as int16, ``value``, ``level``: the colour's position in [0, 1] and
        ``alpha``: the opacity's, 0 at weight 0, as float32; the layout places each cell from its layer, row
        and col: `strip_cell_boxes`), ``panels``, one row per map: ``layer``, ``x, y`` (its top left corner),
        ``cx`` (its centre), ``caption`` (its label's second line; the first is "layer N") and ``shown`` (the
        layer ``selected``, outlined), and ``image``, one row: ``img`` (0) and ``url``, the image's data URI,
        which the image layer looks up by ``img`` (one copy of the image in the data, none in the spec; the
        same frame object while the image is the same).
    """
    n_layers = layer_maps.shape[0]
    per_row = per_row or n_layers
    h, w = trace.image.shape[:2]
    height = panel * h / max(w, 1)
    idx, rc = trace.patch_positions()
    values = np.asarray(layer_maps, dtype=np.float64)[:, idx]  # [L, P]
    if domain is None:
        lo_hi = np.array([hm.map_domain(v) for v in values]).reshape(n_layers, 2)
    else:
        lo_hi = np.tile(hm.safe_domain(*domain), (n_layers, 1))
    lo, hi = lo_hi[:, :1], lo_hi[:, 1:]
    alpha_lo = np.minimum(lo, 0.0)
    layers = np.arange(n_layers)
    left = (layers % per_row) * (panel + STRIP_GAP)
    top = (layers // per_row) * (STRIP_LABEL + height + STRIP_GAP) + STRIP_LABEL
    cells = pd.DataFrame({
        "layer": np.repeat(layers, len(idx)).astype(np.int16),
        "row": np.tile(rc[:, 0].astype(np.int16), n_layers), "col": np.tile(rc[:, 1].astype(np.int16), n_layers),
        "value": values.ravel().astype(np.float32),
        "level": np.clip((values - lo) / (hi - lo), 0, 1).ravel().astype(np.float32),
        "alpha": np.clip((values - alpha_lo) / (hi - alpha_lo), 0, 1).ravel().astype(np.float32),
    })
    captions = (list(captions) + [""] * n_layers)[:n_layers]
    panels = pd.DataFrame({"layer": layers, "x": left.astype(float), "y": top.astype(float), "cx": left + panel / 2,
                           "caption": captions,
                           "shown": layers == (-1 if selected is None else selected)})
    return {"cells": cells, "panels": panels, "image": image_frame(cached_image_uri(trace.image))}


def strip_cell_boxes(trace: Trace, panel: int, per_row: int) -> dict[str, str]:
    """Vega expressions placing a strip cell (``datum.layer, datum.row, datum.col``) in pixels: ``x, x2, y, y2``.

    Map ``layer`` sits in row ``layer // per_row`` and column ``layer % per_row`` of maps ``panel`` pixels wide
    (`STRIP_GAP` apart, `STRIP_LABEL` of label above each), its cells ``panel / cols`` wide.
    """
    h, w = trace.image.shape[:2]
    map_h = panel * h / max(w, 1)
    cell_w, cell_h = panel / trace.grid[1], map_h / trace.grid[0]
    x = f"(datum.layer % {per_row}) * {panel + STRIP_GAP} + datum.col * {cell_w!r}"
    y = f"floor(datum.layer / {per_row}) * {STRIP_LABEL + map_h + STRIP_GAP!r} + {STRIP_LABEL} + datum.row * {cell_h!r}"
    return {"x": x, "x2": f"{x} + {cell_w!r}", "y": y, "y2": f"{y} + {cell_h!r}"}


def _strip_size(trace: Trace, n_layers: int, panel: int, per_row: int) -> tuple[int, float, float]:
    """Width, height and one map's height of the strip, in pixels."""
    h, w = trace.image.shape[:2]
    map_h = panel * h / max(w, 1)
    n_rows = -(-n_layers // per_row)
    return per_row * panel + (per_row - 1) * STRIP_GAP, n_rows * (STRIP_LABEL + map_h) + (n_rows - 1) * STRIP_GAP, map_h


def _strip_layout(trace: Trace, data: Mapping, n_layers: int, panel: int, per_row: int, opacity: float,
                  per_map: bool, select_name: str | None, title: str, lo=None, hi=None) -> alt.LayerChart:
    width, height, map_h = _strip_size(trace, n_layers, panel, per_row)
    xs = alt.Scale(domain=[0, width], nice=False, zero=False)
    ys = alt.Scale(domain=[0, height], nice=False, zero=False, reverse=True)
    x, y = alt.X("x:Q", scale=xs, axis=None), alt.Y("y:Q", scale=ys, axis=None)
    # every map's image is the one row of ``image``, looked up by each panel (no copy of the URI in the spec)
    images = alt.Chart(data["panels"]).transform_calculate(img="0").transform_lookup(
        lookup="img", from_=alt.LookupData(data=data["image"], key="img", fields=["url"]),
    ).mark_image(width=panel, height=map_h, align="left", baseline="top").encode(x=x, y=y, url=alt.Url("url:N"))
    if per_map:
        color = alt.Color("level:Q", scale=alt.Scale(scheme=SCHEME, domain=[0, 1]),
                          title=["each map:", "its min → max"])
    else:
        color = alt.Color("value:Q", scale=alt.Scale(scheme=SCHEME, domain=[lo, hi], clamp=True), title="weight")
    cells = alt.Chart(data["cells"]).transform_calculate(**strip_cell_boxes(trace, panel, per_row)).mark_rect().encode(
        x=x, x2=alt.X2("x2"), y=y, y2=alt.Y2("y2"), color=color,
        opacity=alt.Opacity("alpha:Q", scale=alt.Scale(domain=[0, 1], range=[0, opacity]), legend=None),
        tooltip=[alt.Tooltip("layer:Q"), alt.Tooltip("row:Q"), alt.Tooltip("col:Q"),
                 alt.Tooltip("value:Q", format=".4f")],
    )
    if select_name:
        cells = cells.add_params(alt.selection_point(name=select_name, fields=["layer"], on="click", clear=False))
    shown = alt.condition("datum.shown", alt.value("#0086a8"), alt.value("black"))
    cx = alt.X("cx:Q", scale=xs, axis=None)
    label = alt.Chart(data["panels"]).transform_calculate(text="'layer ' + datum.layer").mark_text(
        baseline="bottom", fontSize=12, fontWeight="bold", dy=-15).encode(x=cx, y=y, text=alt.Text("text:N"), color=shown)
    caption = alt.Chart(data["panels"]).mark_text(baseline="bottom", fontSize=11, dy=-3).encode(
        x=cx, y=y, text=alt.Text("caption:N"), color=shown)
    outline = alt.Chart(data["panels"]).transform_filter("datum.shown").transform_calculate(
        x1="datum.x - 2", x2=f"datum.x + {panel + 2}", y1="datum.y - 2", y2=f"datum.y + {map_h + 2}",
    ).mark_rect(fill=None, stroke="#00e5ff", strokeWidth=2.5).encode(
        x=alt.X("x1:Q", scale=xs, axis=None), x2=alt.X2("x2:Q"), y=alt.Y("y1:Q", scale=ys, axis=None),
        y2=alt.Y2("y2:Q"))
    layers = [images, cells, label, caption, outline]
    return alt.layer(*layers).properties(width=width, height=round(height), title=title, autosize=_PAD)


@fast_build
def build_layer_strip_chart(trace: Trace, layer_maps: np.ndarray, domain: tuple[float, float] | None = None,
                            selected: int | None = None, captions: Sequence[str] = (), opacity: float = 0.8,
                            panel: int | None = None, title: str = "",
                            select_name: str | None = "pick_layer") -> alt.LayerChart:
    """Small maps of one query, one per layer, over the image (`layer_strip_frames`), wrapped at STRIP_WIDTH.

    A click on a map selects its layer (point selection ``select_name`` on the field ``layer``). The colour
    follows ``domain`` (shared by every map) or, when None, each map's own min to max; the opacity grows
    from 0 at weight 0 to ``opacity`` at the top of the map's scale. ``panel``: a map's width (default
    `strip_panel`).
    """
    n_layers = layer_maps.shape[0]
    panel = panel or strip_panel(n_layers)
    per_row = max(1, min(n_layers, (STRIP_WIDTH + STRIP_GAP) // (panel + STRIP_GAP)))
    frames = layer_strip_frames(trace, layer_maps, domain, selected, captions, panel, per_row)
    return _strip_layout(trace, frames, n_layers, panel, per_row, opacity, domain is None, select_name, title,
                         **_domain_values(domain))


def layer_strip_parts(trace: Trace, layer_maps: np.ndarray, domain: tuple[float, float] | None = None,
                      selected: int | None = None, captions: Sequence[str] = (), opacity: float = 0.8,
                      panel: int | None = None, title: str = "", select_name: str | None = "pick_layer") -> ChartParts:
    """`build_layer_strip_chart` as `ChartParts`."""
    n_layers, per_map = layer_maps.shape[0], domain is None
    panel = panel or strip_panel(n_layers)
    per_row = max(1, min(n_layers, (STRIP_WIDTH + STRIP_GAP) // (panel + STRIP_GAP)))
    frames = layer_strip_frames(trace, layer_maps, domain, selected, captions, panel, per_row)
    key = ("strip", layout_key(trace), n_layers, int(panel), per_row, float(opacity), per_map, select_name)
    return chart_parts(key, frames, title,
                       lambda data, t, **v: _strip_layout(trace, data, n_layers, panel, per_row, opacity, per_map,
                                                          select_name, t, **v),
                       _domain_values(domain))


@fast_build
def build_explanations_chart(trace: Trace, maps: Mapping[str, np.ndarray], opacity: float = 0.6,
                             width: int = 260, domain: tuple[float, float] | None = None,
                             subtitles: Mapping[str, str] | None = None) -> alt.HConcatChart:
    """Overlays of several explanation maps side by side (e.g. raw / rollout / relevancy); ``domain`` and
    ``subtitles`` as in `build_attention_overlay_chart` (a subtitle per map name)."""
    overlays = []
    for name, values in maps.items():
        chart = build_attention_overlay_chart(trace, values, opacity=opacity, title=name, width=width,
                                              select_name=None, domain=domain, subtitle=(subtitles or {}).get(name, ""))
        chart.autosize = alt.Undefined  # Vega-Lite sizes a concatenation as a whole
        overlays.append(chart)
    return alt.hconcat(*overlays).resolve_scale(color="independent", opacity="independent").properties(autosize=_PAD)


def curve_frame(curves: Mapping[str, object]) -> pd.DataFrame:
    """Long form of perturbation curves: ``order, fraction, probability, auc``."""
    parts = [pd.DataFrame({"order": name, "fraction": np.asarray(c.fractions, dtype=float),
                           "probability": np.asarray(c.probabilities, dtype=float), "auc": float(c.auc)})
             for name, c in curves.items()]
    return pd.concat(parts, ignore_index=True)


@fast_build
def build_perturbation_chart(curves: Mapping[str, object], title: str = "", width: int = 220,
                             height: int = 160) -> alt.Chart:
    """Answer probability as patches are removed, one line per order (e.g. positive vs random).

    The plot is ``width`` × ``height`` pixels with the axes, the legend (below, one line per order) and the
    title around it (autosize "pad"): render it at its own size (``width="content"``), as a chart stretched
    to its column and fitted into a fixed height loses its y ticks and its legend.

    Args:
        curves: order name → an object with ``fractions``, ``probabilities`` and ``auc``
            (`vlcore.attribution.faithfulness.PerturbationCurve`).
    """
    frame = curve_frame(curves)
    frame["label"] = frame["order"] + " (AUC " + frame["auc"].map("{:.3f}".format) + ")"
    labels = list(dict.fromkeys(frame["label"]))
    palette = ["#1f77b4", "#7f7f7f", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    return alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("fraction:Q", title="fraction of patches removed", scale=alt.Scale(domain=[0, 1]),
                axis=alt.Axis(format=".0%", tickCount=5)),
        y=alt.Y("probability:Q", title="answer probability", scale=alt.Scale(zero=True, nice=True),
                axis=alt.Axis(tickCount=5, ticks=True, labels=True, format=".2f")),
        color=alt.Color("label:N", title=None, scale=alt.Scale(domain=labels, range=palette[: len(labels)]),
                        legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=0)),
        strokeDash=alt.StrokeDash("order:N", legend=None),
        tooltip=[alt.Tooltip("order:N"), alt.Tooltip("fraction:Q", format=".0%"),
                 alt.Tooltip("probability:Q", format=".4f")],
    ).properties(width=width, height=height, title=title, autosize=_PAD)
