"""Run a model on a dataset example or on your own image and text; results are cached."""

from __future__ import annotations

import streamlit as st

from vlcore.data.example import open_image_bytes
from vlcore.data.sources import resolve_example
from vlcore.errors import VLScopeError
from vlcore.ui.annotate import annotate_panel, share_view
from vlcore.extract import trace_for_example
from vlcore.store import put_input
from vlcore.ui.browser import source_from_url
from vlcore.ui.context import load_model
from vlcore.ui.state import get_param, set_params
from vlcore.ui.widgets import show_input_notes, show_task_runs, show_trace_result, store_panel, sweep_panel

st.set_page_config(page_title="Run model · VLScope", layout="wide")
st.title("Run model")
adapter, store = load_model()
store_panel(store)

with st.expander("Your own image and text", expanded=get_param("ex") is None):
    kinds = ["png", "jpg", "jpeg", "gif", "webp", "bmp"]
    upload = st.file_uploader("Image", type=kinds, key="upload")
    upload2 = st.file_uploader("Second image (NLVR2)", type=kinds, key="upload2") if adapter.n_passes > 1 else None
    text = st.text_input("Question or caption", key="upload_text")
    if st.button("Run on my image", key="run_upload"):
        try:
            if upload is None:
                raise VLScopeError("choose an image file first")
            image = open_image_bytes(upload.getvalue(), upload.name)
            extra = ()
            if adapter.n_passes > 1:
                if upload2 is None:
                    raise VLScopeError(f"{adapter.model_id} compares two images: choose the second image too")
                extra = (open_image_bytes(upload2.getvalue(), upload2.name),)
            if not text.strip():
                raise VLScopeError("the text is empty: type a question or caption for the image")
            set_params(ex=put_input(store, image, text.strip(), extra))
        except VLScopeError as exc:
            st.error(str(exc))

try:
    source = source_from_url()
except VLScopeError as exc:
    st.error(str(exc))
    st.stop()
with st.expander(f"Sweep {source.label} (per-head summaries for every example)"):
    try:
        sweep_panel(adapter, store, source)
    except VLScopeError as exc:
        st.error(f"The sweep stopped: {exc}. Finished batches are kept; fix the input and start again to resume.")

example_id = get_param("ex")
if not example_id:
    st.info("Open an example from the dataset browser (\"Interpret this example\"), or upload an image above.")
    st.stop()
try:
    example = resolve_example(example_id, store, source)
    trace, cached = trace_for_example(adapter, example, store)
except VLScopeError as exc:
    st.error(str(exc))
    st.stop()
for notice in store.notices:
    st.info(notice)
show_input_notes(example)
st.caption(f"Example `{example.example_id}`" + (f" · category {example.category}" if example.category else ""))
try:
    show_task_runs(adapter, example)
except VLScopeError as exc:
    st.warning(str(exc))
opacity = st.sidebar.slider("Heat opacity", 0.0, 1.0, 0.6, 0.05, key="opacity")
if adapter.n_passes == 1:
    show_trace_result(trace, cached, opacity=opacity)
else:  # NLVR2: one encoder pass per image, one prediction from both
    for k, tab in enumerate(st.tabs([f"Image {k + 1}" for k in range(adapter.n_passes)])):
        with tab:
            try:
                shown = trace_for_example(adapter, example, store, image_pass=k) if k else (trace, cached)
                show_trace_result(*shown, opacity=opacity)
            except VLScopeError as exc:
                st.error(str(exc))

share_view("pages/2_Run_Model.py")
annotate_panel("pages/2_Run_Model.py", example_id=example.example_id, model=adapter.model_id)
