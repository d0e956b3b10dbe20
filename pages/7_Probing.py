"""Probing (VALUE): what each layer knows, and which heads tie words to the image regions they name."""

from __future__ import annotations

import json

import streamlit as st

from vlcore.charts.probing import build_head_weight_chart, build_layer_accuracy_chart
from vlcore.charts.stats import HEAD_SELECTION
from vlcore.errors import VLScopeError
from vlcore.ui import probing as ui
from vlcore.ui.annotate import share_view
from vlcore.ui.context import load_model, pick_layer_head, pick_sweep
from vlcore.ui.export import chart_downloads, table_downloads
from vlcore.ui.state import carried_params

st.set_page_config(page_title="Probing · VLScope", layout="wide")
st.title("Probing")
st.caption("Simple classifiers on a frozen model's internals, over a sweep (VALUE, Cao et al. 2020): a linear probe per "
           "layer on hidden states, and a probe on word→patch attention that finds the heads grounding words.")
adapter, store = load_model()
L, H = adapter.n_layers, adapter.n_heads
ui.apply_head_click(L, H)
path = pick_sweep(store, adapter)
with st.expander("Make a probe sweep", expanded=path is None):
    try:
        ui.probe_sweep_panel(adapter, store)
    except VLScopeError as exc:
        st.error(str(exc))
if path is None:
    st.stop()
stamp = ui.sweep_stamp(path)
inputs = ui.probe_inputs(ui.available_kinds(str(path), stamp))
layer, head = pick_layer_head(L, H)
if inputs["ptype"] == "attention":
    reason = ui.grounding_reason(json.dumps(adapter.fingerprint(), sort_keys=True, default=str), adapter)
    if reason is not None:
        st.info(reason)
        share_view("pages/7_Probing.py")
        st.stop()

try:
    if inputs["ptype"] == "representation":
        results = ui.layer_results(str(path), stamp, inputs["kind"], inputs["target"], inputs["cover"])
    else:
        summary, weights, heads, agreement = ui.attention_results(str(path), stamp, inputs["target"], inputs["cover"])
except VLScopeError as exc:
    st.error(str(exc))
    st.stop()

name = f"probe-{inputs['ptype']}-{inputs['kind'] or 'words'}-{inputs['target']}"
if inputs["ptype"] == "representation":
    best = results.loc[results["selectivity"].idxmax()]
    st.markdown(f"**{inputs['target']}** from **{ui.TOKEN_KINDS[inputs['kind']]}**: the most selective layer is "
                f"**{int(best['layer'])}** (accuracy {best['accuracy']:.3f}, control {best['control']:.3f}, majority "
                f"{best['majority']:.3f}; {int(best['n_units'])} images or examples split apart, {int(best['n_classes'])} classes).")
    chart = build_layer_accuracy_chart(results, title=f"{inputs['target']} · {ui.TOKEN_KINDS[inputs['kind']]}")
    st.altair_chart(chart)
    chart_downloads(chart, name, "probe_curve_dl")
    st.dataframe(results, hide_index=True)
    table_downloads(results, name, "probe_table_dl")
    ui.explain(ui.EXPLAIN_REPRESENTATION)
else:
    s = summary.iloc[0]
    st.markdown(f"**{ui.ROLE_NAMES[inputs['target']]}**: {int(s['n_words'])} words, {int(s['n_pairs']):,} word–patch "
                f"pairs, {s['positive_rate']:.1%} inside the named region; held-out accuracy {s['accuracy']:.3f} "
                f"(control {s['control']:.3f}, majority {s['majority']:.3f}), AUC {s['auc']:.3f}.")
    left, right = st.columns([3, 2])
    with left:
        chart = build_head_weight_chart(weights, selected=(layer, head) if head is not None else None)
        st.altair_chart(chart, on_select="rerun", selection_mode=HEAD_SELECTION, key=ui.HEAD_CHART_KEY)
        st.caption("Rows are attention layers (layer l's output is layer l + 1 of the representation curve). Click a "
                   "cell to select that head on every page; the link carries it.")
        chart_downloads(chart, f"{name}-heads", "probe_heat_dl")
    with right:
        st.dataframe(summary, hide_index=True)
        st.dataframe(agreement, hide_index=True)
        if head is not None:
            st.page_link("pages/4_Attention_Heatmaps.py", label=f"Open layer {layer}, head {head}'s heatmaps",
                         icon="🔥", query_params=carried_params())
    st.markdown("**Heads ranked by probe weight, beside their txt→img share rankings**")
    st.dataframe(heads, hide_index=True, height=300)
    table_downloads(heads, f"{name}-heads", "probe_heads_dl")
    table_downloads(summary, f"{name}-summary", "probe_summary_dl")
    ui.explain(ui.EXPLAIN_ATTENTION)

share_view("pages/7_Probing.py")
