"""VLScope: the app's entry point (``streamlit run streamlit_app.py``) and its Home page, the bundled demo model
on easy-VQA with its [CLS] attention over the image.

The pages are registered by `vlcore.ui.navigation.run_app`: Home (below), then ``pages/N_Title.py``."""

from __future__ import annotations

import streamlit as st

from vlcore.charts.base import build_patch_overlay_chart, build_prediction_chart
from vlcore.data.easy_vqa import easy_vqa_examples
from vlcore.errors import VLScopeError
from vlcore.run.extract import trace_for_example
from vlcore.ui.loaders import get_adapter, get_store
from vlcore.ui.navigation import run_app
from vlcore.ui.prediction import explaining_map
from vlcore.ui.widgets import open_in_pages


def home() -> None:
    """The Home page: a sample question, the demo model's answer and its [CLS] attention."""
    st.set_page_config(page_title="VLScope", layout="wide")
    st.title("VLScope")
    st.caption(
        "Why did the vision-language model answer that? Pick a question; VLScope runs the bundled "
        "ViLT (trained on easy-VQA, no network needed) and shows where its [CLS] token looks."
    )

    samples = easy_vqa_examples("test", limit=200)
    labels = [f"{i}: {ex.question}" for i, ex in enumerate(samples)]
    choice = st.sidebar.selectbox("Sample question", range(len(samples)), format_func=labels.__getitem__, key="sample")
    opacity = st.sidebar.slider("Heat opacity", 0.0, 1.0, 0.6, 0.05, key="opacity")

    example = samples[choice]
    try:
        adapter = get_adapter("demo")
        store = get_store()
        trace, cached = trace_for_example(adapter, example, store)
    except VLScopeError as exc:
        st.error(str(exc))
        st.stop()
    for notice in store.notices:  # a damaged cache entry recomputed, a result the full disk could not store
        st.info(notice)

    left, right = st.columns([1, 1])
    with left:
        st.subheader(example.question)
        verdict = "correct" if trace.correct else "incorrect"
        st.markdown(f"**Prediction:** {trace.predicted} ({trace.prediction[0][1]:.1%}) · **gold:** {', '.join(trace.gold or ())} · {verdict}")
        st.altair_chart(build_prediction_chart(list(trace.prediction), trace.gold), width="stretch")
        st.caption(f"Model `{trace.model_id}` · {'loaded from the store' if cached else 'computed now and stored'}")
        if trace.text_truncated:
            st.info(f"The text was cut to the model's {adapter.max_text_len} text positions.")
    with right:
        found = explaining_map(trace, adapter)  # the demo's [CLS] row over its joint sequence
        chart = build_patch_overlay_chart(found.trace, found.values, title=found.title, opacity=opacity)
        st.altair_chart(chart, width="content")
        st.caption(f"{trace.grid[0]}×{trace.grid[1]} patches of {trace.patch_px} px; image as the model saw it.")
    open_in_pages({"ex": example.example_id, "model": "demo", "ds": "easy_vqa", "split": "test"})


run_app(home)
