"""Probing page on the bundled demo model: a probe sweep made from the page, the layer curve, the grounding heads,
a head click, URL state, and the errors a user can cause."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pyarrow as pa
import pytest

from tests.app.conftest import chart_specs, open_page
from vlcore.charts.stats import HEAD_SELECTION

PAGE = "pages/7_Probing.py"
N = 24


@pytest.fixture(scope="module")
def probe_sweep_folder(tmp_path_factory):
    """One probe sweep of the demo model over the first 24 easy-VQA test questions, made once and copied into
    each test's store (every test has its own store)."""
    from vlcore.data.easy_vqa import easy_vqa_examples
    from vlcore.models.registry import load_adapter
    from vlcore.run.sweep import run_sweep, sweep_key

    adapter, examples = load_adapter("demo"), easy_vqa_examples("test", limit=N)
    key = sweep_key(adapter, "easy_vqa/test", [e.example_id for e in examples], probe=True)
    out = run_sweep(adapter, examples, tmp_path_factory.mktemp("probe") / key, dataset="easy_vqa/test", batch_size=8,
                    probe=True)
    return out


def install(folder):
    """Copy a sweep folder into this test's store, where the page's sweep picker finds it."""
    from vlcore.storage.store import Store

    target = Store().sweep_dir(folder.name)
    shutil.copytree(folder, target, dirs_exist_ok=True)
    return target


def chart_data(at, index: int = 0) -> pd.DataFrame:
    element = at.get("vega_lite_chart")[index]
    return pd.concat([pa.ipc.open_stream(d.data.data).read_pandas() for d in element.proto.datasets], ignore_index=True)


def test_a_probe_sweep_made_on_the_page_feeds_the_layer_curve():
    at = open_page(PAGE)
    assert not at.exception and not at.error
    assert any("No sweep" in i.value for i in at.info)
    at.number_input(key="probe_sweep_n").set_value(12)
    at.button(key="probe_sweep_go").click().run()
    assert not at.exception and not at.error, at.error
    assert len(at.query_params["sweep"]) == 12
    spec = chart_specs(at)[0]
    data = chart_data(at)
    assert set(data["series"].dropna()) == {"probe accuracy", "control task", "majority class"}
    assert sorted(data["layer"].unique()) == [0, 1, 2, 3, 4]
    assert spec["layer"][1]["encoding"]["y"]["title"] == "held-out accuracy"
    assert at.query_params["probe"] == "representation" and at.query_params["tkind"] == "cls"


def test_which_layer_knows_the_shape_from_the_url(probe_sweep_folder):
    install(probe_sweep_folder)
    at = open_page(PAGE, {"probe": "representation", "tkind": "text_mean", "target": "shape"})
    assert not at.exception and not at.error, at.error
    results = at.dataframe[0].value
    assert results["layer"].tolist() == [0, 1, 2, 3, 4] and (results["target"] == "shape").all()
    assert results["accuracy"].between(0, 1).all() and (results["n_classes"] <= 3).all()
    assert (results["selectivity"] == results["accuracy"] - results["control"]).all()
    assert "most selective layer" in at.markdown[0].value
    names = {b.proto.label for b in at.get("download_button")}
    assert {"PNG", "SVG", "CSV", "Parquet"} <= names
    assert any("accuracy − control" in m.value for m in at.markdown)  # the explanations for annotators
    at.selectbox(key="probe_kind").set_value("patch").run()  # the shape target holds for patches too
    assert at.query_params["tkind"] == "patch" and at.query_params["target"] == "shape"
    assert at.selectbox(key="probe_target_True").options[0] == "patch inside the region"
    at.selectbox(key="probe_target_True").set_value("in_region").run()
    assert at.query_params["target"] == "in_region" and not at.error, at.error
    assert set(at.dataframe[0].value["target"]) == {"in_region"}


def test_grounding_heads_and_a_click_selects_the_head(probe_sweep_folder):
    install(probe_sweep_folder)
    at = open_page(PAGE, {"probe": "attention", "target": "all", "cover": "0.25"})
    assert not at.exception and not at.error, at.error
    heat = next(s for s in chart_specs(at) if any(p.get("name") == HEAD_SELECTION for p in s.get("params", [])))
    assert heat["hconcat"][0]["encoding"]["color"]["title"] == "probe weight"
    summary, agreement, heads = (d.value for d in at.dataframe)
    assert summary.loc[0, "n_pairs"] > 0 and 0 < summary.loc[0, "positive_rate"] < 1
    assert set(agreement["share"]) == {"txtq_to_img", "word_to_patches"}
    assert len(heads) == 16 and heads["weight_rank"].tolist() == sorted(heads["weight_rank"])
    assert at.slider(key="probe_cover").value == 0.25
    top = heads.iloc[0]
    at.session_state["probe_head_chart"] = {"selection": {HEAD_SELECTION: [{"layer": int(top["layer"]),
                                                                           "head": int(top["head"])}]}}
    at.run()
    assert at.query_params["layer"] == str(int(top["layer"])) and at.query_params["head"] == str(int(top["head"]))
    assert at.selectbox(key="head").value == int(top["head"])
    link = next(e.proto for e in at.get("page_link") if "Heatmaps" in e.proto.page)
    assert f"head={int(top['head'])}" in link.query_string


def test_a_sweep_without_probe_data_says_how_to_make_one():
    from vlcore.data.easy_vqa import easy_vqa_examples
    from vlcore.models.registry import load_adapter
    from vlcore.storage.store import Store
    from vlcore.run.sweep import run_sweep, sweep_key

    adapter, examples = load_adapter("demo"), easy_vqa_examples("test", limit=6)
    run_sweep(adapter, examples, Store().sweep_dir(sweep_key(adapter, "easy_vqa/test", [e.example_id for e in examples])),
              dataset="easy_vqa/test", batch_size=6)
    at = open_page(PAGE, {"probe": "attention"})
    assert not at.exception
    assert len(at.error) == 1 and "probe=True" in at.error[0].value
    at = open_page(PAGE, {"probe": "representation", "tkind": "cls", "target": "shape"})
    assert not at.exception and len(at.error) == 1 and "make a probe sweep" in at.error[0].value
    at = open_page(PAGE, {"probe": "representation", "tkind": "cls", "target": "category"})  # no probe data needed
    assert not at.exception and not at.error, at.error


def test_bad_link_values_fall_back_with_a_notice(probe_sweep_folder):
    install(probe_sweep_folder)
    at = open_page(PAGE, {"probe": "nonsense", "tkind": "cls", "target": "in_region", "cover": "7"})
    assert not at.exception and not at.error, at.error
    notices = " ".join(i.value for i in at.info)
    assert "probe=nonsense" in notices and "target=in_region" in notices and "cover=7" in notices
    assert at.query_params["probe"] == "representation" and at.query_params["target"] == "answer"
    assert "cover" not in at.query_params


def test_url_state_round_trips(probe_sweep_folder):
    install(probe_sweep_folder)
    at = open_page(PAGE)
    at.radio(key="probe_type").set_value("attention").run()
    at.selectbox(key="probe_role").set_value("shape").run()
    at.slider(key="probe_cover").set_value(0.3).run()
    params = {k: at.query_params[k] for k in ("probe", "target", "cover", "sweep")}
    assert params["probe"] == "attention" and params["target"] == "shape" and params["cover"] == "0.3"
    again = open_page(PAGE, params)
    assert not again.exception and not again.error, again.error
    assert again.radio(key="probe_type").value == "attention" and again.selectbox(key="probe_role").value == "shape"
    assert json.dumps(again.dataframe[0].value.to_dict(), default=str) == json.dumps(at.dataframe[0].value.to_dict(),
                                                                                     default=str)
