"""Benchmark: server time of the attention-heatmaps page when the head, layer or query token changes.

    python bench/heatmaps.py [--repeats 7]

A ViLT-B/32-sized model (12 layers, 12 heads, random weights, real processor settings) on a 384x640
image and a 24-token question: 24 + 1 + 209 = 234 tokens (11x19 patches), the trace stored and
loaded back as the page does. Three measures per change, interleaved in one run:

- **page rerun**: the page itself under Streamlit's AppTest, from the widget change to the rendered
  result (script run, every chart's spec and Arrow data), with the default section (matrices: the full
  234x234 matrix, 54,756 cells) and with the all-heads section (12 small multiples);
- **charts only**: the page's path without Streamlit: load the trace from the store, compute the
  query map, build the overlay, text chips, special bars and the full matrix, and turn each chart into
  the spec and Arrow tables Streamlit sends;
- **naive**: the same charts, but the trace recomputed by the model for every change (no store).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

PAGE = "pages/4_Attention_Heatmaps.py"
ROOT = Path(__file__).resolve().parents[1]


def page_charts(trace, layer: int, head: int | None, tok: int) -> list:
    """The charts the page builds for the query section and the (default) full-matrix section."""
    from vlcore import charts_heatmaps as ch

    att = trace.head_attention(layer, head)
    values = ch.compute_query_map(att, [tok], "from")
    return [ch.build_attention_overlay_chart(trace, values, width=340), ch.build_token_chips_chart(trace, values, [tok]),
            ch.build_special_weights_chart(trace, values), ch.build_matrix_chart(trace, att, size=440)]


def to_streamlit(charts: list) -> None:
    """What ``st.altair_chart`` does with each chart: the spec, with the data as Arrow tables, as JSON."""
    import json

    from streamlit.elements.vega_charts import _convert_altair_to_vega_lite_spec

    from vlcore.charts_heatmaps import unvalidated

    for chart in charts:
        spec = _convert_altair_to_vega_lite_spec(unvalidated(chart))  # data frames become Arrow bytes here
        spec.pop("datasets")
        json.dumps(spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    os.environ["VLSCOPE_CACHE"] = tempfile.mkdtemp(prefix="vlscope-bench-heatmaps-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from streamlit.testing.v1 import AppTest

    import vlcore.ui.context as context
    from bench.common import QUESTION, vilt_b32
    from vlcore.data.sources import resolve_example
    from vlcore.extract import extract_trace, trace_for_example
    from vlcore.store import Store, put_input

    adapter = vilt_b32("cpu")
    context.get_adapter = lambda source, *a, **k: adapter  # the page's model picker gets the ViLT-B model
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 640, 3), dtype=np.uint8))
    store = Store()
    example_id = put_input(store, image, QUESTION)
    example = resolve_example(example_id, store, None)
    trace, _ = trace_for_example(adapter, example, store)
    print(f"trace: {trace.n_tokens} tokens, grid {trace.grid}, {trace.n_layers} layers x {trace.n_heads} heads")

    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=600)
    at.query_params["ex"] = example_id
    at.switch_page(PAGE)
    at.run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    n_text = len(at.pills(key="hm_tok").options)

    def timed_run(change) -> float:
        change()
        start = time.perf_counter()
        at.run()
        elapsed = time.perf_counter() - start
        assert not at.exception, at.exception
        return elapsed

    state = {"head": 0, "layer": 11, "tok": 0}

    def bump(kind: str):
        if kind == "head":
            state["head"] = (state["head"] + 1) % trace.n_heads
            return lambda: at.selectbox(key="head").set_value(state["head"])
        if kind == "layer":
            state["layer"] = (state["layer"] + 1) % trace.n_layers
            return lambda: at.slider(key="layer").set_value(state["layer"])
        state["tok"] = (state["tok"] + 1) % n_text
        return lambda: at.pills(key="hm_tok").set_value(state["tok"])

    def charts_only() -> None:
        loaded, cached = trace_for_example(adapter, example, store)
        assert cached
        to_streamlit(page_charts(loaded, state["layer"], state["head"], state["tok"]))

    def naive() -> None:
        fresh = extract_trace(adapter, image, QUESTION, example_id)
        to_streamlit(page_charts(fresh, state["layer"], state["head"], state["tok"]))

    rows = []
    for view in ("matrices", "heads"):
        at.segmented_control(key="hm_view").set_value(view).run()
        for kind in ("head", "layer", "query token"):
            timed_run(bump(kind))  # warm-up
            times: dict[str, list[float]] = {"page": [], "charts": [], "naive": []}
            for _ in range(args.repeats):
                times["page"].append(timed_run(bump(kind)))
                if view == "matrices":
                    for name, fn in (("charts", charts_only), ("naive", naive)):
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
            rows.append((view, kind, {k: statistics.median(v) if v else None for k, v in times.items()}))

    print(f"\n{'section':<9} {'change':<12} {'page rerun':>11} {'charts only':>12} {'naive':>9} {'naive / page':>13}")
    for view, kind, t in rows:
        extra = (f"{t['charts'] * 1e3:>9.0f} ms {t['naive'] * 1e3:>6.0f} ms {t['naive'] / t['page']:>12.1f}x"
                 if t["charts"] is not None else f"{'':>12} {'':>9} {'':>13}")
        print(f"{view:<9} {kind:<12} {t['page'] * 1e3:>8.0f} ms {extra}")
    print("\ntarget: page rerun <= 150 ms (median); naive = the trace recomputed by the model on every change")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
