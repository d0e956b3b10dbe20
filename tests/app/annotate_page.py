"""A tiny page for the tests: the "Annotate this view" panel and the share control on a fixed view
(one example, or with ``st.session_state["sweep_view"]`` a sweep-level view with no example)."""

import streamlit as st

from vlcore.ui.annotate import annotate_panel, share_view
from vlcore.ui.state import set_params

example = None if st.session_state.get("sweep_view") else "easy_vqa/test/3"
set_params(ex=example, layer=2, head=1, tok=None if example is None else 0)
st.session_state["link"] = share_view("pages/4_Attention_Heatmaps.py")
annotate_panel("pages/4_Attention_Heatmaps.py", example_id=example, model="demo", layer=2, head=1,
               token=None if example is None else 0)
