"""Token vectors layer by layer: one pooled 2-D projection per layer, the fusion degree, nearest neighbours."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from vlcore.charts.embeddings import COLOR_BY, SELECT_PARAM, build_fusion_chart, build_projection_chart
from vlcore.errors import VLScopeError
from vlcore.analysis.projection import ALIGNS, METHOD_NAMES, METHODS, find_token, umap_available
from vlcore.ui import embeddings as emb
from vlcore.ui.annotate import annotate_panel, share_view
from vlcore.ui.browser import source_from_url
from vlcore.ui.context import load_example_trace, load_model, pick_sweep
from vlcore.ui.export import chart_downloads
from vlcore.ui.prediction import task_picker
from vlcore.ui.shared_space import has_shared_space, shared_space_panel
from vlcore.ui.state import current_params, get_choice, get_int, get_param, set_params

HEATMAPS = "pages/4_Attention_Heatmaps.py"
st.set_page_config(page_title="Embeddings · VLScope", layout="wide")
st.title("Embeddings")
st.caption("Each layer's token vectors, pooled over the chosen examples and projected by **one** fit, so points "
           "of different examples share a space. Neighbours are searched in the full hidden space (cosine).")
adapter, store = load_model()
try:
    source = source_from_url()
except VLScopeError:  # the example's own loader says why, below
    source = None
adapter = task_picker(adapter, source)  # zero-shot: the trace's prediction (and correctness) over the labels
scope = st.sidebar.radio("Scope", ("example", "sweep"), key="emb_scope",
                         index=("example", "sweep").index(get_choice("scope", ("example", "sweep"), "example")),
                         format_func={"example": "One example", "sweep": "A sweep"}.get)
set_params(scope=scope)
try:
    if scope == "example":
        context = load_example_trace(adapter, store)
        streams, stream = emb.pick_stream(context.trace)
        tokens, set_key = emb.example_token_set(context.trace, stream, adapter.answers_compare)
        slice_ = "all"
    else:
        path = pick_sweep(store, adapter)
        if path is None:
            st.stop()
        context, streams, stream = None, [adapter.main_stream], adapter.main_stream
        tokens, set_key = emb.sweep_token_set(path)
        if not adapter.answers_compare:  # a pair's score: gold answers say nothing about being right
            tokens, set_key = emb.without_correctness(tokens), f"{set_key}|no-correctness"
        slices = emb.SLICES if adapter.answers_compare else emb.SLICES[:1]
        slice_ = st.sidebar.selectbox("Slice", slices, key="emb_slice",
                                      index=slices.index(get_choice("slice", slices, "all")))
        set_params(slice=slice_)
        if len(adapter.block_specs()) > 1:
            st.caption(f"A sweep keeps the vectors of the model's `{stream}` stream; open one example for the "
                       "others.")
    show = st.sidebar.selectbox("Tokens", list(emb.SHOW), format_func=emb.SHOW.get, key="emb_show")
    base = (tokens, set_key)
    tokens, set_key = emb.narrow(*base, show, slice_)
except VLScopeError as exc:
    st.error(str(exc))
    st.stop()

n = tokens.n_layers
layer = st.sidebar.select_slider("Layer", options=list(range(n + 1)), value=get_int("layer", n, 0, n), key="emb_layer",
                                 format_func=lambda i: "embeddings" if i == 0 else f"layer {i}")
method = st.sidebar.selectbox("Projection", METHODS, format_func=METHOD_NAMES.get, key="emb_proj",
                              index=METHODS.index(get_choice("proj", METHODS, "pca")))
if not umap_available():
    st.sidebar.caption("UMAP needs `pip install umap-learn`.")
align = st.sidebar.selectbox("PCA axes", ALIGNS, key="emb_align", disabled=method != "pca", format_func={
    "sign": "per layer, signs aligned", "joint": "one fit for all layers", "none": "per layer"}.get)
perplexity = float(st.sidebar.slider("t-SNE perplexity", 5, 50, 30, key="emb_perplexity", disabled=method != "tsne"))
color = st.sidebar.selectbox("Colour by", list(COLOR_BY), key="emb_color",
                             index=list(COLOR_BY).index(get_choice("color", tuple(COLOR_BY), "modality")))
set_params(layer=layer, proj=method, color=color)

# the selected token: a click on the scatter, else the URL, shown and changed in the picker
click = emb.clicked_token("emb_scatter", SELECT_PARAM)
if click:
    emb.select_token(*click)
examples = list(dict.fromkeys(tokens.tokens["example_id"]))
tok_param = get_param("tok")
emb.sync_token_picker(examples, get_param("ex"), int(tok_param) if (tok_param or "").isdigit() else None)
pick_ex = st.sidebar.selectbox("Selected token: example", examples, key="emb_pick_ex",
                               on_change=lambda: emb.select_token(st.session_state["emb_pick_ex"], None))
in_ex = tokens.tokens[tokens.tokens["example_id"] == pick_ex]
labels = dict(zip(in_ex["token"].tolist(), (in_ex["token"].astype(str) + " · " + in_ex["text"]).tolist()))
if st.session_state.get("emb_pick_tok") not in labels:
    st.session_state["emb_pick_tok"] = next(iter(labels))
pick_tok = st.sidebar.selectbox("Selected token", list(labels), format_func=labels.get, key="emb_pick_tok",
                                on_change=lambda: emb.select_token(pick_ex, st.session_state["emb_pick_tok"]))
emb.select_token(pick_ex, pick_tok)

try:
    frame = emb.projection_with_spinner(set_key, layer, method, align, perplexity, tokens)
except VLScopeError as exc:
    st.error(str(exc))
    st.stop()
name = "embeddings" if layer == 0 else f"layer {layer}"
title = f"{METHOD_NAMES[method]} of {tokens.n_tokens:,} tokens · {name}"
left, right = st.columns([3, 2])
with left:
    st.vega_lite_chart(spec=emb.scatter_with_data(frame, color, f"{pick_ex}#{pick_tok}", title), on_select="rerun",
                       selection_mode=SELECT_PARAM, key="emb_scatter")
    st.caption(f"{len(examples)} example(s) · {(frame['modality'] == 'text').sum()} text and "
               f"{(frame['modality'] == 'image').sum()} image tokens · shapes mark text / patch / special tokens")
with right:
    note = emb.fusion_note(tokens, stream if emb.model_streams(adapter) > 1 else None, show)
    fusion = None
    if note is not None:  # text and image tokens do not share this stream (or one modality is shown)
        st.info(note)
    else:
        fusion = emb.fusion_table(set_key, tokens).assign(series="this selection")
        others = {f"sweep:{Path(m['path']).name[:12]}": m for m in store.list_sweeps()}
        others.update({f"slice:{s}": s for s in emb.SLICES if scope == "sweep" and s != slice_})
        cmp = st.selectbox("Compare the fusion degree with", ["none", *others], key="emb_cmp", format_func=lambda c: c if (
            c == "none" or c.startswith("slice")) else f"{others[c].get('model_id')} · {others[c].get('dataset')}")
        fusion_key = set_key
        try:
            if cmp != "none":
                other = emb.sweep_token_set(Path(others[cmp]["path"])) if cmp.startswith("sweep:") else base
                other = emb.narrow(*other, show, cmp[6:] if cmp.startswith("slice:") else "all")
                fusion = pd.concat([fusion, emb.fusion_table(other[1], other[0]).assign(series=cmp)], ignore_index=True)
                fusion_key = f"{set_key}|{other[1]}"
        except VLScopeError as exc:
            st.warning(str(exc))
            cmp = "none"
        st.vega_lite_chart(spec=emb.fusion_spec(fusion_key, layer, fusion))
        st.caption(emb.fusion_caption(fusion))
        with st.expander("Fusion degree table"):
            st.dataframe(emb.fusion_display(fusion), hide_index=True, key="emb_fusion_table")


st.subheader(f"Nearest neighbours of token {pick_tok} of {pick_ex} ({name}, cosine, raw hidden space)")
row = find_token(tokens, pick_ex, pick_tok)
if row is not None:
    nbrs = emb.neighbours(set_key, layer, row, 5, tokens)
    st.dataframe(nbrs.drop(columns="row"), hide_index=True, key="emb_neighbours",
                 column_config={"patch": st.column_config.ImageColumn("patch"),
                                "similarity": st.column_config.NumberColumn(format="%.3f")})
linked_block = emb.stream_view(context.trace, stream).view if context is not None else None
if Path(HEATMAPS).exists() and (linked_block is None or linked_block in context.trace.blocks
                                and context.trace.blocks[linked_block].attentions is not None):
    link = current_params() | {"ex": pick_ex, "tok": str(pick_tok), "layer": str(max(layer - 1, 0))}
    if emb.model_streams(adapter) > 1 and context is not None:  # the token's stream is the queries of this block
        link["block"] = linked_block
    st.page_link(HEATMAPS, label=f"Open token {pick_tok} of {pick_ex} on the attention heatmaps", icon="🔥",
                 query_params={k: v for k, v in link.items() if k not in ("scope", "proj", "color")})

if has_shared_space(adapter):  # a two-tower model: its images and texts in the space they are compared in
    shared_space_panel(adapter, source, pick_ex, store)

with st.expander("Downloads"):
    st.download_button("Coordinates (CSV)", lambda: frame.drop(columns="image").to_csv(index=False),
                       f"coords-{layer}.csv", "text/csv", key="emb_csv", on_click="ignore")
    st.caption("Scatter")
    chart_downloads(lambda: build_projection_chart(frame.drop(columns="image"), color, f"{pick_ex}#{pick_tok}",
                                                   title), f"scatter-{layer}", "emb_scatter_dl")
    if fusion is not None:
        st.caption("Fusion degree")
        chart_downloads(lambda: build_fusion_chart(fusion, layer, {0: "embeddings"}), "fusion", "emb_fusion_dl")

share_view("pages/5_Embeddings.py")
annotate_panel("pages/5_Embeddings.py", example_id=pick_ex, model=adapter.model_id, layer=layer, token=int(pick_tok))
