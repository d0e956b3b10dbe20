"""Benchmark: server time of the attention-heatmaps page when the head, layer or query token changes.

    python bench/heatmaps.py [--repeats 7]
    python bench/heatmaps.py --compare REV [REV ...] [--repeats 9] [--sections matrices,heads]


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

``--compare`` measures page reruns only, of several versions side by side in one run: the working tree and
each REV (a commit, extracted with ``git archive`` into a temporary folder), each in its own worker process
(the same bench model, image and question), one rerun of each version in turn (the order rotating), so
a load that changes during the run weighs on every version alike. It prints each version's median and its
ratio to the first REV's.
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
    from vlcore.charts import heatmaps as ch
    from vlcore.charts import multiples as cm
    from vlcore.analysis import query_maps as hm

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
    from vlcore.charts import heatmaps as ch
    from vlcore.charts import multiples as cm
    from vlcore.analysis import query_maps as hm

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

    from vlcore.charts.parts import unvalidated

    for chart in charts:
        spec = _convert_altair_to_vega_lite_spec(unvalidated(chart))  # data frames become Arrow bytes here
        spec.pop("datasets")
        json.dumps(spec)


def worker(root: Path) -> int:
    """Serve page reruns of the app under ``root`` over stdin/stdout: ``view SECTION`` (switch, warm up),
    ``run CHANGE`` (one timed rerun, answers its milliseconds), ``quit``."""
    sys.path.insert(0, str(root))  # this version's vlcore, pages and bench.common
    os.chdir(root)
    os.environ["VLSCOPE_CACHE"] = tempfile.mkdtemp(prefix="vlscope-bench-heatmaps-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from streamlit.testing.v1 import AppTest

    import vlcore.ui.context as context
    from bench.common import QUESTION, vilt_b32
    from vlcore.data.sources import resolve_example
    from vlcore.run.extract import trace_for_example
    from vlcore.storage.store import Store
    from vlcore.storage.uploads import put_input

    adapter = vilt_b32("cpu")
    if not adapter.config.label2id:
        adapter.config.label2id = {label: int(i) for i, label in adapter.config.id2label.items()}
    context.get_adapter = lambda source, *a, **k: adapter
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 640, 3), dtype=np.uint8))
    store = Store()
    example_id = put_input(store, image, QUESTION)
    trace, _ = trace_for_example(adapter, resolve_example(example_id, store, None), store)
    at = AppTest.from_file(str(root / "streamlit_app.py"), default_timeout=600)
    at.query_params["ex"] = example_id
    at.switch_page(PAGE)
    at.run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    n_text = len(at.pills(key="hm_tok").options)
    state = {"head": 0, "layer": trace.n_layers - 1, "tok": 0}

    def change(kind: str) -> None:
        if kind == "head":
            state["head"] = (state["head"] + 1) % trace.n_heads
            at.selectbox(key="head").set_value(state["head"])
        elif kind == "layer":
            state["layer"] = (state["layer"] + 1) % trace.n_layers
            at.slider(key="layer").set_value(state["layer"])
        else:
            state["tok"] = (state["tok"] + 1) % n_text
            at.pills(key="hm_tok").set_value(state["tok"])

    print("ready", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "quit":
            break
        if command == "view":
            at.segmented_control(key="hm_view").set_value(arg).run()
            for kind in ("head", "layer", "query token"):
                change(kind)
                at.run()
            assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
            print("ok", flush=True)
        elif command == "run":
            change(arg)
            start = time.perf_counter()
            at.run()
            elapsed = time.perf_counter() - start
            assert not at.exception, at.exception
            print(f"{elapsed * 1e3:.3f}", flush=True)
    return 0


def compare(revs: list[str], repeats: int, sections: list[str]) -> int:
    """Page reruns of the working tree and of each REV, interleaved in one run (see the module docstring)."""
    import subprocess

    trees: dict[str, Path] = {}
    for rev in revs:
        folder = Path(tempfile.mkdtemp(prefix=f"vlscope-bench-{rev[:12]}-"))
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
        trees[rev[:12]] = folder
    trees["working tree"] = ROOT
    workers = {}
    for name, root in trees.items():
        workers[name] = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(root)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        for name, proc in workers.items():
            line = proc.stdout.readline().strip()
            assert line == "ready", f"{name}: worker did not start ({line!r})"

        def ask(name: str, command: str) -> str:
            workers[name].stdin.write(command + "\n")
            workers[name].stdin.flush()
            return workers[name].stdout.readline().strip()

        names = list(workers)
        rows = []
        for view in sections:
            for name in names:
                assert ask(name, f"view {view}") == "ok", name
            for kind in ("head", "layer", "query token"):
                times: dict[str, list[float]] = {name: [] for name in names}
                for i in range(repeats):
                    for name in names[i % len(names):] + names[: i % len(names)]:  # rotate who goes first
                        times[name].append(float(ask(name, f"run {kind}")))
                rows.append((view, kind, {name: statistics.median(t) for name, t in times.items()}))
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.stdin.write("quit\n")
                proc.stdin.flush()
                proc.wait(timeout=60)
    base = names[0]
    print(f"\npage rerun medians (ms), {repeats} interleaved reruns per version and change; load before the run: "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'section':<9} {'change':<12} " + " ".join(f"{n:>14}" for n in names) + f"  {'/'.join(names[1:])} vs {base}")
    for view, kind, t in rows:
        ratios = " ".join(f"{t[n] / t[base]:.2f}" for n in names[1:])
        print(f"{view:<9} {kind:<12} " + " ".join(f"{t[n]:>11.0f} ms" for n in names) + f"  {ratios}")
    return 0


def strip_cost(rev: str, repeats: int) -> int:
    """Server time of the layer strip alone (frames, Arrow bytes, spec, the JSON Streamlit sends and its hash),
    REV's `vlcore/charts/multiples.py` (loaded beside today's) against the working tree's, in turn."""
    import hashlib
    import importlib.util
    import json
    import subprocess

    from bench.common import QUESTION, time_interleaved, vilt_b32
    from vlcore.charts import multiples as cm
    from vlcore.analysis import query_maps as hm
    from vlcore.data.sources import resolve_example
    from vlcore.run.extract import trace_for_example
    from vlcore.storage.store import Store
    from vlcore.storage.uploads import put_input
    from vlcore.ui.heatmaps import _named_arrow, layer_strip_captions

    os.environ["VLSCOPE_CACHE"] = tempfile.mkdtemp(prefix="vlscope-bench-heatmaps-")
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:vlcore/charts/multiples.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "charts_multiples_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("charts_multiples_old", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    adapter = vilt_b32("cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 640, 3), dtype=np.uint8))
    store = Store()
    trace, _ = trace_for_example(adapter, resolve_example(put_input(store, image, QUESTION), store, None), store)
    state = {"tok": 0}

    def sent(module) -> None:
        state["tok"] = (state["tok"] + 1) % 20
        maps = hm.compute_layer_maps(trace, 0, [state["tok"]], "from")
        parts = module.layer_strip_parts(trace, maps, selected=3, title="Every layer",
                                         captions=layer_strip_captions(trace, maps, "from"))
        names, sizes = {}, 0
        for role, frame in parts.datasets.items():
            names[role], data = _named_arrow(role, frame)
            sizes += len(data)
        text = json.dumps(parts.spec(names))
        hashlib.md5(text.encode()).hexdigest()  # Streamlit hashes the spec (element id, message cache)
        state[module.__name__] = (len(text), sizes)

    times = time_interleaved({rev: lambda: sent(old), "working tree": lambda: sent(cm)}, repeats, warmup=3)
    print(f"layer strip alone, median of {repeats} interleaved runs (12 maps x 209 patches, 384x640 image):")
    for name, module in ((rev, old), ("working tree", cm)):
        spec_chars, arrow = state[module.__name__]
        print(f"  {name:<14} {times[name] * 1e3:6.2f} ms   spec JSON {spec_chars / 1e3:6.1f} kB   "
              f"Arrow {arrow / 1e3:6.1f} kB")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compare", nargs="+", metavar="REV", help="versions to time beside the working tree")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="sections for --compare (comma-separated)")
    parser.add_argument("--strip-vs", metavar="REV", help="time the layer strip alone against REV's")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.strip_vs:
        return strip_cost(args.strip_vs, args.repeats)
    if args.worker:
        return worker(args.worker.resolve())
    if args.compare:
        return compare(args.compare, args.repeats, [s for s in args.sections.split(",") if s])
    os.environ["VLSCOPE_CACHE"] = tempfile.mkdtemp(prefix="vlscope-bench-heatmaps-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from streamlit.testing.v1 import AppTest

    import vlcore.ui.context as context
    from bench.common import QUESTION, vilt_b32
    from vlcore.data.sources import resolve_example
    from vlcore.run.extract import extract_trace, trace_for_example
    from vlcore.storage.store import Store
    from vlcore.storage.uploads import put_input
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
