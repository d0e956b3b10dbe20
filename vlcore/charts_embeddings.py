"""Altair builders for the embeddings page: the 2-D token scatter and the fusion-degree line chart."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from vlcore.charts import image_data_uri

SELECT_PARAM = "token_pick"  # the scatter's point selection; the page reads event.selection[SELECT_PARAM]
COLOR_BY = {"modality": "modality", "token": "text", "example": "example_id", "correct": "correct"}
MAX_THUMBS = 3000  # patch thumbnails in tooltips for at most this many patch points (else text only)
SHAPES = alt.Scale(domain=["text", "patch", "special"], range=["circle", "square", "triangle-up"])


def thumbnail_uris(thumbs: np.ndarray | None, is_patch: np.ndarray, limit: int = MAX_THUMBS) -> list[str]:
    """PNG data URIs of patch thumbnails (``""`` for other tokens, or for all when over ``limit`` patches).

    Args:
        thumbs: uint8 ``[T, p, p, 3]`` or None.
        is_patch: bool ``[T]``.
        limit: most thumbnails to encode; beyond it tooltips show token text only.
    """
    out = [""] * len(is_patch)
    if thumbs is None or int(np.sum(is_patch)) > limit:
        return out
    for i in np.flatnonzero(is_patch):
        out[i] = image_data_uri(np.ascontiguousarray(thumbs[i]))
    return out


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
        frame: `vlcore.projection.coordinates_frame` output, optionally with an ``image`` column of
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


def build_fusion_chart(fusion: pd.DataFrame, current_layer: int | None = None, layer_names: dict | None = None,
                       width: int = 420, height: int = 260) -> alt.LayerChart:
    """NMI against layer: one line per series and label (modality, token kind).

    Args:
        fusion: columns ``layer, nmi_modality, nmi_kind`` and optionally ``series`` (e.g. the model or
            slice; a second series draws a second set of lines).
        current_layer: draws a vertical rule at this layer.
        layer_names: labels for layers in tooltips (e.g. ``{0: "embeddings"}``).
        width: chart width in pixels.
        height: chart height in pixels.
    """
    data = fusion.copy()
    if "series" not in data.columns:
        data["series"] = "current"
    long = data.melt(id_vars=["layer", "series"], value_vars=["nmi_modality", "nmi_kind"], var_name="label",
                     value_name="nmi")
    long["label"] = long["label"].map({"nmi_modality": "vs modality", "nmi_kind": "vs text/patch/special"})
    long["layer_name"] = long["layer"].map(lambda i: (layer_names or {}).get(i, f"layer {i}"))
    lines = (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O", title="layer (0 = embeddings)"),
            y=alt.Y("nmi:Q", title="NMI (k-means k=2)", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("series:N", title="series"),
            strokeDash=alt.StrokeDash("label:N", title="NMI"),
            tooltip=[alt.Tooltip("series:N"), alt.Tooltip("layer_name:N", title="layer"), alt.Tooltip("label:N"),
                     alt.Tooltip("nmi:Q", format=".3f")],
        )
    )
    layers = [lines]
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
