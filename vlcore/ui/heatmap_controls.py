"""The heatmaps page's controls: the query (token chips, patches), direction, method, scale, section, answer.

The URL is the shareable state (``tok``, ``patch``, ``dir``, ``method``, ``scale``, ``answer``, ``view``);
widgets are seeded from it once per (model, example, block) and write it back on every run. Token positions come
from the viewed block's layouts (`vlcore.analysis.query_maps`): the chips list the query stream's named tokens
(text and specials, or an image tower's CLS), the patch picker the patches of whichever side holds the image.
On a cross block a token is a row (what it reads) and picked patches are columns (who reads them); when the
viewed block changes, the query starts from the block's default (`ModelAdapter.default_query`), not from the
other block's token indices in the URL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import streamlit as st

from vlcore.analysis import query_maps as hm
from vlcore.trace import Trace
from vlcore.ui.state import get_choice, get_int, get_param, notice, set_params

METHODS = ("raw", "rollout", "relevancy")
METHOD_TITLES = {"raw": "raw attention", "rollout": "attention rollout", "relevancy": "gradient relevancy"}
VIEWS = ("matrices", "heads", "step", "explain", "export")
VIEW_TITLES = {"matrices": "Matrices", "heads": "All heads", "step": "Step-through", "explain": "Explanations",
               "export": "Export"}


@dataclass
class Query:
    """The query: one token, or patches (their maps are averaged).

    Attributes:
        tokens: token indices on ``side`` of the viewed block.
        cells: the picked patches' (row, col), empty for a token query.
        label: how titles name it.
        side: ``"query"`` (the block's query stream, the usual case) or ``"key"`` (patches of the image a cross
            block reads: their maps are columns).
    """

    tokens: np.ndarray
    cells: list[tuple[int, int]]
    label: str
    side: str = "query"


def _seed_from_url(trace: Trace, preferred: int | None, use_link: bool = True) -> None:
    """Set the widgets' state from the URL; malformed values get a notice.

    Args:
        preferred: the block's default query token (`ModelAdapter.default_query`).
        use_link: read ``tok`` and ``patch`` (False after a block switch: they named another block's tokens).
    """
    named = [int(i) for i in hm.query_choices(trace)]
    img = hm.image_side(trace)
    grid = hm.side_trace(trace, img).grid if img else (0, 0)
    cells, problems = hm.parse_patches(get_param("patch") if use_link else None, grid)
    for line in problems:
        notice(f"Link parameter `patch`: {line}.")
    default = hm.default_query(trace, preferred)
    start = int(default[0]) if len(default) == 1 else None
    raw = (get_param("tok") or "") if use_link else ""
    tok = get_int("tok", 0 if start is None else start, -(2**62), 2**62) if raw else start  # malformed: a notice
    if tok is not None and not 0 <= tok < trace.n_tokens:
        near = (named[0] if tok < 0 else named[-1]) if named else start
        shown = "" if near is None else f"; showing token {near} ({trace.tokens[near]})"
        notice(f"`tok={raw}` is outside this example's {trace.n_tokens} tokens{shown}.")
        tok = near
    if tok is not None and not cells and img == "query" and trace.patch_rc[tok, 0] >= 0:  # a patch named by index
        cells = [(int(trace.patch_rc[tok, 0]), int(trace.patch_rc[tok, 1]))]
    elif tok is not None and not cells and tok not in named:
        near = named[-1] if named else start
        shown = "" if near is None else f"; showing token {near} ({trace.tokens[near]})"
        notice(f"`tok={tok}` is not a text token or a patch{shown}.")
        tok = near
    st.session_state["hm_tok"] = None if cells or tok not in named else tok
    st.session_state["hm_patches"] = [f"{r}.{c}" for r, c in cells]
    st.session_state["hm_dir"] = get_choice("dir", hm.DIRECTIONS, "from")
    st.session_state["hm_method"] = get_choice("method", METHODS, "raw")
    st.session_state["hm_scale"] = get_choice("scale", hm.SCALES, "map")
    st.session_state["hm_view"] = get_choice("view", VIEWS, "matrices")
    st.session_state["hm_trace"] = (trace.model_id, trace.example_id, trace.view)


def _clear_patches() -> None:
    st.session_state["hm_patches"] = []


def _clear_token() -> None:
    st.session_state["hm_tok"] = None


def on_overlay_click() -> None:
    """A click on the overlay's patches (selection ``patch``) becomes the patch query."""
    event = st.session_state.get("hm_click") or {}
    points = (event.get("selection") or {}).get("patch") or []
    cells = [f"{int(p['row'])}.{int(p['col'])}" for p in points if "row" in p and "col" in p]
    if cells:
        st.session_state["hm_patches"] = cells
        st.session_state["hm_tok"] = None


def pick_query(trace: Trace, preferred: int | None = None) -> Query:
    """Token chips (``st.pills``) and a patch picker, seeded from and written to the URL (``tok``, ``patch``).

    Args:
        trace: the trace viewing the block shown.
        preferred: the block's default query token (`ModelAdapter.default_query`; None: the first named token,
            or every patch of a tower without one).
    """
    seen = st.session_state.get("hm_trace")
    here = (trace.model_id, trace.example_id, trace.view)
    if seen != here or "hm_tok" not in st.session_state:  # a new example or block, or back from another page
        switched = seen is not None and tuple(seen[:2]) == here[:2] and "hm_tok" in st.session_state
        _seed_from_url(trace, preferred, use_link=not switched)
    cross = not trace.block.is_self
    named = [int(i) for i in hm.query_choices(trace)]
    if named:
        st.pills("Query token (click a word)" + (": the patches it reads" if cross else ""), named, key="hm_tok",
                 on_change=_clear_patches, format_func=lambda i: trace.tokens[i])
    img = hm.image_side(trace)
    cells: list[tuple[int, int]] = []
    if img is not None:
        image_trace = hm.side_trace(trace, img)
        _, rc = image_trace.patch_positions()
        what = ("…or pick patches: the text tokens that read them (row.col; or click patches on the image)"
                if img == "key" else
                "…or query patches (row.col; or click patches on the image, shift-click for several)")
        st.multiselect(what, [f"{r}.{c}" for r, c in rc], key="hm_patches", on_change=_clear_token)
        cells = [tuple(int(v) for v in p.split(".")) for p in st.session_state.get("hm_patches") or []]
    if cells:
        set_params(tok=None, patch=hm.format_patches(cells))
        label = f"patch {hm.format_patches(cells)}" if len(cells) == 1 else f"mean of {len(cells)} patches"
        return Query(hm.patch_token_indices(image_trace, cells), cells, label, img)
    tok = st.session_state.get("hm_tok")
    if tok is None:  # nothing picked: the block's default query
        default = hm.default_query(trace, preferred)
        if len(default) != 1:
            set_params(tok=None, patch=None)
            return Query(default, [], "every patch (mean)")
        tok = int(default[0])
    tok = int(tok)
    set_params(tok=tok, patch=None)
    return Query(np.array([tok]), [], f"token {tok} “{trace.tokens[tok]}”")


@dataclass
class Display:
    """How the maps are drawn: direction, method, colour scale (`vlcore.analysis.query_maps.SCALES`), opacity, smoothing."""

    direction: str
    method: str
    scale: str
    opacity: float
    smooth: bool


def pick_display(cross: bool = False) -> Display:
    """Direction, method, colour scale, opacity and smoothing (``dir``, ``method``, ``scale`` in the URL).

    Args:
        cross: the viewed block is a cross block: the query picks the direction (a token's row, patches'
            columns), so there is no direction control and ``dir`` is left as the link had it.
    """
    c1, c2 = st.columns([1, 2])
    if cross:
        c1.caption("Cross-attention: a text token's map is the patches it reads (its row); picked patches show "
                   "the text tokens that read them (their column).")
        direction = "from"
    else:
        direction = c1.segmented_control("Attention", hm.DIRECTIONS, key="hm_dir",
                                         format_func=lambda d: f"{d} the query") or "from"
    method = c2.segmented_control("Map", METHODS, key="hm_method", format_func=METHOD_TITLES.get) or "raw"
    c3, c4, c5 = st.columns([3, 2, 1])
    scale = c3.segmented_control(
        "Colour scale", hm.SCALES, key="hm_scale", format_func=hm.SCALE_TITLES.get,
        help="per map: each map from its own min to its max (a map of near-zero weights looks as strong as any); "
             "shared: one scale from 0 to the largest weight of every map on the page; absolute: 0 to 1, "
             "the share of a row") or "map"
    opacity = c4.slider("Heat opacity", 0.0, 1.0, 0.8, 0.05, key="hm_opacity",
                        help="the heat's opacity at the top of the colour scale; it falls to 0 (transparent) at "
                             "weight 0, so the image shows through low weights")
    smooth = c5.toggle("Smooth", key="hm_smooth", help="bilinear upsampling of the patch grid")
    set_params(method=method, scale=scale, **({} if cross else {"dir": direction}))
    return Display(direction, method, scale, opacity, smooth)


def pick_view() -> str:
    """Which lower section runs (only the chosen one is computed), URL ``view``."""
    view = st.segmented_control("Section", VIEWS, key="hm_view", format_func=VIEW_TITLES.get) or "matrices"
    set_params(view=view)
    return view


def answer_options(adapter, trace: Trace) -> list[str]:
    """Labels the relevancy can explain: the trace's top-k first, then every target the model offers."""
    labels = [label for label, _ in trace.prediction]
    labels += [label for label in adapter.targets() if label not in set(labels)]
    return labels or ["match"]


def pick_answer(adapter, trace: Trace) -> str | None:
    """The answer explained by relevancy (URL ``answer``; the predicted one by default)."""
    options = answer_options(adapter, trace)
    wanted = get_param("answer")
    if wanted and wanted not in options:
        notice(f"The link's answer `{wanted}` is not a label of {adapter.model_id}; explaining the prediction.")
        wanted = None
    index = options.index(wanted) if wanted else 0
    answer = st.selectbox("Answer to explain (relevancy, faithfulness)", options, index=index, key="hm_answer",
                          format_func=lambda a: f"{a} (predicted)" if a == trace.predicted else a)
    set_params(answer=None if answer == trace.predicted else answer)
    return answer
