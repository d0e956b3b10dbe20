"""The Annotations page and the "Annotate this view" panel, against the app's default SQLite file."""

from __future__ import annotations

import io
import os
import uuid
from urllib.parse import parse_qsl, urlsplit

import pandas as pd
import pytest
import sqlalchemy as sa
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

from tests.app.conftest import open_page
from tests.conftest import ROOT
from vlcore.storage.annotations import AnnotationStore, default_url

PAGE = "pages/6_Annotations.py"
PANEL_PAGE = str(ROOT / "tests" / "app" / "annotate_page.py")


@pytest.fixture
def store():
    """The database the app opens by default (the autouse fixture's VLSCOPE_CACHE), with three rows."""
    store = AnnotationStore(default_url())
    view = "ex=easy_vqa/test/0&layer=3&head=1"
    store.add(annotator="ana", page="pages/4_Attention_Heatmaps.py", label="plausible", example_id="easy_vqa/test/0",
              model="demo", layer=3, head=1, view=view, text="tracks the circle")
    store.add(annotator="bo", page="pages/4_Attention_Heatmaps.py", label="implausible", example_id="easy_vqa/test/0",
              model="demo", layer=3, head=2, view=view.replace("head=1", "head=2"), text="background")
    store.add(annotator="ana", page="pages/3_Head_Statistics.py", label="other", example_id="easy_vqa/test/5",
              view="ex=easy_vqa/test/5", text="'); DROP TABLE annotations; --")
    store.add(annotator="eve", page="pages/9_Retired.py", label="other", view="ex=easy_vqa/test/1", text="old page")
    store.add(annotator="dee", page="pages/2_Run_Model.py", label="other", example_id="easy_vqa/test/9",
              view="ex=easy_vqa/test/9&model=demo", text="runner")
    return store


@pytest.fixture
def downloads(monkeypatch):
    """Bytes handed to st.download_button, by file name."""
    files: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def record(self, path_or_data, mimetype, kind, filename=None):
        files[filename] = path_or_data
        return original(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record)
    return files


def _table(at) -> pd.DataFrame:
    return at.dataframe[0].value


def test_lists_every_annotation_and_exports(store, downloads):
    at = open_page(PAGE)
    assert not at.exception and not at.error
    table = _table(at)
    assert sorted(table["text"]) == sorted(store.list()["text"])
    assert "'); DROP TABLE annotations; --" in set(table["text"])
    assert table["link"].str.contains("/Attention_Heatmaps?ex=easy_vqa/test/0&layer=3&head=", regex=False).sum() == 2
    csv = pd.read_csv(io.BytesIO(downloads["annotations.csv"]))
    parquet = pd.read_parquet(io.BytesIO(downloads["annotations.parquet"]))
    for back in (csv, parquet):
        assert sorted(back["text"]) == sorted(table["text"])
        assert list(back.columns) == list(store.list().columns)


@pytest.mark.parametrize(("params", "texts"), [
    ({"who": "bo"}, ["background"]),
    ({"label": "plausible"}, ["tracks the circle"]),
    ({"who": "ana", "ex": "easy_vqa/test/0"}, ["tracks the circle"]),
    ({"page": "Head_Statistics"}, ["'); DROP TABLE annotations; --"]),
])
def test_url_filters(store, params, texts):
    at = open_page(PAGE, params)
    assert not at.exception and not at.error
    assert sorted(_table(at)["text"]) == sorted(texts)
    assert {k: at.query_params[k] for k in params} == params  # the filters stay in the URL


def test_unknown_filter_values_give_a_notice_and_everything(store):
    at = open_page(PAGE, {"who": "../../etc/passwd", "label": "nonsense"})
    assert not at.exception and not at.error
    assert len(_table(at)) == 5
    notices = " ".join(i.value for i in at.info)
    assert "who=../../etc/passwd" in notices and "label=nonsense" in notices
    assert "who" not in at.query_params and "label" not in at.query_params


def test_filter_widgets_write_the_url(store):
    at = open_page(PAGE)
    at.selectbox(key="ann_who").set_value("bo").run()
    assert at.query_params["who"] == "bo"
    assert list(_table(at)["text"]) == ["background"]


@pytest.mark.parametrize(("who", "page", "params"), [
    ("dee", "Run_Model", {"ex": "easy_vqa/test/9", "model": "demo"}),
    ("bo", "Attention_Heatmaps", {"ex": "easy_vqa/test/0", "layer": "3", "head": "2"}),
])
def test_a_row_opens_its_view(store, who, page, params):
    at = open_page(PAGE, {"who": who})
    links = at.get("page_link")
    assert len(links) == 1
    assert page in links[0].proto.page
    assert dict(parse_qsl(links[0].proto.query_string)) == params


def test_a_row_of_a_page_not_in_this_app_shows_its_view(store):
    at = open_page(PAGE, {"who": "eve"})
    assert not at.exception and not at.get("page_link")
    assert any("is not part of this app" in c.value for c in at.caption)


def test_empty_database_says_how_to_start():
    at = open_page(PAGE)
    assert not at.exception and not at.error
    assert any("No annotations yet" in i.value for i in at.info)


def test_session_label_can_be_added(store):
    at = open_page(PAGE)
    at.text_input(key="new_label").set_value("head tracks colour")
    at.button(key="FormSubmitter:add_label-Add label").click().run()
    assert "head tracks colour" in at.selectbox(key="ann_label").options


def test_annotate_panel_saves_a_row_with_its_view():
    at = AppTest.from_file(PANEL_PAGE, default_timeout=60).run()
    assert not at.exception and not at.error
    assert any("No annotations on this example yet" in c.value for c in at.caption)
    at.text_input(key="annotator_name_input").set_value("carla")
    at.selectbox(key="annotate_label").set_value("head tracks the mentioned object")
    at.text_area(key="annotate_text").set_value("follows the circle; '); DROP TABLE annotations; --")
    at.button(key="FormSubmitter:annotate-Save annotation").click().run()
    assert not at.exception and not at.error, at.error
    assert any("Saved as carla" in s.value for s in at.success)
    rows = AnnotationStore(default_url()).list()
    assert len(rows) == 1
    row = rows.iloc[0]
    assert (row["annotator"], row["page"], row["example_id"], row["model"]) == (
        "carla", "pages/4_Attention_Heatmaps.py", "easy_vqa/test/3", "demo")
    assert (row["layer"], row["head"], row["token"]) == (2, 1, 0)
    assert row["text"] == "follows the circle; '); DROP TABLE annotations; --"
    assert dict(parse_qsl(row["view"])) == {"ex": "easy_vqa/test/3", "layer": "2", "head": "1", "tok": "0"}
    assert "1 annotation(s) on this example, 1 on this head" in " ".join(c.value for c in at.caption)
    # the name is remembered for the session: the next run does not ask again
    at.run()
    assert not [t for t in at.text_input if t.key == "annotator_name_input"]
    assert any("Annotating as **carla**" in c.value for c in at.caption)


def test_annotate_panel_refuses_a_save_without_a_name_and_keeps_the_note():
    at = AppTest.from_file(PANEL_PAGE, default_timeout=60).run()
    at.text_area(key="annotate_text").set_value("the head looks at the background")
    at.button(key="FormSubmitter:annotate-Save annotation").click().run()
    assert not at.exception
    assert next(e.value for e in at.error if "annotator name" in e.value).startswith("Type an annotator name")
    assert at.text_area(key="annotate_text").value == "the head looks at the background"  # the note is kept
    assert AnnotationStore(default_url()).count() == 0
    at.text_input(key="annotator_name_input").set_value("dana")
    at.button(key="FormSubmitter:annotate-Save annotation").click().run()
    assert not at.exception and not at.error, at.error
    assert AnnotationStore(default_url()).list()["text"].tolist() == ["the head looks at the background"]
    assert at.text_area(key="annotate_text").value == ""  # saved: the form is ready for the next note


def test_a_view_of_the_mean_over_heads_is_stored_as_mean():
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=120)
    at.switch_page("pages/3_Head_Statistics.py").run()
    assert not at.exception and not at.error, at.error
    assert at.selectbox(key="head").value == "mean"
    at.text_input(key="annotator_name_input").set_value("ana")
    at.button(key="FormSubmitter:annotate-Save annotation").click().run()
    assert not at.exception and not at.error, at.error
    row = AnnotationStore(default_url()).list().iloc[0]
    assert bool(row["head_mean"]) and pd.isna(row["head"])
    at = open_page(PAGE)
    assert _table(at)["head"].tolist() == ["mean"]


def test_share_view_gives_the_full_link():
    at = AppTest.from_file(PANEL_PAGE, default_timeout=60)
    at.context = {"url": "https://vlscope.streamlit.app/Attention_Heatmaps"}
    at.run()
    link = at.session_state["link"]
    assert link.startswith("https://vlscope.streamlit.app/Attention_Heatmaps?")
    assert dict(parse_qsl(urlsplit(link).query)) == {"ex": "easy_vqa/test/3", "layer": "2", "head": "1", "tok": "0"}
    assert link in [c.value for c in at.code]


@pytest.mark.skipif(not os.environ.get("VLSCOPE_TEST_PG_URL"),
                    reason="VLSCOPE_TEST_PG_URL is not set: no PostgreSQL server to test against (.ci/run starts one)")
def test_secrets_connection_to_postgres():
    """[connections.annotations] in secrets wins over the SQLite default; the panel saves to Postgres."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(os.environ["VLSCOPE_TEST_PG_URL"], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    try:
        url = os.environ["VLSCOPE_TEST_PG_URL"]
        at = AppTest.from_file(PANEL_PAGE, default_timeout=60)
        at.secrets["connections"] = {"annotations": {
            "url": url, "create_engine_kwargs": {"connect_args": {"options": f"-csearch_path={schema}"}}}}
        at.run()
        at.text_input(key="annotator_name_input").set_value("pg")
        at.button(key="FormSubmitter:annotate-Save annotation").click().run()
        assert not at.exception and not at.error
        engine = sa.create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
        assert AnnotationStore(engine).list()["annotator"].tolist() == ["pg"]
        engine.dispose()
        assert AnnotationStore(default_url()).count() == 0  # nothing went to the SQLite file
    finally:
        with admin.connect() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        admin.dispose()


def test_unreachable_database_is_one_error_line():
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=60)
    at.secrets["connections"] = {"annotations": {"url": "postgresql+psycopg://nobody@127.0.0.1:1/none"}}
    at.switch_page(PAGE).run()
    assert not at.exception
    assert any("annotations database" in e.value and "secrets.toml" in e.value for e in at.error)


def test_without_an_example_the_panel_lists_this_heads_annotations():
    store = AnnotationStore(default_url())
    for example, layer, head in (("easy_vqa/test/1", 2, 1), ("easy_vqa/test/2", 2, 1), ("easy_vqa/test/3", 2, 0),
                                 ("easy_vqa/test/4", 1, 1)):
        store.add(annotator="ana", page="pages/3_Head_Statistics.py", label="other", example_id=example,
                  model="demo", layer=layer, head=head)
    at = AppTest.from_file(PANEL_PAGE, default_timeout=60)
    at.session_state["sweep_view"] = True
    at.run()
    assert not at.exception and not at.error
    assert any("2 annotation(s) on layer 2 head 1 of this model" in c.value for c in at.caption)
    assert sorted(at.dataframe[0].value["example_id"]) == ["easy_vqa/test/1", "easy_vqa/test/2"]
    at.text_input(key="annotator_name_input").set_value("bo")
    at.button(key="FormSubmitter:annotate-Save annotation").click().run()
    row = store.list(annotator="bo").iloc[0]
    assert pd.isna(row["example_id"]) and (row["layer"], row["head"]) == (2, 1)
    assert dict(parse_qsl(row["view"])) == {"layer": "2", "head": "1"}
