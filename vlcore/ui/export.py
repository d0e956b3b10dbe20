"""Download buttons for charts (PNG/SVG, rendered only when clicked) and tables (CSV/Parquet)."""

from __future__ import annotations

from collections.abc import Callable

import altair as alt
import pandas as pd
import streamlit as st

from vlcore.charts.export import chart_spec_json, chart_to_png, chart_to_svg
from vlcore.storage.tables import frame_to_csv, frame_to_parquet


def chart_downloads(chart: alt.TopLevelMixin | Callable[[], alt.TopLevelMixin], name: str, key: str) -> None:
    """PNG and SVG download buttons; the chart (or the builder's chart, built only then) is rendered by
    vl-convert only when a button is clicked, so a page rerun pays nothing for them."""

    def spec() -> str:
        return chart_spec_json(chart() if callable(chart) else chart)

    c1, c2 = st.columns(2)
    c1.download_button("PNG", lambda: chart_to_png(spec()), f"{name}.png", "image/png", key=f"{key}_png",
                       on_click="ignore")
    c2.download_button("SVG", lambda: chart_to_svg(spec()), f"{name}.svg", "image/svg+xml", key=f"{key}_svg",
                       on_click="ignore")


def table_downloads(frame: pd.DataFrame, name: str, key: str) -> None:
    """CSV and Parquet download buttons of a table."""
    c1, c2 = st.columns(2)
    c1.download_button("CSV", frame_to_csv(frame), f"{name}.csv", "text/csv", key=f"{key}_csv", on_click="ignore")
    c2.download_button("Parquet", frame_to_parquet(frame), f"{name}.parquet", "application/octet-stream",
                       key=f"{key}_parquet", on_click="ignore")
