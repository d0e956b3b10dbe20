"""Streamlit glue for annotations and share links.

The annotations database is ``st.connection("annotations", type="sql")``: the ``[connections.annotations]``
section of ``.streamlit/secrets.toml`` when there is one (Postgres in production), else
``$VLSCOPE_ANNOTATIONS_URL``, else the SQLite file ``annotations.sqlite`` under the store root.

A page adds both controls at its end, after every widget has written its URL parameters::

    from vlcore.ui.annotate import annotate_panel, share_view

    share_view("pages/4_Attention_Heatmaps.py")
    annotate_panel("pages/4_Attention_Heatmaps.py", example_id=trace.example_id, model=trace.model_id,
                   layer=layer, head=head, token=query)
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode

import pandas as pd
import streamlit as st
from streamlit.errors import StreamlitAPIException

from vlcore.storage.annotations import MEAN, AnnotationStore, default_url, head_labels, load_label_set, parse_labels
from vlcore.app_files import APP_ROOT as ROOT  # the checkout, or the installed vlscope_app
from vlcore.errors import AnnotationError, VLScopeError
from vlcore.ui.state import current_params

LABELS_FILE = ROOT / ".streamlit" / "vlscope_labels.toml"
NAME_KEY = "vlscope_annotator"
NAME_INPUT_KEY = "annotator_name_input"
NOTE_KEY = "annotate_text"
SAVE_RESULT_KEY = "_vlscope_annotate_result"  # (kind, message) of the last save, shown once
NO_HEAD = object()  # annotate_panel's head when the view has no heads (head=None is the mean over heads)
EXTRA_LABELS_KEY = "vlscope_extra_labels"
MAIN_SCRIPT = "streamlit_app.py"


def _secret_section(*path: str) -> dict | list | str | None:
    """``st.secrets[path...]``, or None when there is no secrets file or no such entry."""
    try:
        node = st.secrets
        for part in path:
            node = node[part]
    except (FileNotFoundError, KeyError, TypeError):
        return None
    return node.to_dict() if hasattr(node, "to_dict") else node


@st.cache_resource(show_spinner=False)
def _store_for(url_key: str, _engine) -> AnnotationStore:
    """One AnnotationStore (schema checked once) per database; ``_engine`` is the connection's engine for
    ``url_key``."""
    return AnnotationStore(_engine)


def get_annotations() -> AnnotationStore:
    """The annotations store of this app, with the current label set (configured + this session's).

    Raises:
        AnnotationError: the database cannot be opened (the message names it, password hidden).
    """
    try:
        section = _secret_section("connections", "annotations")
        if section:  # passed explicitly: the same as Streamlit reading it, and AppTest's secrets reach it
            kwargs = dict(section)
            conn = st.connection("annotations", type="sql", **kwargs.pop("create_engine_kwargs", {}), **kwargs)
        else:
            conn = st.connection("annotations", type="sql", url=default_url())
        engine = conn.engine
        store = _store_for(engine.url.render_as_string(hide_password=False), engine)
        store.ensure_schema()
    except VLScopeError:
        raise
    except Exception as exc:  # a driver missing, a server down: one line, not a traceback
        raise AnnotationError(f"the annotations database could not be opened ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); check "
                              "[connections.annotations] in .streamlit/secrets.toml") from exc
    return store.with_labels(label_set())


def label_set() -> tuple[str, ...]:
    """Configured labels (secrets ``[annotations] labels``, ``$VLSCOPE_LABELS``,
    ``.streamlit/vlscope_labels.toml``, or the defaults) plus the labels added in this session."""
    base = load_label_set(_secret_section("annotations", "labels"), file=LABELS_FILE)
    return parse_labels([*base, *st.session_state.get(EXTRA_LABELS_KEY, [])])


def add_label_control() -> None:
    """Sidebar: add a label to this session's label set."""
    with st.sidebar.form("add_label", clear_on_submit=True, border=False):
        new = st.text_input("Add a label (this session)", key="new_label", max_chars=200)
        if st.form_submit_button("Add label") and new.strip():
            extra = st.session_state.setdefault(EXTRA_LABELS_KEY, [])
            if new.strip() not in label_set():
                extra.append(new.strip())


def annotator_name() -> str | None:
    """The annotator's name, asked once and kept for the session (None until given)."""
    name = st.session_state.get(NAME_KEY)
    if name:
        left, right = st.columns([3, 1])
        left.caption(f"Annotating as **{name}**")
        if right.button("Not you?", key="annotator_reset"):
            st.session_state.pop(NAME_KEY, None)
            st.rerun()
        return name
    typed = st.text_input("Your name (asked once per session)", key=NAME_INPUT_KEY, max_chars=100)
    if typed.strip():
        st.session_state[NAME_KEY] = typed.strip()
        return typed.strip()
    return None


def current_view() -> str:
    """The current URL state as a query string (the view an annotation refers to)."""
    return urlencode(current_params(), quote_via=quote, safe="/:,")


def annotate_panel(page: str, example_id: str | None = None, model: str | None = None, layer: int | None = None,
                   head: int | None | object = NO_HEAD, token: int | None = None) -> None:
    """An "Annotate this view" expander: label, note, save; then the annotations of this example.

    Args:
        page: the page's script path, e.g. ``pages/4_Attention_Heatmaps.py`` (the Annotations page links to it).
        example_id, model, layer, token: the view's coordinates (None where they do not apply).
        head: the view's head; None is the mean over heads (stored as ``head="mean"``); leave it out for a view
            without heads.
    """
    with st.expander("Annotate this view"):
        try:
            store = get_annotations()
        except VLScopeError as exc:
            st.error(str(exc))
            return
        stored_head = None if head is NO_HEAD else MEAN if head is None else head
        annotator_name()
        # No clear_on_submit: a refused save (no name yet) keeps the note; a saved one is cleared by the callback.
        with st.form("annotate", clear_on_submit=False):
            st.selectbox("Label", store.labels, key="annotate_label")
            st.text_area("Note", key=NOTE_KEY, max_chars=10_000,
                         placeholder="e.g. the answer is wrong because the head looks at the background")
            view = {"page": page, "example_id": example_id, "model": model, "layer": layer, "head": stored_head,
                    "token": token, "view": current_view()}
            st.form_submit_button("Save annotation", on_click=_save, args=(store, view))
        kind, message = st.session_state.pop(SAVE_RESULT_KEY, (None, None))
        if kind == "success":
            st.success(message)
        elif kind == "error":
            st.error(message)
        _show_existing(store, example_id, model, layer, stored_head)


def _save(store: AnnotationStore, view: dict) -> None:
    """The Save button's callback (it runs before the page, so it may clear the note): save the form's label and
    note with the view; on a refusal keep the note and say why."""
    state = st.session_state
    name = state.get(NAME_KEY) or (state.get(NAME_INPUT_KEY) or "").strip()
    if not name:
        message = "Type an annotator name in “Your name” above, then save again: your note is kept."
        state[SAVE_RESULT_KEY] = ("error", message)
        return
    label = state.get("annotate_label")
    try:
        store.add(annotator=name, label=label, text=state.get(NOTE_KEY) or "", **view)
    except VLScopeError as exc:
        state[SAVE_RESULT_KEY] = ("error", f"{str(exc)[:1].upper()}{str(exc)[1:]}. Your note is kept.")
        return
    state[NAME_KEY] = name
    state[NOTE_KEY] = ""
    state[SAVE_RESULT_KEY] = ("success", f"Saved as {name}: {label}")


def _show_existing(store: AnnotationStore, example_id: str | None, model: str | None, layer: int | None,
                   head: int | str | None) -> None:
    """The annotations on this example (this head's counted); without an example, those on this model's head
    (``head``: an index, ``"mean"`` or None for a view without heads)."""
    if example_id is None and head is None:
        return
    try:
        if example_id is not None:
            rows = store.list(example_id=example_id, limit=200)
        else:
            rows = store.list(model=model, head=head, limit=200)
            rows = rows[rows["layer"].eq(layer).fillna(False)] if layer is not None else rows
    except VLScopeError as exc:
        st.error(str(exc))
        return
    head_text = "the mean over heads" if head == MEAN else f"head {head}"
    where = "this example" if example_id is not None else f"layer {layer} {head_text} of this model"
    if rows.empty:
        st.caption(f"No annotations on {where} yet.")
        return
    if head == MEAN:
        on_head = rows["head_mean"].fillna(False).astype(bool)
    elif head is not None:
        on_head = rows["head"].eq(head).fillna(False).astype(bool)
    else:
        on_head = rows["head"].isna() & ~rows["head_mean"].fillna(False).astype(bool)
    count = f"{len(rows)} annotation(s) on {where}"
    st.caption(count + (f", {int(on_head.sum())} on this head" if example_id is not None and head is not None
                        else ""))
    shown = rows.assign(head=head_labels(rows), this_head=on_head.to_numpy())
    st.dataframe(shown[["created_at", "annotator", "label", "text", "example_id", "layer", "head", "token",
                        "this_head", "page"]], hide_index=True)


def page_url_path(page: str) -> str:
    """The URL path Streamlit gives a page file: ``pages/4_Attention_Heatmaps.py`` -> ``Attention_Heatmaps``;
    the main script -> ``""``.

    >>> page_url_path("pages/6_Annotations.py"), page_url_path("streamlit_app.py")
    ('Annotations', '')
    """
    path = Path(page)
    if path.parent.name != "pages":
        return ""
    match = re.fullmatch(r"([0-9]*)[_ -]*(.*)\.py", path.name)
    name = re.sub(r"[_ ]+", "_", match.group(2)).strip() if match else ""
    return name or (match.group(1) if match else path.stem)


def share_link(app_url: str | None, page: str, params: dict) -> str:
    """The full link to ``page`` with ``params``; relative (``/Page?...``) when the app's URL is unknown.

    ``app_url`` is ``st.context.url``: the app's address plus the current page's path.

    >>> share_link("https://vlscope.streamlit.app/Attention_Heatmaps", "pages/4_Attention_Heatmaps.py",
    ...            {"ex": "easy_vqa/test/1", "head": "2"})
    'https://vlscope.streamlit.app/Attention_Heatmaps?ex=easy_vqa/test/1&head=2'
    """
    path = page_url_path(page)
    root = (app_url or "").split("?")[0].split("#")[0].rstrip("/")
    if path and root.endswith("/" + path):
        root = root[: -len(path) - 1]
    query = urlencode(params, quote_via=quote, safe="/:,")
    return f"{root}/{path}" + (f"?{query}" if query else "")


def share_view(page: str) -> str:
    """A "Share this view" control in the sidebar: the full link to this page with the current URL state,
    in a code box with a copy button. Call it last, after the page has written its URL parameters.

    Returns:
        The link.
    """
    link = share_link(st.context.url, page, current_params())
    with st.sidebar.expander("🔗 Share this view"):
        st.code(link, language=None, wrap_lines=True)
        if not st.context.url:
            st.caption("Prefix the app's address (e.g. https://your-app.streamlit.app).")
    return link


def app_pages() -> list[str]:
    """The app's page files, as stored in annotations: the main script, then ``pages/N_Title.py``."""
    return [MAIN_SCRIPT, *sorted(f"pages/{p.name}" for p in (ROOT / "pages").glob("*.py"))]


def view_params(view: str) -> dict[str, str]:
    """A stored view (query string) back as URL parameters."""
    return dict(parse_qsl(view or "", keep_blank_values=False))


def open_view_link(row: pd.Series) -> None:
    """A link that opens an annotation's view: its page with its URL parameters."""
    page = str(row["page"])
    params = view_params(str(row["view"]))
    if page not in app_pages():
        st.caption(f"Page `{page}` is not part of this app; the view was `{row['view']}`.")
        return
    try:
        st.page_link(page, label=f"Open annotation #{row['id']} on {page_url_path(page) or 'Home'}",
                     query_params=params, icon="🔗")
    except StreamlitAPIException:
        st.caption(f"Open `{share_link(st.context.url, page, params)}`")
