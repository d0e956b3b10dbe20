"""Attention heatmaps: where a word looks in the image, what a patch reads, per head and layer, with explanations,
on any attention block (a joint stream, an image or text tower, text-to-image cross-attention)."""

from __future__ import annotations

import dataclasses

import streamlit as st

from vlcore.analysis import query_maps as hm
from vlcore.charts import heatmaps as ch
from vlcore.errors import VLScopeError
from vlcore.ui import heatmap_views as views
from vlcore.ui.annotate import annotate_panel, share_view
from vlcore.ui.blocks import pick_block, select_block
from vlcore.ui.context import load_example_trace, load_model, pick_layer_head, pick_rollout_start
from vlcore.ui.heatmap_controls import pick_answer, pick_display, pick_query, pick_view
from vlcore.ui.heatmaps import method_map, method_reason, scale_caption, scale_domains, step_maps, stored_rollout

st.set_page_config(page_title="Attention heatmaps · VLScope", layout="wide")
st.title("Attention heatmaps")
PAGE = "pages/4_Attention_Heatmaps.py"
adapter, store = load_model()
ctx = load_example_trace(adapter, store)
example = ctx.example
verdict = {True: " ✅", False: " ❌", None: ""}[ctx.trace.correct]
st.markdown(f"**{ctx.trace.text}** · predicted **{ctx.trace.predicted}**{verdict}"
            + (f" · gold {', '.join(ctx.trace.gold)}" if ctx.trace.gold else "") + f" · `{ctx.trace.example_id}`")

if not hm.trace_has_images(ctx.trace):
    st.info(f"Example `{ctx.trace.example_id}` has no image tokens (a text-only input): there is no image to draw "
            "attention on. Open an example with an image from the dataset browser.")
    st.stop()

block = pick_block(adapter, ctx.trace)
trace = select_block(ctx.trace, block)
preferred = adapter.default_query(block, trace.layout)
layer, head = pick_layer_head(trace.n_layers, trace.n_heads)
head_text = "mean over heads" if head is None else f"head {head}"
head_label = f"layer {layer}, {head_text}"
start_layer = pick_rollout_start(trace.n_layers)
with st.sidebar:
    answer = pick_answer(adapter, trace)

query = pick_query(trace, preferred)
picked = pick_display(cross=not trace.block.is_self)
display = dataclasses.replace(picked, direction=hm.query_direction(trace, query.side, picked.direction))
direction, method = display.direction, display.method
reason = method_reason(method, trace, adapter)
if reason:
    st.info(reason)
    method = "raw"
default = views.default_query(trace, preferred)
if method == "relevancy" and (query.tokens.tolist() != default.tokens.tolist() or direction != "from"):
    st.caption(f"Gradient relevancy explains the answer through {default.label}: it is the same map whatever the query.")
shown = dataclasses.replace(display, method=method, direction="from" if method == "relevancy" else direction)
headings = {"raw": f"Attention {direction} the query · {head_label}",
            "rollout": f"Attention rollout {direction} the query · layers {start_layer}–{trace.n_layers - 1}",
            "relevancy": f"Gradient relevancy of each token for the answer “{answer}”"}
if method == "rollout" and stored_rollout(trace) is not None:  # rolled out during the model's pass
    from vlcore.attribution.relevance import rollout_is_composed

    composed = " composed with the vision tower's rollout" if rollout_is_composed(trace) else ""
    headings["rollout"] = f"Attention rollout through the decoder{composed} · layers 0–{trace.n_layers - 1}"
    if start_layer:
        st.caption("This model's rollout was computed during its pass from layer 0; the start layer does not apply.")
titles = {"raw": f"raw attention {direction} {query.label}", "rollout": f"attention rollout {direction} {query.label}",
          "relevancy": f"gradient relevancy for “{answer}”"}
try:
    values = method_map(method, trace, layer, head, query, direction, adapter, example, answer, start_layer)
except NotImplementedError as exc:  # the adapter has no gradient pass
    st.info(f"Gradient relevancy does not apply here: {exc}. Showing raw attention.")
    method, shown = "raw", dataclasses.replace(display, method="raw")
    values = method_map("raw", trace, layer, head, query, direction)
except VLScopeError as exc:
    st.error(str(exc))
    st.stop()
att = trace.head_attention(layer, head)
layer_maps = hm.compute_layer_maps(trace, head, query.tokens, direction)
backdrop = hm.context_map(trace, att) if query.side == "key" else None  # a cross block's patches: who reads them
query_box, strip_box = st.container(), st.container()  # drawn once the section's maps set the shared scale

view = pick_view()
section_maps, section_error, reasons = [], None, {}
try:
    if view == "heads":
        section_maps = [(hm.compute_head_maps(trace, layer, query.tokens, direction), direction)]
    elif view == "step":
        step_direction = hm.query_direction(trace, "query", direction)
        section_maps = [(step_maps(trace, layer, head, step_direction), step_direction)]
    elif view == "explain":
        explained, reasons = views.explanation_maps(trace, layer, head, start_layer, adapter, example, answer, preferred)
        section_maps = [(m, "from") for m in explained.values()]
except VLScopeError as exc:
    section_error = str(exc)
domains = scale_domains(trace, [(values, shown.direction), (layer_maps, direction), *section_maps], display.scale)

with query_box:
    st.subheader(headings[method])
    built = views.show_query_views(trace, values, query, titles[method], shown, domains(shown.direction),
                                   backdrop=backdrop)
with strip_box:
    built["every layer"] = views.show_layer_strip(trace, layer_maps, layer, head_text, query, display,
                                                  domains(direction))

if section_error:
    st.error(section_error)
elif view == "matrices":
    views.show_matrices(trace, att, f"{head_label}: query × key")
elif view == "heads":
    views.show_parts(views.head_maps_parts(trace, section_maps[0][0], direction, domains(direction),
                                           f"Every head of layer {layer}: attention {direction} {query.label}"))
elif view == "step":
    views.show_step_through(trace, layer, head, display, domains(section_maps[0][1]))
elif view == "explain":
    for line in reasons.values():
        st.info(line)
    explain_titles = {"raw": f"raw attention from {default.label}, {head_label}",
                      "rollout": f"rollout from layer {start_layer}", "relevancy": f"relevancy for “{answer}”"}
    views.show_explanations(trace, explained, explain_titles, adapter, example, answer, display, domains("from"))
else:
    builders = dict(built)
    builders["matrix"] = lambda: ch.build_matrix_chart(trace, att, title=head_label, size=420)
    for quadrant in hm.available_quadrants(trace):
        builders[f"block {quadrant}"] = lambda b=quadrant: ch.build_block_chart(trace, att, b)
    builders["all heads"] = lambda: views.build_head_maps_chart(
        trace, hm.compute_head_maps(trace, layer, query.tokens, direction), direction, domains(direction))
    builders["explanations side by side"] = lambda: views.build_explanations_chart(
        trace, views.explanation_maps(trace, layer, head, start_layer, adapter, example, answer, preferred)[0],
        display, domains("from"))
    views.show_export(builders, trace, att, head_label)
st.caption(scale_caption(display.scale, domains(shown.direction)))

share_view(PAGE)
annotate_panel(PAGE, example_id=trace.example_id, model=trace.model_id, layer=layer, head=head,
               token=int(query.tokens[0]) if len(query.tokens) == 1 and query.side == "query" else None)
