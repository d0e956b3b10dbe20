"""A generative model's sweep through the Run Model page (the tiny LLaVA opened as a local folder): the batch size set
on the page, the answers compared with gold answers after VQA normalisation, the prompt-row head summaries stored
beside the built-in metrics, and the sweep offered on the Head Statistics page with those metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT
from tests.models.tiny_llava import write_llava
from vlcore.analysis.answers import answer_in_gold
from vlcore.run.sweep import PROMPT_METRICS
from vlcore.ui.widgets import LOCAL_FOLDER_KEY

HOME = str(ROOT / "streamlit_app.py")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(write_llava(tmp_path_factory.mktemp("llava")))


def open_with(folder: str, page: str, params: dict | None = None) -> AppTest:
    at = AppTest.from_file(HOME, default_timeout=300)
    at.session_state[LOCAL_FOLDER_KEY] = folder
    for key, value in (params or {}).items():
        at.query_params[key] = value
    at.switch_page(page)
    return at.run()


def clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_a_generative_sweep_runs_from_the_page_and_its_metrics_reach_head_statistics(folder):
    from vlcore.storage.store import Store
    from vlcore.storage.sweeps import load_sweep

    at = open_with(folder, "pages/2_Run_Model.py")
    clean(at)
    at.number_input(key="sweep_n").set_value(4).run()
    at.number_input(key="sweep_batch").set_value(3).run()
    at.button(key="sweep_start").click().run()
    clean(at)
    done = next(m.value for m in at.markdown if m.value.startswith("**Sweep:**"))
    table = next(d.value for d in at.dataframe if "probability" in d.value.columns)
    assert len(table) == 4 and done.startswith("**Sweep:** 4/4 examples done")
    expected = [answer_in_gold(p, g) for p, g in zip(table["prediction"], table["gold"])]
    assert table["correct"].tolist() == expected
    assert done.endswith(f"accuracy {sum(expected) / 4:.3f}")

    (sweep,) = Store().list_sweeps()
    manifest = json.loads(Path(sweep["path"], "manifest.json").read_text())
    assert manifest["complete"] and manifest["batch_size"] == 3 and manifest["block"] == "lm.generated"
    _, heads = load_sweep(sweep["path"])
    assert set(PROMPT_METRICS) <= set(heads["metric"].astype(str))

    stats = open_with(folder, "pages/3_Head_Statistics.py", {"scope": "sweep"})
    clean(stats)
    metric = stats.selectbox(key="metric")
    assert {f"{m}: {d}" for m, d in PROMPT_METRICS.items()} <= set(metric.options)
    metric.set_value("prompt_image_share").run()
    clean(stats)
    shown = [c for c in stats.get("vega_lite_chart") if "prompt_image_share" in c.proto.spec]
    assert shown  # the layer x head heatmap of the chosen metric
