"""How much of a language model's attention goes to image tokens, per head and layer, and where it stops.

FastV (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2") found that in LLaVA-style models the
attention the decoder pays to image tokens collapses after the first two layers. This module measures that on one
trace, from a block of attention rows ``[layer, head, query, key]`` (a generative model's ``lm.generated`` block)
or from the per-head summaries the adapter reduced over the prompt's rows (``trace.meta["prompt_head_summaries"]``):

- `compute_key_share`: per head, the share of each row's attention that goes to a key set (the image tokens),
  mean over rows;
- `compute_normalised_entropy`: per head, each row's entropy divided by the log of the number of keys that row
  can see (1: uniform over what it sees, 0: one key), mean over rows that see more than one key;
- `compute_image_sink`: the first layer from which the (per-layer mean) image share stays below ``threshold``
  times its level in the first layers (the reference), for good; `compute_head_sinks` does it per head.

`compute_row_summaries` applies the first two to a trace's block of rows; `prompt_summaries` reads the prompt
rows' table from the trace's meta. All functions are pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlcore.errors import InputError, NoAttentionError
from vlcore.trace import ROLE_IMAGE_SUMMARY, ROLE_PATCH, Trace

REFERENCE_LAYERS = 2  # the share's "early" level is its mean over layers 0 .. REFERENCE_LAYERS - 1 (FastV: 0 and 1)
DEFAULT_THRESHOLD = 0.1  # the share has collapsed once below this fraction of the early level


def compute_key_share(attentions: np.ndarray, key_mask: np.ndarray) -> np.ndarray:
    """The share of attention each head gives a key set, mean over the rows.

    Args:
        attentions: ``[L, H, Q, K]`` attention rows (each sums to 1 over the keys it sees).
        key_mask: bool ``[K]``: the keys of the set (the image tokens).

    Returns:
        float64 ``[L, H]``; NaN when there are no rows.

    >>> att = np.array([[[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]]])  # one layer, one head, two rows
    >>> compute_key_share(att, np.array([True, False, False])).round(3).tolist()
    [[0.35]]
    """
    att = np.asarray(attentions, dtype=np.float64)
    mask = np.asarray(key_mask, dtype=bool)
    if att.ndim != 4 or mask.shape != (att.shape[-1],):
        raise InputError(f"expected attention rows [L, H, Q, K] and a key mask [K]; got {att.shape} and {mask.shape}")
    if att.shape[2] == 0:
        return np.full(att.shape[:2], np.nan)
    return att[..., mask].sum(-1).mean(-1)


def compute_normalised_entropy(attentions: np.ndarray, n_visible: np.ndarray | None = None) -> np.ndarray:
    """Each row's entropy divided by the log of the keys it can see, mean over rows, per head.

    Args:
        attentions: ``[L, H, Q, K]`` attention rows.
        n_visible: int ``[Q]``: keys each row can see (a causal row sees the keys up to its position); None: all
            ``K``. Rows that see one key (entropy 0 of 0) are left out.

    Returns:
        float64 ``[L, H]``, in [0, 1]; NaN when no row sees more than one key.

    >>> uniform = np.full((1, 1, 1, 4), 0.25)
    >>> compute_normalised_entropy(uniform).tolist()
    [[1.0]]
    >>> compute_normalised_entropy(np.array([[[[0.5, 0.5, 0.0, 0.0]]]]), np.array([2])).tolist()
    [[1.0]]
    """
    att = np.asarray(attentions, dtype=np.float64)
    if att.ndim != 4:
        raise InputError(f"expected attention rows [L, H, Q, K]; got shape {att.shape}")
    seen = np.full(att.shape[2], att.shape[3]) if n_visible is None else np.asarray(n_visible, dtype=np.int64)
    if seen.shape != (att.shape[2],):
        raise InputError(f"expected one visible-key count per row ({att.shape[2]}); got shape {seen.shape}")
    rows = seen > 1
    if not rows.any():
        return np.full(att.shape[:2], np.nan)
    p = att[:, :, rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = -plogp.sum(-1) / np.log(seen[rows])
    return entropy.mean(-1)


@dataclass(frozen=True)
class ImageSink:
    """Where attention to image tokens collapses.

    Attributes:
        layer: the first layer from which the share stays below ``cutoff`` through the last layer; None when it
            does not (the share recovers in a later layer, or never drops).
        reference: the share's mean over the reference (first) layers.
        cutoff: ``threshold * reference``.
        threshold: the fraction of the reference level asked for.
    """

    layer: int | None
    reference: float
    cutoff: float
    threshold: float


def _check_threshold(threshold: float) -> float:
    value = float(threshold)
    if not 0.0 < value <= 1.0:
        raise InputError(f"the sink threshold is a fraction of the early layers' image share, in (0, 1]; got "
                         f"{threshold!r}. Pick a value such as 0.1.")
    return value


def compute_image_sink(share: Sequence[float] | np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                       layers: Sequence[int] | None = None, reference_layers: int = REFERENCE_LAYERS) -> ImageSink:
    """The first layer after which the image share stays below ``threshold`` times its early level.

    Args:
        share: ``[n]`` the image share of each layer in ``layers`` (e.g. the mean over a layer's heads).
        threshold: in (0, 1]: the fraction of the early level under which image tokens "stop mattering".
        layers: the layer numbers of ``share`` (ascending); default ``0 .. n - 1``. NaN entries are skipped.
        reference_layers: the early level is the mean share over layers ``0 .. reference_layers - 1`` (those
            present; the first present layer when none of them is).

    Returns:
        `ImageSink`; ``layer`` None when the share is not below the cutoff in the last layer or after some
        layer for good (a zero early level gives cutoff 0, which nothing is below).

    Raises:
        InputError: a threshold outside (0, 1], or shares and layers of different lengths.

    >>> compute_image_sink([0.6, 0.4, 0.03, 0.2, 0.01, 0.02]).layer  # 0.1 x 0.5: below 0.05 from layer 4 on
    4
    >>> compute_image_sink([0.6, 0.4, 0.3, 0.2]).layer is None
    True
    """
    threshold = _check_threshold(threshold)
    values = np.asarray(share, dtype=np.float64).reshape(-1)
    ids = np.arange(len(values)) if layers is None else np.asarray(layers, dtype=np.int64).reshape(-1)
    if ids.shape != values.shape:
        raise InputError(f"expected one layer number per share; got {len(ids)} layers for {len(values)} shares")
    keep = np.isfinite(values)
    values, ids = values[keep], ids[keep]
    if not len(values):
        return ImageSink(None, float("nan"), float("nan"), threshold)
    early = ids < reference_layers
    reference = float(values[early].mean() if early.any() else values[0])
    cutoff = threshold * reference
    below = values < cutoff
    if not below[-1]:
        return ImageSink(None, reference, cutoff, threshold)
    above = np.flatnonzero(~below)  # the last layer still at or above the cutoff; the sink is the next one
    first = 0 if not len(above) else int(above[-1]) + 1
    return ImageSink(int(ids[first]), reference, cutoff, threshold)


def compute_head_sinks(share: np.ndarray, threshold: float = DEFAULT_THRESHOLD, layers: Sequence[int] | None = None,
                       reference_layers: int = REFERENCE_LAYERS) -> list[ImageSink]:
    """`compute_image_sink` for each head of a ``[L, H]`` share table (column ``h``: head ``h``)."""
    table = np.asarray(share, dtype=np.float64)
    if table.ndim != 2:
        raise InputError(f"expected an image-share table [layer, head]; got shape {table.shape}")
    return [compute_image_sink(table[:, h], threshold, layers, reference_layers) for h in range(table.shape[1])]


def compute_layer_share(share: np.ndarray) -> np.ndarray:
    """The mean over heads of a ``[L, H]`` share table: ``[L]`` (NaN for a layer with no value).

    >>> compute_layer_share(np.array([[0.2, 0.4], [0.1, np.nan]])).tolist()
    [0.30000000000000004, 0.1]
    """
    table = np.asarray(share, dtype=np.float64)
    out = np.full(table.shape[0], np.nan)
    has = np.isfinite(table).any(1)
    out[has] = np.nanmean(table[has], axis=1)
    return out


@dataclass(frozen=True)
class HeadSummaryTable:
    """Per-head image share and normalised entropy over one set of query rows.

    Attributes:
        layers: the layer numbers of the tables' rows.
        image_share: float64 ``[len(layers), H]``: the share of attention on image tokens, mean over the rows.
        entropy: float64 ``[len(layers), H]``: row entropy / log(keys the row sees), mean over the rows.
        rows: how many query rows were summarised.
    """

    layers: tuple[int, ...]
    image_share: np.ndarray
    entropy: np.ndarray
    rows: int


def compute_row_summaries(trace: Trace, block: str = "lm.generated") -> HeadSummaryTable:
    """Image share and normalised entropy of every head over the rows of one block of a trace (a generative
    model's ``lm.generated``: each generated token's row over every earlier token).

    Image tokens are the key stream's patches and image summaries (`vlcore.trace.ROLE_PATCH`,
    `ROLE_IMAGE_SUMMARY`); each row's visible keys are the block's ``n_visible``.

    Raises:
        NoAttentionError: the trace has no such block, or it kept no attention (a sweep's summaries only).
    """
    if block not in trace.blocks or trace.blocks[block].attentions is None:
        raise NoAttentionError(f"this trace has no attention rows for block {block!r} (it has "
                               f"{', '.join(trace.blocks) or 'none'}); run the example on a generative model.")
    view = trace.select(block)
    keys = np.isin(view.key_layout.role, (ROLE_PATCH, ROLE_IMAGE_SUMMARY))
    att = view.attentions
    return HeadSummaryTable(tuple(range(att.shape[0])), compute_key_share(att, keys),
                            compute_normalised_entropy(att, view.n_visible()), int(att.shape[2]))


def prompt_summaries(meta: dict) -> HeadSummaryTable | None:
    """The per-head summaries a generative adapter reduced over the prompt's rows (``meta["prompt_head_summaries"]``:
    ``layers``, ``image_share`` and ``entropy`` ``[len(layers)][H]``, ``rows``), or None when the trace has none."""
    summary = meta.get("prompt_head_summaries") if isinstance(meta, dict) else None
    if not summary:
        return None
    share = np.asarray(summary["image_share"], dtype=np.float64)
    entropy = np.asarray(summary["entropy"], dtype=np.float64)
    layers = tuple(int(layer) for layer in summary.get("layers", range(len(share))))
    return HeadSummaryTable(layers, share.reshape(len(layers), -1), entropy.reshape(len(layers), -1),
                            int(summary.get("rows", 0)))
