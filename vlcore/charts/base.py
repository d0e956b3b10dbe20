"""Chart builders: pure functions from traces and tables to Altair charts."""

from __future__ import annotations

import base64
import io

import altair as alt
import numpy as np
import pandas as pd
from PIL import Image

from vlcore.trace import TokenLayout, Trace


def image_data_uri(image: np.ndarray) -> str:
    """PNG data URI of a uint8 ``[h, w, 3]`` image."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def map_layout(trace: Trace, values: np.ndarray) -> TokenLayout:
    """The layout whose tokens a per-token map ``values`` is over: the viewed block's key stream (a row of
    attention: where a query looks; ViLT's joint sequence, BLIP's vision tokens under ``text.cross``), else its
    query stream (a column).

    Raises:
        ValueError: ``values`` fits neither stream.
    """
    n = len(values)
    for layout in (trace.key_layout, trace.layout):
        if layout.n_tokens == n:
            return layout
    raise ValueError(f"a map of {n} values fits neither stream of block {trace.view!r} "
                     f"({trace.key_layout.n_tokens} keys, {trace.layout.n_tokens} queries)")


def patch_frame(trace: Trace, values: np.ndarray, layout: TokenLayout | None = None, image: int = 0) -> pd.DataFrame:
    """One row per patch token of one image: its grid cell, pixel rectangle, token index and value.

    Args:
        trace: supplies the layouts.
        values: ``[N]`` one value per token of ``layout``; only its patch tokens are used.
        layout: the tokens ``values`` are over; default `map_layout` (the viewed block's keys or queries).
        image: which image of the layout.

    Returns:
        Columns ``token, row, col, x, x2, y, y2, value`` (pixels in the image as the model saw it, from each
        cell's box); no rows when the layout has no image.
    """
    layout = map_layout(trace, values) if layout is None else layout
    idx, rc = layout.patch_positions(image) if len(layout.images) > image else (np.zeros(0, np.int64),
                                                                                np.zeros((0, 2), np.int16))
    rows, cols = rc[:, 0].astype(int), rc[:, 1].astype(int)
    boxes = layout.images[image].boxes[rows, cols] if len(idx) else np.zeros((0, 4), np.int32)
    return pd.DataFrame(
        {
            "token": idx,
            "row": rows,
            "col": cols,
            "x": boxes[:, 0].astype(int),
            "x2": boxes[:, 2].astype(int),
            "y": boxes[:, 1].astype(int),
            "y2": boxes[:, 3].astype(int),
            "value": np.asarray(values, dtype=np.float64)[idx],
        }
    )


def build_patch_overlay_chart(
    trace: Trace,
    values: np.ndarray,
    title: str = "",
    opacity: float = 0.6,
    width: int = 320,
    scheme: str = "inferno",
) -> alt.LayerChart:
    """The image as the model saw it with one heat rectangle per patch, placed by ``patch_rc``.

    Args:
        trace: the trace whose image and patch layout to use.
        values: ``[N]`` per-token values (e.g. one attention row) over the viewed block's keys or queries
            (`map_layout`); patch tokens are drawn.
        title: chart title.
        opacity: opacity of the heat layer.
        width: chart width in pixels; the height keeps the image's aspect.
        scheme: a Vega colour scheme.
    """
    layout = map_layout(trace, values)
    picture = layout.images[0].image if layout.images else trace.image
    h, w = picture.shape[:2]
    height = max(1, int(round(width * h / max(w, 1))))
    x_scale = alt.Scale(domain=[0, w], nice=False, zero=False)
    y_scale = alt.Scale(domain=[0, h], nice=False, zero=False, reverse=True)
    axis_x = alt.Axis(title=None, labels=False, ticks=False, grid=False, domain=False)
    image = (
        alt.Chart(pd.DataFrame({"url": [image_data_uri(picture)], "x": [0], "y": [0]}))
        .mark_image(width=width, height=height, align="left", baseline="top")
        .encode(x=alt.X("x:Q", scale=x_scale, axis=axis_x), y=alt.Y("y:Q", scale=y_scale, axis=axis_x), url="url:N")
    )
    heat = (
        alt.Chart(patch_frame(trace, values, layout))
        .mark_rect(opacity=opacity)
        .encode(
            x=alt.X("x:Q", scale=x_scale, axis=axis_x),
            x2="x2:Q",
            y=alt.Y("y:Q", scale=y_scale, axis=axis_x),
            y2="y2:Q",
            color=alt.Color("value:Q", scale=alt.Scale(scheme=scheme), title="weight"),
            tooltip=[
                alt.Tooltip("row:Q"), alt.Tooltip("col:Q"), alt.Tooltip("token:Q"), alt.Tooltip("value:Q", format=".4f"),
            ],
        )
    )
    # "pad" keeps the plot exactly width x height: Streamlit's theme asks for "fit", which shrinks the plot to
    # make room for the title and legend while the image mark keeps its pixel size, so the grid and the image
    # drift apart (caught by the real-browser test).
    return alt.layer(image, heat).properties(width=width, height=height, title=title,
                                             autosize=alt.AutoSizeParams(type="pad"))


BAR_STEP = 26  # pixels per bar of a bar list: room for a 12 px label at Streamlit's font size


def bar_list_axis(title: str | None = None) -> alt.Axis:
    """The category axis of a bar list: every bar labelled (Vega's default hides labels it thinks overlap),
    long labels kept."""
    return alt.Axis(title=title, labelOverlap=False, labelLimit=240, labelPadding=4)


def build_prediction_chart(prediction: list[tuple[str, float]], gold: tuple[str, ...] | None = None) -> alt.Chart:
    """Horizontal bars of the top-k answers (highest first), gold answers highlighted.

    The height is a step per bar (`BAR_STEP`), not a fixed number of pixels: Streamlit stretches a chart to its
    column and fits a fixed height around the axes, which left too little room per bar and made Vega drop every
    other label (2 labels for 5 bars).
    """
    frame = pd.DataFrame(prediction, columns=["answer", "probability"])
    frame["gold"] = frame["answer"].isin(gold or ())
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
            y=alt.Y("answer:N", sort=frame["answer"].tolist(), axis=bar_list_axis("answer")),
            color=alt.Color("gold:N", scale=alt.Scale(domain=[True, False], range=["#2ca02c", "#9e9e9e"])),
            tooltip=["answer", alt.Tooltip("probability:Q", format=".2%"), "gold"],
        )
        .properties(height=alt.Step(BAR_STEP))
    )
