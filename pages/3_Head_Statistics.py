"""Head statistics: a layer × head summary of one metric of one attention block, for one example or a sweep, plus
causal importance. A metric that does not apply to the block reads "n/a" with the reason."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from vlcore.attribution.ablation import METRIC as IMPORTANCE
from vlcore.charts.stats import HEAD_SELECTION, build_head_heatmap_chart, build_importance_bar_chart
from vlcore.errors import VLScopeError
from vlcore.run.extract import model_image_input
from vlcore.analysis.head_table import aggregate_heads, compare_slices, slice_examples, slice_options
from vlcore.analysis.stats import metric_description, metric_names
from vlcore.ui.blocks import pick_block, select_block
from vlcore.ui.context import load_example_trace, load_model, pick_layer_head, pick_sweep
from vlcore.ui.export import chart_downloads, table_downloads
from vlcore.ui.state import carried_params, get_choice, set_params
from vlcore.ui import stats as ui
from vlcore.ui.annotate import annotate_panel, share_view

st.set_page_config(page_title="Head statistics · VLScope", layout="wide")
st.title("Head statistics")
ui.load_custom_metrics()  # a deployment's vlscope_metrics.py, if any
adapter, store = load_model()
block = pick_block(adapter)
spec = adapter.block_specs()[block]
L, H = spec.n_layers, spec.n_heads  # the grid of the block's heads
ui.apply_head_click(L, H)

scopes = {"example": "One example", "sweep": "A sweep"}
scope = st.sidebar.radio("Scope", list(scopes), format_func=scopes.get, key="scope",
                         index=list(scopes).index(get_choice("scope", list(scopes), "example")))
set_params(scope=scope)
norms = {"raw": "raw", "z": "z-scored across all heads"}
norm = st.sidebar.radio("Normalisation", list(norms), format_func=norms.get, key="norm",
                        index=list(norms).index(get_choice("norm", list(norms), "raw")))
set_params(norm=norm)

try:
    if scope == "example":
        include_special = st.sidebar.checkbox("Include [CLS]/[SEP]/image CLS in the blocks", key="with_special")
        ctx = load_example_trace(adapter, store)
        trace = select_block(ctx.trace, block)
        heads = ui.trace_stats(ctx.key, block, include_special, tuple(metric_names()), trace)
        reasons = ui.trace_reasons(trace, include_special)
        if L * H <= ui.AUTO_IMPORTANCE_HEADS or st.sidebar.button("Compute head importance", key="imp_example"):
            imp, answer, base = ui.example_importance(adapter, ctx.key, trace.example_id, trace.text,
                                                      model_image_input(adapter, ctx.example), block)
            heads = pd.concat([heads, imp], ignore_index=True)
            st.caption(f"Head importance follows the predicted answer **{answer}** (p = {base:.3f}).")
        st.caption(f"Example `{trace.example_id}`: {trace.text} → **{trace.predicted}**")
        agg, label = aggregate_heads(heads, None, norm), trace.example_id
    else:
        path = pick_sweep(store, adapter, block)
        if path is None:
            st.stop()
        reasons = {}
        preds, heads = ui.sweep_tables(str(path), ui.sweep_updated(path))
        options = slice_options(preds)
        pick = get_choice("slice", options, "all")
        chosen = st.sidebar.selectbox("Slice", options, index=options.index(pick), key="slice")
        versus = st.sidebar.selectbox("Compare with", ["none"] + options, key="cmp",
                                      index=(["none"] + options).index(get_choice("cmp", options, "none")))
        set_params(slice=chosen, cmp=None if versus == "none" else versus)
        ids = slice_examples(preds, chosen)
        if not ids:
            st.warning(f"The slice {chosen!r} has no examples in this sweep; choose another slice.")
            st.stop()
        if versus != "none":
            other = slice_examples(preds, versus)
            agg, label = compare_slices(heads, ids, other, norm), f"{chosen} − {versus}"
            pair = {f"{chosen} (n = {len(ids)})": aggregate_heads(heads, ids, norm),
                    f"{versus} (n = {len(other)})": aggregate_heads(heads, other, norm)}
        else:
            agg, label = aggregate_heads(heads, ids, norm), f"{chosen} (n = {len(ids)})"
except VLScopeError as exc:
    st.error(str(exc))
    st.stop()

metrics = ui.available_metrics(heads)
missing = ui.missing_metrics(agg)  # n/a on this block
applicable = [m for m in metrics if m not in missing] or metrics
metric = st.selectbox("Metric", metrics, key="metric",
                      format_func=lambda m: (f"{m}: {metric_description(m)}" if m != IMPORTANCE else
                                             f"{m}: drop in the answer's probability when the head is masked")
                      + (" (n/a on this block)" if m in missing else ""),
                      index=metrics.index(get_choice("metric", metrics, applicable[0])))
set_params(metric=metric)
layer, head = pick_layer_head(L, H)

left, right = st.columns([3, 2])
with left:
    if metric in missing:
        st.info(ui.na_line(metric, block, reasons))
    else:
        diverging = norm == "z" or (scope == "sweep" and versus != "none")
        chart = build_head_heatmap_chart(agg, metric, title=f"{metric} · {label}", diverging=diverging,
                                         selected=(layer, head) if head is not None else None, n_layers=L, n_heads=H)
        st.altair_chart(chart, on_select="rerun", selection_mode=HEAD_SELECTION, key=ui.CHART_KEY)
        st.caption("Click a cell to select that head on every page; the link carries it. "
                   "Sweeps show mean over examples; hover for mean, std and n.")
        chart_downloads(chart, f"heads-{metric}", "heat_dl")
with right:
    if head is not None:
        st.markdown(f"**Layer {layer}, head {head}**" + (f" · {block}" if len(adapter.block_specs()) > 1 else ""))
        ui.show_head_row(agg, layer, head, reasons)
        st.page_link("pages/4_Attention_Heatmaps.py", label="Open this head's attention heatmaps", icon="🔥",
                     query_params={**carried_params(), **({"block": block} if len(adapter.block_specs()) > 1 else {})})
    if IMPORTANCE in metrics:
        imp = agg[agg["metric"] == IMPORTANCE]
        st.altair_chart(build_importance_bar_chart(imp), width="stretch")
    if scope == "sweep":
        with st.expander("Causal head importance over this slice"):
            from vlcore.ui.browser import source_from_url

            done = set(heads.loc[heads["metric"] == IMPORTANCE, "example_id"].astype(str))
            try:
                ui.sweep_importance_panel(adapter, path, source_from_url(), ids, done, block)
            except VLScopeError as exc:
                st.error(f"{exc}. Open the sweep's dataset in the browser first, so its examples can be read.")

if scope == "sweep" and versus != "none":
    st.markdown("**The two slices side by side** (their difference is the diverging map above)")
    for column, (name, frame) in zip(st.columns(2), pair.items()):
        with column:
            if metric not in missing:
                st.altair_chart(build_head_heatmap_chart(frame, metric, title=f"{metric} · {name}", cell=20,
                                                         n_layers=L, n_heads=H))

k = st.slider("Highlight the top k heads", 1, 20, 5, key="top_k")
table = ui.show_head_table(agg, metric, k)
table_downloads(table, f"heads-{label}".replace(" ", "_"), "table_dl")

if scope == "example" and ui.is_generative(trace):  # a generative model: its language model's heads on image tokens
    ui.generative_heads_panel(ctx.key, trace)

share_view("pages/3_Head_Statistics.py")
annotate_panel("pages/3_Head_Statistics.py", example_id=trace.example_id if scope == "example" else None,
               model=adapter.model_id, layer=layer, head=head)
