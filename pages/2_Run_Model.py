"""Run a model on a dataset example or on your own image and text; results are cached."""

from __future__ import annotations

import streamlit as st

from vlcore.data.example import open_image_bytes
from vlcore.errors import VLScopeError
from vlcore.ui.annotate import annotate_panel, share_view
from vlcore.storage.uploads import put_input
from vlcore.ui.browser import example_from_url, source_from_url
from vlcore.ui.context import load_model
from vlcore.ui.prediction import task_picker
from vlcore.ui.state import carried_params, get_param, set_params
from vlcore.ui.widgets import open_in_pages, show_example, store_panel, sweep_panel

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

example_id = get_param("ex")
try:
    source = source_from_url()
except VLScopeError as exc:
    if (get_param("ds") or "easy_vqa") == "easy_vqa":
        st.error(str(exc))
        st.stop()
    example_id = example_from_url(store).example_id  # a refused dataset: the bundled example, with a notice why
    source = source_from_url()
adapter = task_picker(adapter, source)  # zero-shot over candidate labels, for a model that offers it
sweep_box = st.container()  # filled last: stopping a sweep (■ Stop, any click) leaves the example's result below

example = show_example(adapter, store, source, example_id)
if example is not None:
    open_in_pages(carried_params(), generates=adapter.generates)
share_view("pages/2_Run_Model.py")
if example is not None:
    annotate_panel("pages/2_Run_Model.py", example_id=example.example_id, model=adapter.model_id)

with sweep_box, st.expander(f"Sweep {source.label} (per-head summaries for every example)"):
    try:
        sweep_panel(adapter, store, source)
    except VLScopeError as exc:
        st.error(f"The sweep stopped: {exc}. Finished batches are kept; fix the input and start again to resume.")
