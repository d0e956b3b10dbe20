"""Every page on the bundled generative demo (`model=demo-generative`), offline: no exception and no error, and the
Run Model and Heatmaps pages show the answer the notebook API gets for the same example independently."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT
from vlcore.app_files import GENERATIVE_DEMO_DIR

HOME = str(ROOT / "streamlit_app.py")
EX = "easy_vqa/test/1"  # "what is the color of the triangle?" (gold: red)
PAGES = ("1_Dataset_Browser", "2_Run_Model", "3_Head_Statistics", "4_Attention_Heatmaps", "5_Embeddings",
         "6_Annotations", "7_Probing", "8_Logit_Lens")
pytestmark = pytest.mark.skipif(not (GENERATIVE_DEMO_DIR / "config.json").is_file(),
                                reason="the generative demo is not bundled in this checkout")


@pytest.fixture(scope="module")
def answer() -> str:
    import vlcore.notebook as vn

    return vn.run("demo-generative", example=EX).prediction[0][0]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_runs_on_the_generative_demo(page, answer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = AppTest.from_file(HOME, default_timeout=300)
    at.query_params.update({"ex": EX, "model": "demo-generative"})
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception and not at.error, [*at.exception, *at.error]
    if page not in ("1_Dataset_Browser", "6_Annotations"):  # the pages that run a model pick it in the sidebar
        assert at.radio(key="model_kind").value == "Bundled demo (generative)"
    shown = " ".join(m.value for m in at.markdown)
    if page == "2_Run_Model":
        assert f"**Prediction:** {answer} (" in shown and "**Answer, token by token**" in shown
    if page == "4_Attention_Heatmaps":
        assert f"predicted **{answer}**" in shown
