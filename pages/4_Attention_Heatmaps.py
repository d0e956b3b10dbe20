"""Attention heatmaps: where a word looks in the image, what a patch reads, per head and layer, with explanations."""

from __future__ import annotations

import streamlit as st

from vlcore.charts import heatmaps as ch
from vlcore.charts import multiples as cm
from vlcore.analysis import query_maps as hm
from vlcore.errors import VLScopeError
from vlcore.ui.annotate import annotate_panel, share_view
from vlcore.ui.context import load_example_trace, load_model, pick_layer_head
from vlcore.ui.heatmaps import (explanation_captions, explanation_maps, method_map, pick_answer, pick_display,
                                pick_query, pick_view, scale_caption, scale_domain, show_explanations, show_export,
                                show_layer_strip, show_matrices, show_parts, show_query_views, show_step_through,
                                step_maps)

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
head_text = "mean over heads" if head is None else f"head {head}"
head_label = f"layer {layer}, {head_text}"
start_layer = st.sidebar.slider("Rollout from layer", 0, trace.n_layers - 1, 0, key="hm_rollout_start")
with st.sidebar:
    answer = pick_answer(adapter, trace)

query = pick_query(trace)
display = pick_display()
direction, method = display.direction, display.method
att = trace.head_attention(layer, head)
if method == "relevancy" and (query.tokens.tolist() != [0] or direction != "from"):
    st.caption("Gradient relevancy explains the answer through [CLS]: it is the same map whatever the query.")
headings = {"raw": f"Attention {direction} the query · {head_label}",
            "rollout": f"Attention rollout {direction} the query · layers {start_layer}–{trace.n_layers - 1}",
            "relevancy": f"Gradient relevancy of each token for the answer “{answer}”"}
titles = {"raw": f"raw attention {direction} {query.label}", "rollout": f"attention rollout {direction} {query.label}",
          "relevancy": f"gradient relevancy for “{answer}”"}
try:
    values = method_map(method, trace, layer, head, query, direction, adapter, example, answer, start_layer)
except VLScopeError as exc:
    st.error(str(exc))
    st.stop()
layer_maps = hm.compute_layer_maps(trace, head, query.tokens, direction)
query_box, strip_box = st.container(), st.container()  # drawn once the section's maps set the shared scale

view = pick_view()
section_maps, section_error = {}, None
try:
    if view == "heads":
        section_maps = {"heads": hm.compute_head_maps(trace, layer, query.tokens, direction)}
    elif view == "step":
        section_maps = {"step": step_maps(trace, layer, head, direction)}
    elif view == "explain":
        section_maps = explanation_maps(trace, layer, head, start_layer, adapter, example, answer)
except VLScopeError as exc:
    section_error = str(exc)
domain = scale_domain(trace, [values, layer_maps, *section_maps.values()], display.scale)

with query_box:
    st.subheader(headings[method])
    shown = show_query_views(trace, values, query, titles[method], display, domain)
with strip_box:
    shown["every layer"] = show_layer_strip(trace, layer_maps, layer, head_text, query, display, domain)

if section_error:
    st.error(section_error)
elif view == "matrices":
    show_matrices(trace, att, f"{head_label}: query × key")
elif view == "heads":
    show_parts(cm.all_heads_parts(trace, section_maps["heads"], domain=domain,
                                  title=f"Every head of layer {layer}: attention {direction} {query.label}"))
elif view == "step":
    show_step_through(trace, layer, head, display, domain)
elif view == "explain":
    explain_titles = {"raw": f"raw [CLS] attention, {head_label}", "rollout": f"rollout from layer {start_layer}",
                      "relevancy": f"relevancy for “{answer}”"}
    show_explanations(trace, section_maps, explain_titles, adapter, example, answer, display, domain)
else:
    builders = dict(shown)
    builders["matrix"] = lambda: ch.build_matrix_chart(trace, att, title=head_label, size=420)
    for block in ch.BLOCK_TITLES:
        builders[f"block {block}"] = lambda b=block: ch.build_block_chart(trace, att, b)
    builders["all heads"] = lambda: cm.build_all_heads_chart(
        trace, hm.compute_head_maps(trace, layer, query.tokens, direction), domain=domain)

    def explanations_chart():
        maps = explanation_maps(trace, layer, head, start_layer, adapter, example, answer)
        return cm.build_explanations_chart(trace, maps, display.opacity, domain=domain,
                                           subtitles=explanation_captions(trace, maps))

    builders["explanations side by side"] = explanations_chart
    show_export(builders, trace, att, head_label)
st.caption(scale_caption(display.scale, domain))

share_view(PAGE)
annotate_panel(PAGE, example_id=trace.example_id, model=trace.model_id, layer=layer, head=head,
               token=int(query.tokens[0]) if len(query.tokens) == 1 else None)
