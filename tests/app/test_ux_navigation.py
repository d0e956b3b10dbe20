"""What a user met in the browser (issue 14, item 4): the view across pages, Back, the hub picker, a stopped sweep,
and the statistics caches keyed on what a trace is rather than on its name."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

import pytest
from streamlit.testing.v1 import AppTest

from tests.app.conftest import HOME, PAGES, heatmap_specs, open_page
from tests.app.entry_point import through_entry_point  # noqa: F401 (a fixture)
from vlcore.ui.annotate import page_url_path

pytestmark = pytest.mark.usefixtures("through_entry_point")

RUNNER = "pages/2_Run_Model.py"
STATS = "pages/3_Head_Statistics.py"
HEATMAPS = "pages/4_Attention_Heatmaps.py"
EMBEDDINGS = "pages/5_Embeddings.py"
BROWSER = "pages/1_Dataset_Browser.py"


def sidebar_to(at: AppTest, page: str) -> AppTest:
    """Follow the sidebar's link to ``page``: Streamlit's navigation drops the query string."""
    at.query_params.clear()
    return at.switch_page(page).run()


def links(at: AppTest) -> dict[str, dict[str, str]]:
    """The page links on the page: label -> query parameters."""
    return {link.value: dict(parse_qsl(link.proto.query_string)) for link in at.get("page_link")}


def test_the_first_page_of_the_navigation_is_home(monkeypatch):
    import streamlit as st

    registered = []
    real = st.navigation

    def spy(pages, **kwargs):
        registered.append(list(pages))
        return real(pages, **kwargs)

    monkeypatch.setattr(st, "navigation", spy)
    at = open_page()
    assert not at.exception and at.title[0].value == "VLScope"
    pages = registered[-1]
    assert pages[0].title == "Home" and pages[0].url_path == ""  # the default page, at the app's root
    # every page file, in its number order, with the title and URL path the pages/ folder gave it
    expected = [(page_url_path(p).replace("_", " "), page_url_path(p)) for p in PAGES]
    assert [(p.title, p.url_path) for p in pages[1:]] == expected
    assert expected[:6] == [
        ("Dataset Browser", "Dataset_Browser"), ("Run Model", "Run_Model"), ("Head Statistics", "Head_Statistics"),
        ("Attention Heatmaps", "Attention_Heatmaps"), ("Embeddings", "Embeddings"), ("Annotations", "Annotations")]


def test_the_example_and_head_survive_the_sidebar_navigation():
    view = {"ds": "easy_vqa", "split": "train", "ex": "easy_vqa/train/3"}
    at = open_page(RUNNER, view)
    assert not at.exception and not at.error
    for page in (HEATMAPS, STATS, EMBEDDINGS, BROWSER, RUNNER):
        sidebar_to(at, page)
        assert not at.exception and not at.error, (page, at.error)
        assert {k: at.query_params.get(k) for k in view} == view, page
    sidebar_to(at, HEATMAPS)
    assert any("`easy_vqa/train/3`" in m.value for m in at.markdown)
    at.slider(key="layer").set_value(1).run()
    at.selectbox(key="head").set_value(0).run()
    sidebar_to(at, STATS)
    assert (at.slider(key="layer").value, at.selectbox(key="head").value) == (1, 0)
    assert (at.query_params["layer"], at.query_params["head"], at.query_params["ex"]) == ("1", "0", view["ex"])
    to_heatmaps = links(at)["Open this head's attention heatmaps"]
    assert {k: to_heatmaps.get(k) for k in (*view, "layer", "head")} == {**view, "layer": "1", "head": "0"}


def test_the_embeddings_link_to_the_heatmaps_keeps_the_carried_dataset():
    view = {"ds": "easy_vqa", "split": "train", "ex": "easy_vqa/train/3"}
    at = open_page(RUNNER, view)
    sidebar_to(at, EMBEDDINGS)  # the first run after the sidebar link: the URL is written at its end
    assert not at.exception and not at.error
    to_heatmaps = next(q for label, q in links(at).items() if "attention heatmaps" in label)
    assert {k: to_heatmaps.get(k) for k in view} == view


def test_a_local_model_folder_survives_the_sidebar_navigation_but_stays_out_of_links():
    from tests.conftest import DEMO_DIR

    at = open_page(RUNNER, {"ex": "easy_vqa/test/3"})
    at.radio(key="model_kind").set_value("Local folder").run()
    at.text_input(key="model_dir").set_value(str(DEMO_DIR)).run()
    assert not at.exception and not at.error and "model" not in at.query_params
    sidebar_to(at, HEATMAPS)
    assert not at.exception and not at.error
    assert (at.radio(key="model_kind").value, at.text_input(key="model_dir").value) == ("Local folder", str(DEMO_DIR))
    assert "model" not in at.query_params and at.query_params["ex"] == "easy_vqa/test/3"
    at.radio(key="model_kind").set_value("Bundled demo (ViLT)").run()
    sidebar_to(at, STATS)
    assert at.radio(key="model_kind").value == "Bundled demo (ViLT)" and at.query_params["model"] == "demo"


def test_a_link_names_the_view_over_the_remembered_one():
    at = open_page(RUNNER, {"ex": "easy_vqa/test/4"})
    at.query_params.clear()
    at.query_params["ex"] = "easy_vqa/test/8"  # an "Open in" link or a shared link
    at.switch_page(HEATMAPS).run()
    assert not at.exception and at.query_params["ex"] == "easy_vqa/test/8"
    sidebar_to(at, STATS)
    assert at.query_params["ex"] == "easy_vqa/test/8"


def test_the_annotations_page_neither_takes_nor_changes_the_carried_example():
    at = open_page(RUNNER, {"ex": "easy_vqa/test/4"})
    sidebar_to(at, "pages/6_Annotations.py")
    assert not at.exception and "ex" not in at.query_params  # its ex is a filter: no filter was asked for
    at.text_input(key="ann_ex").set_value("easy_vqa/test/9").run()
    sidebar_to(at, HEATMAPS)
    assert at.query_params["ex"] == "easy_vqa/test/4"


def test_home_and_run_model_link_to_every_analysis_page_with_the_example():
    at = open_page()
    at.selectbox(key="sample").set_value(3).run()
    found = {label: query for label, query in links(at).items() if label.startswith("Open in")}
    assert set(found) == {"Open in Heatmaps", "Open in Head statistics", "Open in Embeddings"}
    assert links(at)["Open Bundled ViLT in Heatmaps"]["model"] == "demo"  # each demo's own link on Home
    assert {tuple(sorted(q.items())) for q in found.values()} == {
        (("ds", "easy_vqa"), ("ex", "easy_vqa/test/3"), ("model", "demo"), ("split", "test"))}
    at = open_page(RUNNER, {"ex": "easy_vqa/test/6"})
    found = links(at)
    assert found["Open in Embeddings"]["ex"] == "easy_vqa/test/6" and found["Open in Heatmaps"]["model"] == "demo"
    at.query_params.clear()
    at.query_params.update(found["Open in Heatmaps"])
    at.switch_page(HEATMAPS).run()
    assert not at.exception and any("`easy_vqa/test/6`" in m.value for m in at.markdown)


@pytest.fixture
def url_updates(monkeypatch) -> list[str]:
    """The query strings Streamlit sends to the browser; each one adds a browser history entry."""
    from streamlit.runtime.state.query_params import QueryParams

    sent: list[str] = []
    real = QueryParams._send_query_param_msg

    def recording(self):
        sent.append(str(self))
        real(self)

    monkeypatch.setattr(QueryParams, "_send_query_param_msg", recording)
    return sent


def test_a_rerun_updates_the_url_at_most_once(url_updates):
    at = AppTest.from_file(HOME, default_timeout=120)
    at.query_params["ex"] = "easy_vqa/test/7"
    at.switch_page(HEATMAPS).run()
    assert not at.exception and len(url_updates) == 1, url_updates
    assert {"model", "layer", "head", "tok", "dir", "method", "view"} <= set(at.query_params)
    url_updates.clear()
    at.slider(key="layer").set_value(1).run()
    assert len(url_updates) == 1 and at.query_params["layer"] == "1"
    url_updates.clear()
    at.run()
    assert url_updates == []  # nothing changed: no history entry at all
    sidebar_to(at, STATS)
    assert len(url_updates) == 1 and at.query_params["ex"] == "easy_vqa/test/7"


def test_a_page_that_stops_early_still_writes_its_url_once(url_updates):
    at = open_page(STATS, {"scope": "sweep", "ex": "easy_vqa/test/1"})  # no sweep stored: the page stops
    assert not at.exception and any("No sweep" in i.value for i in at.info)
    assert len(url_updates) == 1 and at.query_params["model"] == "demo" and at.query_params["scope"] == "sweep"


def test_hub_checkpoint_preselects_the_vqa_checkpoint():
    at = open_page(RUNNER, {"ex": "easy_vqa/test/1"})
    at.radio(key="model_kind").set_value("Hub checkpoint").run()
    assert not at.exception
    assert at.selectbox(key="model_hub").value == "dandelin/vilt-b32-finetuned-vqa"
    assert not any("Enter a model" in i.value for i in at.info)
    assert any("dandelin/vilt-b32-finetuned-vqa" in e.value for e in at.error)  # offline here: its error, not blank


def test_a_stopped_sweep_keeps_the_result_and_says_how_to_resume(monkeypatch):
    from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

    from vlcore.run import sweep

    real = sweep.run_sweep

    def stopped_after_the_first_batch(*args, progress, **kwargs):
        def progress_then_stop(p):
            progress(p)
            if p.done == 4:  # the user presses Streamlit's ■ Stop: the run ends at its next output
                get_script_run_ctx().script_requests.request_stop()

        return real(*args, progress=progress_then_stop, **kwargs)

    monkeypatch.setattr(sweep, "run_sweep", stopped_after_the_first_batch)
    at = open_page(RUNNER, {"ex": "easy_vqa/test/5"})
    at.number_input(key="sweep_n").set_value(20)
    at.number_input(key="sweep_batch").set_value(4)
    at.button(key="sweep_start").click().run()
    assert not at.exception
    assert any(m.value.startswith("**Prediction:**") for m in at.markdown)  # the example's result stays
    assert len(heatmap_specs(at)) == 1
    bar = at.get("progress")[0].proto.text
    assert re.match(r"\d+/20 examples done and kept", bar), bar
    at.run()  # the next click
    stopped = [w.value for w in at.warning if w.value.startswith("Stopped:")]
    kept = int(re.match(r"Stopped: (\d+) examples kept; run again to resume", stopped[0]).group(1))
    assert 4 <= kept < 20
    table = next(d.value for d in at.dataframe if "prediction" in d.value.columns)
    assert len(table) == kept


def _generic_dataset(folder, colour) -> str:
    import datasets

    from tests.data._records import solid

    datasets.Dataset.from_dict(
        {"image": [solid((48, 48), colour)] * 2, "question": ["what color is the shape?"] * 2,
         "answer": ["red"] * 2},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string")}),
    ).save_to_disk(str(folder))
    return str(folder)


def head_table(at: AppTest):
    """The one-row-per-head table of the statistics page."""
    return next(d.value for d in at.dataframe if {"layer", "head", "entropy"} <= set(d.value.columns))


def test_statistics_of_one_id_and_text_in_two_datasets_are_their_own(tmp_path):
    from tests.data._records import BLUE, RED

    red, blue = _generic_dataset(tmp_path / "red", RED), _generic_dataset(tmp_path / "blue", BLUE)
    at = open_page(STATS, {"ds": "generic", "loc": red, "split": "train", "ex": "generic/train/0"})
    assert not at.exception and not at.error, at.error
    first = head_table(at)
    at.query_params["loc"] = blue  # same example id, same question, another image
    at.run()
    assert not at.exception and not at.error, at.error
    second = head_table(at)
    assert list(first.columns) == list(second.columns) and "ablation_drop" in first.columns
    assert not first.equals(second)
    fresh = open_page(STATS, {"ds": "generic", "loc": blue, "split": "train", "ex": "generic/train/0"})
    assert head_table(fresh).equals(second)


def test_a_fresh_server_runs_a_linked_page_through_the_entry_point(monkeypatch, url_updates):
    """A shared link is the first request of a fresh server: Streamlit starts in its pages/ folder mode and runs
    the page file alone; the page's first URL read leaves that mode and reruns it through the entry point."""
    import streamlit as st
    from streamlit.runtime.pages_manager import PagesManager

    from tests.app.entry_point import FOLDER_MODE_INIT
    from vlcore.ui import state

    monkeypatch.setattr(state, "_under_app_test", lambda: False)  # as on a server
    monkeypatch.setattr(PagesManager, "__init__", FOLDER_MODE_INIT)  # the fixture's patch undone: a fresh server
    navigations, reruns = [], []
    real_navigation, real_rerun = st.navigation, st.rerun
    monkeypatch.setattr(st, "navigation", lambda pages, **kw: navigations.append(pages) or real_navigation(pages, **kw))
    monkeypatch.setattr(st, "rerun", lambda *a, **kw: reruns.append(1) or real_rerun(*a, **kw))
    at = open_page(HEATMAPS, {"ex": "easy_vqa/test/2"})
    assert not at.exception and not at.error
    assert PagesManager.uses_pages_directory is False and len(reruns) == 1  # left the folder mode once
    assert len(navigations) == 1 and navigations[0][0].title == "Home"  # then ran through the entry point
    assert len(url_updates) == 1 and at.query_params["ex"] == "easy_vqa/test/2"
