"""Widgets shared by pages: model picker, trace summary, store panel."""

from __future__ import annotations

import streamlit as st

from vlcore.charts.base import build_patch_overlay_chart, build_prediction_chart
from vlcore.models.base import TASK_NAMES
from vlcore.models.registry import DEFAULT_HUB_CHECKPOINT, DEMO_LABELS, known_checkpoints
from vlcore.attribution.relevance import compute_raw_attention
from vlcore.errors import VLScopeError
from vlcore.storage.store import Store
from vlcore.trace import Trace
from vlcore.ui.state import apply_params, get_param, set_params

DEMO_KINDS = {label: model for model, label in DEMO_LABELS.items()}  # the picker's label -> model
MODEL_KINDS = (*DEMO_KINDS, "Hub checkpoint", "Local folder")
LOCAL_FOLDER_KEY = "_vlscope_model_folder"  # the local checkpoint folder in use (carried across pages, never linked)
ANALYSIS_PAGES = {  # page script -> link label of open_in_pages
    "pages/4_Attention_Heatmaps.py": "Open in Heatmaps",
    "pages/3_Head_Statistics.py": "Open in Head statistics",
    "pages/5_Embeddings.py": "Open in Embeddings",
}


def model_picker() -> str:
    """Sidebar controls for the model; returns "demo", a hub id, or a folder path.

    A hub id or the demo is the URL's ``model`` (carried across pages with the URL); a local folder never goes into
    a link, so it is carried in the session instead, and a page whose URL names no model opens it again.
    """
    from vlcore.data.hub import HUB_ID

    folder = st.session_state.get(LOCAL_FOLDER_KEY)
    current = get_param("model") or ("" if folder else "demo")
    demos = list(DEMO_KINDS.values())
    if current and current not in demos and not HUB_ID.match(current):  # links name hub ids only, never folders
        st.sidebar.warning(f"Ignored the link's model {current!r}: links can name hub ids only.")
        current = "demo"
    kind_index = MODEL_KINDS.index("Local folder") if not current else (
        demos.index(current) if current in demos else MODEL_KINDS.index("Hub checkpoint"))
    kind = st.sidebar.radio("Model", MODEL_KINDS, index=kind_index, key="model_kind")
    if kind in DEMO_KINDS:
        source = DEMO_KINDS[kind]
    elif kind == "Hub checkpoint":
        known = known_checkpoints()  # grouped by family, in display order
        options = list(known) + ["other…"]
        if current in options:
            default = options.index(current)
        elif current in demos:  # just switched from a demo: a checkpoint, not an empty "other…" box
            default = options.index(DEFAULT_HUB_CHECKPOINT)
        else:
            default = len(options) - 1
        pick = st.sidebar.selectbox(
            "Checkpoint", options, index=default, key="model_hub",
            format_func=lambda o: f"{known[o][0].title} · {o} ({known[o][1]})" if o in known else o)
        if pick in known:
            family = known[pick][0]
            st.sidebar.caption(f"{family.title} checkpoints can do: "
                               + "; ".join(TASK_NAMES.get(task, task) for task in family.tasks) + ".")
        other = current if current not in options and current not in demos else ""
        source = st.sidebar.text_input("Hub id", value=other, key="model_hub_other").strip() if pick == "other…" else pick
        if source and not HUB_ID.match(source):
            st.sidebar.error(f"{source!r} is not a hub id (owner/name); use 'Local folder' for a checkpoint on disk.")
            source = ""
    else:
        source = st.sidebar.text_input("Checkpoint folder", value=folder or "", key="model_dir").strip()
    if kind == "Local folder":
        st.session_state[LOCAL_FOLDER_KEY] = source or None
        set_params(model=None)  # folders never go into share links (nor a model the page does not show)
    elif source:
        st.session_state.pop(LOCAL_FOLDER_KEY, None)
        set_params(model=source)
    return source


GENERATIVE_PAGES = {"pages/8_Logit_Lens.py": "Open in Logit lens"}  # pages for models that generate


def open_in_pages(params: dict[str, str], generates: bool = False) -> None:
    """One link per analysis page that opens it on this view (``params``: the example, model, layer, head and
    the dataset that identifies the example); the logit lens too for a model that ``generates``."""
    pages = {**ANALYSIS_PAGES, **(GENERATIVE_PAGES if generates else {})}
    columns = st.columns(len(pages))
    for column, (page, label) in zip(columns, pages.items()):
        column.page_link(page, label=label, query_params=params, icon="➡️")


def show_model_info(info: dict) -> None:
    """Sidebar: the model's id, architecture, size, layers × heads (per tower for two-tower models), width, device,
    and its family with the tasks it can do."""
    from vlcore.models.registry import families
    from vlcore.ui.prediction import per_stream

    st.sidebar.caption(
        f"`{info['model_id']}` · {info['architecture']} · {info['parameters'] / 1e6:.2f} M parameters · "
        f"{per_stream(info['layers'])} layers × {per_stream(info['heads'])} heads · d={per_stream(info['d_model'])} · "
        f"device {info['device']}"
    )
    family = next((f for f in families() if f.name == info.get("family")), None)
    if family is not None:
        st.sidebar.caption(f"Family: {family.title} (tasks: {', '.join(family.tasks)})")


def show_trace_result(trace: Trace, cached: bool, opacity: float = 0.6, adapter=None, example=None) -> None:
    """The prediction as its task gives it (answers against gold, or a pair's scores), the map of the row that
    explains it over the image, and notes on truncation and caching.

    Args:
        trace: the example's trace.
        cached: whether it came from the store.
        opacity: the heat's opacity.
        adapter: the model (its task, targets and default queries); None: the trace alone (answers, row 0).
        example: the example, to score a pair-scoring model's other targets (`vlcore.ui.prediction`).
    """
    from vlcore.ui.prediction import explaining_map, show_pair_scores, show_prediction

    left, right = st.columns(2)
    with left:
        st.subheader(trace.text)
        if adapter is not None:
            show_prediction(trace, adapter)
            if example is not None:
                try:
                    show_pair_scores(adapter, example, int(trace.meta.get("image_pass", 0)))
                except VLScopeError as exc:
                    st.warning(str(exc))
        elif trace.prediction:
            top, prob = trace.prediction[0]
            verdict = {True: " · ✅ correct", False: " · ❌ incorrect", None: ""}[trace.correct]
            gold = f" · **gold:** {', '.join(trace.gold)}" if trace.gold else ""
            st.markdown(f"**Prediction:** {top} ({prob:.1%}){gold}{verdict}")
            st.altair_chart(build_prediction_chart(list(trace.prediction), trace.gold), width="stretch")
        st.caption(f"{'⚡ Loaded from the store' if cached else 'Computed now and stored'} · model `{trace.model_id}`")
        if trace.text_truncated:
            st.warning(
                f"The text was cut to the model's {trace.meta.get('max_text_len', 40)} text positions "
                f"({trace.meta.get('n_text_tokens_full')} tokens given)."
            )
    with right:
        found = explaining_map(trace, adapter) if adapter is not None else None
        if found is None and adapter is None:
            values = compute_raw_attention(trace, layer=-1, head=None, query=0)
            found_trace, title = trace, "[CLS] attention, last layer, mean over heads"
        elif found is None:
            st.info("No single token's attention explains this prediction over the image (no block of this model "
                    "has an explaining row with image keys); see the Attention heatmaps page for every block.")
            return
        else:
            found_trace, values, title = found.trace, found.values, found.title
        st.altair_chart(build_patch_overlay_chart(found_trace, values, title=title, opacity=opacity), width="content")


def show_example(adapter, store: Store, source, example_id: str | None):
    """The Run model page's result for the URL's example: input notes, task runs, prediction and [CLS] heatmap
    (one tab per image for NLVR2).

    Returns:
        The example, or None (with a message) when there is none or it cannot be run.
    """
    from vlcore.data.sources import resolve_example
    from vlcore.errors import VLScopeError
    from vlcore.run.extract import trace_for_example

    if not example_id:
        st.info("Open an example from the dataset browser (\"Interpret this example\"), or upload an image above.")
        return None
    try:
        example = resolve_example(example_id, store, source)
        trace, cached = trace_for_example(adapter, example, store)
    except VLScopeError as exc:
        st.error(str(exc))
        return None
    for notice in store.notices:
        st.info(notice)
    show_input_notes(example)
    st.caption(f"Example `{example.example_id}`" + (f" · category {example.category}" if example.category else ""))
    from vlcore.ui.prediction import model_summary

    st.caption(model_summary(adapter))
    try:
        show_task_runs(adapter, example)
    except VLScopeError as exc:
        st.warning(str(exc))
    opacity = st.sidebar.slider("Heat opacity", 0.0, 1.0, 0.6, 0.05, key="opacity")
    if adapter.n_passes == 1:
        show_trace_result(trace, cached, opacity=opacity, adapter=adapter, example=example)
        return example
    for k, tab in enumerate(st.tabs([f"Image {k + 1}" for k in range(adapter.n_passes)])):  # NLVR2: a pass per image
        with tab:
            try:
                shown = trace_for_example(adapter, example, store, image_pass=k) if k else (trace, cached)
                show_trace_result(*shown, opacity=opacity, adapter=adapter, example=example)
            except VLScopeError as exc:
                st.error(str(exc))
    return example


def show_input_notes(example) -> None:
    """One ``st.info`` per change made to the example's image on the way in (first frame of an animation,
    EXIF rotation, 16-bit grey, transparency, CMYK, padding of a strip, a tiny image)."""
    from vlcore.errors import VLScopeError

    try:
        notes = example.input_notes()
    except VLScopeError:  # the image itself failed: the caller has shown that error
        return
    for note in notes:
        st.info(f"Image: {note}.")


def store_panel(store: Store) -> None:
    """Sidebar: the store's size and a button to clear it."""
    st.sidebar.caption(f"Result store: `{store.root}` · {store.size_bytes() / 2**20:.1f} MiB")
    if st.sidebar.button("Clear the store", key="clear_store"):
        store.clear()
        st.sidebar.success("Store cleared.")


def sweep_panel(adapter, store: Store, source) -> None:
    """Run the model over the first N examples of a source, with progress, stop and resume."""
    from vlcore.run.sweep import run_sweep, sweep_key
    from vlcore.storage.sweeps import load_sweep

    from vlcore.data.browse import filter_index, filtered_label
    from vlcore.ui.state import get_filters

    filters = get_filters()
    matching = filter_index(source.index, **filters)
    filtered = any(filters.values()) and st.checkbox(  # the label names the filters and how many examples match
        filtered_label(filters, len(matching), len(source), source.categories_label), value=True, key="sweep_filtered")
    positions = matching if filtered else range(len(source))
    n_max = len(positions)
    if n_max == 0:
        st.info("No example to sweep.")
        return
    c1, c2, c3 = st.columns(3)
    n = c1.number_input("Examples (first N)", 1, n_max, min(100, n_max), key="sweep_n")
    batch_size = c2.number_input("Batch size", 1, 256, 8, key="sweep_batch")
    start = c3.button("Start / resume sweep", key="sweep_start", type="primary")
    st.caption("Stop with Streamlit's ■ Stop (top right) or any click; finished batches are kept and the next start resumes.")
    chosen = [int(p) for p in positions[: int(n)]]
    ids = source.index["example_id"].iloc[chosen].tolist()
    dataset = f"{source.key}/{source.split}"  # the key names location, config, images and mapping
    out = store.sweep_dir(sweep_key(adapter, dataset, ids))
    if start:
        apply_params()  # the URL is final before a long run that a stop may end
        bar = st.progress(0.0, text="starting…")

        def progress(p) -> None:
            # A stopped run can write nothing more, so this text stays on the page as it is: say what is kept.
            bar.progress(p.done / p.total, text=f"{p.done}/{p.total} examples done and kept · {p.rate:.1f} ex/s · "
                         f"ETA {p.eta_s:.0f} s" + (f" · resumed after {p.skipped}" if p.skipped else ""))

        examples = [source.example(i) for i in chosen]
        run_sweep(adapter, examples, out, dataset=dataset, batch_size=int(batch_size), progress=progress)
        bar.empty()
    preds, _ = load_sweep(out) if out.exists() else (None, None)
    for note in _manifest_notices(out):
        st.info(note)
    if preds is not None and len(preds):
        if len(preds) < len(ids):
            st.warning(f"Stopped: {len(preds)} examples kept; run again to resume ({len(preds)}/{len(ids)} done).")
        columns = ["example_id", "question", "gold", "prediction", "probability", "correct", "category"]
        known = preds["correct"].dropna() if adapter.answers_compare else preds["correct"].iloc[:0]
        accuracy = f"accuracy {known.astype(float).mean():.3f}" if len(known) else "accuracy n/a"
        st.markdown(f"**Sweep:** {len(preds)}/{len(ids)} examples done · {accuracy}")
        if not adapter.answers_compare:
            from vlcore.ui.prediction import task_text

            columns = [c for c in columns if c not in ("gold", "correct")]
            if (preds["prediction"] == preds["question"]).all():  # a similarity's label is the text itself
                columns.remove("prediction")
            st.caption(f"No accuracy: this model scores each image-text pair ({task_text(adapter.task)}); gold "
                       "answers have nothing to compare with.")
        elif not len(known):
            st.caption("No accuracy: these examples have no gold answers.")
        st.dataframe(preds[columns], hide_index=True, height=240)


def _manifest_notices(out) -> list[str]:
    """The notices a sweep folder's manifest holds (damaged parts dropped, batch size lowered)."""
    import json

    try:
        return list(json.loads((out / "manifest.json").read_text()).get("notices", []))
    except (OSError, ValueError, AttributeError):
        return []


def show_task_runs(adapter, example) -> None:
    """The task-specific runs: VCR multiple choice with a model that scores image-text pairs (its ``"match"``
    target), WebQA's question on each image fact with an answering model."""
    import pandas as pd

    from vlcore.run.tasks import run_vcr_choices, run_webqa_facts

    if example.source == "vcr" and not adapter.answers_compare:  # a model that scores image-text pairs
        for stage, result in zip(("Q→A", "QA→R"), run_vcr_choices(adapter, example)):
            if result is None:
                continue
            verdict = {True: "✅ correct", False: "❌ incorrect", None: ""}[result.correct]
            st.markdown(f"**{stage}:** picked {chr(65 + result.pick)} {verdict}")
            st.dataframe(pd.DataFrame({
                "choice": [chr(65 + i) for i in range(len(result.texts))],
                "text as scored": result.texts,
                "match probability": result.scores,
                "gold": [i == result.gold for i in range(len(result.texts))],
                f"text cut at {adapter.max_text_len}": result.truncated,
            }), hide_index=True)
    elif example.source == "vcr":
        st.caption("VCR with an answering model: the question alone is run (below). Use a model that scores "
                   "image-text pairs (an image-text-matching or similarity checkpoint) to score the answer and "
                   "rationale choices.")
    if example.source == "webqa":
        st.info("Text facts are not seen by an image-text model: it reads one image and the question.")
        if adapter.answers_compare and adapter.n_passes == 1:
            images = [_fact_image(example, f) for f in example.facts if f.kind == "image"]
            answers = run_webqa_facts(adapter, example, images)
            st.dataframe(pd.DataFrame({
                "image fact": [a.title for a in answers], "positive": [a.positive for a in answers],
                "answer": [a.prediction[0][0] if a.prediction else None for a in answers],
                "probability": [a.prediction[0][1] if a.prediction else None for a in answers],
                "in gold A": [a.matches_gold for a in answers],
            }), hide_index=True)


def _fact_image(example, fact):
    """A WebQA fact's image through the source's imgs.tsv (URL ``img``), or None when unavailable."""
    from vlcore.data.sources import check_location
    from vlcore.data.webqa import WebQAImages
    from vlcore.errors import VLScopeError

    path = get_param("img")
    try:
        return WebQAImages(check_location(path)).load(fact.image_id) if path and fact.image_id else None
    except VLScopeError:
        return None
