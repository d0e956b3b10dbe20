"""Attention-heatmap views: query maps, overlays, token chips, matrices, head grids, curves, exports.

Pure functions: numpy/pandas in, Altair charts (or bytes for exports) out. The heatmaps page
(`pages/4_Attention_Heatmaps.py`) renders them; the tests read their data directly.

Token order is the trace's: ``[text (CLS first, SEP last) | image CLS | patches row-major]``.
A *query* is one token or several (patches selected together); its map is the mean of their rows
(attention **from** the query) or of their columns (attention **to** the query).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import altair as alt
import numpy as np
import pandas as pd
from altair.utils import schemapi
from PIL import Image

from vlcore.charts import image_data_uri, patch_frame
from vlcore.trace import IMAGE, TEXT, Trace

DIRECTIONS = ("from", "to")
SCHEME = "inferno"
_AXIS_OFF = alt.Axis(title=None, labels=False, ticks=False, grid=False, domain=False)
_PATCH = re.compile(r"^\s*(-?\d+)\.(-?\d+)\s*$")


def _fast(build: Callable) -> Callable:
    """Build without Altair validating every intermediate object (a third of a page rerun on a 234-token
    trace). The finished chart is still validated by ``to_dict()``, as the tests do; the page skips that
    too (`unvalidated`)."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with schemapi.debug_mode(False):
            return build(*args, **kwargs)

    return wrapper


def unvalidated(chart: alt.TopLevelMixin) -> alt.TopLevelMixin:
    """The chart, serialised without schema validation when Streamlit calls ``chart.to_dict()``.

    Every builder's output is validated in tests/test_charts_heatmaps.py; skipping it at render time
    saves ~20 ms per chart.
    """
    object.__setattr__(chart, "to_dict", functools.partial(chart.to_dict, validate=False))
    return chart


# ---------------------------------------------------------------------------------------
# Queries and maps (pure numpy)
# ---------------------------------------------------------------------------------------


def has_image_tokens(trace: Trace) -> bool:
    """Whether the trace has image patches to draw a heatmap on (False for a text-only trace).

    >>> from vlcore.trace import Trace
    >>> t = Trace("e", "m", ("[CLS]", "a", "[SEP]"), np.zeros(3, np.int8), np.array([1, 0, 1], bool),
    ...           np.full((3, 2), -1, np.int16), (0, 0), np.zeros((0, 0, 3), np.uint8), 8, None, None)
    >>> has_image_tokens(t)
    False
    """
    return bool(trace.grid[0] * trace.grid[1] > 0 and (trace.patch_rc[:, 0] >= 0).any() and trace.image.size)


def compute_query_map(attention: np.ndarray, query: Sequence[int], direction: str = "from") -> np.ndarray:
    """The map of a query in one attention matrix: float32 ``[N]``.

    Args:
        attention: ``[N, N]`` (rows queries, columns keys): one head, the mean, or a rollout.
        query: token indices; several give the mean of their maps.
        direction: ``"from"`` (the query's rows: what it attends to) or ``"to"`` (its columns: how
            much every token attends to it).

    >>> a = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    >>> compute_query_map(a, [1]).tolist(), compute_query_map(a, [0], "to").tolist()
    ([0.0, 0.0, 1.0], [0.5, 0.0, 1.0])
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    q = np.asarray(list(query), dtype=np.int64)
    if q.size == 0:
        raise ValueError("a query needs at least one token")
    rows = attention[q] if direction == "from" else attention[:, q].T
    return rows.mean(0, dtype=np.float32)


def compute_head_maps(trace: Trace, layer: int, query: Sequence[int], direction: str = "from") -> np.ndarray:
    """The query's map in every head of one layer: float32 ``[H, N]``."""
    att = trace.attentions[layer]  # [H, N, N] float16
    q = np.asarray(list(query), dtype=np.int64)
    rows = att[:, q, :] if direction == "from" else np.swapaxes(att[:, :, q], 1, 2)
    return rows.mean(1, dtype=np.float32)


def parse_patches(text: str | None, grid: tuple[int, int]) -> tuple[list[tuple[int, int]], list[str]]:
    """Patch cells from the URL form ``"row.col,row.col"``.

    Malformed entries are dropped; cells outside the grid move to the nearest cell inside it.

    Returns:
        ``(cells, problems)``: unique (row, col) cells in the order given, and one line per problem.

    >>> parse_patches("1.2,x,9.0", (2, 3))
    ([(1, 2), (1, 0)], ['`x` is not row.col', '`9.0` is outside the 2×3 grid; using 1.0'])
    """
    cells: list[tuple[int, int]] = []
    problems: list[str] = []
    rows, cols = grid
    for part in (text or "").split(","):
        if not part.strip():
            continue
        m = _PATCH.match(part)
        if m is None:
            problems.append(f"`{part.strip()}` is not row.col")
            continue
        r, c = int(m.group(1)), int(m.group(2))
        if rows * cols == 0:
            problems.append(f"`{part.strip()}`: this example has no image patches")
            continue
        if not (0 <= r < rows and 0 <= c < cols):
            r, c = min(max(r, 0), rows - 1), min(max(c, 0), cols - 1)
            problems.append(f"`{part.strip()}` is outside the {rows}×{cols} grid; using {r}.{c}")
        if (r, c) not in cells:
            cells.append((r, c))
    return cells, problems


def format_patches(cells: Sequence[tuple[int, int]]) -> str:
    """The URL form of patch cells.

    >>> format_patches([(1, 2), (0, 0)])
    '1.2,0.0'
    """
    return ",".join(f"{r}.{c}" for r, c in cells)


def patch_token_indices(trace: Trace, cells: Sequence[tuple[int, int]]) -> np.ndarray:
    """Token indices of patch cells (cells with no patch token are skipped)."""
    idx, rc = trace.patch_positions()
    lookup = {(int(r), int(c)): int(i) for i, (r, c) in zip(idx, rc)}
    return np.array([lookup[cell] for cell in cells if cell in lookup], dtype=np.int64)


def token_label(trace: Trace, index: int) -> str:
    """``"index:token"``: a unique, readable name of a token."""
    return f"{index}:{trace.tokens[index]}"


# ---------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------

_URI_CACHE: OrderedDict[str, str] = OrderedDict()


def cached_image_uri(image: np.ndarray) -> str:
    """The image as a data URI (PNG; JPEG above 256×256 pixels), memoised on the pixels' digest.

    Traces are reloaded from the store on every page run, so the cache cannot key on the array object.
    """
    key = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest() + str(image.shape)
    if key not in _URI_CACHE:
        _URI_CACHE[key] = image_data_uri(image) if image.shape[0] * image.shape[1] <= 256 * 256 else _jpeg_uri(image)
        while len(_URI_CACHE) > 16:
            _URI_CACHE.popitem(last=False)
    _URI_CACHE.move_to_end(key)
    return _URI_CACHE[key]


def _jpeg_uri(image: np.ndarray, quality: int = 90) -> str:
    """JPEG data URI for large images (a photo's PNG is several times larger to send on every rerun)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def upsample_bilinear(grid: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upsampling of a ``[R, C]`` grid to ``[R * factor, C * factor]`` (cell centres aligned).

    NaN cells count as the mean of the others.

    >>> upsample_bilinear(np.array([[0.0, 1.0]]), 2)[0].round(2).tolist()
    [0.0, 0.25, 0.75, 1.0]
    """
    g = np.where(np.isnan(grid), np.nanmean(grid) if np.isfinite(grid).any() else 0.0, grid).astype(np.float64)
    rows, cols = g.shape

    def centres(n: int) -> np.ndarray:
        return np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0, n - 1)

    ys, xs = centres(rows), centres(cols)
    along_x = np.stack([np.interp(xs, np.arange(cols), g[r]) for r in range(rows)])  # [R, C*f]
    return np.stack([np.interp(ys, np.arange(rows), along_x[:, j]) for j in range(cols * factor)], axis=1)


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


@_fast
def build_attention_overlay_chart(
    trace: Trace,
    values: np.ndarray,
    selected: Sequence[tuple[int, int]] = (),
    opacity: float = 0.6,
    smooth: bool = False,
    title: str = "",
    width: int = 320,
    select_name: str | None = "patch",
) -> alt.LayerChart:
    """The image as the model saw it, a heat layer per patch placed by ``patch_rc``, selected patches outlined.

    Args:
        trace: supplies the image, ``patch_rc`` and ``patch_px``.
        values: ``[N]`` per-token weights; only patch tokens are drawn (specials never set the scale).
        selected: (row, col) cells to outline (the query patches).
        opacity: opacity of the heat layer.
        smooth: draw a bilinear upsampling of the patch grid instead of flat patches.
        title: chart title.
        width: width in pixels; the height keeps the image's aspect.
        select_name: name of a point selection on the patch rectangles (fields ``row, col``; shift-click
            adds patches), or None for a static chart.
    """
    h, w = trace.image.shape[:2]
    height = max(1, int(round(width * h / max(w, 1))))
    xs = alt.Scale(domain=[0, w], nice=False, zero=False)
    ys = alt.Scale(domain=[0, h], nice=False, zero=False, reverse=True)
    pos = dict(x=alt.X("x:Q", scale=xs, axis=_AXIS_OFF), x2=alt.X2("x2"), y=alt.Y("y:Q", scale=ys, axis=_AXIS_OFF),
               y2=alt.Y2("y2"))
    image = alt.Chart(pd.DataFrame({"url": [cached_image_uri(trace.image)], "x": [0], "y": [0]})).mark_image(
        width=width, height=height, align="left", baseline="top"
    ).encode(x=alt.X("x:Q", scale=xs, axis=_AXIS_OFF), y=alt.Y("y:Q", scale=ys, axis=_AXIS_OFF), url=alt.Url("url:N"))
    patches = patch_frame(trace, values)
    color = alt.Color("value:Q", scale=alt.Scale(scheme=SCHEME), title="weight")
    tooltip = [alt.Tooltip("row:Q"), alt.Tooltip("col:Q"), alt.Tooltip("token:Q"), alt.Tooltip("value:Q", format=".4f")]
    layers = [image]
    if smooth:
        layers.append(alt.Chart(smooth_frame(trace, values)).mark_rect(opacity=opacity).encode(**pos, color=color))
        hit = alt.Chart(patches).mark_rect(opacity=0.001).encode(**pos, tooltip=tooltip)
    else:
        hit = alt.Chart(patches).mark_rect(opacity=opacity).encode(**pos, color=color, tooltip=tooltip)
    if select_name:
        hit = hit.add_params(alt.selection_point(name=select_name, fields=["row", "col"], on="click", clear="dblclick"))
    layers.append(hit)
    if selected:
        sel = patches[[(r, c) in set(selected) for r, c in zip(patches["row"], patches["col"])]]
        layers.append(alt.Chart(sel).mark_rect(fill=None, stroke="#00e5ff", strokeWidth=2).encode(**pos))
    return alt.layer(*layers).properties(width=width, height=height, title=title)


# ---------------------------------------------------------------------------------------
# Text tokens
# ---------------------------------------------------------------------------------------


def token_chips_frame(trace: Trace, values: np.ndarray, selected: Sequence[int] = (), width: int = 640) -> pd.DataFrame:
    """Layout of the non-special text tokens as chips wrapped into lines.

    Returns:
        Columns ``token, text, value, x, x2, line, selected`` (x in pixels).
    """
    idx = trace.text_index()
    x, line, rows = 0.0, 0, []
    for i in idx:
        text = trace.tokens[i]
        w = 12 + 7.5 * len(text)
        if x + w > width and x > 0:
            x, line = 0.0, line + 1
        rows.append((int(i), text, float(values[i]), x, x + w, line, int(i) in set(selected)))
        x += w + 4
    return pd.DataFrame(rows, columns=["token", "text", "value", "x", "x2", "line", "selected"])


@_fast
def build_token_chips_chart(
    trace: Trace, values: np.ndarray, selected: Sequence[int] = (), title: str = "", width: int = 640
) -> alt.LayerChart:
    """The text tokens (specials left out) as a row of chips coloured by the weight they get."""
    frame = token_chips_frame(trace, values, selected, width)
    n_lines = int(frame["line"].max()) + 1 if len(frame) else 1
    top = float(frame["value"].max()) if len(frame) else 1.0
    frame["mid"] = (frame["x"] + frame["x2"]) / 2
    frame["dark"] = frame["value"] > 0.55 * top
    xs = alt.Scale(domain=[0, width], nice=False, zero=False)
    pos = dict(x=alt.X("x:Q", scale=xs, axis=None), x2=alt.X2("x2"), y=alt.Y("line:O", axis=None))
    chip = alt.Chart(frame).mark_rect(cornerRadius=4, height=22).encode(
        **pos, color=alt.Color("value:Q", scale=alt.Scale(scheme="blues", domainMin=0), title="weight"),
        tooltip=[alt.Tooltip("token:Q"), alt.Tooltip("text:N"), alt.Tooltip("value:Q", format=".4f")],
    )
    label = alt.Chart(frame).mark_text(fontSize=13).encode(
        x=alt.X("mid:Q", scale=xs, axis=None), y=alt.Y("line:O", axis=None), text=alt.Text("text:N"),
        color=alt.Color("dark:N", scale=alt.Scale(domain=[True, False], range=["white", "black"]), legend=None),
    )
    layers = [chip, label]
    if frame["selected"].any():
        layers.append(alt.Chart(frame[frame["selected"]]).mark_rect(
            cornerRadius=4, height=22, fill=None, stroke="#d62728", strokeWidth=2.5).encode(**pos))
    return alt.layer(*layers).properties(width=width, height=30 * n_lines, title=title)


@_fast
def build_special_weights_chart(trace: Trace, values: np.ndarray, title: str = "Special tokens") -> alt.LayerChart:
    """Weights on [CLS], [SEP] and the image CLS, and the total on text and on patches, as bars.

    Kept apart from the overlay and the chips so their (often large) weights do not wash out those scales.
    """
    v = np.asarray(values, dtype=np.float64)
    special = np.flatnonzero(trace.special)
    rows = [(token_label(trace, int(i)), float(v[i]), "special token") for i in special]
    rows.append(("all text (no specials)", float(v[trace.text_index()].sum()), "total"))
    rows.append(("all patches", float(v[trace.image_index()].sum()), "total"))
    frame = pd.DataFrame(rows, columns=["token", "value", "kind"])
    base = alt.Chart(frame).encode(
        y=alt.Y("token:N", sort=None, title=None), x=alt.X("value:Q", title="weight"),
        tooltip=[alt.Tooltip("token:N"), alt.Tooltip("kind:N"), alt.Tooltip("value:Q", format=".4f")],
    )
    bars = base.mark_bar().encode(color=alt.Color("kind:N", scale=alt.Scale(range=["#ff7f0e", "#9e9e9e"]), legend=None))
    text = base.mark_text(align="left", dx=3).encode(text=alt.Text("value:Q", format=".3f"))
    return alt.layer(bars, text).properties(height=22 * len(frame), width=220, title=title)


# ---------------------------------------------------------------------------------------
# Matrices
# ---------------------------------------------------------------------------------------


def matrix_frame(trace: Trace, attention: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> pd.DataFrame:
    """Long form of ``attention[rows][:, cols]``: ``query, key`` (``index:token`` names, categorical), ``value``."""
    labels = np.array([token_label(trace, i) for i in range(trace.n_tokens)], dtype=object)
    sub = attention[np.ix_(rows, cols)]
    return pd.DataFrame({
        "query": pd.Categorical.from_codes(np.repeat(np.arange(len(rows)), len(cols)), categories=labels[rows]),
        "key": pd.Categorical.from_codes(np.tile(np.arange(len(cols)), len(rows)), categories=labels[cols]),
        "value": sub.ravel().astype(np.float32),
    })


@_fast
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
        trace: names the tokens and their modality.
        attention: ``[N, N]`` attention (one head or the mean).
        rows, cols: query and key token indices (default: every token).
        title: chart title.
        size: the larger side in pixels.
        separators: draw rules between text and image tokens.
        fill: stretch the cells to fill a ``size``×``size`` box (cells at most 28 px) instead of square cells.
    """
    rows = np.arange(trace.n_tokens) if rows is None else np.asarray(rows)
    cols = np.arange(trace.n_tokens) if cols is None else np.asarray(cols)
    frame = matrix_frame(trace, attention, rows, cols)
    q_order, k_order = list(frame["query"].cat.categories), list(frame["key"].cat.categories)
    cell = size / max(len(rows), len(cols), 1)
    cell_x, cell_y = (min(size / max(len(cols), 1), 28), min(size / max(len(rows), 1), 28)) if fill else (cell, cell)
    show_x, show_y = len(cols) <= 48, len(rows) <= 48
    x = alt.X("key:O", sort=k_order, title="key (attended to)",
              axis=alt.Axis(labels=show_x, ticks=show_x, labelAngle=-60, grid=False))
    y = alt.Y("query:O", sort=q_order, title="query (attending)", axis=alt.Axis(labels=show_y, ticks=show_y, grid=False))
    heat = alt.Chart(frame).mark_rect().encode(
        x=x, y=y, color=alt.Color("value:Q", scale=alt.Scale(scheme="viridis"), title="weight"),
        tooltip=[alt.Tooltip("query:N"), alt.Tooltip("key:N"), alt.Tooltip("value:Q", format=".4f")],
    )
    layers = [heat]
    if separators:
        seps = pd.DataFrame({"key": _boundaries(trace, cols)}), pd.DataFrame({"query": _boundaries(trace, rows)})
        if len(seps[0]):
            layers.append(alt.Chart(seps[0]).mark_rule(color="white", strokeWidth=1.5).encode(
                x=alt.X("key:O", sort=k_order, bandPosition=0)))
        if len(seps[1]):
            layers.append(alt.Chart(seps[1]).mark_rule(color="white", strokeWidth=1.5).encode(
                y=alt.Y("query:O", sort=q_order, bandPosition=0)))
    return alt.layer(*layers).properties(width=max(1, round(cell_x * len(cols))), height=max(1, round(cell_y * len(rows))),
                                         title=title)


def _boundaries(trace: Trace, index: np.ndarray) -> list[str]:
    """Names of the tokens in ``index`` that start a new modality (text → image)."""
    mod = trace.modality[index]
    return [token_label(trace, int(index[i])) for i in range(1, len(index)) if mod[i] != mod[i - 1]]


BLOCK_TITLES = {"txt2txt": "text → text", "txt2img": "text → image", "img2txt": "image → text",
                "img2img": "image → image"}


@_fast
def build_block_chart(trace: Trace, attention: np.ndarray, block: str, size: int = 260) -> alt.LayerChart:
    """One modality block of the matrix (specials left out), e.g. ``"txt2img"`` (text queries, patch keys)."""
    rows, cols = trace.block_index(block)
    return build_matrix_chart(trace, attention, rows, cols, title=BLOCK_TITLES[block], size=size,
                             separators=False, fill=True)


def matrix_csv(trace: Trace, attention: np.ndarray) -> str:
    """The ``[N, N]`` matrix as CSV, rows and columns named ``index:token`` (rows queries)."""
    labels = [token_label(trace, i) for i in range(trace.n_tokens)]
    frame = pd.DataFrame(np.asarray(attention, dtype=np.float32), index=labels, columns=labels)
    frame.index.name = "query\\key"
    return frame.to_csv(float_format="%.6g")


# ---------------------------------------------------------------------------------------
# Heads, step-through, explanations, faithfulness
# ---------------------------------------------------------------------------------------


@_fast
def build_all_heads_chart(trace: Trace, head_maps: np.ndarray, columns: int = 6, panel: int = 110,
                          title: str = "") -> alt.FacetChart:
    """Small multiples: one patch-grid heatmap per head (``head_maps`` ``[H, N]``), one shared colour scale."""
    idx, rc = trace.patch_positions()
    n_heads = head_maps.shape[0]
    frame = pd.DataFrame({
        "head": np.repeat(np.arange(n_heads), len(idx)),
        "row": np.tile(rc[:, 0].astype(int), n_heads), "col": np.tile(rc[:, 1].astype(int), n_heads),
        "value": head_maps[:, idx].ravel().astype(np.float32),
    })
    rows, cols = trace.grid
    cell = panel / max(rows, cols, 1)
    return alt.Chart(frame).mark_rect().encode(
        x=alt.X("col:O", axis=None), y=alt.Y("row:O", axis=None),
        color=alt.Color("value:Q", scale=alt.Scale(scheme=SCHEME), title="weight"),
        tooltip=[alt.Tooltip("head:Q"), alt.Tooltip("row:Q"), alt.Tooltip("col:Q"), alt.Tooltip("value:Q", format=".4f")],
    ).properties(width=round(cell * cols), height=round(cell * rows)).facet(
        facet=alt.Facet("head:O", title=None, header=alt.Header(labelExpr="'head ' + datum.value")),
        columns=min(columns, n_heads),
    ).properties(title=title)


@_fast
def build_explanations_chart(trace: Trace, maps: Mapping[str, np.ndarray], opacity: float = 0.6,
                             width: int = 260) -> alt.HConcatChart:
    """Overlays of several explanation maps side by side (e.g. raw / rollout / relevancy)."""
    return alt.hconcat(*[
        build_attention_overlay_chart(trace, values, opacity=opacity, title=name, width=width, select_name=None)
        for name, values in maps.items()
    ]).resolve_scale(color="independent")


def curve_frame(curves: Mapping[str, object]) -> pd.DataFrame:
    """Long form of perturbation curves: ``order, fraction, probability, auc``."""
    parts = [pd.DataFrame({"order": name, "fraction": np.asarray(c.fractions, dtype=float),
                           "probability": np.asarray(c.probabilities, dtype=float), "auc": float(c.auc)})
             for name, c in curves.items()]
    return pd.concat(parts, ignore_index=True)


@_fast
def build_perturbation_chart(curves: Mapping[str, object], title: str = "", width: int = 260) -> alt.Chart:
    """Answer probability as patches are removed, one line per order (e.g. positive vs random).

    Args:
        curves: order name → an object with ``fractions``, ``probabilities`` and ``auc``
            (`vlcore.faithfulness.PerturbationCurve`).
    """
    frame = curve_frame(curves)
    frame["label"] = frame["order"] + " (AUC " + frame["auc"].map("{:.3f}".format) + ")"
    return alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("fraction:Q", title="fraction of patches removed", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("probability:Q", title="answer probability"),
        color=alt.Color("label:N", title=None, legend=alt.Legend(orient="bottom", direction="vertical")),
        strokeDash=alt.StrokeDash("order:N", legend=None),
        tooltip=[alt.Tooltip("order:N"), alt.Tooltip("fraction:Q", format=".0%"), alt.Tooltip("probability:Q", format=".4f")],
    ).properties(width=width, height=180, title=title)


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------


def chart_spec_json(chart: alt.TopLevelMixin) -> str:
    """The chart's Vega-Lite spec with its data inline (no row limit)."""
    with alt.data_transformers.enable("default", max_rows=None):
        return chart.to_json(validate=False)


def export_chart(chart: alt.TopLevelMixin, fmt: str, scale: float = 2.0) -> bytes:
    """A chart as a PNG or SVG file (rendered by vl-convert).

    Raises:
        ValueError: ``fmt`` is not ``"png"`` or ``"svg"``.
    """
    import vl_convert as vlc

    spec = chart_spec_json(chart)
    if fmt == "png":
        return vlc.vegalite_to_png(spec, scale=scale)
    if fmt == "svg":
        return vlc.vegalite_to_svg(spec).encode()
    raise ValueError(f"export format must be 'png' or 'svg', got {fmt!r}")


def modality_counts(trace: Trace) -> dict:
    """Token counts for captions: text (with specials), image CLS and patches."""
    return {"text": int((trace.modality == TEXT).sum()), "image": int((trace.modality == IMAGE).sum()),
            "patches": int((trace.patch_rc[:, 0] >= 0).sum())}
