"""Streamlit glue of the embeddings page: cached token sets, cached fits, fusion tables and the token picker.

Fits are cached per (token set key, layer, method, alignment, perplexity): moving the layer slider
back to a layer already seen never refits. `FITS` counts real fits (cache misses) for tests and the
benchmark. Token sets of sweeps are held with ``st.cache_resource`` (read-only arrays, not copied on
every rerun); fits, fusion tables and thumbnails with ``st.cache_data``. Every cached function is keyed
on hashable arguments that determine the result; the underscore argument is the token set named by
``set_key``, and ``set_key`` is the set's content fingerprint (`token_set_fingerprint`, plus the
modality / slice kept), never an example id, a text or a folder name.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from vlcore.charts.embeddings import (
    COLOR_BY,
    build_fusion_chart,
    build_projection_chart,
    chart_spec,
    max_spread,
    row_thumbnails,
    thumbnail_uris,
)
from vlcore.analysis.fusion import N_DIRECTIONS, N_STARTS, compute_fusion
from vlcore.analysis.projection import (
    DEFAULT_PERPLEXITY,
    ProjectionError,
    TokenSet,
    align_signs,
    apply_pca,
    compute_neighbours,
    compute_projection,
    coordinates_frame,
    min_tokens,
    fit_joint_pca,
    token_set_fingerprint,
    token_set_from_sweep,
    token_set_from_traces,
)
from vlcore.storage.sweeps import load_sweep, load_sweep_vectors
from vlcore.trace import ROLE_PATCH, ROLE_TEXT, AttentionBlock, Trace
from vlcore.ui.state import set_params

FITS: Counter = Counter()  # real fits per method ("pca", "tsne", "umap", "pca-joint"), cache misses only
SLICES = ("all", "correct", "incorrect")
SHOW = {"all": "all tokens", "text": "text tokens", "image": "image tokens"}


_EXAMPLE_SETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_EXAMPLE_SETS_LOCK = threading.Lock()


def stream_options(trace: Trace) -> list[str]:
    """The streams of a trace that carry hidden states of enough tokens to project (`min_tokens` of PCA; not
    a one-token pooling probe), a stream of text and image tokens first, then the viewed block's query stream."""
    joint = [name for name, lay in trace.streams.items() if len(lay.index(ROLE_PATCH)) and len(lay.index(ROLE_TEXT))]
    names = dict.fromkeys([*joint, trace.block.query, *trace.streams])  # a stream of text and image tokens first
    return [name for name in names if trace.hiddens.get(name) is not None
            and trace.streams[name].n_tokens >= min_tokens("pca")]


def pick_stream(trace: Trace) -> tuple[list[str], str]:
    """Sidebar choice of the stream to project, for a trace with several (`stream_options`).

    Returns:
        ``(streams, stream)``: the choices and the one picked.

    Raises:
        ProjectionError: no stream has enough tokens to project.
    """
    streams = stream_options(trace)
    if not streams:
        raise ProjectionError(f"no stream of this trace has hidden states of {min_tokens('pca')} tokens or more to "
                              "project")
    if len(streams) == 1:
        return streams, streams[0]
    stream = st.sidebar.selectbox("Stream", streams, key="emb_stream", help="Each stream has its own vector space "
                                  "(and width): one is projected at a time.",
                                  format_func=lambda s: f"{s} ({trace.streams[s].n_tokens} tokens)")
    return streams, stream


def stream_view(trace: Trace, stream: str) -> Trace:
    """The trace viewing a block whose queries are ``stream`` (a self-attention block first), so that its flat
    accessors (tokens, hidden states, patches) read that stream.

    Raises:
        ProjectionError: no block reads ``stream`` as its queries.
    """
    blocks = sorted(trace.blocks.items(), key=lambda kv: not kv[1].is_self)
    name = next((n for n, b in blocks if b.query == stream), None)
    if name is None and stream in trace.streams and trace.hiddens.get(stream) is not None:
        # a stream whose attention rows were not kept (a generative model's decoder sequence: only the generated
        # tokens' rows are): a view of its tokens and hidden states without attentions
        view = f"{stream} (tokens)"
        return dataclasses.replace(trace, blocks={**trace.blocks, view: AttentionBlock(None, stream, stream)},
                                   view=view)
    if name is None:
        raise ProjectionError(f"this trace has no stream {stream!r} with its own attention block; its streams: "
                              f"{', '.join(stream_options(trace))}")
    return trace.select(name)


def example_token_set(trace: Trace, stream: str | None = None, answers_compare: bool = True) -> tuple[TokenSet, str]:
    """Every token of one stream of a trace (default: the viewed block's query stream), and its key: the token
    set's content fingerprint (vectors, token table with the correctness the trace's gold answer gives, thumbnails).
    ``answers_compare`` False (a model that scores the pair: gold answers say nothing) leaves correctness unknown.
    Traces are frozen, so each set is built once per trace object and remembered while it lives."""
    stream = stream or trace.block.query
    with _EXAMPLE_SETS_LOCK:
        known = _EXAMPLE_SETS.get(trace, {}).get((stream, answers_compare))
    if known is not None:
        return known
    tokens = token_set_from_traces([stream_view(trace, stream)])
    if not answers_compare:
        tokens = without_correctness(tokens)
    value = (tokens, f"ex|{token_set_fingerprint(tokens)}")
    with _EXAMPLE_SETS_LOCK:
        _EXAMPLE_SETS.setdefault(trace, {})[(stream, answers_compare)] = value
    return value


def without_correctness(tokens: TokenSet) -> TokenSet:
    """The token set with every token's correctness unknown (a model whose prediction is a pair's score)."""
    return TokenSet(tokens.vectors, tokens.tokens.assign(correct=[None] * tokens.n_tokens), tokens.thumbs)


def fusion_note(tokens: TokenSet, stream: str | None = None, show: str = "all") -> str | None:
    """None when the fusion degree applies (text and image tokens in the one stream shown), else the one line
    that says why it does not."""
    present = set(tokens.tokens["modality"].astype(int).unique())
    if present >= {0, 1}:
        return None
    only = "text" if present == {0} else "image" if present == {1} else "no"
    if show != "all":
        return (f"Fusion degree: n/a with {SHOW[show]} alone (it measures how far a layer's vectors separate text "
                "from image tokens; show all tokens).")
    where = f"the {stream} stream" if stream else "these vectors"
    return (f"Fusion degree: n/a: {where} holds only {only} tokens. This model keeps text and image in separate "
            "streams (they meet through cross-attention or only in a similarity score), so no layer mixes the two "
            "for a 2-means split to tell apart.")


def model_streams(adapter) -> int:
    """How many token streams the model's attention blocks read (1 for a single-stream model)."""
    return len({name for spec in adapter.block_specs().values() for name in (spec.query, spec.key)})


def sweep_stamp(path: Path) -> str:
    """Changes whenever the sweep's files change (an unfinished sweep grows): decides when to read them again."""
    files = sorted(p for p in path.glob("*") if p.suffix in (".parquet", ".safetensors"))
    return "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}:{p.stat().st_ino}" for p in files)


@st.cache_resource(max_entries=4, show_spinner="Loading the sweep's token vectors…")
def _sweep_tokens(path: str, stamp: str) -> tuple[TokenSet, str]:
    preds, _ = load_sweep(path)
    tokens = token_set_from_sweep(load_sweep_vectors(path), preds)
    return tokens, token_set_fingerprint(tokens)


def sweep_token_set(path: Path) -> tuple[TokenSet, str]:
    """The sampled token vectors of a sweep (raises `ProjectionError` when it kept none) and its key, the
    content fingerprint of what was read (computed once per read; the files' stamp only decides when to
    read again)."""
    tokens, digest = _sweep_tokens(str(path), sweep_stamp(path))
    return tokens, f"sweep|{digest}"


def narrow(tokens: TokenSet, key: str, show: str = "all", slice_: str = "all") -> tuple[TokenSet, str]:
    """Keep one modality (``show``: all / text / image) and one slice (all / correct / incorrect)."""
    keep = np.ones(tokens.n_tokens, dtype=bool)
    if show != "all":
        keep &= tokens.tokens["modality"].to_numpy() == (0 if show == "text" else 1)
    if slice_ != "all":
        keep &= tokens.tokens["correct"].map(lambda c: c is not None and not pd.isna(c) and bool(c) == (
            slice_ == "correct")).to_numpy(dtype=bool)
    if keep.all():
        return tokens, key
    return tokens.subset(keep), f"{key}|show={show}|slice={slice_}"


@st.cache_data(max_entries=512, show_spinner=False)
def fit_layer(set_key: str, layer: int, method: str, align: str, perplexity: float, _tokens: TokenSet) -> np.ndarray:
    """float32 ``[T, 2]`` coordinates of one layer, computed once per argument tuple.

    PCA with ``align="sign"`` flips the axes to agree with the previous layer (itself cached);
    ``align="joint"`` uses one PCA fitted on all layers.
    """
    if method == "pca" and align == "joint":
        mean, comps = _joint_pca(set_key, _tokens)
        return apply_pca(_tokens.layer(layer), mean, comps)
    FITS[method] += 1
    coords = compute_projection(_tokens.layer(layer), method, perplexity=perplexity)
    if method == "pca" and align == "sign" and layer > 0:
        coords = align_signs(coords, fit_layer(set_key, layer - 1, method, align, perplexity, _tokens))
    return coords


@st.cache_data(max_entries=16, show_spinner=False)
def _joint_pca(set_key: str, _tokens: TokenSet) -> tuple[np.ndarray, np.ndarray]:
    FITS["pca-joint"] += 1
    return fit_joint_pca(_tokens)


@st.cache_data(max_entries=32, show_spinner=False)
def fusion_table(set_key: str, _tokens: TokenSet) -> pd.DataFrame:
    """`compute_fusion` of a token set, once per key."""
    return compute_fusion(_tokens)


def fusion_caption(fusion: pd.DataFrame) -> str:
    """What the fusion chart shows, and how far its values move between k-means seeds."""
    seeds = int(fusion["n_seeds"].max()) if "n_seeds" in fusion.columns and len(fusion) else 1
    spread = max_spread(fusion)
    stable = ("the same value with every seed" if spread == 0 else
              f"**values move by up to {spread:.3f} between seeds** (bars on the chart; read them with care)")
    return (f"NMI between the layer's lowest-inertia 2-means partition and the tokens' modality (VALUE): "
            f"1, the clusters are the modalities; 0, fused. The partition is the best of {N_DIRECTIONS} principal "
            f"splits and {N_STARTS} random starts, each refined by Lloyd and Hartigan steps. Searched with "
            f"{seeds} seeds: {stable}.")


def fusion_display(fusion: pd.DataFrame) -> pd.DataFrame:
    """The fusion table as shown: series, layer, NMI vs modality and its range over seeds, NMI vs token kind."""
    cols = {"series": "series", "layer": "layer", "nmi_modality": "NMI vs modality",
            "nmi_modality_min": "min over seeds", "nmi_modality_max": "max over seeds",
            "nmi_kind": "NMI vs token kind", "n_seeds": "seeds", "n_tokens": "tokens"}
    table = fusion[[c for c in cols if c in fusion.columns]].rename(columns=cols)
    return table.round(3)


@st.cache_data(max_entries=16, show_spinner=False)
def thumbnails(set_key: str, _tokens: TokenSet) -> list[str]:
    """Tooltip thumbnails (data URIs) of the set's patch tokens."""
    return thumbnail_uris(_tokens.thumbs, _tokens.tokens["kind"].to_numpy() == "patch")


@st.cache_data(max_entries=64, show_spinner=False)
def projection_frame(set_key: str, layer: int, method: str, align: str, perplexity: float,
                     _tokens: TokenSet) -> pd.DataFrame:
    """`coordinates_frame` of a cached fit, with the tooltip thumbnails in an ``image`` column."""
    coords = fit_layer(set_key, layer, method, align, perplexity, _tokens)
    return coordinates_frame(_tokens, coords, layer).assign(image=thumbnails(set_key, _tokens))


def projection_with_spinner(set_key: str, layer: int, method: str, align: str, perplexity: float,
                            tokens: TokenSet) -> pd.DataFrame:
    """`projection_frame`, under a spinner with a rough time for the slow methods (shown only on a miss that
    takes a while: Streamlit delays spinners)."""
    if method == "pca":
        return projection_frame(set_key, layer, method, align, perplexity, tokens)
    with st.spinner(f"Fitting {method.upper()} on {tokens.n_tokens:,} tokens "
                    f"(about {max(1, tokens.n_tokens // 400)} s on 2 CPU cores; cached afterwards)…"):
        return projection_frame(set_key, layer, method, align, perplexity, tokens)


@st.cache_data(max_entries=64, show_spinner=False)
def scatter_spec(color: str, n_colors: int, title: str, columns: tuple[str, ...]) -> dict:
    """The scatter's Vega-Lite spec without data (rows go in as the dataset ``points`` at render time).

    Building and validating an Altair chart costs tens of milliseconds; the spec depends only on these
    arguments, so reruns reuse it.
    """
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    return chart_spec(build_projection_chart(empty, color, title=title, n_colors=n_colors), data_name="points")


def scatter_with_data(frame: pd.DataFrame, color: str, selected: str, title: str) -> dict:
    """A fresh spec dict (Streamlit moves datasets out of it) holding ``frame`` with its ``selected`` column."""
    spec = scatter_spec(color, int(frame[COLOR_BY[color]].nunique()), title, tuple(frame.columns))
    return {**spec, "datasets": {"points": frame.assign(selected=frame["uid"] == selected)}}


@st.cache_data(max_entries=64, show_spinner=False)
def fusion_spec(fusion_key: str, layer: int, _fusion: pd.DataFrame) -> dict:
    """The fusion chart's spec for a fusion table (named by ``fusion_key``) and the current layer."""
    return chart_spec(build_fusion_chart(_fusion, current_layer=layer, layer_names={0: "embeddings"}))


@st.cache_data(max_entries=256, show_spinner=False)
def neighbours(set_key: str, layer: int, row: int, k: int, _tokens: TokenSet) -> pd.DataFrame:
    """`compute_neighbours` with a ``patch`` thumbnail column, once per (set, layer, token, k).

    The thumbnails are encoded for these rows only, so they show however many patches the set has (the
    scatter's tooltips stop at `vlcore.charts.embeddings.MAX_THUMBS`)."""
    table = compute_neighbours(_tokens, layer, row, k)
    return table.assign(patch=row_thumbnails(_tokens.thumbs, _tokens.tokens["kind"].to_numpy() == "patch",
                                             table["row"].to_numpy()))


def sync_token_picker(examples: list[str], wanted_ex: str | None, wanted_tok: int | None) -> None:
    """Put the URL's (or a clicked) token into the picker widgets' state before they are drawn."""
    ex = wanted_ex if wanted_ex in examples else examples[0]
    if st.session_state.get("emb_pick_ex") != ex:
        st.session_state["emb_pick_ex"] = ex
    if wanted_tok is not None and st.session_state.get("emb_pick_tok") != wanted_tok:
        st.session_state["emb_pick_tok"] = wanted_tok


def select_token(example_id: str, token: int | None) -> None:
    """Select one token app-wide: the URL's ``ex`` and ``tok`` (None removes ``tok``)."""
    set_params(ex=example_id, tok=None if token is None else int(token))


def clicked_token(state_key: str, param: str) -> tuple[str, int] | None:
    """A new click on the scatter (its ``uid`` is ``example_id#token``), or None."""
    event = st.session_state.get(state_key)
    points = ((event or {}).get("selection") or {}).get(param) or []
    uid = points[0].get("uid") if points and isinstance(points[0], dict) else None
    if not uid or uid == st.session_state.get("emb_last_click"):
        return None
    st.session_state["emb_last_click"] = uid
    example_id, _, token = str(uid).rpartition("#")
    return (example_id, int(token)) if token.isdigit() else None


__all__ = ["DEFAULT_PERPLEXITY", "FITS", "SHOW", "SLICES", "example_token_set", "fit_layer", "fusion_caption",
           "fusion_display", "fusion_note", "fusion_spec", "fusion_table", "model_streams", "narrow", "neighbours",
           "pick_stream", "projection_frame", "projection_with_spinner", "scatter_spec", "scatter_with_data",
           "select_token", "stream_options", "stream_view", "sweep_token_set", "sync_token_picker", "thumbnails",
           "without_correctness"]
