"""Exports: charts past Altair's 5,000-row default (a sweep's scatter, a full attention matrix) still render."""

from __future__ import annotations

import io
import xml.dom.minidom

import altair as alt
import numpy as np
import pandas as pd

from vlcore.charts.export import chart_to_png, chart_to_svg
from vlcore.storage.tables import frame_to_csv, frame_to_parquet


def test_a_chart_with_more_than_5000_rows_renders_to_png_and_svg():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=6000), "y": rng.normal(size=6000)})
    chart = alt.Chart(frame).mark_point().encode(x="x:Q", y="y:Q")
    assert chart_to_png(chart)[:8] == b"\x89PNG\r\n\x1a\n"
    assert xml.dom.minidom.parseString(chart_to_svg(chart)).documentElement.tagName == "svg"


def test_tables_round_trip():
    frame = pd.DataFrame({"layer": [0, 1], "head": [1, 0], "entropy": [0.5, 0.25]})
    assert pd.read_csv(io.BytesIO(frame_to_csv(frame))).equals(frame)
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(frame_to_parquet(frame))), frame)
