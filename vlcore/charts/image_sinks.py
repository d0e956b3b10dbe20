"""Altair charts of a language model's attention to image tokens (`vlcore.analysis.image_sinks`).

- `head_summary_frame`: a ``[layer, head]`` table in the tidy form `vlcore.charts.stats.build_head_heatmap_chart`
  draws (``layer, head, metric, mean``);
- `image_share_frame` / `build_image_share_chart`: the per-layer mean image share, one line per row set (prompt
  rows, generated rows), with the sink cutoff as a rule and the sink layer marked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import altair as alt
import numpy as np
import pandas as pd

from vlcore.analysis.image_sinks import ImageSink


def head_summary_frame(values: np.ndarray, metric: str, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """A ``[len(layers), H]`` table as tidy rows ``layer, head, metric, mean, n`` (one example: ``n`` 1).

    >>> head_summary_frame(np.array([[0.1, 0.2]]), "image_share", [3])[["layer", "head", "mean"]].values.tolist()
    [[3.0, 0.0, 0.1], [3.0, 1.0, 0.2]]
    """
    table = np.asarray(values, dtype=np.float64)
    ids = np.arange(table.shape[0]) if layers is None else np.asarray(layers, dtype=np.int64)
    layer, head = np.meshgrid(ids, np.arange(table.shape[1]), indexing="ij")
    return pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), "metric": metric, "mean": table.ravel(),
                         "n": 1})


def image_share_frame(series: Mapping[str, tuple[Sequence[int], np.ndarray]]) -> pd.DataFrame:
    """Per-layer image shares as rows ``rows, layer, share``.

    Args:
        series: ``{row set name: (layers, share per layer)}``.
    """
    parts = [pd.DataFrame({"rows": name, "layer": np.asarray(layers, dtype=np.int64),
                           "share": np.asarray(share, dtype=np.float64)})
             for name, (layers, share) in series.items()]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["rows", "layer", "share"])


def build_image_share_chart(frame: pd.DataFrame, sink: ImageSink | None = None, sink_rows: str | None = None,
                            title: str = "") -> alt.LayerChart:
    """The mean share of attention on image tokens per layer, one line per row set; with ``sink``, a dashed rule
    at its cutoff and a vertical rule at its layer (the row set ``sink_rows`` it was computed on).

    Args:
        frame: `image_share_frame` output.
        sink: the sink of ``sink_rows``' line (`vlcore.analysis.image_sinks.compute_image_sink`).
        sink_rows: the row set the sink belongs to (named in the rules' tooltips).
        title: chart title.
    """
    base = alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("share:Q", title="share of attention on image tokens"),
        color=alt.Color("rows:N", title="rows"),
        tooltip=[alt.Tooltip("rows:N"), alt.Tooltip("layer:Q"), alt.Tooltip("share:Q", format=".4f")],
    )
    layers = [base]
    if sink is not None and np.isfinite(sink.cutoff):
        cut = pd.DataFrame({"cutoff": [sink.cutoff], "rows": [sink_rows or ""]})
        layers.append(alt.Chart(cut).mark_rule(strokeDash=[4, 4], color="#d62728").encode(
            y="cutoff:Q", tooltip=[alt.Tooltip("rows:N"), alt.Tooltip("cutoff:Q", format=".4f")]))
        if sink.layer is not None:
            at = pd.DataFrame({"sink_layer": [sink.layer], "rows": [sink_rows or ""]})
            layers.append(alt.Chart(at).mark_rule(color="#d62728").encode(
                x="sink_layer:Q", tooltip=[alt.Tooltip("rows:N"), alt.Tooltip("sink_layer:Q", title="sink layer")]))
    return alt.layer(*layers).properties(title=title or "Image share by layer (mean over heads)", height=260)
