"""Attention heatmaps: where a word looks in the image, what a patch reads, per head, with explanations."""

from __future__ import annotations

import streamlit as st

from vlcore import charts_heatmaps as ch
from vlcore import heatmap_maps as hm
from vlcore.errors import VLScopeError
from vlcore.ui.annotate import annotate_panel, share_view
from vlcore.ui.context import load_example_trace, load_model, pick_layer_head
from vlcore.ui.heatmaps import (METHOD_TITLES, explanation_maps, method_map, pick_answer, pick_display, pick_query,
                                pick_view, show_explanations, show_export, show_matrices, show_parts,
                                show_query_views, show_step_through)

st.set_page_config(page_title="Attention heatmaps · VLScope", layout="wide")
st.title("Attention heatmaps")
PAGE = "pages/4_Attention_Heatmaps.py"
adapter, store = load_model()
ctx = load_example_trace(adapter, store)
trace, example = ctx.trace, ctx.example
verdict = {True: " ✅", False: " ❌", None: ""}[trace.correct]
st.markdown(f"**{trace.text}** · predicted **{trace.predicted}**{verdict}"
            + (f" · gold {', '.join(trace.gold)}" if trace.gold else "") + f" · `{trace.example_id}`")

if not hm.has_image_tokens(trace):
    st.info(f"Example `{trace.example_id}` has no image tokens (a text-only input): there is no image to draw "
            "attention on. Open an example with an image from the dataset browser.")
    st.stop()

layer, head = pick_layer_head(trace.n_layers, trace.n_heads)
head_label = f"layer {layer}, " + ("mean over heads" if head is None else f"head {head}")
start_layer = st.sidebar.slider("Rollout from layer", 0, trace.n_layers - 1, 0, key="hm_rollout_start")
with st.sidebar:
    answer = pick_answer(adapter, trace)

query = pick_query(trace)
direction, method, opacity, smooth = pick_display()
att = trace.head_attention(layer, head)
if method == "relevancy" and (query.tokens.tolist() != [0] or direction != "from"):
    st.caption("Gradient relevancy explains the answer through [CLS]: it is the same map whatever the query.")
where = {"raw": head_label, "rollout": f"layers {start_layer}–{trace.n_layers - 1}", "relevancy": f"answer “{answer}”"}
title = f"{METHOD_TITLES[method]} {direction} {query.label}" if method != "relevancy" else METHOD_TITLES[method]
try:
    values = method_map(method, trace, layer, head, query, direction, adapter, example, answer, start_layer)
except VLScopeError as exc:
    st.error(str(exc))
    st.stop()
st.subheader(f"Attention {direction} the query · {where[method]}")
shown = show_query_views(trace, values, query, title, opacity, smooth)

view = pick_view()
if view == "matrices":
    show_matrices(trace, att, f"{head_label}: query × key")
elif view == "heads":
    maps = hm.compute_head_maps(trace, layer, query.tokens, direction)
    show_parts(ch.all_heads_parts(trace, maps, title=f"Every head of layer {layer}: attention {direction} {query.label}"))
elif view == "step":
    show_step_through(trace, layer, head, direction, opacity, smooth)
elif view == "explain":
    titles = {"raw": f"raw [CLS] attention, {head_label}", "rollout": f"rollout from layer {start_layer}",
              "relevancy": f"relevancy for “{answer}”"}
    try:
        maps = explanation_maps(trace, layer, head, start_layer, adapter, example, answer)
    except VLScopeError as exc:
        st.error(str(exc))
        st.stop()
    show_explanations(trace, maps, titles, adapter, example, answer, opacity, smooth)
else:
    builders = dict(shown)
    builders["matrix"] = lambda: ch.build_matrix_chart(trace, att, title=head_label, size=420)
    for block in ch.BLOCK_TITLES:
        builders[f"block {block}"] = lambda b=block: ch.build_block_chart(trace, att, b)
    builders["all heads"] = lambda: ch.build_all_heads_chart(
        trace, hm.compute_head_maps(trace, layer, query.tokens, direction))
    builders["explanations side by side"] = lambda: ch.build_explanations_chart(
        trace, explanation_maps(trace, layer, head, start_layer, adapter, example, answer), opacity)
    show_export(builders, trace, att, head_label)

share_view(PAGE)
annotate_panel(PAGE, example_id=trace.example_id, model=trace.model_id, layer=layer, head=head,
               token=int(query.tokens[0]) if len(query.tokens) == 1 else None)
