"""Streamlit glue of the probing page: cached probe fits on a sweep, the inputs in the URL, head clicks,
explanations, and a panel that makes a probe sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from vlcore.analysis.probing import (
    DEFAULT_COVER,
    DEFAULT_FOLDS,
    EXAMPLE_TARGETS,
    PATCH_TARGET,
    PROBE_TYPES,
    TOKEN_KINDS,
    WORD_ROLES,
)
from vlcore.ui.state import get_choice, get_param, notice, set_params

HEAD_CHART_KEY = "probe_head_chart"
SHARE_METRIC = "txtq_to_img"  # the sweep's per-head txt→img share: a text query's attention mass on image keys
PROBE_NAMES = {"representation": "Representation: what each layer knows", "attention": "Attention: which heads ground words"}
ROLE_NAMES = {"shape": "shape words (easy-VQA)", "color": "colour words (easy-VQA)", "object": "object names (VCR)",
              "all": "every grounding word"}
EXPLAIN_REPRESENTATION = {
    "accuracy": "share of held-out tokens the layer's linear probe labels correctly; its examples were never trained on",
    "control": "the same probe trained on labels shuffled between examples: what memorising alone scores",
    "majority": "the score of always answering the training set's most frequent label",
    "selectivity": "accuracy − control: how much of the accuracy the layer itself supplies",
}
EXPLAIN_ATTENTION = {
    "accuracy": "share of held-out word–patch pairs whose 'inside the named region' label the probe gets right",
    "balanced_accuracy": "mean of the hit rates inside and outside the region (0.5 = chance, whatever the mix)",
    "auc": "chance that a patch inside the region scores above one outside it (0.5 = chance, 1 = perfect)",
    "control / control_auc": "the same probe trained on labels shuffled between examples (same patch positions)",
    "majority": "the score of always answering 'outside' (or the more common label)",
    "selectivity": "accuracy − control accuracy",
    "weight": "the probe's weight on a head's attention (standardised): positive = the head looks from the word at "
              "its region",
    "spearman": "rank agreement of the weight ranking with a txt→img share ranking (1 = same order, 0 = unrelated)",
}


def probe_inputs(kinds: list[str] | None = None) -> dict:
    """Sidebar inputs of the page, read from and written to the URL (``probe``, ``tkind``, ``target``, ``cover``).

    Args:
        kinds: the token kinds the sweep holds (`available_kinds`); default every kind.
    """
    ptype = st.sidebar.radio("Probe", PROBE_TYPES, format_func=PROBE_NAMES.get, key="probe_type",
                             index=PROBE_TYPES.index(get_choice("probe", PROBE_TYPES, PROBE_TYPES[0])))
    kinds = list(kinds or TOKEN_KINDS)
    if ptype == "representation":
        kind = st.sidebar.selectbox("Token kind", kinds, format_func=TOKEN_KINDS.get, key="probe_kind",
                                    index=kinds.index(get_choice("tkind", kinds, kinds[0])))
        targets = [PATCH_TARGET] if kind == "patch" else list(EXAMPLE_TARGETS)
        targets += list(EXAMPLE_TARGETS) if kind == "patch" else []
        target = st.sidebar.selectbox("Target", targets, key=f"probe_target_{kind == 'patch'}",
                                      format_func=lambda t: "patch inside the region" if t == PATCH_TARGET else t,
                                      index=targets.index(get_choice("target", targets, targets[0])))
    else:
        kind = None
        target = st.sidebar.selectbox("Words", WORD_ROLES, format_func=ROLE_NAMES.get, key="probe_role",
                                      index=WORD_ROLES.index(get_choice("target", WORD_ROLES, "all")))
    cover = _cover_param()
    cover = st.sidebar.slider("Inside the region from (share of a patch's pixels)", 0.05, 1.0, cover, 0.05,
                              key="probe_cover")
    set_params(probe=ptype, tkind=kind, target=target, cover=f"{cover:g}" if cover != DEFAULT_COVER else None)
    return {"ptype": ptype, "kind": kind, "target": target, "cover": float(cover)}


def _cover_param() -> float:
    raw = get_param("cover")
    try:
        value = float(raw) if raw not in (None, "") else DEFAULT_COVER
    except ValueError:
        value = -1.0
    if not 0.05 <= value <= 1.0:
        notice(f"Ignored `cover={raw}` in the link: expected a share between 0.05 and 1; showing {DEFAULT_COVER:g}.")
        return DEFAULT_COVER
    return round(value * 20) / 20  # the slider's step


def sweep_stamp(path: Path) -> float:
    """Newest modification time of a sweep's manifest and probe file: a newer sweep is read again."""
    from vlcore.storage.sweeps import probe_files

    files = [path / "manifest.json", *probe_files(path)]
    return max((p.stat().st_mtime for p in files if p.exists()), default=0.0)


@st.cache_resource(max_entries=2, show_spinner="Reading the sweep's vectors and probe data…")
def sweep_probe_data(path: str, stamp: float):
    """``(token set, example labels, patch cover, probe payload or None, mean head share [L, H] or None)``.

    A resource, not data: the vectors (hundreds of MB for a large sweep) are shared read-only, not copied on every
    call; the probe fits below copy what they select.
    """
    from vlcore.run.probe_sweep import example_label_table, patch_cover_table
    from vlcore.storage.sweeps import load_sweep_probe
    from vlcore.analysis.projection import token_set_from_sweep
    from vlcore.storage.sweeps import load_sweep, load_sweep_vectors

    preds, heads = load_sweep(path)
    probe = load_sweep_probe(path)
    vectors = load_sweep_vectors(path)
    tokens = token_set_from_sweep(vectors, preds) if vectors is not None else None
    share = None
    if len(heads) and (heads["metric"].astype(str) == SHARE_METRIC).any():
        mean = heads[heads["metric"].astype(str) == SHARE_METRIC].groupby(["layer", "head"])["value"].mean()
        share = mean.unstack("head").sort_index().to_numpy(np.float64)
    return tokens, example_label_table(probe, preds), patch_cover_table(probe), probe, share


@st.cache_data(max_entries=32, show_spinner="Fitting one probe per layer…")
def layer_results(path: str, stamp: float, kind: str, target: str, cover: float, folds: int = DEFAULT_FOLDS) -> pd.DataFrame:
    """`vlcore.analysis.probing.compute_layer_probes` on a sweep's kept vectors (``path``/``stamp`` name the data)."""
    from vlcore.analysis.probing import ProbingError, compute_layer_probes, representation_inputs

    tokens, labels, cover_table, _, _ = sweep_probe_data(path, stamp)
    if tokens is None:
        raise ProbingError("this sweep kept no token vectors (made with vector_patches=None or before sweeps kept "
                           "them); make a probe sweep below")
    vectors, y, groups, keys = representation_inputs(tokens, kind, target, labels, cover_table, cover)
    result = compute_layer_probes(vectors, y, groups, keys, folds=min(folds, max(1, pd.Series(groups).nunique() // 2)))
    return result.assign(token_kind=kind, target=target)


@st.cache_data(max_entries=16, show_spinner="Fitting the attention probe…")
def attention_results(path: str, stamp: float, role: str, cover: float, folds: int = 3):
    """``(summary, weights [L, H], heads table, agreement)`` of the attention probe on a probe sweep."""
    from vlcore.run.probe_sweep import require_probe
    from vlcore.analysis.probing import attention_inputs, compute_attention_probe, rank_heads, word_patch_share

    _, _, _, probe, share = sweep_probe_data(path, stamp)
    feats, inside, groups, keys, words = attention_inputs(require_probe(probe), role, cover)
    n_units = pd.Series(groups).nunique()
    fit = compute_attention_probe(feats, inside, groups, keys, folds=min(folds, max(1, n_units // 2)))
    shares = {"word_to_patches": word_patch_share(feats, words)}
    if share is not None and share.shape == fit.weights.shape and np.isfinite(share).all():  # NaN: n/a to the block
        shares = {SHARE_METRIC: share, **shares}
    shares = {name: value for name, value in shares.items() if np.isfinite(value).all()}
    table, agreement = rank_heads(fit.weights, shares)
    summary = fit.summary.assign(words=role, n_words=len(np.unique(words)))
    return summary, fit.weights, table, agreement


def token_kinds(tokens) -> list[str]:
    """The `TOKEN_KINDS` a sweep's kept vectors hold (a two-stream model's sweep keeps one stream: BLIP's text has
    no image tokens, CLIP's vision no text), in `TOKEN_KINDS` order; every kind when the sweep kept no vectors."""
    if tokens is None:
        return list(TOKEN_KINDS)
    t = tokens.tokens
    text, image, special = t["modality"].to_numpy() == 0, t["modality"].to_numpy() == 1, t["special"].to_numpy(bool)
    present = {
        "cls": bool((special & text & (t["token"].to_numpy() == 0)).any()),
        "text_mean": bool((t["kind"] == "text").any()), "words": bool((t["kind"] == "text").any()),
        "image_cls": bool((special & image).any()), "patch": bool((t["kind"] == "patch").any()),
    }
    return [kind for kind in TOKEN_KINDS if present[kind]] or list(TOKEN_KINDS)


def available_kinds(path: str, stamp: float) -> list[str]:
    """`token_kinds` of a sweep's kept vectors (read through the cached `sweep_probe_data`)."""
    return token_kinds(sweep_probe_data(path, stamp)[0])


@st.cache_data(max_entries=16, show_spinner=False)
def grounding_reason(model_key: str, _adapter) -> str | None:
    """None when the model's default block (the one a probe sweep records) has text queries attending to image
    patches, else one line on why the attention probe does not apply (``model_key``: the adapter's fingerprint)."""
    from PIL import Image

    from vlcore.trace import ROLE_PATCH, ROLE_TEXT

    specs = _adapter.block_specs()
    batch = _adapter.encode([Image.new("RGB", (64, 64), (128, 128, 128))], ["what is the shape"])

    def grounds(spec) -> bool:
        return bool(len(batch.streams[spec.query][0].index(ROLE_TEXT))
                    and len(batch.streams[spec.key][0].index(ROLE_PATCH)))

    if grounds(specs[_adapter.default_block]):
        return None
    others = [name for name, spec in specs.items() if grounds(spec)]
    if others:
        return (f"The attention probe reads the block a probe sweep records, {_adapter.default_block}, where no text "
                f"token attends to image patches; {', '.join(others)} does, but sweeps do not record it.")
    return (f"The attention probe does not apply to {_adapter.model_id}: in none of its attention blocks "
            f"({', '.join(specs)}) do text tokens attend to image patches (its text and image meet only in a "
            "similarity score), so no head ties a word to an image region. The representation probe applies.")


def apply_head_click(n_layers: int, n_heads: int) -> None:
    """A click on the weight heatmap selects that head app-wide (URL and sidebar), as on the statistics page."""
    from vlcore.ui.stats import apply_head_click as select_clicked_head

    select_clicked_head(n_layers, n_heads, chart_key=HEAD_CHART_KEY)


def explain(lines: dict[str, str]) -> None:
    """One line per number, for annotators."""
    st.markdown("\n".join(f"- **{name}**: {text}" for name, text in lines.items()))


def probe_sweep_panel(adapter, store) -> None:
    """Make a probe sweep of the first N examples of the URL's dataset (easy-VQA test by default)."""
    from vlcore.run.sweep import VECTOR_PATCHES, run_sweep, sweep_key
    from vlcore.ui.browser import source_from_url

    st.caption("A probe sweep stores, besides the usual statistics and token vectors, every patch's share inside "
               "the region (easy-VQA's shape, the boxes of the objects a VCR question names) and each grounding "
               "word's attention to every patch in every layer and head. In code: "
               "`run_sweep(adapter, examples, folder, probe=True)`.")
    source = source_from_url()
    c1, c2, c3 = st.columns(3)
    n = c1.number_input("Examples (first N)", 2, len(source), min(500, len(source)), key="probe_sweep_n")
    patches = c2.number_input("Patches kept per example", 1, 1024, VECTOR_PATCHES, key="probe_sweep_patches")
    start = c3.button("Make the probe sweep", key="probe_sweep_go", type="primary")
    if not start:
        return
    examples = [source.example(i) for i in range(int(n))]
    dataset = f"{source.key}/{source.split}"
    ids = [e.example_id for e in examples]
    out = store.sweep_dir(sweep_key(adapter, dataset, ids, vector_patches=int(patches), probe=True))
    bar = st.progress(0.0, text="starting…")
    run_sweep(adapter, examples, out, dataset=dataset, vector_patches=int(patches), probe=True,
              progress=lambda p: bar.progress(p.done / p.total, text=f"{p.done}/{p.total} examples"))
    bar.empty()
    set_params(sweep=out.name[:12])
    st.session_state.pop("sweep_pick", None)  # the picker follows the URL to the new sweep
    st.rerun()
