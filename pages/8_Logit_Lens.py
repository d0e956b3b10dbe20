"""Logit lens: each layer's hidden state read through the final norm and the LM head, for every generated token
(the rank and probability of the token finally produced) and for every image token (its top word, on the image)."""

from __future__ import annotations

import streamlit as st

from vlcore.ui import logit_lens as ui
from vlcore.ui.annotate import annotate_panel, share_view
from vlcore.ui.context import load_example_trace, load_model

st.set_page_config(page_title="Logit lens · VLScope", layout="wide")
st.title("Logit lens")
adapter, store = load_model()
if not adapter.generates:
    st.info(ui.NOT_GENERATIVE.format(model=adapter.model_id))
    st.stop()

ctx = load_example_trace(adapter, store)
trace = ctx.trace
lens = ui.lens_of(trace)
if lens is None:
    st.info(ui.NO_LENS)
    st.stop()
st.caption(f"Example `{trace.example_id}`: {trace.text} → **{trace.meta.get('answer', trace.predicted)}**")
layer = ui.pick_lens_layer(len(lens["rank"]))

st.subheader("Generated tokens")
ui.show_generated_lens(trace, lens)
st.subheader("Image tokens")
ui.show_image_lens(trace, lens, layer)

share_view("pages/8_Logit_Lens.py")
annotate_panel("pages/8_Logit_Lens.py", example_id=trace.example_id, model=adapter.model_id, layer=layer)
