"""Chart exports: PNG/SVG through vl-convert and the Vega-Lite JSON. Pure functions returning bytes (tables: `vlcore.storage.tables`)."""

from __future__ import annotations

import altair as alt


def chart_spec_json(chart: alt.TopLevelMixin) -> str:
    """The chart's Vega-Lite spec with its data inline and no row limit (Altair refuses more than 5,000 rows
    by default; a full attention matrix or a sweep's scatter has more)."""
    with alt.data_transformers.enable("default", max_rows=None):
        return chart.to_json(validate=False)


def chart_to_png(chart: alt.TopLevelMixin | str, scale: float = 2.0) -> bytes:
    """PNG bytes of an Altair chart (or its Vega-Lite JSON), rendered by vl-convert (no browser)."""
    import vl_convert

    spec = chart if isinstance(chart, str) else chart_spec_json(chart)
    return vl_convert.vegalite_to_png(spec, scale=scale)


def chart_to_svg(chart: alt.TopLevelMixin | str) -> str:
    """SVG text of an Altair chart (or its Vega-Lite JSON)."""
    import vl_convert

    spec = chart if isinstance(chart, str) else chart_spec_json(chart)
    return vl_convert.vegalite_to_svg(spec)
