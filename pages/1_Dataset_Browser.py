"""Browse a dataset, filter it, open an example, and hand it to the model runner."""

from __future__ import annotations

import streamlit as st

from vlcore.data.browse import count_pages, filter_index, page_of
from vlcore.errors import VLScopeError
from vlcore.ui.browser import render_detail, render_grid, source_picker, use_bundled_source
from vlcore.ui.state import get_filters, get_int, get_param, set_filters, set_params

st.set_page_config(page_title="Dataset browser · VLScope", layout="wide")
st.title("Dataset browser")

try:
    source = source_picker()
except VLScopeError as exc:
    st.error(str(exc))
    st.button("Open the bundled easy-VQA samples instead", key="to_bundled", on_click=use_bundled_source)
    st.stop()
if source is None:
    st.stop()

index = source.index
with st.sidebar:
    url = get_filters()
    query = st.text_input("Search questions", value=url["query"], key="q")
    all_categories = sorted(index["category"].dropna().unique())
    categories = st.multiselect(f"Filter by {source.categories_label}", all_categories, key="cat",
                                default=[c for c in url["categories"] if c in all_categories])
    answer = st.text_input("Answer is", value=url["answer"], key="answer")
    all_objects = sorted({o for row in index["objects"] for o in row})
    objects = st.multiselect("Objects present", all_objects, key="objects",
                             default=[o for o in url["objects"] if o in all_objects]) if all_objects else []
set_filters(query, categories, answer, objects)

matches = filter_index(index, query, categories, answer, objects)
st.caption(f"{source.label}: {len(matches):,} of {len(index):,} examples match.")
if len(matches) == 0:
    st.info("No example matches these filters.")
    st.stop()

n_pages = count_pages(len(matches))  # the box and the link's page are clamped to the pages there are
page_number = st.number_input("Page", min_value=1, max_value=n_pages, value=get_int("pg", 1, 1, n_pages), step=1,
                              key="pg")
positions, page_number, n_pages = page_of(matches, page_number)
set_params(pg=page_number if page_number > 1 else None)
st.caption(f"Page {page_number} of {n_pages}")
chosen = render_grid(source, positions)
if chosen is not None:
    set_params(ex=index["example_id"].iloc[chosen])

example_id = get_param("ex")
if example_id and source.position_of(example_id) is not None:
    try:
        render_detail(source, example_id)
    except VLScopeError as exc:
        st.error(str(exc))
