"""Streamlit glue of the attention-heatmaps page: chart rendering, cached explanations, what applies to a block.

The page's controls are in `vlcore.ui.heatmap_controls`, its sections (query views, layer strip, matrices, every
head, step-through, explanations, export) in `vlcore.ui.heatmap_views`. Derived results (rollout, relevancy,
perturbation curves) are cached on the trace's content fingerprint (`trace_fingerprint`, which covers the viewed
block) and the model's (`model_fingerprint`), never on its example id or text.

What applies to a block (`method_reason`): rollout needs a self-attention block (a cross block's rows and columns
are different tokens); gradient relevancy uses the single-stream rules on a self block
(`vlcore.attribution.relevance`, or per tower into a pooling head: `vlcore.attribution.towers`) and the bi-modal
rules through a cross block (`vlcore.attribution.bimodal`: the text→image map).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
import weakref
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import streamlit as st

from vlcore.charts import parts as cp
from vlcore.analysis import query_maps as hm
from vlcore.trace import Trace
from vlcore.ui.heatmap_controls import (METHOD_TITLES, METHODS, VIEW_TITLES, VIEWS, Display, Query,  # noqa: F401
                                        answer_options, pick_answer, pick_display, pick_query, pick_view)

CHIPS_WIDTH = 380  # the chips' plot width: with its legend it fits half of the page, beside the 340-px overlay


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
# Cached computations
# ---------------------------------------------------------------------------------------


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FINGERPRINTS_LOCK = threading.Lock()


def trace_fingerprint(trace: Trace) -> str:
    """A digest of what the trace holds: model id, the viewed block, its tokens, text, grid, the image and every
    attention weight of the block.

    Two traces with the same example id and text but another image, model or dataset get different
    fingerprints. A trace is frozen with read-only arrays, so its digest is computed once per object
    (~20 ms for a 234-token trace of a base-size joint encoder) and remembered while the object lives.
    """
    with _FINGERPRINTS_LOCK:
        known = _FINGERPRINTS.get(trace)
    if known is not None:
        return known
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([trace.model_id, trace.view, list(trace.tokens), list(trace.key_layout.tokens),
                              trace.text, list(trace.grid), trace.patch_px]).encode())
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
def cached_relevancy(_adapter, _example, trace_key: str, model_key: str, answer: str | None,
                     block: str | None = None) -> np.ndarray:
    """Relevancy values of the example for one answer, on the side of ``block`` they explain (keyed on the trace's
    and the model's fingerprints: the example is the one the trace was made from).

    A self block (default: the adapter's default block): the single-stream map ``[N]`` of its default query, or,
    for a tower whose head pools every token (no default query), the map into its pooling block. A cross block:
    the bi-modal map ``[K]`` of its query stream's default token over the key stream (the image).
    """
    from vlcore.attribution.dispatch import extract_block_relevancy
    from vlcore.run.extract import model_image_input

    return extract_block_relevancy(_adapter, model_image_input(_adapter, _example), _example.question, answer, block)


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
    """The map shown for a method: raw (this head), rollout (from ``start_layer``) or relevancy (the block's
    default query; see `cached_relevancy`).

    Raw and rollout maps lie on the keys (``direction`` "from") or the queries ("to"); a relevancy map lies on the
    keys (`relevancy_direction`). Rollout needs a self block (`method_reason`).
    """
    if method == "raw":
        return hm.compute_query_map(trace.head_attention(layer, head), query.tokens, direction)
    if method == "rollout":
        rollout = cached_rollout(trace, trace_fingerprint(trace), start_layer)
        return hm.compute_query_map(rollout, query.tokens, direction)
    return cached_relevancy(adapter, example, trace_fingerprint(trace), model_fingerprint(adapter), answer,
                            trace.view)


def relevancy_direction() -> str:
    """The direction a relevancy map takes: over the keys the explained token reads (``"from"``)."""
    return "from"


def method_reason(method: str, trace: Trace, adapter) -> str | None:
    """One line on why ``method`` does not apply to the viewed block (the page then shows raw attention), or None.

    Rollout multiplies a block's layers into a token-to-token matrix: a cross block alone has none. Gradient
    relevancy through a cross block needs the bi-modal rules (`vlcore.attribution.bimodal`).
    """
    if method == "rollout" and not trace.block.is_self and stored_rollout(trace) is None and trace.meta.get("generates"):
        return (f"Rollout was not computed for this example: its decoder holds {len(trace.key_layout.tokens)} tokens "
                f"in {trace.n_layers} layers, past the memory a rollout may take during the pass (layers x tokens² "
                "under 2^26). Showing raw attention.")
    if method == "rollout" and not trace.block.is_self and stored_rollout(trace) is None:
        return (f"Rollout does not apply to a cross block alone: {trace.view}'s rows and columns are different "
                "tokens, so its layers do not multiply into one token-to-token matrix (roll out a self-attention "
                "block instead). Showing raw attention.")
    if method == "relevancy" and not trace.block.is_self and not bimodal_available():
        return (f"Gradient relevancy through {trace.view} (the bi-modal rules of Chefer et al. 2021, which "
                "propagate relevancy through the cross-attention) is coming. Showing raw attention.")
    if method == "relevancy" and adapter is not None and trace.view not in adapter.block_specs():
        return f"{adapter.model_id} has no block {trace.view} to explain. Showing raw attention."
    return None


def stored_rollout(trace: Trace):
    """The rollout rows the model computed in its pass for the viewed block (`vlcore.attribution.relevance`)."""
    from vlcore.attribution.relevance import stored_rollout as stored

    return stored(trace)


def bimodal_available() -> bool:
    """Whether the bi-modal relevancy module (`vlcore.attribution.bimodal`) is installed."""
    return importlib.util.find_spec("vlcore.attribution.bimodal") is not None


def layer_strip_captions(trace: Trace, layer_maps: np.ndarray, direction: str) -> list[str]:
    """Each layer's image share, short enough for a small map ("img 12.3%"; "to": the patches' mean).

    Args:
        trace: the trace the maps lie on (`vlcore.analysis.query_maps.map_trace`).
    """
    return [f"img {hm.format_share(hm.compute_image_share(trace, m, direction))}" for m in layer_maps]


def scale_domain(trace: Trace, maps: list[np.ndarray], scale: str) -> tuple[float, float] | None:
    """The colour domain of every map drawn this run (`vlcore.analysis.query_maps.compute_domain` on their patches,
    or on their tokens when the maps lie on a stream without an image).

    Args:
        trace: the trace the maps lie on (`vlcore.analysis.query_maps.map_trace`).
        maps: arrays ``[..., N]``: one map, or a stack (every layer, head or step-through token).
    """
    rows = [row for m in maps for row in np.asarray(m).reshape(-1, trace.n_tokens)]
    if hm.has_patches(trace):
        return hm.compute_domain([hm.patch_values(trace, row) for row in rows], scale)
    valid = trace.layout.valid
    return hm.compute_domain([np.asarray(row, np.float64)[valid] for row in rows], scale)


def scale_domains(trace: Trace, maps: list[tuple[np.ndarray, str]], scale: str) -> Callable[[str], tuple | None]:
    """The colour domain of the maps drawn this run, per stream they lie on (`scale_domain`): on a self block
    every map shares one; on a cross block the maps over the image and those over the text get their own.

    Args:
        trace: the trace viewing the block.
        maps: ``(map, direction)`` pairs (a map ``[..., N]`` of that direction).

    Returns:
        direction -> the domain of the maps lying where a map of that direction lies.
    """
    groups: dict[int, tuple[Trace, list[np.ndarray]]] = {}
    for values, direction in maps:
        on = hm.map_trace(trace, direction)
        groups.setdefault(id(on), (on, []))[1].append(values)
    domains = {key: scale_domain(on, group, scale) for key, (on, group) in groups.items()}

    def domain_of(direction: str) -> tuple | None:
        on = hm.map_trace(trace, direction)
        return domains[id(on)] if id(on) in domains else scale_domain(on, [], scale)

    return domain_of


def scale_caption(scale: str, domain: tuple[float, float] | None) -> str:
    """What the colours mean under a scale, with its range."""
    what = {"map": "each map from its own min to its max (compare shapes, not strengths)",
            "shared": "one scale for every map on this page", "absolute": "weights as shares of a row"}[scale]
    span = "" if domain is None else f", {domain[0]:.3g} to {domain[1]:.3g}"
    return f"Colour scale: {what}{span}. The heat's opacity grows with the weight: zero is transparent."


def step_maps(trace: Trace, layer: int, head: int | None, direction: str) -> np.ndarray:
    """The step-through's maps: one per stepped query token (`vlcore.analysis.query_maps.step_tokens`) ``[T, N]``
    (so a shared scale holds while it plays)."""
    att = trace.head_attention(layer, head)
    rows = hm.step_tokens(trace)
    return att[rows] if direction == "from" else att[:, rows].T
