"""Streamlit glue of the attention-heatmaps page: query picking, cached explanations, step-through, export.

The URL is the shareable state (``tok``, ``patch``, ``dir``, ``method``, ``scale``, ``answer``, ``view``; the
layer strip writes ``layer``); widgets are seeded from it once per example and write it back on every run.
Derived results (rollout, relevancy, perturbation curves) are cached on the trace's content fingerprint
(`trace_fingerprint`) and the model's (`model_fingerprint`), never on its example id or text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import streamlit as st

from vlcore.charts import heatmaps as ch
from vlcore.charts import parts as cp
from vlcore.charts import multiples as cm
from vlcore.analysis import query_maps as hm
from vlcore.errors import VLScopeError
from vlcore.trace import Trace
from vlcore.ui.state import get_choice, get_int, get_param, notice, set_params

METHODS = ("raw", "rollout", "relevancy")
METHOD_TITLES = {"raw": "raw attention", "rollout": "attention rollout", "relevancy": "gradient relevancy"}
VIEWS = ("matrices", "heads", "step", "explain", "export")
CHIPS_WIDTH = 380  # the chips' plot width: with its legend it fits half of the page, beside the 340-px overlay
VIEW_TITLES = {"matrices": "Matrices", "heads": "All heads", "step": "Step-through", "explain": "Explanations",
               "export": "Export"}


@dataclass
class Query:
    """The query tokens: one text token, or patches (their maps are averaged)."""

    tokens: np.ndarray
    cells: list[tuple[int, int]]
    label: str


def show_chart(chart, **kwargs):
    """``st.altair_chart`` without Altair's schema validation at render time (the tests validate every builder)."""
    return st.altair_chart(cp.unvalidated(chart), **kwargs)


def arrow_bytes(frame: pd.DataFrame) -> bytes:
    """A data frame as Arrow IPC bytes, as Streamlit sends chart data (categoricals stay dictionary-encoded).

    Built column by column from numpy, without pandas' Arrow conversion (a millisecond or two per frame).
    """
    columns = {}
    for name, series in frame.items():
        if isinstance(series.dtype, pd.CategoricalDtype):
            columns[str(name)] = pa.DictionaryArray.from_arrays(
                series.cat.codes.to_numpy(), pa.array(series.cat.categories.to_numpy(dtype=object), pa.string()))
        else:
            columns[str(name)] = pa.array(series.to_numpy())
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


_SHARED_ARROW: dict[int, tuple[pd.DataFrame, str, bytes]] = {}
_SHARED_ARROW_LOCK = threading.Lock()


def _named_arrow(role: str, frame: pd.DataFrame) -> tuple[str, bytes]:
    """A frame's Arrow bytes and its dataset name (the role and a hash of the bytes).

    A one-row frame that comes back as the same object (`vlcore.charts.parts.image_frame`: an image's data
    URI, a few hundred kB) is converted and hashed once, not on every rerun.
    """
    if len(frame) == 1:
        with _SHARED_ARROW_LOCK:
            known = _SHARED_ARROW.get(id(frame))
        if known is not None and known[0] is frame:
            return f"{role}-{known[1]}", known[2]
    data = arrow_bytes(frame)
    digest = hashlib.blake2b(data, digest_size=12).hexdigest()
    if len(frame) == 1:
        with _SHARED_ARROW_LOCK:
            _SHARED_ARROW[id(frame)] = (frame, digest, data)  # the frame kept alive: its id stays its own
            while len(_SHARED_ARROW) > 16:
                del _SHARED_ARROW[next(iter(_SHARED_ARROW))]
    return f"{role}-{digest}", data


def show_parts(parts: cp.ChartParts, **kwargs):
    """Render `ChartParts` (a cached Altair layout and this run's data) as ``st.altair_chart`` would render
    the matching ``build_*_chart``: the same element, spec and Arrow datasets named by a hash of their bytes.

    Keyword arguments go to ``st.vega_lite_chart`` (``key``, ``on_select``, ``selection_mode``...); the width
    is the chart's own (``width="content"``: the layouts set their plot size and ``autosize`` "pad", and a
    chart stretched to its column would push its legend or axis labels out of it).
    """
    kwargs.setdefault("width", "content")
    datasets, names = {}, {}
    for role, frame in parts.datasets.items():
        names[role], data = _named_arrow(role, frame)
        datasets[names[role]] = data
    spec = parts.spec(names)
    spec["datasets"] = datasets
    return st.vega_lite_chart(spec, **kwargs)


# ---------------------------------------------------------------------------------------
# Query and view controls
# ---------------------------------------------------------------------------------------


def _seed_from_url(trace: Trace) -> None:
    """Set the widgets' state from the URL once per (model, example); malformed values get a notice."""
    n_text = len(trace.text_index(include_special=True))
    cells, problems = hm.parse_patches(get_param("patch"), trace.grid)
    for line in problems:
        notice(f"Link parameter `patch`: {line}.")
    raw = get_param("tok") or ""
    tok = get_int("tok", 0, -(2**62), 2**62)  # malformed: a notice and 0
    if not 0 <= tok < trace.n_tokens:
        near = 0 if tok < 0 else n_text - 1
        notice(f"`tok={raw}` is outside this example's {trace.n_tokens} tokens; showing text token {near} "
               f"({trace.tokens[near]}).")
        tok = near
    if not cells and trace.patch_rc[tok, 0] >= 0:  # a patch token named by index (e.g. from another page)
        cells = [(int(trace.patch_rc[tok, 0]), int(trace.patch_rc[tok, 1]))]
    elif not cells and tok >= n_text:
        notice(f"`tok={tok}` is not a text token or a patch; showing token {n_text - 1} "
               f"({trace.tokens[n_text - 1]}).")
        tok = n_text - 1
    st.session_state["hm_tok"] = None if cells else tok
    st.session_state["hm_patches"] = [f"{r}.{c}" for r, c in cells]
    st.session_state["hm_dir"] = get_choice("dir", hm.DIRECTIONS, "from")
    st.session_state["hm_method"] = get_choice("method", METHODS, "raw")
    st.session_state["hm_scale"] = get_choice("scale", hm.SCALES, "map")
    st.session_state["hm_view"] = get_choice("view", VIEWS, "matrices")
    st.session_state["hm_trace"] = (trace.model_id, trace.example_id)


def _clear_patches() -> None:
    st.session_state["hm_patches"] = []


def _clear_token() -> None:
    st.session_state["hm_tok"] = None


def _on_overlay_click() -> None:
    """A click on the overlay's patches (selection ``patch``) becomes the patch query."""
    event = st.session_state.get("hm_click") or {}
    points = (event.get("selection") or {}).get("patch") or []
    cells = [f"{int(p['row'])}.{int(p['col'])}" for p in points if "row" in p and "col" in p]
    if cells:
        st.session_state["hm_patches"] = cells
        st.session_state["hm_tok"] = None


def pick_query(trace: Trace) -> Query:
    """Token chips (``st.pills``) and a patch picker, seeded from and written to the URL (``tok``, ``patch``)."""
    if st.session_state.get("hm_trace") != (trace.model_id, trace.example_id) or "hm_tok" not in st.session_state:
        _seed_from_url(trace)  # a new example, or back from another page (Streamlit dropped the widget state)
    n_text = len(trace.text_index(include_special=True))
    st.pills("Query token (click a word)", list(range(n_text)), key="hm_tok", on_change=_clear_patches,
             format_func=lambda i: trace.tokens[i])
    _, rc = trace.patch_positions()
    options = [f"{r}.{c}" for r, c in rc]
    st.multiselect("…or query patches (row.col; or click patches on the image, shift-click for several)", options,
                   key="hm_patches", on_change=_clear_token)
    cells = [tuple(int(v) for v in p.split(".")) for p in st.session_state["hm_patches"]]
    tok = st.session_state["hm_tok"]
    if cells:
        set_params(tok=None, patch=hm.format_patches(cells))
        label = f"patch {hm.format_patches(cells)}" if len(cells) == 1 else f"mean of {len(cells)} patches"
        return Query(hm.patch_token_indices(trace, cells), cells, label)
    tok = 0 if tok is None else int(tok)
    set_params(tok=tok, patch=None)
    return Query(np.array([tok]), [], f"token {tok} “{trace.tokens[tok]}”")


@dataclass
class Display:
    """How the maps are drawn: direction, method, colour scale (`vlcore.analysis.query_maps.SCALES`), opacity, smoothing."""

    direction: str
    method: str
    scale: str
    opacity: float
    smooth: bool


def pick_display() -> Display:
    """Direction, method, colour scale, opacity and smoothing (``dir``, ``method``, ``scale`` in the URL)."""
    c1, c2 = st.columns([1, 2])
    direction = c1.segmented_control("Attention", hm.DIRECTIONS, key="hm_dir",
                                     format_func=lambda d: f"{d} the query") or "from"
    method = c2.segmented_control("Map", METHODS, key="hm_method", format_func=METHOD_TITLES.get) or "raw"
    c3, c4, c5 = st.columns([3, 2, 1])
    scale = c3.segmented_control(
        "Colour scale", hm.SCALES, key="hm_scale", format_func=hm.SCALE_TITLES.get,
        help="per map: each map from its own min to its max (a map of near-zero weights looks as strong as any); "
             "shared: one scale from 0 to the largest weight of every map on the page; absolute: 0 to 1, "
             "the share of a row") or "map"
    opacity = c4.slider("Heat opacity", 0.0, 1.0, 0.8, 0.05, key="hm_opacity",
                        help="the heat's opacity at the top of the colour scale; it falls to 0 (transparent) at "
                             "weight 0, so the image shows through low weights")
    smooth = c5.toggle("Smooth", key="hm_smooth", help="bilinear upsampling of the patch grid")
    set_params(dir=direction, method=method, scale=scale)
    return Display(direction, method, scale, opacity, smooth)


def pick_view() -> str:
    """Which lower section runs (only the chosen one is computed), URL ``view``."""
    view = st.segmented_control("Section", VIEWS, key="hm_view", format_func=VIEW_TITLES.get) or "matrices"
    set_params(view=view)
    return view


def answer_options(adapter, trace: Trace) -> list[str]:
    """Labels the relevancy can explain: the trace's top-k first, then every label the model knows."""
    labels = [label for label, _ in trace.prediction]
    config = getattr(adapter, "config", None)
    if getattr(adapter, "task", "") in ("vqa", "nlvr2") and config is not None:
        known = [str(v) for v in config.id2label.values()]
        labels += [label for label in known if label not in set(labels)]
    return labels or ["match"]


def pick_answer(adapter, trace: Trace) -> str | None:
    """The answer explained by relevancy (URL ``answer``; the predicted one by default)."""
    options = answer_options(adapter, trace)
    wanted = get_param("answer")
    if wanted and wanted not in options:
        notice(f"The link's answer `{wanted}` is not a label of {adapter.model_id}; explaining the prediction.")
        wanted = None
    index = options.index(wanted) if wanted else 0
    answer = st.selectbox("Answer to explain (relevancy, faithfulness)", options, index=index, key="hm_answer",
                          format_func=lambda a: f"{a} (predicted)" if a == trace.predicted else a)
    set_params(answer=None if answer == trace.predicted else answer)
    return answer


# ---------------------------------------------------------------------------------------
# Cached computations
# ---------------------------------------------------------------------------------------


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FINGERPRINTS_LOCK = threading.Lock()


def trace_fingerprint(trace: Trace) -> str:
    """A digest of what the trace holds: model id, tokens, text, grid, the image and every attention weight.

    Two traces with the same example id and text but another image, model or dataset get different
    fingerprints. A trace is frozen with read-only arrays, so its digest is computed once per object
    (~20 ms for a 234-token ViLT-B trace) and remembered while the object lives.
    """
    with _FINGERPRINTS_LOCK:
        known = _FINGERPRINTS.get(trace)
    if known is not None:
        return known
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([trace.model_id, list(trace.tokens), trace.text, list(trace.grid),
                              trace.patch_px]).encode())
    for array in (trace.image, trace.patch_rc, trace.attentions):
        if array is None:
            digest.update(b"none")
            continue
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    value = digest.hexdigest()
    with _FINGERPRINTS_LOCK:
        _FINGERPRINTS[trace] = value
    return value


def model_fingerprint(adapter) -> str:
    """A digest of the adapter's fingerprint (model id with revision or weights hash, dtype, processing)."""
    text = json.dumps(adapter.fingerprint(), sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@st.cache_data(max_entries=8, show_spinner=False)
def cached_rollout(_trace: Trace, trace_key: str, start_layer: int) -> np.ndarray:
    """Attention rollout ``[N, N]`` of the trace (keyed on its `trace_fingerprint` and the start layer)."""
    from vlcore.attribution.relevance import compute_rollout

    return compute_rollout(_trace, start_layer)


@st.cache_data(max_entries=32, show_spinner="Computing gradient relevancy (one forward and backward pass)…")
def cached_relevancy(_adapter, _example, trace_key: str, model_key: str, answer: str | None) -> np.ndarray:
    """Relevancy values ``[N]`` of the example for one answer (keyed on the trace's and the model's fingerprints:
    the example is the one the trace was made from)."""
    from vlcore.run.extract import model_image_input
    from vlcore.attribution.relevance import extract_relevancy

    return extract_relevancy(_adapter, model_image_input(_adapter, _example), _example.question, answer).values


@st.cache_data(max_entries=64, show_spinner="Removing patches in order and re-running the model…")
def cached_curve(_adapter, _example, trace_key: str, model_key: str, values: np.ndarray, answer: str | None,
                 order: str):
    """A perturbation curve (`vlcore.attribution.faithfulness.compute_perturbation_curve`) for one map and order."""
    from vlcore.run.extract import model_image_input
    from vlcore.attribution.faithfulness import compute_perturbation_curve

    return compute_perturbation_curve(_adapter, model_image_input(_adapter, _example), _example.question, values,
                                      answer=answer, order=order, seed=0, n_random=3 if order == "random" else 1)


def method_map(method: str, trace: Trace, layer: int, head: int | None, query: Query, direction: str,
               adapter=None, example=None, answer: str | None = None, start_layer: int = 0) -> np.ndarray:
    """The ``[N]`` map shown for a method: raw (this head), rollout (from ``start_layer``) or relevancy ([CLS])."""
    if method == "raw":
        return hm.compute_query_map(trace.head_attention(layer, head), query.tokens, direction)
    if method == "rollout":
        rollout = cached_rollout(trace, trace_fingerprint(trace), start_layer)
        return hm.compute_query_map(rollout, query.tokens, direction)
    return cached_relevancy(adapter, example, trace_fingerprint(trace), model_fingerprint(adapter), answer)


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


def show_query_views(trace: Trace, values: np.ndarray, query: Query, title: str, display: Display,
                     domain: tuple[float, float] | None, clickable: bool = True) -> dict[str, Callable]:
    """Overlay (clickable patches; the image's share of the map under its title), token chips and
    special-token bars for one map.

    Returns:
        name → a function building the chart as an Altair object (for the export section).
    """
    select_name = "patch" if clickable else None
    tokens = query.tokens.tolist()
    relevance = display.method == "relevancy"
    subtitle = hm.image_share_caption(trace, values, display.direction, relevance)
    shares = not relevance and display.direction == "from"
    overlay_args = dict(selected=query.cells, opacity=display.opacity, smooth=display.smooth, title=title, width=340,
                        select_name=select_name, domain=domain, subtitle=subtitle)
    left, right = st.columns(2)
    with left:
        overlay = ch.overlay_parts(trace, values, **overlay_args)
        if clickable:
            show_parts(overlay, key="hm_click", on_select=_on_overlay_click, selection_mode="patch")
        else:
            show_parts(overlay)
    with right:
        show_parts(ch.token_chips_parts(trace, values, tokens, title="Text tokens", width=CHIPS_WIDTH))
        show_parts(ch.special_weights_parts(trace, values, shares=shares))
    return {
        "overlay": lambda: ch.build_attention_overlay_chart(trace, values, **overlay_args),
        "text tokens": lambda: ch.build_token_chips_chart(trace, values, tokens, title="Text tokens", width=CHIPS_WIDTH),
        "special tokens": lambda: ch.build_special_weights_chart(trace, values, shares=shares),
    }


STRIP_SELECTION = "pick_layer"


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


def layer_strip_captions(trace: Trace, layer_maps: np.ndarray, direction: str) -> list[str]:
    """Each layer's image share, short enough for a small map ("img 12.3%"; "to": the patches' mean)."""
    return [f"img {hm.format_share(hm.compute_image_share(trace, m, direction))}" for m in layer_maps]


def show_layer_strip(trace: Trace, layer_maps: np.ndarray, layer: int, head_text: str, query: Query, display: Display,
                     domain: tuple[float, float] | None) -> Callable:
    """Every layer's raw map of the query (this head), side by side; a click on one shows that layer.

    Returns:
        A function building the strip as an Altair object (for the export section).
    """
    title = f"Every layer: raw attention {display.direction} {query.label}, {head_text} (click a map to show its layer)"
    args = dict(domain=domain, selected=layer, captions=layer_strip_captions(trace, layer_maps, display.direction),
                opacity=display.opacity, title=title)
    key = f"hm_layers_{layer}"  # a new widget per shown layer: a click on a map picked before still registers
    show_parts(cm.layer_strip_parts(trace, layer_maps, **args), key=key,
               on_select=functools.partial(_on_layer_click, key), selection_mode=STRIP_SELECTION)
    what = "of this row" if display.direction == "from" else "of each patch's row to the query (mean)"
    st.caption(f"Under each layer: the image's share {what}. The informative layer is often not the last.")
    return lambda: cm.build_layer_strip_chart(trace, layer_maps, select_name=None, **args)


def scale_domain(trace: Trace, maps: list[np.ndarray], scale: str) -> tuple[float, float] | None:
    """The colour domain of every map drawn this run (`vlcore.analysis.query_maps.compute_domain` on their patches).

    Args:
        maps: arrays ``[..., N]``: one map, or a stack (every layer, head or step-through token).
    """
    rows = [row for m in maps for row in np.asarray(m).reshape(-1, trace.n_tokens)]
    return hm.compute_domain([hm.patch_values(trace, row) for row in rows], scale)


def scale_caption(scale: str, domain: tuple[float, float] | None) -> str:
    """What the colours mean under a scale, with its range."""
    what = {"map": "each map from its own min to its max (compare shapes, not strengths)",
            "shared": "one scale for every map on this page", "absolute": "weights as shares of a row"}[scale]
    span = "" if domain is None else f", {domain[0]:.3g} to {domain[1]:.3g}"
    return f"Colour scale: {what}{span}. The heat's opacity grows with the weight: zero is transparent."


def step_maps(trace: Trace, layer: int, head: int | None, direction: str) -> np.ndarray:
    """The step-through's maps: one per text token ``[T, N]`` (so a shared scale holds while it plays)."""
    att = trace.head_attention(layer, head)
    rows = trace.text_index(include_special=True)
    return att[rows] if direction == "from" else att[:, rows].T


def show_matrices(trace: Trace, att: np.ndarray, title: str) -> str:
    """The full matrix with modality separators, or one of the four blocks (one chart per run keeps it fast).

    The block picker sits in a column of its own, left of the chart: above the chart it was covered by the
    chart's toolbar.

    Returns:
        The block shown (``"full"`` or a key of ``BLOCK_TITLES``).
    """
    options = ["full", *ch.BLOCK_TITLES]
    picker, chart = st.columns([1, 4])
    block = picker.radio("Matrix", options, key="hm_block", index=0,
                         format_func=lambda b: "full query × key" if b == "full" else ch.BLOCK_TITLES[b]) or "full"
    with chart:
        if block == "full":
            show_parts(ch.matrix_parts(trace, att, title=title, size=440))
        else:
            show_parts(ch.block_parts(trace, att, block, size=440))
        st.caption("Rows are queries (attending), columns keys (attended to); hover a cell for both tokens. "
                   "White rules separate text from image tokens; the blocks leave out [CLS], [SEP] and [IMG].")
    return block


def _step(delta: int, n: int) -> None:
    st.session_state["hm_step"] = (int(st.session_state.get("hm_step", 0)) + delta) % n


def show_step_through(trace: Trace, layer: int, head: int | None, display: Display,
                      domain: tuple[float, float] | None, interval_s: float = 1.0) -> None:
    """Play through the text tokens one by one (a fragment timer), or step with buttons and a slider."""
    n = len(trace.text_index(include_special=True))
    if st.session_state.get("hm_step", 0) >= n:
        st.session_state["hm_step"] = 0
    c1, c2, c3 = st.columns([1, 1, 4])
    c1.button("◀ previous", key="hm_prev", on_click=_step, args=(-1, n))
    c2.button("next ▶", key="hm_next", on_click=_step, args=(1, n))
    playing = c3.toggle("Play", key="hm_play", help=f"advance one token every {interval_s:.1f} s")
    att = trace.head_attention(layer, head)
    direction = display.direction

    @st.fragment(run_every=interval_s if playing else None)
    def frame() -> None:
        now = time.monotonic()
        if playing and now - st.session_state.get("hm_step_at", 0.0) >= 0.9 * interval_s:
            st.session_state["hm_step_at"] = now
            _step(1, n)
        st.slider("Token", 0, n - 1, key="hm_step")
        i = int(st.session_state["hm_step"])
        values = hm.compute_query_map(att, [i], direction)
        show_parts(ch.overlay_parts(trace, values, opacity=display.opacity, smooth=display.smooth, select_name=None,
                                    width=300, title=f"attention {direction} token {i} “{trace.tokens[i]}”",
                                    domain=domain, subtitle=hm.image_share_caption(trace, values, direction)))
        show_parts(ch.token_chips_parts(trace, values, [i], width=CHIPS_WIDTH))

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


def explanation_maps(trace: Trace, layer: int, head: int | None, start_layer: int, adapter, example,
                     answer: str | None) -> dict[str, np.ndarray]:
    """The three [CLS] maps side by side: raw (this layer/head), rollout (from ``start_layer``), relevancy."""
    cls = Query(np.array([0]), [], "[CLS]")
    return {method: method_map(method, trace, layer, head, cls, "from", adapter, example, answer, start_layer)
            for method in METHODS}


def explanation_captions(trace: Trace, maps: dict[str, np.ndarray]) -> dict[str, str]:
    """The image's share of each explanation map ([CLS] rows, and the relevance)."""
    return {method: hm.image_share_caption(trace, values, "from", method == "relevancy")
            for method, values in maps.items()}


def show_explanations(trace: Trace, maps: dict[str, np.ndarray], titles: dict[str, str], adapter, example,
                      answer: str | None, display: Display, domain: tuple[float, float] | None) -> None:
    """Each explanation's overlay and text colouring, and (on request) its perturbation curve and AUC."""
    score = st.toggle("Score faithfulness: remove patches in order of each map and re-run the model "
                      "(a few dozen forward passes per map, cached)", key="hm_faith")
    captions = explanation_captions(trace, maps)
    for col, (method, values) in zip(st.columns(len(maps)), maps.items()):
        with col:
            show_parts(ch.overlay_parts(trace, values, opacity=display.opacity, smooth=display.smooth,
                                        title=titles[method], width=260, select_name=None, domain=domain,
                                        subtitle=captions[method]))
            show_parts(ch.token_chips_parts(trace, values, width=260))
            if not score:
                continue
            try:
                curves = {order: cached_curve(adapter, example, trace_fingerprint(trace), model_fingerprint(adapter),
                                              np.asarray(values, dtype=np.float32), answer, order)
                          for order in ("positive", "random")}
            except VLScopeError as exc:
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
