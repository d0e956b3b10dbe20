"""Altair charts of per-head statistics: the layer × head summary with a separated mean column.

A metric undefined for an attention block (NaN, e.g. text→image attention inside an image tower) is never drawn
as a number: its cells read "n/a" (`vlcore.analysis.stats` says why).
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from vlcore.charts.base import BAR_STEP, bar_list_axis

HEAD_SELECTION = "head_pick"  # name of the click selection on the layer × head heatmap


def build_head_heatmap_chart(
    aggregated: pd.DataFrame,
    metric: str,
    title: str = "",
    diverging: bool = False,
    selected: tuple[int, int] | None = None,
    cell: int = 26,
    n_layers: int | None = None,
    n_heads: int | None = None,
) -> alt.HConcatChart:
    """Layer × head heatmap of one metric, plus a separated "Mean" column (mean over heads per layer).

    Args:
        aggregated: `vlcore.analysis.head_table.aggregate_heads` output (``layer, head, metric, mean, std, n``) or
            `compare_slices` output (its ``mean`` is a difference).
        metric: the metric to draw.
        title: chart title.
        diverging: a diverging colour scale centred on 0 (differences, z-scores).
        selected: (layer, head) outlined in the chart.
        cell: cell size in pixels.
        n_layers, n_heads: the grid's size (the block's `vlcore.models.base.BlockSpec`); default: the largest
            layer and head in ``aggregated`` plus one.

    Returns:
        ``heatmap | mean column``; clicking a heatmap cell fills the point selection `HEAD_SELECTION`
        with that cell's ``layer`` and ``head``.
    """
    data = aggregated[aggregated["metric"] == metric].copy()
    data["layer"] = data["layer"].astype(int)
    data["head"] = data["head"].astype(int)
    for col in ("std", "n"):
        if col not in data:
            data[col] = float("nan")
    # std and n only where some head has more than one example; a head with one shows "n/a", never "null"
    spread = bool((data["n"] > 1).any())
    data["std_text"] = data["std"].map(lambda v: "n/a" if pd.isna(v) else f"{v:.6f}")
    spread_tips = [alt.Tooltip("std_text:N", title="std"), alt.Tooltip("n:Q")] if spread else []
    n_layers = int(data["layer"].max()) + 1 if n_layers is None else int(n_layers)
    n_heads = int(data["head"].max()) + 1 if n_heads is None else int(n_heads)
    missing = data["mean"].isna()
    means = data.groupby("layer", as_index=False)["mean"].mean().assign(column="Mean")
    lo, hi = float(data["mean"].min()), float(data["mean"].max())
    if not np.isfinite([lo, hi]).all():  # every cell n/a: a scale Vega can draw
        lo, hi = 0.0, 1.0
    if diverging:
        bound = max(abs(lo), abs(hi), 1e-12)
        scale = alt.Scale(scheme="redblue", domain=[-bound, bound], reverse=True)
    else:
        scale = alt.Scale(scheme="viridis", domain=[lo, hi] if hi > lo else [lo - 1e-9, hi + 1e-9])
    color = alt.Color("mean:Q", scale=scale, title=metric)
    pick = alt.selection_point(name=HEAD_SELECTION, fields=["layer", "head"], on="click", clear=False)
    y = alt.Y("layer:O", title="layer", sort="ascending", scale=alt.Scale(domain=list(range(n_layers))))
    x = alt.X("head:O", title="head", scale=alt.Scale(domain=list(range(n_heads))))
    mean_tip = alt.Tooltip("mean:Q", title=metric, format=".6f")
    if missing.any():
        data["mean_text"] = data["mean"].map(lambda v: "n/a" if pd.isna(v) else f"{v:.6f}")
        mean_tip = alt.Tooltip("mean_text:N", title=metric)
    stroke = alt.condition(pick, alt.value("black"), alt.value(None))
    if selected is not None:
        data["is_selected"] = (data["layer"] == selected[0]) & (data["head"] == selected[1])
        stroke = alt.condition("datum.is_selected", alt.value("white"), alt.value(None))
    heat = (
        alt.Chart(data)
        .mark_rect(strokeWidth=2)
        .encode(
            x=x,
            y=y,
            color=color,
            stroke=stroke,
            tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("head:O"), mean_tip, *spread_tips],
        )
        .add_params(pick)
        .properties(width=cell * n_heads, height=cell * n_layers, title=title or metric)
    )
    if missing.any():  # undefined cells say so, never look like a number
        na = alt.Chart(data[missing]).mark_text(fontSize=max(8, cell // 3), color="#757575").encode(
            x=x, y=y, text=alt.value("n/a"))
        heat = alt.layer(heat, na).properties(width=cell * n_heads, height=cell * n_layers, title=title or metric)
    mean_col = (
        alt.Chart(means)
        .mark_rect()
        .encode(
            x=alt.X("column:N", title=None),
            y=y,
            color=color,
            tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("mean:Q", title="mean over heads", format=".6f")],
        )
        .properties(width=cell, height=cell * n_layers)
    )
    return alt.hconcat(heat, mean_col, spacing=12).resolve_scale(color="shared")


def build_importance_bar_chart(drop: pd.DataFrame, k: int = 15) -> alt.Chart:
    """The ``k`` heads whose masking drops the answer's probability most (``layer, head, mean`` rows), largest
    first, every bar labelled (a step per bar, see `vlcore.charts.base.build_prediction_chart`)."""
    top = drop.sort_values("mean", ascending=False).head(k).copy()
    top["name"] = "L" + top["layer"].astype(int).astype(str) + " H" + top["head"].astype(int).astype(str)
    return (
        alt.Chart(top)
        .mark_bar()
        .encode(
            x=alt.X("mean:Q", title="drop in the answer's probability"),
            y=alt.Y("name:N", sort=top["name"].tolist(), axis=bar_list_axis()),
            tooltip=["layer", "head", alt.Tooltip("mean:Q", format=".5f")],
        )
        .properties(height=alt.Step(BAR_STEP))
    )
