"""Altair builders for the embeddings page: the 2-D token scatter and the fusion-degree line chart."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from vlcore.charts.base import image_data_uri

SELECT_PARAM = "token_pick"  # the scatter's point selection; the page reads event.selection[SELECT_PARAM]
COLOR_BY = {"modality": "modality", "token": "text", "example": "example_id", "correct": "correct"}
MAX_THUMBS = 3000  # patch thumbnails in tooltips for at most this many patch points (else text only)
SHAPES = alt.Scale(domain=["text", "patch", "special"], range=["circle", "square", "triangle-up"])


def thumbnail_uris(thumbs: np.ndarray | None, is_patch: np.ndarray, limit: int | None = None) -> list[str]:
    """PNG data URIs of patch thumbnails (``""`` for other tokens, or for all when over ``limit`` patches).

    Args:
        thumbs: uint8 ``[T, p, p, 3]`` or None.
        is_patch: bool ``[T]``.
        limit: most thumbnails to encode (default `MAX_THUMBS`); beyond it tooltips show token text only.
    """
    limit = MAX_THUMBS if limit is None else limit
    out = [""] * len(is_patch)
    if thumbs is None or int(np.sum(is_patch)) > limit:
        return out
    for i in np.flatnonzero(is_patch):
        out[i] = image_data_uri(np.ascontiguousarray(thumbs[i]))
    return out


def row_thumbnails(thumbs: np.ndarray | None, is_patch: np.ndarray, rows: np.ndarray) -> list[str | None]:
    """PNG data URIs of the patch thumbnails of a few ``rows`` (None for a row that is not a patch), with no cap.

    Args:
        thumbs: uint8 ``[T, p, p, 3]`` or None (then every row gets None).
        is_patch: bool ``[T]``.
        rows: indices into the ``T`` tokens.
    """
    if thumbs is None:
        return [None] * len(rows)
    return [image_data_uri(np.ascontiguousarray(thumbs[r])) if is_patch[r] else None for r in rows]


def build_projection_chart(
    frame: pd.DataFrame,
    color: str = "modality",
    selected: str | None = None,
    title: str = "",
    width: int = 560,
    height: int = 460,
    n_colors: int | None = None,
) -> alt.Chart:
    """Scatter of 2-D token coordinates.

    Args:
        frame: `vlcore.analysis.projection.coordinates_frame` output, optionally with an ``image`` column of
            thumbnail data URIs (shown in the tooltip by Vega's tooltip handler).
        color: one of `COLOR_BY` (modality, token, example, correct).
        selected: ``uid`` of the selected token, drawn larger with a black outline.
        title: chart title.
        width: chart width in pixels.
        height: chart height in pixels.
        n_colors: how many colour values there are (default: counted in ``frame``); over 20, no legend.

    Returns:
        A chart with a click point selection named `SELECT_PARAM` over the ``uid`` field.
    """
    if color not in COLOR_BY:
        raise ValueError(f"color must be one of {tuple(COLOR_BY)}, got {color!r}")
    data = frame.copy()
    data["selected"] = data["uid"] == selected if selected else False
    field = COLOR_BY[color]
    n_values = data[field].nunique() if n_colors is None else n_colors
    legend = alt.Legend(title=color) if n_values <= 20 else None
    scale = alt.Scale(domain=["correct", "incorrect", "unknown"], range=["#2ca02c", "#d62728", "#9e9e9e"]) \
        if color == "correct" else alt.Scale(scheme="tableau10" if n_values <= 10 else "tableau20")
    tooltip = [alt.Tooltip("text:N", title="token"), alt.Tooltip("example_id:N", title="example"),
               alt.Tooltip("token:Q", title="index"), alt.Tooltip("kind:N"), alt.Tooltip("correct:N")]
    if "image" in data.columns:
        tooltip.append(alt.Tooltip("image:N", title="image"))
    pick = alt.selection_point(name=SELECT_PARAM, fields=["uid"], on="click", toggle=False)
    return (
        alt.Chart(data)
        .mark_point(filled=True, opacity=0.75)
        .encode(
            x=alt.X("x:Q", title="component 1"),
            y=alt.Y("y:Q", title="component 2"),
            color=alt.Color(f"{field}:N", scale=scale, legend=legend),
            shape=alt.Shape("kind:N", scale=SHAPES, title="token kind"),
            size=alt.condition("datum.selected", alt.value(260), alt.value(40)),
            stroke=alt.condition("datum.selected", alt.value("black"), alt.value(None)),
            strokeWidth=alt.condition("datum.selected", alt.value(2), alt.value(0)),
            order=alt.Order("selected:N"),
            tooltip=tooltip,
        )
        .add_params(pick)
        .properties(width=width, height=height, title=title)
    )


def fusion_long(fusion: pd.DataFrame, layer_names: dict | None = None) -> pd.DataFrame:
    """One row per (series, layer, label) with ``nmi``, its range over seeds (``nmi_min``, ``nmi_max``; the
    value itself when the table has no range) and a ``seeds`` text such as ``0.669 to 0.669 over 8 seeds``."""
    data = fusion.copy()
    if "series" not in data.columns:
        data["series"] = "current"
    parts = []
    for col, label in (("nmi_modality", "vs modality"), ("nmi_kind", "vs text/patch/special")):
        lo = data[f"{col}_min"] if f"{col}_min" in data.columns else data[col]
        hi = data[f"{col}_max"] if f"{col}_max" in data.columns else data[col]
        n_seeds = data["n_seeds"] if "n_seeds" in data.columns else pd.Series(1, index=data.index)
        parts.append(pd.DataFrame({
            "layer": data["layer"], "series": data["series"], "label": label, "nmi": data[col],
            "nmi_min": lo, "nmi_max": hi,
            "seeds": [f"{a:.3f} to {b:.3f} over {int(n)} seeds" for a, b, n in zip(lo, hi, n_seeds)],
        }))
    long = pd.concat(parts, ignore_index=True)
    long["layer_name"] = long["layer"].map(lambda i: (layer_names or {}).get(i, f"layer {i}"))
    return long


def max_spread(fusion: pd.DataFrame) -> float:
    """The largest range over seeds of the modality NMI at any layer (0 when the table has no range).

    >>> max_spread(pd.DataFrame({"nmi_modality_min": [0.2, 0.5], "nmi_modality_max": [0.25, 0.5]}))
    0.05
    """
    if "nmi_modality_min" not in fusion.columns or fusion.empty:
        return 0.0
    return round(float((fusion["nmi_modality_max"] - fusion["nmi_modality_min"]).max()), 12)


def build_fusion_chart(fusion: pd.DataFrame, current_layer: int | None = None, layer_names: dict | None = None,
                       width: int = 420, height: int = 260) -> alt.LayerChart:
    """NMI against layer: one line per series and label (modality, token kind), with its range over seeds.

    Args:
        fusion: columns ``layer, nmi_modality, nmi_kind``, optionally the ranges over seeds
            (``nmi_modality_min/max``, ``nmi_kind_min/max``, ``n_seeds``; `vlcore.analysis.fusion.compute_fusion`) and
            ``series`` (e.g. the model or slice; a second series draws a second set of lines).
        current_layer: draws a vertical rule at this layer.
        layer_names: labels for layers in tooltips (e.g. ``{0: "embeddings"}``).
        width: chart width in pixels.
        height: chart height in pixels.

    Returns:
        The lines (tooltips give the value and its range over seeds), a vertical bar over each point's
        range (visible only where seeds disagree) and the rule.
    """
    long = fusion_long(fusion, layer_names)
    tooltip = [alt.Tooltip("series:N"), alt.Tooltip("layer_name:N", title="layer"), alt.Tooltip("label:N"),
               alt.Tooltip("nmi:Q", format=".3f"), alt.Tooltip("seeds:N", title="range over seeds")]
    base = alt.Chart(long).encode(x=alt.X("layer:O", title="layer (0 = embeddings)"),
                                  color=alt.Color("series:N", title="series"))
    lines = base.mark_line(point=True).encode(
        y=alt.Y("nmi:Q", title="NMI (2-means)", scale=alt.Scale(domain=[0, 1])),
        strokeDash=alt.StrokeDash("label:N", title="NMI"), tooltip=tooltip)
    ranges = base.mark_rule(strokeWidth=3, opacity=0.5).encode(y="nmi_min:Q", y2="nmi_max:Q", tooltip=tooltip)
    layers = [lines, ranges]
    if current_layer is not None:
        rule = alt.Chart(pd.DataFrame({"layer": [current_layer]})).mark_rule(color="gray", strokeDash=[2, 2])
        layers.append(rule.encode(x="layer:O"))
    return alt.layer(*layers).properties(width=width, height=height, title="Fusion degree (low = fused)")


def chart_spec(chart: alt.TopLevelMixin, data_name: str | None = None) -> dict:
    """A chart's Vega-Lite dict; with ``data_name``, its inline data replaced by a reference to that
    named dataset (supply the rows at render time, e.g. ``{**spec, "datasets": {name: frame}}``)."""
    spec = chart.to_dict()
    if data_name is not None:
        spec.pop("datasets", None)
        spec["data"] = {"name": data_name}
    return spec


SHARED_KINDS = alt.Scale(domain=["image", "text", "label"], range=["#1f77b4", "#ff7f0e", "#2ca02c"])


def build_shared_space_chart(frame: pd.DataFrame, selected: str | None = None, title: str = "",
                             width: int = 520, height: int = 420) -> alt.LayerChart:
    """Images and texts in a two-tower model's shared embedding space (one 2-D PCA of the unit embeddings).

    Args:
        frame: `vlcore.ui.embeddings.shared_space_frame` output (``kind, example_id, text, x, y, cosine``).
        selected: an example id whose image and text are drawn larger.
        title: chart title.
        width, height: size in pixels.

    Returns:
        A thin line from each example's image to its text, and the points (colour and shape by kind: image, text,
        candidate label), the cosine with the image in the tooltip.
    """
    data = frame.assign(selected=frame["example_id"].eq(selected) if selected else False)
    x, y = alt.X("x:Q", title="component 1"), alt.Y("y:Q", title="component 2")
    pairs = alt.Chart(data[data["kind"] != "label"]).mark_line(color="#bbbbbb", strokeWidth=1).encode(
        x=x, y=y, detail="example_id:N")
    points = alt.Chart(data).mark_point(filled=True, opacity=0.8).encode(
        x=x, y=y, color=alt.Color("kind:N", scale=SHARED_KINDS, title="embedding"),
        shape=alt.Shape("kind:N", scale=alt.Scale(domain=["image", "text", "label"],
                                                  range=["square", "circle", "diamond"]), title="embedding"),
        size=alt.condition("datum.selected", alt.value(220), alt.value(60)),
        tooltip=[alt.Tooltip("kind:N"), alt.Tooltip("text:N"), alt.Tooltip("example_id:N", title="example"),
                 alt.Tooltip("cosine:Q", format=".3f", title="cosine with the image")])
    return alt.layer(pairs, points).properties(width=width, height=height,
                                               title=title or "Image and text embeddings (shared space)")
