"""Altair charts of probes: the layer-wise accuracy curve with its baselines, and the grounding heads."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from vlcore.charts.stats import build_head_heatmap_chart

SERIES = {"accuracy": "probe accuracy", "control": "control task", "majority": "majority class"}
WEIGHT_METRIC = "probe weight"


def build_layer_accuracy_chart(results: pd.DataFrame, title: str = "") -> alt.LayerChart:
    """Held-out accuracy per layer with the control-task and majority-class baselines.

    Args:
        results: `vlcore.analysis.probing.compute_layer_probes` output.
        title: chart title.

    Returns:
        Lines with points, one colour per series; the accuracy band shows ± one std over the folds.
    """
    long = results.melt(id_vars=["layer", "selectivity"], value_vars=list(SERIES), var_name="series", value_name="value")
    long["series"] = long["series"].map(SERIES)
    colour = alt.Color("series:N", title=None, sort=list(SERIES.values()),
                       scale=alt.Scale(domain=list(SERIES.values()), range=["#1f77b4", "#d62728", "#7f7f7f"]))
    x = alt.X("layer:O", title="layer (0 = embeddings)", axis=alt.Axis(labelAngle=0))
    lines = alt.Chart(long).mark_line(point=True).encode(
        x=x, y=alt.Y("value:Q", title="held-out accuracy", scale=alt.Scale(domain=[0, 1])), color=colour,
        strokeDash=alt.condition("datum.series == 'probe accuracy'", alt.value([1, 0]), alt.value([5, 3])),
        tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("series:N"), alt.Tooltip("value:Q", format=".3f"),
                 alt.Tooltip("selectivity:Q", format=".3f")],
    )
    band_data = results.assign(lo=(results["accuracy"] - results["accuracy_std"]).clip(0, 1),
                               hi=(results["accuracy"] + results["accuracy_std"]).clip(0, 1))
    band = alt.Chart(band_data).mark_area(opacity=0.15, color="#1f77b4").encode(x=x, y="lo:Q", y2="hi:Q")
    return alt.layer(band, lines).properties(title=title or "Probe accuracy by layer", width=420, height=260)


def head_weight_frame(weights: np.ndarray) -> pd.DataFrame:
    """``[L, H]`` probe weights as the tidy frame `build_head_heatmap_chart` reads (``metric`` = `WEIGHT_METRIC`).

    >>> head_weight_frame(np.array([[1.0, -2.0]]))[["layer", "head", "mean"]].values.tolist()
    [[0.0, 0.0, 1.0], [0.0, 1.0, -2.0]]
    """
    layer, head = np.divmod(np.arange(weights.size), weights.shape[1])
    return pd.DataFrame({"layer": layer, "head": head, "metric": WEIGHT_METRIC,
                         "mean": np.asarray(weights, dtype=np.float64).ravel(), "std": np.nan, "n": 1})


def build_head_weight_chart(weights: np.ndarray, title: str = "", selected: tuple[int, int] | None = None):
    """Layer × head heatmap of the attention probe's weights (diverging around 0; a click selects a head,
    `vlcore.charts.stats.HEAD_SELECTION`)."""
    return build_head_heatmap_chart(head_weight_frame(weights), WEIGHT_METRIC, title=title or "Grounding heads",
                                    diverging=True, selected=selected)
