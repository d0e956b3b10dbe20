"""Benchmark: server time of the attention-heatmaps page when the head, layer or query token changes.

    python bench/heatmaps.py [--repeats 7]

A ViLT-B/32-sized model (12 layers, 12 heads, random weights, real processor settings) on a 384x640
image and a 24-token question: 24 + 1 + 209 = 234 tokens (11x19 patches), the trace stored and
loaded back as the page does. Measures per change, interleaved in one run:

- **page rerun**: the page itself under Streamlit's AppTest, from the widget change to the rendered
  result (script run, every chart's spec and Arrow data), for each section: matrices (the default: the
  full 234x234 matrix, 54,756 cells), all heads (12 small multiples), step-through and explanations
  (raw, rollout and relevancy side by side; the relevancy's gradient pass is cached after the first run);
- **charts**: the page's chart path without Streamlit: the trace (kept in memory), the query map, the
  overlay (with the image's share under its title), text chips, special bars, the strip of every layer's
  map and the full matrix as `ChartParts` (layouts built once), turned into the spec JSON and Arrow tables
  Streamlit sends;
- **Altair objects**: the same charts the previous way: the trace read from the store, every chart built
  as Altair objects (`build_*_chart`) and converted as ``st.altair_chart`` does;
- **naive**: the Altair objects on a trace recomputed by the model for every change (no store).
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
SECTIONS = ("matrices", "heads", "step", "explain")


def page_parts(trace, layer: int, head: int | None, tok: int) -> list:
    """The charts the page shows for the query and the (default) full-matrix section, as `ChartParts`."""
    from vlcore import charts_heatmaps as ch
    from vlcore import charts_multiples as cm
    from vlcore import heatmap_maps as hm

    att = trace.head_attention(layer, head)
    values = hm.compute_query_map(att, [tok], "from")
    layers = hm.compute_layer_maps(trace, head, [tok], "from")
    return [ch.overlay_parts(trace, values, title="raw attention", width=340,
                             subtitle=hm.image_share_caption(trace, values)),
            ch.token_chips_parts(trace, values, [tok], title="Text tokens", width=380),
            ch.special_weights_parts(trace, values, shares=True),
            cm.layer_strip_parts(trace, layers, selected=layer, title="Every layer"),
            ch.matrix_parts(trace, att, title="matrix", size=440)]


def send_parts(parts: list) -> None:
    """What ``show_parts`` does with each chart: Arrow tables named by their hash, the spec as JSON."""
    import hashlib
    import json

    from vlcore.ui.heatmaps import arrow_bytes

    for part in parts:
        names = {}
        for role, frame in part.datasets.items():
            names[role] = f"{role}-{hashlib.blake2b(arrow_bytes(frame), digest_size=12).hexdigest()}"
        json.dumps(part.spec(names))


def page_charts(trace, layer: int, head: int | None, tok: int) -> list:
    """The same charts as Altair objects (the builders the tests validate and the export uses)."""
    from vlcore import charts_heatmaps as ch
    from vlcore import charts_multiples as cm
    from vlcore import heatmap_maps as hm

    att = trace.head_attention(layer, head)
    values = hm.compute_query_map(att, [tok], "from")
    layers = hm.compute_layer_maps(trace, head, [tok], "from")
    return [ch.build_attention_overlay_chart(trace, values, title="raw attention", width=340,
                                             subtitle=hm.image_share_caption(trace, values)),
            ch.build_token_chips_chart(trace, values, [tok], title="Text tokens", width=380),
            ch.build_special_weights_chart(trace, values, shares=True),
            cm.build_layer_strip_chart(trace, layers, selected=layer, title="Every layer"),
            ch.build_matrix_chart(trace, att, title="matrix", size=440)]


def to_streamlit(charts: list) -> None:
    """What ``st.altair_chart`` does with each chart: the spec, with the data as Arrow tables, as JSON."""
    import json

    from streamlit.elements.vega_charts import _convert_altair_to_vega_lite_spec

    from vlcore.chart_parts import unvalidated

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
    from vlcore.ui.context import RememberingStore, TraceMemory

    adapter = vilt_b32("cpu")
    if not adapter.config.label2id:  # the random model's config names its labels one way only; relevancy needs both
        adapter.config.label2id = {label: int(i) for i, label in adapter.config.id2label.items()}
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

    memory = TraceMemory()

    def charts() -> None:
        loaded, cached = trace_for_example(adapter, example, RememberingStore(store, memory))
        assert cached
        send_parts(page_parts(loaded, state["layer"], state["head"], state["tok"]))

    def altair_objects() -> None:
        loaded, cached = trace_for_example(adapter, example, store)
        assert cached
        to_streamlit(page_charts(loaded, state["layer"], state["head"], state["tok"]))

    def naive() -> None:
        fresh = extract_trace(adapter, image, QUESTION, example_id)
        to_streamlit(page_charts(fresh, state["layer"], state["head"], state["tok"]))

    paths = {"charts": charts, "altair": altair_objects, "naive": naive}
    rows = []
    for view in SECTIONS:
        at.segmented_control(key="hm_view").set_value(view).run()
        assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
        for kind in ("head", "layer", "query token"):
            timed_run(bump(kind))  # warm-up
            times: dict[str, list[float]] = {"page": [], **{name: [] for name in paths}}
            for _ in range(args.repeats):
                times["page"].append(timed_run(bump(kind)))
                if view == "matrices":
                    for name, fn in paths.items():
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
            rows.append((view, kind, {k: statistics.median(v) if v else None for k, v in times.items()}))

    print(f"\n{'section':<9} {'change':<12} {'page rerun':>11} {'charts':>9} {'Altair objects':>15} {'naive':>9} "
          f"{'Altair / charts':>16} {'naive / page':>13}")
    for view, kind, t in rows:
        extra = ""
        if t["charts"] is not None:
            extra = (f"{t['charts'] * 1e3:>6.1f} ms {t['altair'] * 1e3:>12.0f} ms {t['naive'] * 1e3:>6.0f} ms "
                     f"{t['altair'] / t['charts']:>15.0f}x {t['naive'] / t['page']:>12.1f}x")
        print(f"{view:<9} {kind:<12} {t['page'] * 1e3:>8.0f} ms {extra}")
    print("\ntarget: page rerun <= 150 ms (median); naive = the trace recomputed by the model on every change")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
