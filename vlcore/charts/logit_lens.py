"""Altair charts of the logit lens: each layer's residual stream read through the final norm and the LM head.

The lens of a generative model's trace (``trace.meta["lens"]``, `vlcore.models.generative.GenerativeAdapter.trace_meta`)
holds, per lens layer ``0 .. L`` (0: the embeddings, ``l``: the output of decoder layer ``l``) and per generated
token, the top-5 vocabulary tokens with their probabilities and the rank (0 = top) and probability of the token
finally produced; and per image token its top-3 vocabulary tokens per layer.

- `lens_frame` / `build_lens_rank_chart`: a layer × generated-token heatmap of the final token's rank (log colour
  scale), the layer's top-5 in the tooltip;
- `build_lens_prob_chart`: the produced token's probability by layer, one line per generated token;
- `image_lens_frame` / `build_image_lens_chart`: the image with each image token's top vocabulary token written on
  its grid cell, at one layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import altair as alt
import numpy as np
import pandas as pd

from vlcore.charts.base import image_data_uri
from vlcore.trace import ROLE_PATCH, TokenLayout

_AXIS_OFF = alt.Axis(title=None, labels=False, ticks=False, grid=False, domain=False)


def layer_name(layer: int) -> str:
    """A lens layer's name.

    >>> layer_name(0), layer_name(3)
    ('embeddings', 'layer 3')
    """
    return "embeddings" if int(layer) == 0 else f"layer {int(layer)}"


def _top_text(words: Sequence[str], probs: Sequence[float]) -> str:
    """``'a 0.512 · b 0.100'``: a layer's top tokens with their probabilities."""
    return " · ".join(f"{w!r}"[1:-1] + f" {p:.3f}" for w, p in zip(words, probs))


def lens_frame(lens: Mapping, generated: Sequence[str]) -> pd.DataFrame:
    """One row per (lens layer, generated token).

    Args:
        lens: ``trace.meta["lens"]``: ``top_tokens`` ``[L+1][T][5]``, ``top_probs`` ``[L+1][T][5]``, ``rank``
            ``[L+1][T]`` (-1 past the answer), ``prob`` ``[L+1][T]``.
        generated: the ``T`` generated token strings (the trace's ``generated`` stream).

    Returns:
        Columns ``layer, layer_name, step, token, label`` (``"step: token"``, unique per step), ``rank`` (0 = top),
        ``rank1`` (rank + 1, for the log scale), ``prob``, ``top1`` (the layer's top token) and ``top`` (its top
        tokens with probabilities); steps with rank -1 are left out.
    """
    rank = np.asarray(lens["rank"], dtype=np.int64)
    n_layers, n_steps = rank.shape if rank.ndim == 2 else (0, 0)
    prob = np.asarray(lens["prob"], dtype=np.float64).reshape(n_layers, n_steps)
    rows = []
    for layer in range(n_layers):
        for step in range(n_steps):
            if rank[layer, step] < 0:
                continue
            words, probs = lens["top_tokens"][layer][step], lens["top_probs"][layer][step]
            token = generated[step] if step < len(generated) else "?"
            rows.append({"layer": layer, "layer_name": layer_name(layer), "step": step, "token": token,
                         "label": f"{step}: {token}", "rank": int(rank[layer, step]),
                         "rank1": int(rank[layer, step]) + 1, "prob": float(prob[layer, step]),
                         "top1": str(words[0]) if len(words) else "", "top": _top_text(words, probs)})
    columns = ["layer", "layer_name", "step", "token", "label", "rank", "rank1", "prob", "top1", "top"]
    return pd.DataFrame(rows, columns=columns)


def build_lens_rank_chart(frame: pd.DataFrame, title: str = "", cell: int = 28) -> alt.Chart:
    """Lens layer (rows, the last layer on top) × generated token (columns), coloured by the rank of the token
    finally produced at that step on a log scale (rank 0, the top token, is the brightest); the tooltip gives
    the layer's top-5 tokens and probabilities.

    Args:
        frame: `lens_frame` output.
        title: chart title.
        cell: cell size in pixels.
    """
    labels = frame.drop_duplicates("step").sort_values("step")["label"].tolist()
    n_layers = int(frame["layer"].max()) + 1 if len(frame) else 1
    top_rank = max(int(frame["rank1"].max()) if len(frame) else 1, 2)
    return (
        alt.Chart(frame)
        .mark_rect()
        .encode(
            x=alt.X("label:N", sort=labels, title="generated token", axis=alt.Axis(labelAngle=-45)),
            y=alt.Y("layer:O", sort="descending", title="layer (0: embeddings)"),
            color=alt.Color("rank1:Q", title="rank + 1",
                            scale=alt.Scale(type="log", domain=[1, top_rank], scheme="viridis", reverse=True)),
            tooltip=[alt.Tooltip("label:N", title="token"), alt.Tooltip("layer_name:N", title="layer"),
                     alt.Tooltip("rank:Q", title="rank of the final token (0 = top)"),
                     alt.Tooltip("prob:Q", title="its probability", format=".4f"),
                     alt.Tooltip("top:N", title="top 5")],
        )
        .properties(width=max(cell * len(labels), 120), height=cell * n_layers,
                    title=title or "Rank of the final token at each layer")
    )


def build_lens_prob_chart(frame: pd.DataFrame, title: str = "") -> alt.Chart:
    """The produced token's probability by lens layer, one line per generated token."""
    labels = frame.drop_duplicates("step").sort_values("step")["label"].tolist()
    return (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:Q", title="layer (0: embeddings)", axis=alt.Axis(tickMinStep=1)),
            y=alt.Y("prob:Q", title="probability of the final token", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("label:N", sort=labels, title="generated token"),
            tooltip=[alt.Tooltip("label:N", title="token"), alt.Tooltip("layer_name:N", title="layer"),
                     alt.Tooltip("prob:Q", format=".4f"), alt.Tooltip("rank:Q"), alt.Tooltip("top:N", title="top 5")],
        )
        .properties(title=title or "Probability of the final token by layer", height=260)
    )


def image_lens_frame(layout: TokenLayout, lens: Mapping, layer: int, image: int = 0) -> pd.DataFrame:
    """One row per image token of one image that sits on a grid cell: its top vocabulary tokens at one layer.

    Args:
        layout: the trace's ``lm`` stream (the trimmed layout ``lens["image_positions"]`` indexes).
        lens: ``trace.meta["lens"]`` (``image_positions`` ``[I]``, ``image_top_tokens`` ``[L+1][I][3]``).
        layer: the lens layer, ``0 .. L``.
        image: which image of the layout.

    Returns:
        Columns ``token`` (position in ``layout``), ``row, col, x, x2, y, y2`` (the cell's pixel box on the image as
        the model saw it), ``xc, yc`` (its centre), ``word`` (the top token) and ``top`` (the top 3, joined).
    """
    columns = ["token", "row", "col", "x", "x2", "y", "y2", "xc", "yc", "word", "top"]
    tops = lens["image_top_tokens"][int(layer)]
    rows = []
    for i, pos in enumerate(lens["image_positions"]):
        pos = int(pos)
        if pos < 0 or pos >= layout.n_tokens or layout.role[pos] != ROLE_PATCH or layout.image_of[pos] != image:
            continue
        r, c = (int(v) for v in layout.cell[pos])
        x0, y0, x1, y1 = (int(v) for v in layout.images[image].boxes[r, c])
        words = [str(w) for w in tops[i]]
        rows.append({"token": pos, "row": r, "col": c, "x": x0, "x2": x1, "y": y0, "y2": y1, "xc": (x0 + x1) / 2,
                     "yc": (y0 + y1) / 2, "word": words[0] if words else "", "top": " · ".join(words)})
    return pd.DataFrame(rows, columns=columns)


def build_image_lens_chart(layout: TokenLayout, frame: pd.DataFrame, image: int = 0, title: str = "",
                           width: int = 480) -> alt.LayerChart:
    """The image as the model saw it, each image token's cell outlined and its top vocabulary token written on it.

    Args:
        layout: the layout whose image ``frame`` is over.
        frame: `image_lens_frame` output.
        image: which image.
        title: chart title.
        width: chart width in pixels; the height keeps the image's aspect.
    """
    picture = layout.images[image].image
    h, w = picture.shape[:2]
    height = max(1, round(width * h / max(w, 1)))
    x_scale = alt.Scale(domain=[0, w], nice=False, zero=False)
    y_scale = alt.Scale(domain=[0, h], nice=False, zero=False, reverse=True)
    cell_px = float((frame["x2"] - frame["x"]).median()) if len(frame) else float(w)
    font = round(min(max(cell_px * width / max(w, 1) / 4, 7), 16))
    x, y = alt.X("x:Q", scale=x_scale, axis=_AXIS_OFF), alt.Y("y:Q", scale=y_scale, axis=_AXIS_OFF)
    tips = [alt.Tooltip("row:Q"), alt.Tooltip("col:Q"), alt.Tooltip("token:Q"), alt.Tooltip("top:N", title="top 3")]
    picture_layer = (
        alt.Chart(pd.DataFrame({"url": [image_data_uri(picture)], "x": [0], "y": [0]}))
        .mark_image(width=width, height=height, align="left", baseline="top")
        .encode(x=x, y=y, url="url:N")
    )
    cells = (
        alt.Chart(frame)
        .mark_rect(fill="black", fillOpacity=0.35, stroke="white", strokeOpacity=0.5, strokeWidth=0.5)
        .encode(x=x, x2="x2:Q", y=y, y2="y2:Q", tooltip=tips)
    )
    words = (
        alt.Chart(frame)
        .mark_text(color="white", fontSize=font, fontWeight="bold", limit=max(cell_px * width / max(w, 1) - 2, 8))
        .encode(x=alt.X("xc:Q", scale=x_scale, axis=_AXIS_OFF), y=alt.Y("yc:Q", scale=y_scale, axis=_AXIS_OFF),
                text="word:N", tooltip=tips)
    )
    # "pad" keeps the plot exactly width x height, so the image mark and the cells stay aligned
    # (see vlcore.charts.base.build_patch_overlay_chart)
    return alt.layer(picture_layer, cells, words).properties(width=width, height=height, title=title,
                                                             autosize=alt.AutoSizeParams(type="pad"))
