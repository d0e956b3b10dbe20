"""Chart plumbing shared by the heatmap views: layouts built by Altair once and reused as JSON, image
data URIs, unvalidated rendering and PNG/SVG export.

A page rerun redraws several charts; building Altair objects and validating them is most of its cost.
`chart_parts` builds a chart's layout once per *layout key* (everything but its data and title), keeps
it as JSON and swaps only the data frames on later calls.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import altair as alt
import numpy as np
import pandas as pd
from altair.utils import schemapi
from PIL import Image

from vlcore.charts.base import image_data_uri
from vlcore.charts.export import chart_to_png, chart_to_svg
from vlcore.trace import Trace


def fast_build(build: Callable) -> Callable:
    """Build without Altair validating every intermediate object (a third of a page rerun on a 234-token
    trace). The finished chart is still validated by ``to_dict()``, as the tests do; the page skips that
    too (`unvalidated`)."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with schemapi.debug_mode(False):
            return build(*args, **kwargs)

    return wrapper


def unvalidated(chart: alt.TopLevelMixin) -> alt.TopLevelMixin:
    """The chart, serialised without schema validation when Streamlit calls ``chart.to_dict()``.

    Every builder's output is validated in tests/test_charts_heatmaps.py; skipping it at render time
    saves ~20 ms per chart.
    """
    object.__setattr__(chart, "to_dict", functools.partial(chart.to_dict, validate=False))
    return chart


_TITLE = "@@vlscope-title@@"
_ROLE = "@@vlscope-data:"
_TEMPLATES: OrderedDict[tuple, str] = OrderedDict()
_TEMPLATES_MAX = 64
_TEMPLATES_LOCK = threading.Lock()


@dataclass(frozen=True)
class ChartParts:
    """A chart as its Vega-Lite spec (JSON, data referenced by name) and the data frames it names.

    The same chart as the matching ``build_*_chart`` (tests/test_charts_heatmaps.py compares them),
    made without building Altair objects: Altair builds the layout once per *layout key* (everything
    but the data and the title) and it is kept as JSON; each call only makes the data frames. The
    heatmaps page renders these (`vlcore.ui.heatmaps.show_parts`), which keeps a rerun cheap.

    Attributes:
        spec_json: the Vega-Lite spec; every data reference is ``{"name": ROLE}`` for a role of ``datasets``.
        datasets: role → data frame.
    """

    spec_json: str
    datasets: dict[str, pd.DataFrame]

    def spec(self, names: Mapping[str, str] | None = None) -> dict:
        """The spec, with each role's data reference renamed by ``names`` (role → dataset name)."""
        text = self.spec_json
        for role in self.datasets:
            text = text.replace(json.dumps(_ROLE + role), json.dumps((names or {}).get(role, role)))
        return json.loads(text)

    def to_dict(self) -> dict:
        """The spec with the data inline as top-level ``datasets`` (named by role), as Altair writes them."""
        spec = self.spec()
        spec["datasets"] = {role: alt.utils.data.to_values(frame)["values"] for role, frame in self.datasets.items()}
        return spec


def chart_parts(key: tuple, frames: dict[str, pd.DataFrame], title: str,
                 layout: Callable[..., alt.TopLevelMixin], values: Mapping[str, object] | None = None) -> ChartParts:
    """``layout(data, title, **values)`` as JSON, built once per ``key`` (which must name everything it
    draws but the frames' data, the title and ``values``), with ``frames`` as its data.

    ``values`` are numbers or strings the layout puts in the spec as they are (a colour domain, a subtitle,
    an image URI): the layout is built with a placeholder string for each, which every call replaces by
    the value's JSON. Each must appear in the spec as a whole JSON value (not inside a longer string).
    """
    values = dict(values or {})
    key = (*key, tuple(frames), tuple(values))
    with _TEMPLATES_LOCK:
        template = _TEMPLATES.get(key)
        if template is not None:
            _TEMPLATES.move_to_end(key)
    if template is None:
        with schemapi.debug_mode(False):
            chart = layout({role: alt.Data(name=_ROLE + role) for role in frames}, _TITLE,
                           **{name: _value_holder(name) for name in values})
        spec = chart.to_dict(validate=False)
        spec.pop("config", None)  # the default theme's view size; Streamlit renders charts with theme "none"
        template = json.dumps(spec)
        with _TEMPLATES_LOCK:
            _TEMPLATES[key] = template
            while len(_TEMPLATES) > _TEMPLATES_MAX:
                _TEMPLATES.popitem(last=False)
    text = template.replace(json.dumps(_TITLE), json.dumps(title))
    for name, value in values.items():
        text = text.replace(json.dumps(_value_holder(name)), _json_value(value))
    return ChartParts(text, frames)


def _value_holder(name: str) -> str:
    return f"@@vlscope-value:{name}@@"


@functools.lru_cache(maxsize=32)
def _json_value_cached(value: str) -> str:
    return json.dumps(value)


def _json_value(value: object) -> str:
    """``json.dumps(value)``; a long string (an image's data URI, the same object on every rerun) is encoded once."""
    return _json_value_cached(value) if isinstance(value, str) and len(value) > 4096 else json.dumps(value)


def layout_key(trace: Trace) -> tuple:
    """What of a trace a layout can depend on: its identity, the viewed block, its query and key tokens, grid and
    image size (two blocks with the same queries, e.g. ``text.self`` and ``text.cross``, name other keys)."""
    keys = trace.key_layout.tokens if trace.key_layout is not trace.layout else ()
    return (trace.model_id, trace.example_id, trace.view, trace.tokens, keys, trace.grid, trace.image.shape,
            trace.patch_px)


_URI_CACHE: OrderedDict[str, str] = OrderedDict()
_URI_BY_ID: dict[int, tuple[weakref.ref, str]] = {}


def cached_image_uri(image: np.ndarray) -> str:
    """The image as a data URI (PNG; JPEG above 256×256 pixels), memoised on the pixels' digest.

    The same array (a trace kept in memory) is looked up by identity first, without hashing its pixels.
    """
    known = _URI_BY_ID.get(id(image))
    if known is not None and known[0]() is image:
        return known[1]
    key = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest() + str(image.shape)
    if key not in _URI_CACHE:
        _URI_CACHE[key] = image_data_uri(image) if image.shape[0] * image.shape[1] <= 256 * 256 else _jpeg_uri(image)
        while len(_URI_CACHE) > 16:
            _URI_CACHE.popitem(last=False)
    _URI_CACHE.move_to_end(key)
    if not image.flags.writeable:  # a trace's read-only array: safe to remember by identity
        for stale in [k for k, (ref, _) in _URI_BY_ID.items() if ref() is None]:
            del _URI_BY_ID[stale]
        _URI_BY_ID[id(image)] = (weakref.ref(image), _URI_CACHE[key])
    return _URI_CACHE[key]


@functools.lru_cache(maxsize=8)
def image_frame(uri: str) -> pd.DataFrame:
    """A one-row frame for an image layer: ``url`` (``uri``), its top-left corner ``x, y`` (0, 0) and ``img``
    (0, a key to look it up by). One copy of the image in a chart's data, and the same object for the same
    URI (the page sends its Arrow bytes without rebuilding them). The frame is shared: never modify it."""
    zero = np.zeros(1, dtype=np.int8)
    return pd.DataFrame({"url": [uri], "x": zero, "y": zero, "img": zero})


def _jpeg_uri(image: np.ndarray, quality: int = 90) -> str:
    """JPEG data URI for large images (a photo's PNG is several times larger to send on every rerun)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def export_chart(chart: alt.TopLevelMixin, fmt: str, scale: float = 2.0) -> bytes:
    """A chart as a PNG or SVG file (`vlcore.charts.export`, rendered by vl-convert, no row limit).

    Raises:
        ValueError: ``fmt`` is not ``"png"`` or ``"svg"``.
    """
    if fmt == "png":
        return chart_to_png(chart, scale=scale)
    if fmt == "svg":
        return chart_to_svg(chart).encode()
    raise ValueError(f"export format must be 'png' or 'svg', got {fmt!r}")
