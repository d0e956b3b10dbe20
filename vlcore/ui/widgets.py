"""Widgets shared by pages: model picker, trace summary, store panel."""

from __future__ import annotations

import streamlit as st

from vlcore.charts import build_patch_overlay_chart, build_prediction_chart
from vlcore.models.registry import KNOWN_CHECKPOINTS
from vlcore.relevance import compute_raw_attention
from vlcore.store import Store
from vlcore.trace import Trace
from vlcore.ui.state import get_param, set_params

MODEL_KINDS = ("Bundled demo", "Hub checkpoint", "Local folder")


def model_picker() -> str:
    """Sidebar controls for the model; returns "demo", a hub id, or a folder path."""
    current = get_param("model", "demo") or "demo"
    kind_index = 0 if current == "demo" else 1
    kind = st.sidebar.radio("Model", MODEL_KINDS, index=kind_index, key="model_kind")
    if kind == "Bundled demo":
        source = "demo"
    elif kind == "Hub checkpoint":
        options = list(KNOWN_CHECKPOINTS) + ["other…"]
        default = options.index(current) if current in options else 0
        pick = st.sidebar.selectbox("Checkpoint", options, index=default, key="model_hub",
                                    format_func=lambda o: f"{o} ({KNOWN_CHECKPOINTS[o]})" if o in KNOWN_CHECKPOINTS else o)
        source = st.sidebar.text_input("Hub id", key="model_hub_other").strip() if pick == "other…" else pick
    else:
        source = st.sidebar.text_input("Checkpoint folder", key="model_dir").strip()
    if kind != "Local folder" and source:
        set_params(model=source)  # folders never go into share links
    return source


def show_model_info(info: dict) -> None:
    st.sidebar.caption(
        f"`{info['model_id']}` · {info['architecture']} · {info['parameters'] / 1e6:.2f} M parameters · "
        f"{info['layers']} layers × {info['heads']} heads · d={info['d_model']} · device {info['device']}"
    )


def show_trace_result(trace: Trace, cached: bool, opacity: float = 0.6) -> None:
    """Prediction against gold, the [CLS] heatmap, and notes on truncation and caching."""
    left, right = st.columns(2)
    with left:
        st.subheader(trace.text)
        if trace.prediction:
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
        values = compute_raw_attention(trace, layer=-1, head=None, query=0)
        st.altair_chart(
            build_patch_overlay_chart(trace, values, title="[CLS] attention, last layer, mean over heads", opacity=opacity),
            width="content",
        )


def store_panel(store: Store) -> None:
    """Sidebar: the store's size and a button to clear it."""
    st.sidebar.caption(f"Result store: `{store.root}` · {store.size_bytes() / 2**20:.1f} MiB")
    if st.sidebar.button("Clear the store", key="clear_store"):
        store.clear()
        st.sidebar.success("Store cleared.")


def sweep_panel(adapter, store: Store, source) -> None:
    """Run the model over the first N examples of a source, with progress, stop and resume."""
    from vlcore.extract import load_sweep, run_sweep, sweep_key

    n_max = len(source)
    c1, c2, c3 = st.columns(3)
    n = c1.number_input("Examples (first N)", 1, n_max, min(100, n_max), key="sweep_n")
    batch_size = c2.number_input("Batch size", 1, 256, 8, key="sweep_batch")
    start = c3.button("Start / resume sweep", key="sweep_start", type="primary")
    st.caption("Stop with Streamlit's ■ Stop (top right) or any click; finished batches are kept and the next start resumes.")
    ids = source.index["example_id"].iloc[: int(n)].tolist()
    dataset = f"{source.key}/{source.split}"
    out = store.sweep_dir(sweep_key(adapter, dataset, ids))
    if start:
        bar = st.progress(0.0, text="starting…")

        def progress(p) -> None:
            bar.progress(p.done / p.total, text=f"{p.done}/{p.total} examples · {p.rate:.1f} ex/s · ETA {p.eta_s:.0f} s"
                         + (f" · resumed after {p.skipped}" if p.skipped else ""))

        examples = [source.example(i) for i in range(int(n))]
        run_sweep(adapter, examples, out, dataset=dataset, batch_size=int(batch_size), progress=progress)
    preds, _ = load_sweep(out) if out.exists() else (None, None)
    if preds is not None and len(preds):
        acc = preds["correct"].dropna().mean()
        st.markdown(f"**Sweep:** {len(preds)}/{len(ids)} examples done · accuracy {acc:.3f}")
        st.dataframe(preds[["example_id", "question", "gold", "prediction", "probability", "correct", "category"]],
                     hide_index=True, height=240)
