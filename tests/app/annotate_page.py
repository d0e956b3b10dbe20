"""A tiny page for the tests: the "Annotate this view" panel and the share control on a fixed view."""

import streamlit as st

from vlcore.ui.annotate import annotate_panel, share_view
from vlcore.ui.state import set_params

set_params(ex="easy_vqa/test/3", layer=2, head=1, tok=0)
st.session_state["link"] = share_view("pages/4_Heatmaps.py")
annotate_panel("pages/4_Heatmaps.py", example_id="easy_vqa/test/3", model="demo", layer=2, head=1, token=0)
