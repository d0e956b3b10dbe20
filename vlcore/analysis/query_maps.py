"""Attention maps of a query over a trace, and the patch selections that name queries (pure numpy).

Token order is the trace's: ``[text (CLS first, SEP last) | image CLS | patches row-major]``.
A *query* is one token or several (patches selected together); its map is the mean of their rows
(attention **from** the query) or of their columns (attention **to** the query). The chart builders
in `vlcore.charts.heatmaps` and `vlcore.charts.multiples` draw these maps, on a colour scale chosen here
(`SCALES`: per map, shared by the maps shown, or absolute 0–1), with the image's share of each map
(`compute_image_share`, `image_share_caption`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from vlcore.trace import IMAGE, TEXT, Trace

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
