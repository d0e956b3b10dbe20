"""A link whose dataset or example cannot be opened shows the bundled fallback it promises (issue 14, 4.5)."""

from __future__ import annotations

from tests.app.conftest import heatmap_specs, open_page

HEATMAPS = "pages/4_Attention_Heatmaps.py"


def notices(at) -> list[str]:
    return [i.value for i in at.info]


def test_refused_dataset_link_shows_the_bundled_example_it_promises():
    at = open_page(HEATMAPS, {"ex": "/etc/passwd", "ds": "generic", "loc": "/etc"})
    assert not at.exception and not at.error, [e.value for e in at.error]
    (said,) = [n for n in notices(at) if "instead" in n]
    assert "not under a configured data folder" in said
    assert said.endswith("Showing the bundled easy-VQA example easy_vqa/test/0 instead.") and ".." not in said
    assert heatmap_specs(at)  # the fallback's maps are on the page, not an empty page
    assert not {"ds", "loc", "ex"} & set(at.query_params)  # the URL names what is shown


def test_refused_dataset_keeps_a_bundled_example_the_link_names():
    at = open_page(HEATMAPS, {"ex": "easy_vqa/test/3", "ds": "vqa", "loc": "/etc", "split": "train"})
    assert not at.exception and not at.error
    assert any(n.endswith("Showing easy_vqa/test/3 from the bundled easy-VQA samples instead.") for n in notices(at))
    assert at.query_params["ex"] == "easy_vqa/test/3" and "ds" not in at.query_params
    assert heatmap_specs(at)


def test_unknown_example_in_a_good_dataset_falls_back_with_one_full_stop():
    at = open_page(HEATMAPS, {"ex": "easy_vqa/test/999999"})
    assert not at.exception and not at.error
    (said,) = [n for n in notices(at) if "instead" in n]
    assert said == ("unknown example 'easy_vqa/test/999999'; open one from the dataset browser or upload an image. "
                    "Showing the bundled easy-VQA example easy_vqa/test/0 instead.")
    assert heatmap_specs(at)


def test_refused_dataset_link_on_the_run_model_page_runs_the_bundled_example():
    at = open_page("pages/2_Run_Model.py", {"ex": "/etc/passwd", "ds": "generic", "loc": "/etc"})
    assert not at.exception and not at.error, [e.value for e in at.error]
    (said,) = [n for n in notices(at) if "instead" in n]
    assert said.endswith("Showing the bundled easy-VQA example easy_vqa/test/0 instead.") and ".." not in said
    assert any("easy_vqa/test/0" in c.value for c in at.caption)  # the example's result is on the page
    assert not {"ds", "loc"} & set(at.query_params)
