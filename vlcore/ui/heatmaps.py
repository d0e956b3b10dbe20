"""Streamlit glue of the attention-heatmaps page: query picking, cached explanations, step-through, export.

The URL is the shareable state (``tok``, ``patch``, ``dir``, ``method``, ``answer``, ``view``); widgets are
seeded from it once per example and write it back on every run.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import streamlit as st

from vlcore import charts_heatmaps as ch
from vlcore import chart_parts as cp
from vlcore import heatmap_maps as hm
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
        data = arrow_bytes(frame)
        names[role] = f"{role}-{hashlib.blake2b(data, digest_size=12).hexdigest()}"
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


def pick_display() -> tuple[str, str, float, bool]:
    """Direction, method, opacity and smoothing (``dir``, ``method`` in the URL)."""
    c1, c2, c3, c4 = st.columns([2, 3, 2, 1])
    direction = c1.segmented_control("Attention", hm.DIRECTIONS, key="hm_dir",
                                     format_func=lambda d: f"{d} the query") or "from"
    method = c2.segmented_control("Map", METHODS, key="hm_method", format_func=METHOD_TITLES.get) or "raw"
    opacity = c3.slider("Heat opacity", 0.0, 1.0, 0.6, 0.05, key="hm_opacity")
    smooth = c4.toggle("Smooth", key="hm_smooth", help="bilinear upsampling of the patch grid")
    set_params(dir=direction, method=method)
    return direction, method, opacity, smooth


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


@st.cache_data(max_entries=8, show_spinner=False)
def cached_rollout(_trace: Trace, model_id: str, example_id: str, text: str, start_layer: int) -> np.ndarray:
    """Attention rollout ``[N, N]`` of the trace (keyed on model, example and start layer)."""
    from vlcore.relevance import compute_rollout

    return compute_rollout(_trace, start_layer)


@st.cache_data(max_entries=32, show_spinner="Computing gradient relevancy (one forward and backward pass)…")
def cached_relevancy(_adapter, _example, model_id: str, example_id: str, text: str, answer: str | None) -> np.ndarray:
    """Relevancy values ``[N]`` of the example for one answer."""
    from vlcore.extract import model_image_input
    from vlcore.relevance import extract_relevancy

    return extract_relevancy(_adapter, model_image_input(_adapter, _example), _example.question, answer).values


@st.cache_data(max_entries=64, show_spinner="Removing patches in order and re-running the model…")
def cached_curve(_adapter, _example, model_id: str, example_id: str, text: str, values: np.ndarray,
                 answer: str | None, order: str):
    """A perturbation curve (`vlcore.faithfulness.compute_perturbation_curve`) for one map and order."""
    from vlcore.extract import model_image_input
    from vlcore.faithfulness import compute_perturbation_curve

    return compute_perturbation_curve(_adapter, model_image_input(_adapter, _example), _example.question, values,
                                      answer=answer, order=order, seed=0, n_random=3 if order == "random" else 1)


def method_map(method: str, trace: Trace, layer: int, head: int | None, query: Query, direction: str,
               adapter=None, example=None, answer: str | None = None, start_layer: int = 0) -> np.ndarray:
    """The ``[N]`` map shown for a method: raw (this head), rollout (from ``start_layer``) or relevancy ([CLS])."""
    if method == "raw":
        return hm.compute_query_map(trace.head_attention(layer, head), query.tokens, direction)
    if method == "rollout":
        rollout = cached_rollout(trace, trace.model_id, trace.example_id, trace.text, start_layer)
        return hm.compute_query_map(rollout, query.tokens, direction)
    return cached_relevancy(adapter, example, trace.model_id, trace.example_id, trace.text, answer)


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


def show_query_views(trace: Trace, values: np.ndarray, query: Query, title: str, opacity: float, smooth: bool,
                     clickable: bool = True) -> dict[str, Callable]:
    """Overlay (clickable patches), token chips and special-token bars for one map.

    Returns:
        name → a function building the chart as an Altair object (for the export section).
    """
    select_name = "patch" if clickable else None
    tokens = query.tokens.tolist()
    left, right = st.columns(2)
    with left:
        overlay = ch.overlay_parts(trace, values, query.cells, opacity, smooth, title=title, width=340,
                                   select_name=select_name)
        if clickable:
            show_parts(overlay, key="hm_click", on_select=_on_overlay_click, selection_mode="patch")
        else:
            show_parts(overlay)
    with right:
        show_parts(ch.token_chips_parts(trace, values, tokens, title="Text tokens", width=CHIPS_WIDTH))
        show_parts(ch.special_weights_parts(trace, values))
    return {
        "overlay": lambda: ch.build_attention_overlay_chart(trace, values, query.cells, opacity, smooth, title=title,
                                                            width=340, select_name=select_name),
        "text tokens": lambda: ch.build_token_chips_chart(trace, values, tokens, title="Text tokens", width=CHIPS_WIDTH),
        "special tokens": lambda: ch.build_special_weights_chart(trace, values),
    }


def show_matrices(trace: Trace, att: np.ndarray, title: str) -> str:
    """The full matrix with modality separators, or one of the four blocks (one chart per run keeps it fast).

    Returns:
        The block shown (``"full"`` or a key of ``BLOCK_TITLES``).
    """
    options = ["full", *ch.BLOCK_TITLES]
    block = st.segmented_control("Matrix", options, key="hm_block", default="full",
                                 format_func=lambda b: "full query × key" if b == "full" else ch.BLOCK_TITLES[b]) or "full"
    if block == "full":
        show_parts(ch.matrix_parts(trace, att, title=title, size=440))
    else:
        show_parts(ch.block_parts(trace, att, block, size=440))
    st.caption("Rows are queries (attending), columns keys (attended to); hover a cell for both tokens. "
               "White rules separate text from image tokens; the blocks leave out [CLS], [SEP] and [IMG].")
    return block


def _step(delta: int, n: int) -> None:
    st.session_state["hm_step"] = (int(st.session_state.get("hm_step", 0)) + delta) % n


def show_step_through(trace: Trace, layer: int, head: int | None, direction: str, opacity: float, smooth: bool,
                      interval_s: float = 1.0) -> None:
    """Play through the text tokens one by one (a fragment timer), or step with buttons and a slider."""
    n = len(trace.text_index(include_special=True))
    if st.session_state.get("hm_step", 0) >= n:
        st.session_state["hm_step"] = 0
    c1, c2, c3 = st.columns([1, 1, 4])
    c1.button("◀ previous", key="hm_prev", on_click=_step, args=(-1, n))
    c2.button("next ▶", key="hm_next", on_click=_step, args=(1, n))
    playing = c3.toggle("Play", key="hm_play", help=f"advance one token every {interval_s:.1f} s")
    att = trace.head_attention(layer, head)

    @st.fragment(run_every=interval_s if playing else None)
    def frame() -> None:
        now = time.monotonic()
        if playing and now - st.session_state.get("hm_step_at", 0.0) >= 0.9 * interval_s:
            st.session_state["hm_step_at"] = now
            _step(1, n)
        st.slider("Token", 0, n - 1, key="hm_step")
        i = int(st.session_state["hm_step"])
        values = hm.compute_query_map(att, [i], direction)
        show_parts(ch.overlay_parts(trace, values, opacity=opacity, smooth=smooth, select_name=None, width=300,
                                    title=f"attention {direction} token {i} “{trace.tokens[i]}”"))
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


def show_explanations(trace: Trace, maps: dict[str, np.ndarray], titles: dict[str, str], adapter, example,
                      answer: str | None, opacity: float, smooth: bool) -> None:
    """Each explanation's overlay and text colouring, and (on request) its perturbation curve and AUC."""
    score = st.toggle("Score faithfulness: remove patches in order of each map and re-run the model "
                      "(a few dozen forward passes per map, cached)", key="hm_faith")
    for col, (method, values) in zip(st.columns(len(maps)), maps.items()):
        with col:
            show_parts(ch.overlay_parts(trace, values, opacity=opacity, smooth=smooth, title=titles[method],
                                        width=260, select_name=None))
            show_parts(ch.token_chips_parts(trace, values, width=260))
            if not score:
                continue
            try:
                curves = {order: cached_curve(adapter, example, trace.model_id, trace.example_id, trace.text,
                                              np.asarray(values, dtype=np.float32), answer, order)
                          for order in ("positive", "random")}
            except VLScopeError as exc:
                st.error(str(exc))
                continue
            show_chart(ch.build_perturbation_chart(curves, title="faithfulness", width=220))
            drop = curves["random"].auc - curves["positive"].auc
            st.metric("AUC, relevance order", f"{curves['positive'].auc:.3f}", f"{-drop:+.3f} vs random",
                      delta_color="inverse")
    if score:
        st.caption("Lower AUC = the answer's probability falls faster when the map's top patches are removed: "
                   "a more faithful map. The random order is the baseline.")
