"""Bar lists label every bar, as Streamlit draws them: the answer bars and the head-importance bars.

Streamlit stretches a chart to its column with ``autosize: fit`` and its theme turns Vega's ``labelOverlap`` on.
With a height fixed in pixels the bars got ~10 px each and Vega hid every other label (the real browser showed 2
labels for 5 answers). The charts are laid out here by Vega itself (vl-convert's scene graph) under those
settings, and every label must be visible, in the bars' order, beside its own bar.
"""

from __future__ import annotations

import pandas as pd
import pytest
import vl_convert as vlc

from vlcore.charts.base import build_prediction_chart
from vlcore.charts.stats import build_head_heatmap_chart, build_importance_bar_chart

# Streamlit's Vega theme (frontend CustomTheme: axis labelOverlap true, twoSm labels, lg paddings) and the
# autosize it adds to a chart shown with width="stretch" (streamlit/elements/vega_charts.py).
STREAMLIT_AXIS = {"labelOverlap": True, "labelFontSize": 12, "labelSeparation": 2, "labelPadding": 16,
                  "titlePadding": 16, "titleFontSize": 14, "labelLimit": 100, "ticks": False}
COLUMN_WIDTH = 450


def _find(node, role: str, out: list) -> list:
    if isinstance(node, dict):
        if node.get("role") == role:
            out.append(node)
        for value in node.values():
            _find(value, role, out)
    elif isinstance(node, list):
        for value in node:
            _find(value, role, out)
    return out


def layout_as_streamlit(chart) -> dict:
    """The Vega scene graph of ``chart`` stretched to a column under Streamlit's theme."""
    spec = chart.to_dict()
    spec.setdefault("autosize", {"type": "fit", "contains": "padding"})
    spec["width"] = COLUMN_WIDTH
    spec["config"] = {**spec.get("config", {}), "axis": STREAMLIT_AXIS}
    return vlc.vegalite_to_scenegraph(spec)


def category_labels(scene: dict) -> list[tuple[str, float, float]]:
    """(text, opacity, y) of the category (y) axis labels: the axis whose labels are not numbers."""
    axes = [[(i["text"], i.get("opacity", 1), i["y"]) for i in group["items"]]
            for group in _find(scene, "axis-label", [])]
    return next(a for a in axes if not all(t.replace(".", "").replace("%", "").isdigit() for t, _, _ in a))


def bars(scene: dict) -> list[tuple[float, float]]:
    """(top, bottom) of each bar, in data order."""
    marks = [m for m in _find(scene, "mark", []) if m.get("marktype") == "rect"]
    return [(i["y"], i["y"] + i["height"]) for i in marks[0]["items"]]


def assert_every_bar_labelled(chart, expected: list[str]) -> None:
    scene = layout_as_streamlit(chart)
    labels = category_labels(scene)
    assert [t for t, _, _ in labels] == expected
    hidden = [t for t, opacity, _ in labels if opacity == 0]
    assert not hidden, f"Vega hid the labels {hidden}"
    for (text, _, y), (top, bottom) in zip(labels, bars(scene)):
        assert top <= y <= bottom, f"label {text!r} at y={y} is not beside its bar ({top}-{bottom})"


@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_every_answer_bar_is_labelled_beside_its_bar(k):
    answers = ["circle", "yes", "rectangle", "no", "triangle", "red", "blue", "green", "gray", "teal"][:k]
    probs = [0.9, 0.028, 0.02, 0.01, 0.005, 0.004, 0.003, 0.002, 0.001, 0.0005][:k]
    chart = build_prediction_chart(list(zip(answers, probs)), ("circle",))
    assert_every_bar_labelled(chart, answers)  # highest first, as the prediction lists them


def test_answers_with_equal_probabilities_keep_the_prediction_order():
    chart = build_prediction_chart([("yes", 0.4), ("no", 0.4), ("circle", 0.2)], ("yes",))
    assert_every_bar_labelled(chart, ["yes", "no", "circle"])


@pytest.mark.parametrize("k", [4, 15])
def test_every_head_importance_bar_is_labelled(k):
    drop = pd.DataFrame({"layer": [h // 4 for h in range(16)], "head": [h % 4 for h in range(16)],
                         "mean": [0.001 * h for h in range(16)]})
    chart = build_importance_bar_chart(drop, k=k)
    expected = [f"L{h // 4} H{h % 4}" for h in range(15, 15 - k, -1)]
    assert_every_bar_labelled(chart, expected)


def _tooltip_fields(chart) -> list[str]:
    heat = chart.to_dict()["hconcat"][0]
    return [t.get("title") or t["field"] for t in heat["encoding"]["tooltip"]]


def test_one_example_has_no_std_in_the_tooltip():
    one = pd.DataFrame({"layer": [0, 0], "head": [0, 1], "metric": "entropy", "mean": [0.5, 0.7],
                        "std": [float("nan")] * 2, "n": [1, 1]})
    fields = _tooltip_fields(build_head_heatmap_chart(one, "entropy"))
    assert "std" not in fields and "n" not in fields


def test_a_sweep_shows_std_and_says_n_a_where_a_head_has_one_example():
    sweep = pd.DataFrame({"layer": [0, 0], "head": [0, 1], "metric": "entropy", "mean": [0.5, 0.7],
                          "std": [0.1, float("nan")], "n": [4, 1]})
    chart = build_head_heatmap_chart(sweep, "entropy")
    assert {"std", "n"} <= set(_tooltip_fields(chart))
    values = chart.to_dict()["datasets"]
    rows = next(v for v in values.values() if v and "std_text" in v[0])
    assert [r["std_text"] for r in rows] == ["0.100000", "n/a"]
