"""Streamlit glue of the head-statistics page: cached statistics, sweep tables, head clicks, importance.

Statistics are per attention block (`vlcore.ui.blocks`): a metric that does not apply to a block is NaN in the
tables (`vlcore.analysis.stats.not_applicable` gives the reason) and shows as "n/a" with that reason, never as 0.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from vlcore.attribution.ablation import (IMPORTANCE_FILE, METRIC as IMPORTANCE, extract_head_importance, extract_sweep_importance,
                             importance_frame, load_sweep_importance, save_sweep_importance)
from vlcore.charts.stats import HEAD_SELECTION
from vlcore.analysis.head_table import head_table, top_heads
from vlcore.analysis.stats import compute_trace_summaries, metric_names, not_applicable
from vlcore.ui.state import set_params

CUSTOM_METRICS_MODULE = "vlscope_metrics"  # an optional module next to streamlit_app.py that registers metrics


def load_custom_metrics() -> None:
    """Import `CUSTOM_METRICS_MODULE` if the deployment has one (it calls `vlcore.analysis.stats.register_metric`)."""
    import importlib

    try:
        importlib.import_module(CUSTOM_METRICS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != CUSTOM_METRICS_MODULE:
            raise

CHART_KEY = "head_chart"
AUTO_IMPORTANCE_HEADS = 64  # models with at most this many heads get head importance without a click


@st.cache_data(max_entries=64, show_spinner="Computing head statistics…")
def trace_stats(trace_key: str, block: str, include_special: bool, metrics: tuple[str, ...], _trace) -> pd.DataFrame:
    """Tidy statistics of one trace's attention block (NaN where a metric does not apply to it).

    Args:
        trace_key: the trace's store key (`vlcore.ui.context.TraceContext.key`): a fingerprint of the model, the
            example's content and the extraction settings. Never the example's id or text: one id names
            different examples in two datasets, and one example gives different traces under two models.
        block: the block summarised (``_trace`` views it).
        include_special, metrics: change the result (``metrics``: the registered metric names).
        _trace: the trace ``trace_key`` names, viewing ``block``.
    """
    return compute_trace_summaries(_trace, include_special=include_special)


def trace_reasons(trace, include_special: bool) -> dict[str, str]:
    """``{metric: why it is n/a}`` for the viewed block of a trace (`vlcore.analysis.stats.not_applicable`)."""
    return not_applicable(trace, include_special=include_special)


def missing_metrics(aggregated: pd.DataFrame) -> set[str]:
    """Metrics with no value in any head (NaN everywhere: they do not apply to the block)."""
    if aggregated.empty:
        return set()
    has_value = aggregated.groupby("metric")["mean"].apply(lambda v: v.notna().any())
    return {str(m) for m, ok in has_value.items() if not ok}


def na_line(metric: str, block: str, reasons: dict[str, str]) -> str:
    """The one line shown for a metric that does not apply to a block.

    >>> na_line("txt2img", "vision.self", {"txt2img": "no text queries in this block"})
    '`txt2img` is n/a on vision.self: no text queries in this block.'
    """
    reason = reasons.get(metric) or f"it is undefined for every head of {block}"
    return f"`{metric}` is n/a on {block}: {reason}."


@st.cache_data(max_entries=8, show_spinner="Reading the sweep…")
def sweep_tables(path: str, updated: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(predictions, head_stats)`` of a sweep folder plus its stored head importance rows; ``updated`` is the
    manifest's and importance file's modification time, so a newer sweep is re-read."""
    from vlcore.storage.sweeps import load_sweep

    preds, heads = load_sweep(path)
    had_file = (Path(path) / IMPORTANCE_FILE).exists()
    importance = load_sweep_importance(path)
    if importance is not None:
        heads = pd.concat([heads, importance], ignore_index=True)
    elif had_file:
        st.info("Dropped a damaged head-importance file of this sweep; compute it again below.")
    heads["metric"] = heads["metric"].astype(str)
    return preds, heads


def sweep_updated(path: Path) -> float:
    stamps = [p.stat().st_mtime for p in (path / "manifest.json", path / IMPORTANCE_FILE) if p.exists()]
    return max(stamps, default=0.0)


def example_importance(adapter, trace_key: str, example_id: str, text: str, image,
                       block: str | None = None) -> tuple[pd.DataFrame, str, float]:
    """Tidy head-importance rows of one example (its predicted answer) for one block's heads, with a progress bar.

    Kept per session, keyed by the trace's store key (model fingerprint and example content, see `trace_stats`),
    rather than in ``st.cache_data``, so that the progress bar shows while it runs and is never replayed from a
    cache.

    Returns:
        ``(rows, answer, base probability)``.
    """
    cache = st.session_state.setdefault("_importance", {})
    block = block or adapter.default_block
    key = (trace_key, block)
    if key not in cache:
        bar = st.progress(0.0, text="Masking heads one at a time…")
        drop, label, base = extract_head_importance(
            adapter, image, text, progress=lambda d, t: bar.progress(d / t, text=f"masked {d}/{t} heads"), block=block)
        bar.empty()
        frame = importance_frame(example_id, drop)
        cache[key] = (frame, label, base)
    return cache[key]


def sweep_importance_panel(adapter, sweep_path: Path, source, ids: list[str], done: set[str],
                           block: str | None = None) -> None:
    """Compute head importance for the first N examples of the slice that lack it, and store it in the sweep.

    A sweep's importance masks the heads of the adapter's default block (`extract_sweep_importance`); a sweep of
    another block says so in one line.
    """
    if (block or adapter.default_block) != adapter.default_block:
        st.caption(f"Head importance over a sweep masks the heads of {adapter.default_block}: open that block to "
                   "compute it (one example's importance for this block is on the example scope).")
        return
    todo_all = [i for i in ids if i not in done]
    st.caption(f"Head importance is stored for {len(done & set(ids))} of the {len(ids)} examples in this slice "
               f"({adapter.n_layers * adapter.n_heads} masked passes per example, batched).")
    if not todo_all:
        return
    n = st.number_input("Examples to add", 1, len(todo_all), min(20, len(todo_all)), key="imp_n")
    if not st.button("Compute head importance", key="imp_go"):
        return
    from vlcore.data.sources import resolve_example

    examples = [resolve_example(i, None, source) for i in todo_all[: int(n)]]
    bar = st.progress(0.0, text="starting…")
    new = extract_sweep_importance(adapter, examples,
                                   progress=lambda d, t: bar.progress(d / t, text=f"{d}/{t} examples"))
    save_sweep_importance(sweep_path, new)
    st.rerun()


def apply_head_click(n_layers: int, n_heads: int, chart_key: str = CHART_KEY) -> None:
    """A click on a layer × head heatmap (the chart's selection state) selects that head app-wide: URL and sidebar.

    Runs before the sidebar's layer/head widgets are created, so their state can still be set.

    Args:
        chart_key: the heatmap element's key (the statistics page's, or another page's head heatmap).
    """
    state = st.session_state.get(chart_key)
    try:
        points = state["selection"][HEAD_SELECTION] if state else []
    except (KeyError, TypeError):
        points = []
    if not points:
        return
    layer, head = points[0].get("layer"), points[0].get("head")
    seen = f"_head_click_seen_{chart_key}"
    if layer is None or head is None or st.session_state.get(seen) == (layer, head):
        return
    st.session_state[seen] = (layer, head)
    layer, head = min(max(int(layer), 0), n_layers - 1), min(max(int(head), 0), n_heads - 1)
    st.session_state["layer"], st.session_state["head"] = layer, head
    set_params(layer=layer, head=head)


def available_metrics(heads: pd.DataFrame) -> list[str]:
    """Metrics present in a statistics frame, in the documented order, importance last."""
    present = set(heads["metric"].astype(str))
    return [m for m in metric_names() if m in present] + ([IMPORTANCE] if IMPORTANCE in present else [])


def show_head_table(aggregated: pd.DataFrame, metric: str, k: int) -> pd.DataFrame:
    """The one-row-per-head table, the top-k heads of the chosen metric highlighted; returns the table."""
    table = head_table(aggregated)
    every = sorted(set(aggregated["metric"].astype(str)))  # a metric n/a for every head still gets its column
    table = table.reindex(columns=["layer", "head", *every])
    top = set(top_heads(table, metric, k)) if metric in table.columns else set()

    def highlight(row):
        on = (int(row["layer"]), int(row["head"])) in top
        return ["background-color: #fff3b0" if on else "" for _ in row]

    values = [c for c in table.columns if c not in ("layer", "head")]
    styled = table.style.apply(highlight, axis=1).format("{:.5f}", subset=values, na_rep="n/a")
    st.dataframe(styled, hide_index=True, height=320, key="head_table")
    st.caption(f"Highlighted: the top {k} heads by {metric}. Click a column header to sort; n/a: the metric does "
               "not apply to this block.")
    return table


def show_head_row(aggregated: pd.DataFrame, layer: int, head: int, reasons: dict[str, str]) -> None:
    """One head's value of every metric (mean; std and n over a sweep), "n/a" with the reason where a metric
    does not apply to the block."""
    row = aggregated[(aggregated["layer"] == layer) & (aggregated["head"] == head)].set_index("metric")
    spread = [c for c in ("std", "n") if "n" in row and (row["n"] > 1).any() and c in row]  # none for one example
    frame = row[["mean", *spread]].copy()
    if frame["mean"].isna().any():
        frame["why n/a"] = [reasons.get(m, "does not apply to this block") if pd.isna(v) else ""
                            for m, v in frame["mean"].items()]
    numbers = [c for c in ("mean", "std") if c in frame]
    st.dataframe(frame.style.format("{:.6g}", subset=numbers, na_rep="n/a"), height=240)


# -- a generative model's language-model heads (image share, entropy, image-token sinks) ----------------------------

GENERATIVE_ROWS = {"generated": "generated tokens' rows", "prompt": "prompt rows"}


def is_generative(trace) -> bool:
    """Whether a trace comes from a model that generates its answer (its meta says so)."""
    return bool(isinstance(trace.meta, dict) and trace.meta.get("generates"))


@st.cache_data(max_entries=32, show_spinner="Summarising the language model's heads…")
def generative_tables(trace_key: str, _trace) -> dict:
    """``{"generated": ..., "prompt": ...}`` `vlcore.analysis.image_sinks.HeadSummaryTable`s of a generative trace
    (the generated tokens' rows recomputed from the ``lm.generated`` block; the prompt rows from the summaries
    stored in the trace's meta); a row set the trace lacks is left out.

    Args:
        trace_key: the trace's store key (see `trace_stats`).
        _trace: the trace ``trace_key`` names.
    """
    from vlcore.analysis.image_sinks import compute_row_summaries, prompt_summaries
    from vlcore.models.generative import LM_BLOCK

    tables = {}
    if LM_BLOCK in _trace.blocks and _trace.blocks[LM_BLOCK].attentions is not None:
        tables["generated"] = compute_row_summaries(_trace, LM_BLOCK)
    prompt = prompt_summaries(_trace.meta)
    if prompt is not None:
        tables["prompt"] = prompt
    return tables


def _head_maps(tables: dict, field: str, title: str) -> None:
    """One layer × head heatmap of ``field`` per row set, side by side."""
    from vlcore.charts.image_sinks import head_summary_frame
    from vlcore.charts.stats import build_head_heatmap_chart

    n_layers = max(max(t.layers, default=0) for t in tables.values()) + 1
    n_heads = max(getattr(t, field).shape[1] for t in tables.values())
    for column, (name, table) in zip(st.columns(len(tables)), tables.items()):
        with column:
            frame = head_summary_frame(getattr(table, field), field, table.layers)
            st.altair_chart(build_head_heatmap_chart(frame, field, title=f"{title} · {GENERATIVE_ROWS[name]} "
                                                     f"({table.rows})", n_layers=n_layers, n_heads=n_heads),
                            key=f"gen_{field}_{name}")


def generative_heads_panel(trace_key: str, trace) -> None:
    """The language model's heads of a generative trace: the share of each head's attention on image tokens and
    its normalised entropy (over the prompt's rows and over the generated tokens' rows), and the layer after which
    image tokens stop mattering (FastV's image-token sink) at a threshold the user sets."""
    from vlcore.analysis.image_sinks import (
        DEFAULT_THRESHOLD,
        REFERENCE_LAYERS,
        compute_head_sinks,
        compute_image_sink,
        compute_layer_share,
    )
    from vlcore.charts.image_sinks import build_image_share_chart, image_share_frame

    st.subheader("Language-model heads: attention to image tokens")
    tables = generative_tables(trace_key, trace)
    if not tables:
        st.info("This trace kept neither the generated tokens' attention rows nor the prompt's head summaries.")
        return
    st.caption("Rows: the prompt's tokens (reduced on the device while the model ran) and the generated tokens "
               "(each one's attention over every earlier token). Numbers in brackets: rows averaged.")
    _head_maps(tables, "image_share", "image share")
    _head_maps(tables, "entropy", "entropy / log(visible keys)")
    st.caption("Image share: the part of a row's attention on image tokens, mean over the rows. Entropy: each row's "
               "entropy divided by the log of the number of keys it can see (1: uniform over them, 0: one key).")
    st.markdown("**Image-token sinks**")
    left, right = st.columns([1, 2])
    names = list(tables)
    rows = left.radio("Sink over", names, format_func=GENERATIVE_ROWS.get, key="sink_rows")
    threshold = left.slider("Threshold (share of the early level)", 0.01, 1.0, DEFAULT_THRESHOLD, 0.01,
                            key="sink_threshold")
    layer_share = {name: (t.layers, compute_layer_share(t.image_share)) for name, t in tables.items()}
    sink = compute_image_sink(layer_share[rows][1], threshold, layer_share[rows][0])
    right.altair_chart(build_image_share_chart(image_share_frame(
        {GENERATIVE_ROWS[n]: s for n, s in layer_share.items()}), sink, GENERATIVE_ROWS[rows]), key="sink_chart")
    early = f"layers 0–{REFERENCE_LAYERS - 1}"
    left.caption(f"FastV found that attention to image tokens collapses after the first layers. The early level is "
                 f"the mean image share of {early}; the sink is the first layer from which the share stays below "
                 f"the threshold times that level through the last layer (dashed line: the cutoff).")
    where = f"layer **{sink.layer}**" if sink.layer is not None else "no layer (it does not stay below the cutoff)"
    left.markdown(f"Sink over the {GENERATIVE_ROWS[rows]}: {where} · early level {sink.reference:.4f} · "
                  f"cutoff {sink.cutoff:.4f}")
    heads = compute_head_sinks(tables[rows].image_share, threshold, tables[rows].layers)
    st.dataframe(pd.DataFrame({"head": range(len(heads)),
                               "sink layer": pd.array([s.layer for s in heads], dtype="Int64"),
                               "early level": [s.reference for s in heads], "cutoff": [s.cutoff for s in heads]}),
                 hide_index=True, key="sink_heads")
    st.caption("Per head: the first layer from which that head's image share stays below the threshold times its "
               "own early level (empty: it does not).")
    table = pd.DataFrame({"layer": sorted({int(l) for t in tables.values() for l in t.layers})})
    for name, (layers, share) in layer_share.items():
        table[GENERATIVE_ROWS[name]] = table["layer"].map(dict(zip(map(int, layers), share)))
    st.dataframe(table, hide_index=True, key="sink_layers")
