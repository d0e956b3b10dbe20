"""Attention maps of a query over a trace's viewed block, and the patch selections that name queries (pure numpy).

A trace views one attention block (`vlcore.trace.Trace.select`): a self block (ViLT's joint ``self``, a tower's
``vision.self`` or ``text.self``; rows and columns are the same tokens) or a cross block (BLIP's ``text.cross``:
rows are the text stream's tokens, columns the image stream's). Token positions are read from the layouts, never
assumed. A *query* is one token or several (patches selected together); its map is the mean of their rows
(attention **from** the query, a map over the block's keys) or of their columns (attention **to** the query, a
map over its queries). On a cross block a query token is a row (a text token: the patches it reads) and picked
patches are columns (the text tokens that read them): `query_direction`. A map lies on the keys' or the queries'
layout (`map_trace`), which says whether it is drawn on the image, as text chips, or both. The chart builders in
`vlcore.charts.heatmaps` and `vlcore.charts.multiples` draw these maps, on a colour scale chosen here (`SCALES`:
per map, shared by the maps shown, or absolute 0–1), with the image's share of each map (`compute_image_share`,
`image_share_caption`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

import threading
import weakref

from vlcore.trace import IMAGE, ROLE_GENERATED, ROLE_IMAGE_SUMMARY, ROLE_PATCH, ROLE_SPECIAL, ROLE_TEXT, TEXT, Trace

DIRECTIONS = ("from", "to")
_PATCH = re.compile(r"^\s*(-?\d+)\.(-?\d+)\s*$")


def has_image_tokens(trace: Trace) -> bool:
    """Whether the trace has image patches to draw a heatmap on (False for a text-only trace).

    >>> from vlcore.trace import Trace
    >>> t = Trace.from_arrays("e", "m", ("[CLS]", "a", "[SEP]"), np.zeros(3, np.int8), np.array([1, 0, 1], bool),
    ...           np.full((3, 2), -1, np.int16), (0, 0), np.zeros((0, 0, 3), np.uint8), 8, None, None)
    >>> has_image_tokens(t)
    False
    """
    return bool(trace.grid[0] * trace.grid[1] > 0 and (trace.patch_rc[:, 0] >= 0).any() and trace.image.size)


# ---------------------------------------------------------------------------------------
# The viewed block: its sides, where the image is, which tokens a user picks
# ---------------------------------------------------------------------------------------

SIDES = ("query", "key")
_SIDE_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SIDE_LOCK = threading.Lock()


def layout_has_patches(layout) -> bool:
    """Whether a `TokenLayout` holds image patches on an image it carries."""
    return bool(layout.images) and bool((layout.role == ROLE_PATCH).any())


def trace_has_images(trace: Trace) -> bool:
    """Whether any stream of the trace has image patches (False only for a text-only input)."""
    return any(layout_has_patches(layout) for layout in trace.streams.values())


def side_trace(trace: Trace, side: str) -> Trace:
    """A trace whose flat accessors (``tokens``, ``patch_positions``, ``image`` ...) read one side of the viewed
    block: its queries' layout (``"query"``) or its keys' (``"key"``).

    A self block's two sides are the trace itself. A cross block's side is a one-stream trace over that stream
    (no attentions: it only places a map's values), the same object for the same trace and side.

    Raises:
        ValueError: ``side`` is not one of `SIDES`.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if trace.block.is_self:
        return trace
    with _SIDE_LOCK:
        known = _SIDE_TRACES.get(trace, {}).get(side)
    if known is not None:
        return known
    stream = trace.block.query if side == "query" else trace.block.key
    made = Trace.single(trace.example_id, trace.model_id, trace.streams[stream], None, None,
                        block=f"{trace.view}:{side}", stream=stream, prediction=trace.prediction, gold=trace.gold,
                        text=trace.text, meta=trace.meta)
    with _SIDE_LOCK:
        _SIDE_TRACES.setdefault(trace, {})[side] = made
    return made


def map_side(direction: str) -> str:
    """The side a map lies on: attention *from* a query spreads over the keys, *to* a query over the queries."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return "key" if direction == "from" else "query"


def map_stream(trace: Trace, direction: str) -> str:
    """The stream a map of ``direction`` lies on: the viewed block's key stream ("from") or query stream ("to")."""
    return trace.block.key if map_side(direction) == "key" else trace.block.query


def map_trace(trace: Trace, direction: str) -> Trace:
    """The trace that places a map of ``direction`` (`side_trace` of `map_side`)."""
    return side_trace(trace, map_side(direction))


def image_side(trace: Trace) -> str | None:
    """The side of the viewed block whose tokens are image patches: ``"query"`` (a self block over an image
    stream, or image queries), ``"key"`` (a cross block reading an image) or None (a text-only block)."""
    for side, stream in (("query", trace.block.query), ("key", trace.block.key)):
        if layout_has_patches(trace.streams[stream]):
            return side
    return None


def query_direction(trace: Trace, side: str, direction: str) -> str:
    """The direction of a query's map: on a self block the one asked for; on a cross block a query-stream token's
    map is its row (``"from"``: the keys it reads) and a key-stream token's its column (``"to"``: who reads it)."""
    if trace.block.is_self:
        return direction
    return "from" if side == "query" else "to"


def has_text(trace: Trace) -> bool:
    """Whether the viewed layout has text tokens (words, specials or generated tokens)."""
    return bool(len(trace.layout.index(ROLE_TEXT, ROLE_SPECIAL, ROLE_GENERATED)))


def has_patches(trace: Trace) -> bool:
    """Whether the viewed layout has patches on an image (a map over it can be drawn on the image)."""
    return layout_has_patches(trace.layout)


def query_choices(trace: Trace) -> np.ndarray:
    """Query tokens a user picks by name (the token chips): the text, special and generated tokens of the query
    stream, or in a stream with none (an image tower) its image summaries (CLS). Patches are picked on the grid.

    Returns:
        int64 token indices, in sequence order (empty for a tower of patches only).
    """
    named = trace.layout.index(ROLE_TEXT, ROLE_SPECIAL, ROLE_GENERATED)
    return named if len(named) else trace.layout.index(ROLE_IMAGE_SUMMARY)


def step_tokens(trace: Trace) -> np.ndarray:
    """The query tokens the step-through plays: the named ones (`query_choices`), or every token of a stream
    with at most one (an image tower: its CLS and its patches, row by row)."""
    named = query_choices(trace)
    return named if len(named) > 1 else np.flatnonzero(trace.layout.valid)


def default_query(trace: Trace, preferred: int | None) -> np.ndarray:
    """The query a view opens on: ``preferred`` (the adapter's `default_query` for the block) when it is a query
    token, else the first named token, else every patch of the query stream (a tower whose head pools them).

    Returns:
        int64 query-stream token indices.
    """
    if preferred is not None and 0 <= int(preferred) < trace.n_tokens:
        return np.array([int(preferred)], dtype=np.int64)
    named = query_choices(trace)
    if len(named):
        return named[:1].astype(np.int64)
    return trace.layout.index(ROLE_PATCH).astype(np.int64)


def context_map(trace: Trace, attention: np.ndarray) -> np.ndarray:
    """On a cross block, what each image token receives from the other stream, as the backdrop of a patch
    query's overlay: the mean of every query's row (image keys) or of every key's column (image queries).

    Args:
        attention: ``[Q, K]`` of the viewed block (one head or the mean).

    Returns:
        float32 values on the image side's tokens.
    """
    if image_side(trace) == "key":
        return compute_query_map(attention, np.flatnonzero(trace.layout.valid), "from")
    return compute_query_map(attention, np.flatnonzero(trace.key_layout.valid), "to")


def no_image_reason(trace: Trace) -> str:
    """One line on why a text-only block has no image overlay, naming the blocks that have one.

    >>> from vlcore.trace import TokenLayout, AttentionBlock, ImageGrid
    >>> text = TokenLayout.build(["[CLS]", "hi"], [ROLE_SPECIAL, ROLE_TEXT])
    >>> img = TokenLayout.build(["<p>"], [ROLE_PATCH], [0], [[0, 0]], [ImageGrid.regular(np.zeros((2, 2, 3), np.uint8), (1, 1), 2)])
    >>> a = np.ones((1, 1, 2, 2), np.float16) / 2
    >>> t = Trace("e", "m", {"text": text, "vision": img}, {"text.self": AttentionBlock(a, "text", "text"),
    ...           "text.cross": AttentionBlock(np.ones((1, 1, 2, 1), np.float16), "text", "vision")}, {}, "text.self")
    >>> no_image_reason(t)
    'text.self has no image tokens: pick text.cross'
    """
    others = [name for name, block in trace.blocks.items() if block.attentions is not None and name != trace.view
              and (layout_has_patches(trace.streams[block.query]) or layout_has_patches(trace.streams[block.key]))]
    return f"{trace.view} has no image tokens" + (f": pick {' or '.join(others)}" if others else "")


def available_quadrants(trace: Trace) -> list[str]:
    """The modality quadrants (`vlcore.trace.BLOCKS`) of the viewed block with rows and columns (specials left
    out): all four on ViLT's joint block, ``img2img`` on an image tower, ``txt2img`` on text-to-image cross."""
    from vlcore.trace import BLOCKS

    out = []
    for quadrant in BLOCKS:
        rows, cols = trace.block_index(quadrant)
        if len(rows) and len(cols):
            out.append(quadrant)
    return out


def compute_query_map(attention: np.ndarray, query: Sequence[int], direction: str = "from") -> np.ndarray:
    """The map of a query in one attention matrix: float32 ``[N]``.

    Args:
        attention: ``[N, N]`` (rows queries, columns keys): one head, the mean, or a rollout.
        query: token indices; several give the mean of their maps.
        direction: ``"from"`` (the query's rows: what it attends to) or ``"to"`` (its columns: how
            much every token attends to it).

    >>> a = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    >>> compute_query_map(a, [1]).tolist(), compute_query_map(a, [0], "to").tolist()
    ([0.0, 0.0, 1.0], [0.5, 0.0, 1.0])
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    q = np.asarray(list(query), dtype=np.int64)
    if q.size == 0:
        raise ValueError("a query needs at least one token")
    rows = attention[q] if direction == "from" else attention[:, q].T
    return rows.mean(0, dtype=np.float32)


def compute_head_maps(trace: Trace, layer: int, query: Sequence[int], direction: str = "from") -> np.ndarray:
    """The query's map in every head of one layer: float32 ``[H, N]``."""
    att = trace.attentions[layer]  # [H, N, N] float16
    q = np.asarray(list(query), dtype=np.int64)
    rows = att[:, q, :] if direction == "from" else np.swapaxes(att[:, :, q], 1, 2)
    return rows.mean(1, dtype=np.float32)


def compute_layer_maps(trace: Trace, head: int | None, query: Sequence[int], direction: str = "from") -> np.ndarray:
    """The query's map in every layer, for one head or the mean over heads: float32 ``[L, N]``.

    Row ``l`` equals ``compute_query_map(trace.head_attention(l, head), query, direction)``.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    q = np.asarray(list(query), dtype=np.int64)
    att = trace.attentions if head is None else trace.attentions[:, head : head + 1]  # [L, H', N, N]
    rows = att[:, :, q, :] if direction == "from" else np.swapaxes(att[:, :, :, q], 2, 3)  # [L, H', Q, N]
    return rows.mean((1, 2), dtype=np.float32)


# ---------------------------------------------------------------------------------------
# Colour scales and the image's share of a map
# ---------------------------------------------------------------------------------------

SCALES = ("map", "shared", "absolute")
SCALE_TITLES = {"map": "per map (min–max)", "shared": "shared", "absolute": "absolute 0–1"}


def patch_values(trace: Trace, values: np.ndarray) -> np.ndarray:
    """The values of the patch tokens (row-major grid order): float64 ``[P]``."""
    return np.asarray(values, dtype=np.float64)[trace.patch_positions()[0]]


def safe_domain(lo: float, hi: float) -> tuple[float, float]:
    """A colour domain Vega can draw: finite, and ``hi > lo`` (a constant map gets a sliver of width).

    >>> safe_domain(0.0, 0.5), safe_domain(0.25, 0.25)[1] > 0.25, safe_domain(float("nan"), 1.0)
    ((0.0, 0.5), True, (0.0, 1.0))
    """
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return 0.0, 1.0
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        hi = lo + max(abs(lo), 1.0) * 1e-6
    return lo, hi


def map_domain(values: np.ndarray) -> tuple[float, float]:
    """One map's own range, min to max (the "per map" scale).

    >>> map_domain(np.array([0.2, 0.1, 0.4]))
    (0.1, 0.4)
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return safe_domain(float(v.min()), float(v.max())) if v.size else (0.0, 1.0)


def compute_domain(maps: Sequence[np.ndarray], scale: str) -> tuple[float, float] | None:
    """The colour domain the maps share under a scale, or None when each map keeps its own (``"map"``).

    Args:
        maps: the values each map draws (e.g. `patch_values` of every map on screen).
        scale: ``"map"`` (None: every map min to max), ``"shared"`` (0, or a lower minimum, to the
            largest value of all maps) or ``"absolute"`` (0 to 1: a weight's share of its row).

    >>> compute_domain([np.array([0.0, 0.2]), np.array([0.1, 0.6])], "shared")
    (0.0, 0.6)
    >>> compute_domain([np.array([0.3])], "absolute"), compute_domain([np.array([0.3])], "map")
    ((0.0, 1.0), None)
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale == "map":
        return None
    if scale == "absolute":
        return 0.0, 1.0
    values = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps]) if len(maps) else np.zeros(0)
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    return safe_domain(min(0.0, float(values.min())), float(values.max()))


def clip_share(share: float) -> float:
    """A share for display, in [0, 1] (float16 rows sum to 1 ± 1e-3; a printed 100.01 % is noise).

    >>> clip_share(1.00001), clip_share(-1e-9), clip_share(0.25)
    (1.0, 0.0, 0.25)
    """
    return float(min(max(float(share), 0.0), 1.0)) if np.isfinite(share) else 0.0


def format_share(share: float) -> str:
    """A share as a percentage with one decimal; a positive share below 0.05 % reads "<0.1%", not "0.0%".

    >>> format_share(1.00001), format_share(0.1234), format_share(0.0), format_share(3e-6)
    ('100.0%', '12.3%', '0.0%', '<0.1%')
    """
    s = clip_share(share)
    return "<0.1%" if 0 < s < 0.0005 else f"{s:.1%}"


def compute_image_share(trace: Trace, values: np.ndarray, direction: str = "from") -> float:
    """How much of a map lies on the image patches.

    ``"from"``: the patches' part of the map's total, i.e. the share of the query's attention (its row) that
    the image receives, or of a relevancy map's total relevance. ``"to"``: the mean over patches of the weight
    each gives the query, i.e. the share of a patch's attention the query receives.

    Returns:
        A share in [0, 1] (clipped: float16 sums may pass 1 by a rounding error).
    """
    v = np.asarray(values, dtype=np.float64)
    patches = patch_values(trace, v)
    if direction == "to":
        return clip_share(patches.mean()) if patches.size else 0.0
    total = float(v.sum())
    return clip_share(patches.sum() / total) if total > 0 else 0.0


def image_share_caption(trace: Trace, values: np.ndarray, direction: str = "from", relevance: bool = False) -> str:
    """The line shown beside an overlay, e.g. ``"image: 0.0% of this row"``."""
    share = format_share(compute_image_share(trace, values, direction))
    if relevance:
        return f"image: {share} of the relevance"
    if direction == "to":
        return f"patches give the query {share} of their attention (mean)"
    return f"image: {share} of this row"


def parse_patches(text: str | None, grid: tuple[int, int]) -> tuple[list[tuple[int, int]], list[str]]:
    """Patch cells from the URL form ``"row.col,row.col"``.

    Malformed entries are dropped; cells outside the grid move to the nearest cell inside it.

    Returns:
        ``(cells, problems)``: unique (row, col) cells in the order given, and one line per problem.

    >>> parse_patches("1.2,x,9.0", (2, 3))
    ([(1, 2), (1, 0)], ['`x` is not row.col', '`9.0` is outside the 2×3 grid; using 1.0'])
    """
    cells: list[tuple[int, int]] = []
    problems: list[str] = []
    rows, cols = grid
    for part in (text or "").split(","):
        if not part.strip():
            continue
        m = _PATCH.match(part)
        if m is None:
            problems.append(f"`{part.strip()}` is not row.col")
            continue
        r, c = int(m.group(1)), int(m.group(2))
        if rows * cols == 0:
            problems.append(f"`{part.strip()}`: this example has no image patches")
            continue
        if not (0 <= r < rows and 0 <= c < cols):
            r, c = min(max(r, 0), rows - 1), min(max(c, 0), cols - 1)
            problems.append(f"`{part.strip()}` is outside the {rows}×{cols} grid; using {r}.{c}")
        if (r, c) not in cells:
            cells.append((r, c))
    return cells, problems


def format_patches(cells: Sequence[tuple[int, int]]) -> str:
    """The URL form of patch cells.

    >>> format_patches([(1, 2), (0, 0)])
    '1.2,0.0'
    """
    return ",".join(f"{r}.{c}" for r, c in cells)


def patch_token_indices(trace: Trace, cells: Sequence[tuple[int, int]]) -> np.ndarray:
    """Token indices of patch cells (cells with no patch token are skipped)."""
    idx, rc = trace.patch_positions()
    lookup = {(int(r), int(c)): int(i) for i, (r, c) in zip(idx, rc)}
    return np.array([lookup[cell] for cell in cells if cell in lookup], dtype=np.int64)


def token_label(trace: Trace, index: int) -> str:
    """``"index:token"``: a unique, readable name of a token."""
    return f"{index}:{trace.tokens[index]}"


def upsample_bilinear(grid: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upsampling of a ``[R, C]`` grid to ``[R * factor, C * factor]`` (cell centres aligned).

    NaN cells count as the mean of the others.

    >>> upsample_bilinear(np.array([[0.0, 1.0]]), 2)[0].round(2).tolist()
    [0.0, 0.25, 0.75, 1.0]
    """
    g = np.where(np.isnan(grid), np.nanmean(grid) if np.isfinite(grid).any() else 0.0, grid).astype(np.float64)
    rows, cols = g.shape

    def centres(n: int) -> np.ndarray:
        return np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0, n - 1)

    ys, xs = centres(rows), centres(cols)
    along_x = np.stack([np.interp(xs, np.arange(cols), g[r]) for r in range(rows)])  # [R, C*f]
    return np.stack([np.interp(ys, np.arange(rows), along_x[:, j]) for j in range(cols * factor)], axis=1)


def modality_counts(trace: Trace) -> dict:
    """Token counts for captions: text (with specials), image CLS and patches."""
    return {"text": int((trace.modality == TEXT).sum()), "image": int((trace.modality == IMAGE).sum()),
            "patches": int((trace.patch_rc[:, 0] >= 0).sum())}
