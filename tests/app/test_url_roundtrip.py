"""Every view is a URL: set a state, read the URL, open a fresh session with it, get the same view.

And malformed links (a negative head, a head past the model's count, a non-number, an unknown example,
a path like ``../../etc/passwd``) give a notice and a valid view, never an exception or a file read.
"""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest

from tests.app.conftest import PAGES, open_page
from tests.app.entry_point import through_entry_point  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("through_entry_point")  # pages run as the server runs them

WIDGET_KINDS = ("selectbox", "radio", "slider", "select_slider", "text_input", "multiselect", "checkbox", "toggle",
                "number_input", "button_group")
SKIP_KEYS = {"hm_opacity", "hm_smooth", "opacity", "top_k"}  # display preferences, not view state


def view_state(at) -> dict:
    """Key -> value of every keyed input widget on the page (the view a user sees)."""
    state = {}
    for kind in WIDGET_KINDS:
        try:
            widgets = list(getattr(at, kind))
        except (AttributeError, KeyError):
            continue
        for w in widgets:
            key = getattr(w, "key", None)
            if key and key not in SKIP_KEYS and not key.startswith("$$"):
                value = w.value
                state[key] = list(value) if isinstance(value, (list, tuple)) else value
    return state


def reopen(page: str, at):
    """A fresh session on ``page`` with only the URL of ``at``."""
    return open_page(page, dict(at.query_params))


def roundtrip(page: str, params: dict, actions) -> tuple[dict, dict, dict]:
    at = open_page(page, params)
    assert not at.exception and not at.error
    for act in actions:
        act(at)
        at.run()
        assert not at.exception and not at.error
    fresh = reopen(page, at)
    assert not fresh.exception and not fresh.error
    return view_state(at), view_state(fresh), dict(at.query_params)


def test_statistics_page_roundtrip():
    before, after, url = roundtrip("pages/3_Head_Statistics.py", {"ex": "easy_vqa/test/4"}, [
        lambda at: at.radio(key="norm").set_value("z"),
        lambda at: at.selectbox(key="metric").set_value("cross_modal"),
        lambda at: at.slider(key="layer").set_value(2),
        lambda at: at.selectbox(key="head").set_value(3),
    ])
    assert url["norm"] == "z" and url["layer"] == "2" and url["head"] == "3" and url["ex"] == "easy_vqa/test/4"
    assert before == after


def test_heatmaps_page_roundtrip():
    before, after, url = roundtrip("pages/4_Attention_Heatmaps.py", {"ex": "easy_vqa/test/7"}, [
        lambda at: at.slider(key="layer").set_value(1),
        lambda at: at.selectbox(key="head").set_value(2),
        lambda at: at.button_group(key="hm_tok").set_value(2),
        lambda at: at.button_group(key="hm_dir").set_value("to"),
        lambda at: at.button_group(key="hm_method").set_value("rollout"),
    ])
    assert url["tok"] == "2" and url["dir"] == "to" and url["method"] == "rollout" and url["head"] == "2"
    assert before == after


def test_annotations_page_roundtrip():
    from vlcore.storage.annotations import AnnotationStore

    store = AnnotationStore()
    store.add(annotator="ana", page="pages/4_Attention_Heatmaps.py", label="plausible", text="ok",
              example_id="easy_vqa/test/1", model="demo", layer=1, head=0)
    store.add(annotator="bo", page="pages/3_Head_Statistics.py", label="implausible", text="no",
              example_id="easy_vqa/test/2", model="demo", layer=0, head=1)
    before, after, url = roundtrip("pages/6_Annotations.py", {}, [
        lambda at: at.selectbox(key="ann_who").set_value("ana"),
    ])
    assert url["who"] == "ana"
    assert before == after


MALFORMED = [
    {"head": "-1"},
    {"head": "999"},
    {"layer": "abc", "head": "1.5"},
    {"ex": "easy_vqa/test/999999"},
    {"ex": "../../etc/passwd"},
    {"ds": "generic", "loc": "../../etc/passwd", "ex": "generic/x/1"},
    {"ds": "vcr", "loc": "/etc", "img": "/etc/passwd"},
    {"model": "../../etc", "tok": "-3", "patch": "9.9,a.b"},
    {"sweep": "../../..", "scope": "sweep", "slice": "cat:", "metric": "x"},
]


@pytest.mark.parametrize("page", [p for p in PAGES if "Annotations" not in p] + [None])
def test_malformed_links_give_a_valid_view_and_read_no_file(page, monkeypatch):
    import mimetypes

    mimetypes.init()  # the standard library's own table (/etc/mime.types) is not a file a link made us read
    opened = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    for params in MALFORMED:
        at = open_page(page, params)
        assert not at.exception, (page, params, at.exception)
    assert not [f for f in opened if Path(f).resolve().is_relative_to("/etc")]


def test_browser_page_roundtrip():
    before, after, url = roundtrip("pages/1_Dataset_Browser.py", {}, [
        lambda at: at.text_input(key="q").set_value("shape"),
        lambda at: at.multiselect(key="cat").set_value(["shape"]),
        lambda at: at.number_input(key="pg").set_value(2),
    ])
    assert url["q"] == "shape" and url["cat"] == "shape" and url["pg"] == "2"
    assert before == after


def test_runner_page_roundtrip():
    before, after, url = roundtrip("pages/2_Run_Model.py", {"ex": "easy_vqa/test/9"}, [])
    assert url["ex"] == "easy_vqa/test/9"
    assert before == after


def test_embeddings_page_roundtrip():
    before, after, url = roundtrip("pages/5_Embeddings.py", {"ex": "easy_vqa/test/6"}, [
        lambda at: at.select_slider(key="emb_layer").set_value(2),
        lambda at: at.selectbox(key="emb_color").set_value("token"),
    ])
    assert url["layer"] == "2" and url["color"] == "token"
    assert before == after
