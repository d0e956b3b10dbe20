"""Streamlit pieces of the dataset browser: source picker, thumbnail grid, detail view."""

from __future__ import annotations

import io

import numpy as np
import streamlit as st

from vlcore.data.browse import draw_regions, highlight_mentions, make_thumbnail
from vlcore.data.sources import ExampleSource, easy_vqa_source
from vlcore.ui.state import get_param, set_params

RUNNER_PAGE = "pages/2_Run_Model.py"
GRID_COLUMNS = 6


@st.cache_resource(show_spinner="Indexing the dataset…", max_entries=4)
def get_source(kind: str, name: str, config: str | None, split: str) -> ExampleSource:
    """An example source, opened once per (kind, name, config, split)."""
    if kind == "easy_vqa":
        return easy_vqa_source(split)
    from vlcore.data.sources import open_source

    return open_source(kind, name, config, split)


@st.cache_data(show_spinner=False, max_entries=2048)
def thumbnail_png(kind: str, name: str, config: str | None, split: str, position: int) -> bytes | None:
    """PNG bytes of one example's thumbnail, or None when its image cannot be read."""
    from vlcore.errors import VLScopeError

    try:
        image = get_source(kind, name, config, split).example(position).load_image()
    except VLScopeError:
        return None
    buf = io.BytesIO()
    make_thumbnail(image).save(buf, format="PNG")
    return buf.getvalue()


def source_picker() -> ExampleSource | None:
    """Sidebar controls choosing a source and split; the choice goes into the URL."""
    split = st.sidebar.selectbox("Split", ["test", "train"], index=0 if get_param("split", "test") == "test" else 1,
                                 key="split")
    set_params(ds="easy_vqa", split=split)
    st.session_state["source_args"] = ("easy_vqa", "easy_vqa", None, split)
    return get_source("easy_vqa", "easy_vqa", None, split)


def render_grid(source: ExampleSource, positions: np.ndarray) -> int | None:
    """A grid of thumbnails with an Open button each; returns the clicked position."""
    kind, name, config, split = st.session_state["source_args"]
    chosen = None
    for row_start in range(0, len(positions), GRID_COLUMNS):
        cols = st.columns(GRID_COLUMNS)
        for col, pos in zip(cols, positions[row_start : row_start + GRID_COLUMNS]):
            with col:
                png = thumbnail_png(kind, name, config, split, int(pos))
                if png is None:
                    st.warning("image unavailable")
                else:
                    st.image(png, width="stretch")
                st.caption(str(source.index["question"].iloc[pos])[:80])
                if st.button("Open", key=f"open_{pos}"):
                    chosen = int(pos)
    return chosen


def render_detail(source: ExampleSource, example_id: str) -> None:
    """The opened example: image with boxes, question, choices with gold, facts, and the hand-over."""
    position = int(example_id.rsplit("/", 1)[-1])
    example = source.example(position)
    st.divider()
    st.subheader(f"Example `{example.example_id}`")
    left, right = st.columns([1, 1])
    with left:
        image = example.load_image()
        st.image(draw_regions(image, example.regions) if example.regions else image, width="stretch")
    with right:
        mentions = example.meta.get("mentions", {})
        st.html(f"<p style='font-size:1.2em'>{highlight_mentions(example.question, mentions.get('question', []))}</p>")
        if example.answers:
            st.markdown(f"**Gold answer:** {', '.join(example.answers)}")
        _choices("Answers", example.answer_choices, example.answer_label, mentions.get("answer_choices", []))
        _choices("Rationales", example.rationale_choices, example.rationale_label, mentions.get("rationale_choices", []))
        _facts(example)
        if example.category:
            st.caption(f"{source.categories_label}: {example.category}")
        if st.button("Interpret this example", key="interpret", type="primary"):
            st.switch_page(RUNNER_PAGE, query_params={"ds": source.key, "split": source.split, "ex": example.example_id})


def _choices(title: str, choices, gold: int | None, mentions: list) -> None:
    if not choices:
        return
    st.markdown(f"**{title}**")
    for i, text in enumerate(choices):
        spans = mentions[i] if i < len(mentions) else []
        mark = " ✅ <i>(gold)</i>" if gold == i else ""
        st.html(f"<div>{chr(65 + i)}. {highlight_mentions(text, spans)}{mark}</div>")


def _facts(example) -> None:
    if not example.facts:
        return
    st.markdown("**Facts** (✅ positive)")
    for fact in example.facts:
        tick = "✅" if fact.positive else "▫️"
        kind = "🖼️" if fact.kind == "image" else "📄"
        st.markdown(f"{tick} {kind} **{fact.title}** — {fact.text}")
