"""VLScope: the app's entry point (``streamlit run streamlit_app.py``) and its Home page, the bundled demo model
on easy-VQA with its [CLS] attention over the image.

The pages are registered by `vlcore.ui.navigation.run_app`: Home (below), then ``pages/N_Title.py``."""

from __future__ import annotations

import streamlit as st

from vlcore.charts.base import build_patch_overlay_chart, build_prediction_chart
from vlcore.data.easy_vqa import easy_vqa_examples
from vlcore.errors import VLScopeError
from vlcore.models.registry import DEMOS
from vlcore.run.extract import trace_for_example
from vlcore.ui.loaders import get_adapter, get_store
from vlcore.ui.navigation import run_app
from vlcore.ui.prediction import explaining_map
from vlcore.ui.widgets import open_in_pages


def home() -> None:
    """The Home page: a sample question, both bundled models' answers and where each looked."""
    st.set_page_config(page_title="VLScope", layout="wide")
    st.title("VLScope")
    st.caption(
        "Why did the vision-language model answer that? Pick a question; VLScope runs the two bundled models "
        "(trained on easy-VQA, no network needed): ViLT, which picks an answer and shows where its [CLS] token "
        "looks, and a small LLaVA-architecture model, which writes its answer and shows where its answer token looks."
    )

    samples = easy_vqa_examples("test", limit=200)
    labels = [f"{i}: {ex.question}" for i, ex in enumerate(samples)]
    choice = st.sidebar.selectbox("Sample question", range(len(samples)), format_func=labels.__getitem__, key="sample")
    opacity = st.sidebar.slider("Heat opacity", 0.0, 1.0, 0.6, 0.05, key="opacity")

    example = samples[choice]
    store = get_store()
    st.subheader(example.question)
    for column, (model, title) in zip(st.columns(2), HOME_MODELS.items()):
        with column:
            show_demo(model, title, example, store, opacity)
    for notice in dict.fromkeys(store.notices):  # a damaged cache entry recomputed, a result the disk could not store
        st.info(notice)
    open_in_pages({"ex": example.example_id, "model": "demo", "ds": "easy_vqa", "split": "test"})


HOME_MODELS = {"demo": "Bundled ViLT (answer classifier)", "demo-generative": "Bundled LLaVA-style model (generates)"}


def show_demo(model: str, title: str, example, store, opacity: float) -> None:
    """One bundled model on the example: its answer against the gold, and the map of the row that explains it."""
    st.markdown(f"#### {title}")
    if not (DEMOS[model] / "config.json").is_file():
        st.info(f"This checkout has no {title.lower()} ({DEMOS[model].name}); scripts/train_demo_lvlm.py trains it.")
        return
    try:
        adapter = get_adapter(model)
        trace, cached = trace_for_example(adapter, example, store)
    except VLScopeError as exc:
        st.error(str(exc))
        return
    verdict = "correct" if trace.correct else "incorrect"
    st.markdown(f"**Prediction:** {trace.predicted} ({trace.prediction[0][1]:.1%}) · "
                f"**gold:** {', '.join(trace.gold or ())} · {verdict}")
    if not adapter.generates:
        st.altair_chart(build_prediction_chart(list(trace.prediction), trace.gold), width="stretch")
    found = explaining_map(trace, adapter)  # ViLT: its [CLS] row; the generative model: its answer token's row
    if found is not None:
        chart = build_patch_overlay_chart(found.trace, found.values, title=found.title, opacity=opacity)
        st.altair_chart(chart, width="content")
        grid = found.trace.key_layout.images[0].grid if found.trace.key_layout.images else trace.grid
        st.caption(f"{grid[0]}×{grid[1]} image tokens; image as the model saw it.")
    st.caption(f"Model `{trace.model_id}` · {'loaded from the store' if cached else 'computed now and stored'}")
    if trace.text_truncated:
        st.info(f"The text was cut to the model's {adapter.max_text_len} text positions.")
    st.page_link("pages/4_Attention_Heatmaps.py", label=f"Open {title.split(' (')[0]} in Heatmaps", icon="➡️",
                 query_params={"ex": example.example_id, "model": model, "ds": "easy_vqa", "split": "test"})


run_app(home)
