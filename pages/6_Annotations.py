"""Every annotation: filter by annotator, label, example and page; open a row's view; export CSV or Parquet."""

from __future__ import annotations

import streamlit as st

from vlcore.storage.annotations import COLUMNS, head_labels
from vlcore.storage.tables import frame_to_csv, frame_to_parquet
from vlcore.errors import VLScopeError
from vlcore.ui.annotate import (add_label_control, get_annotations, open_view_link, page_url_path, share_link,
                                share_view, view_params)
from vlcore.ui.state import get_choice, get_param, set_params

PAGE = "pages/6_Annotations.py"
ALL = "(all)"

st.set_page_config(page_title="Annotations · VLScope", layout="wide")
st.title("Annotations")
st.caption("Judgements annotators saved with **Annotate this view** on the analysis pages.")
add_label_control()
try:
    store = get_annotations()
    annotators, labels_used, pages = store.annotators(), store.labels_used(), store.pages()
except VLScopeError as exc:
    st.error(str(exc))
    st.stop()

# Filters, bound to the URL: who, label, ex, page.
page_names = {page_url_path(p) or "Home": p for p in pages}
who_options = [ALL, *annotators]
label_options = [ALL, *dict.fromkeys([*store.labels, *labels_used])]
page_options = [ALL, *page_names]
who = st.sidebar.selectbox("Annotator", who_options, key="ann_who",
                           index=who_options.index(get_choice("who", who_options, ALL)))
label = st.sidebar.selectbox("Label", label_options, key="ann_label",
                             index=label_options.index(get_choice("label", label_options, ALL)))
example = st.sidebar.text_input("Example id", value=get_param("ex") or "", key="ann_ex",
                                placeholder="easy_vqa/test/12").strip()
page_name = st.sidebar.selectbox("Page", page_options, key="ann_page",
                                 index=page_options.index(get_choice("page", page_options, ALL)))
set_params(who=None if who == ALL else who, label=None if label == ALL else label, ex=example or None,
           page=None if page_name == ALL else page_name)
st.sidebar.caption(f"Database: `{store.where}`")
share_view(PAGE)

try:
    table = store.list(annotator=None if who == ALL else who, label=None if label == ALL else label,
                       example_id=example or None, page=page_names.get(page_name))
except VLScopeError as exc:
    st.error(str(exc))
    st.stop()

if table.empty:
    st.info("No annotations match." if store.count() else
            "No annotations yet. Open an analysis page and use **Annotate this view**.")
    st.stop()

st.caption(f"{len(table):,} of {store.count():,} annotation(s)")
shown = table.assign(head=head_labels(table),  # "mean" for the mean over heads
                     link=[share_link(st.context.url, p, view_params(v)) for p, v in zip(table["page"], table["view"])])
shown = shown.drop(columns="head_mean")
st.dataframe(shown, hide_index=True, key="annotations_table",
             column_config={"link": st.column_config.LinkColumn("view", display_text="open"),
                            "created_at": st.column_config.DatetimeColumn("time (UTC)")})

pick = st.selectbox("Open the view of annotation", table["id"].tolist(), key="ann_open",
                    format_func=lambda i: f"#{i}: {table.set_index('id').at[i, 'label']} "
                                          f"by {table.set_index('id').at[i, 'annotator']}")
open_view_link(table.set_index("id", drop=False).loc[pick])

left, right = st.columns(2)
left.download_button("Download CSV", frame_to_csv(table[COLUMNS]), "annotations.csv", "text/csv", key="dl_csv")
right.download_button("Download Parquet", frame_to_parquet(table[COLUMNS]), "annotations.parquet",
                      "application/vnd.apache.parquet", key="dl_parquet")
