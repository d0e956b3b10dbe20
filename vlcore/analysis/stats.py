"""Per-head attention statistics as tidy DataFrames (``example_id, layer, head, metric, value``), per block.

A model exposes named attention blocks (`vlcore.trace`): ViLT one joint ``self``; BLIP ``vision.self``,
``text.self`` and the cross-attention ``text.cross`` (text queries, image keys); CLIP two towers. Statistics are
computed on one block at a time: its query tokens are the rows, its key tokens the columns, each side's token
sets read from that side's `TokenLayout`, never from positions.

One implementation, written in torch over a batch (`SummaryReducer`, one layer at a time), serves
both paths: a sweep feeds it each layer's attention on the model's device during the forward pass
(only ``[B, L, H, M]`` numbers leave the device; `vlcore.run.sweep.summarize_batch`), and a stored `Trace`
is fed through it on the CPU (`compute_trace_summaries`, the trace's viewed block). Both paths round the
attention to float16 first (a stored trace keeps float16), so they agree to float32 precision. Every formula,
and the rule for rows where a value is undefined, is in ``docs/statistics.md``.

Token sets (per example, on each side of the block; padding is never counted):

- ``txt`` / ``img``: text tokens / image tokens *without* the special ones (text specials such as [CLS] and
  [SEP], image summaries such as the image CLS), unless ``include_special=True`` (then they join their modality).
- ``patch``: image tokens with a grid position (never an image summary).
- ``cls``: the first special text token ([CLS]), wherever it sits; ``sep``: the other special text tokens;
  ``imgcls``: the image summary tokens.

Entropy is normalised per query by the log of the keys *that query can see*: every valid key, or under a causal
mask the keys up to its position (`vlcore.trace.Trace.n_visible`); a query that sees a single key is left out.

A metric that does not apply to a block (a text→image share on a text-only tower, anything cross-modal on CLIP,
the grid metrics on a cross-attention block) is NaN, never 0, and `not_applicable` names the reason.

Custom metrics: `register_metric` adds a function of a `Trace` returning ``[layer, head]``; it is
computed wherever the built-ins are (single traces, sweeps, the statistics page).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from vlcore.analysis.block_sets import KEY_SETS, BlockSets, StreamTokens, build_block_sets, token_masks
from vlcore.trace import AttentionBlock, TokenLayout, Trace

__all__ = ["KEY_SETS", "StreamTokens", "token_masks"]  # re-exported: built in vlcore.analysis.block_sets

BLOCK_METRICS = ("txt2txt", "txt2img", "img2txt", "img2img")

METRICS: dict[str, str] = {
    "txt2txt": "mean attention in the text→text block (text queries, text keys)",
    "txt2img": "mean attention in the text→image block (text queries, image keys)",
    "img2txt": "mean attention in the image→text block (image queries, text keys)",
    "img2img": "mean attention in the image→image block",
    "img2img_nonlocal": "mean image→image attention without self and the 8 grid neighbours (patches only)",
    "cross_modal": "mean over all text→image and image→text cells",
    "intra_modal": "mean over all text→text and image→image cells",
    "cls_to_txt": "modality importance (VALUE): the text [CLS] query's attention mass on text keys",
    "cls_to_img": "modality importance (VALUE): the text [CLS] query's attention mass on image keys",
    "txtq_to_txt": "share of a text query's attention on text keys, mean over text queries",
    "txtq_to_img": "share of a text query's attention on image keys, mean over text queries",
    "imgq_to_txt": "share of an image query's attention on text keys, mean over image queries",
    "imgq_to_img": "share of an image query's attention on image keys, mean over image queries",
    "entropy": "row entropy / log(keys the query sees), mean over queries (1 uniform, 0 one-hot)",
    "max_weight": "largest weight of a row, mean over queries",
    "to_cls": "attention to the text [CLS], mean over queries",
    "to_sep": "attention to the text [SEP], mean over queries",
    "to_imgcls": "attention to the image CLS, mean over queries",
    "spatial_distance": "attention-weighted grid distance (in patches) from a patch query to patch keys",
}
BUILTIN_METRICS = tuple(METRICS)
# Metrics a sweep keeps beside the built-in ones when the model computes them during its own pass: a generative
# model's per-head summaries over its prompt's rows, reduced on the device in row chunks (`vlcore.run.sweep`).
PROMPT_METRICS: dict[str, str] = {
    "prompt_entropy": "prompt rows: row entropy / log(keys the query sees), mean over the prompt's tokens",
    "prompt_image_share": "prompt rows: share of a row's attention on image tokens, mean over the prompt's tokens",
}


@dataclass(frozen=True)
class CustomMetric:
    """A user metric: ``fn(trace) -> [layer, head]`` array."""

    name: str
    fn: Callable[[Trace], np.ndarray]
    description: str


_CUSTOM: dict[str, CustomMetric] = {}


def register_metric(name: str, fn: Callable[[Trace], np.ndarray], description: str = "") -> None:
    """Register a custom per-head metric, computed wherever the built-ins are.

    Args:
        name: metric name (must not clash with a built-in).
        fn: takes a `Trace` (with attentions) and returns a float array ``[n_layers, n_heads]``.
        description: shown in the statistics page's metric picker.

    Example:
        >>> register_metric("diag", lambda t: np.stack([np.diagonal(a, axis1=-2, axis2=-1).mean(-1)
        ...                                             for a in t.attentions.astype(np.float32)]))
        >>> "diag" in metric_names()
        True
        >>> unregister_metric("diag")
    """
    if name in METRICS:
        raise ValueError(f"{name!r} is a built-in metric; choose another name")
    _CUSTOM[name] = CustomMetric(name, fn, description or name)


def unregister_metric(name: str) -> None:
    """Remove a custom metric (no error when absent)."""
    _CUSTOM.pop(name, None)


def metric_names() -> list[str]:
    """Built-in metrics, the prompt-row metrics of a generative model's sweep, then the registered custom ones."""
    return list(METRICS) + list(PROMPT_METRICS) + list(_CUSTOM)


def custom_metric_names() -> list[str]:
    """The registered custom metrics (they need each example's full attentions)."""
    return list(_CUSTOM)


def metric_description(name: str) -> str:
    return METRICS.get(name) or PROMPT_METRICS.get(name) or (_CUSTOM[name].description if name in _CUSTOM else name)


# ---------------------------------------------------------------------------------------
# Batched torch core
# ---------------------------------------------------------------------------------------


def _nan_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / den.where(den > 0, torch.full_like(den, float("nan")))


def compute_block_means(
    attention: torch.Tensor, masks: dict[str, torch.Tensor], row_mass: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Mean attention in each modality block of every head of one layer of a self-attention block.

    Args:
        attention: ``[B, H, N, N]`` attention probabilities (rows are queries).
        masks: from `token_masks`.
        row_mass: ``[B, H, N, >=2]`` each row's mass on the ``txt`` and ``img`` keys (first two columns), when
            the caller has it already; computed here otherwise.

    Returns:
        ``{"txt2txt": [B, H], ...}`` float32 for `BLOCK_METRICS` plus ``cross_modal`` and ``intra_modal``;
        NaN where a block is empty.
    """
    if row_mass is None:
        keys = torch.stack([masks["txt"], masks["img"]], dim=-1).to(attention.dtype)  # [B, N, 2]
        row_mass = torch.matmul(attention, keys[:, None]).float()  # [B, H, N, 2]: each row's mass per key set
    sums = [_row_sums(row_mass[..., :2], masks[src][:, None, :, None], dim=2) for src in ("txt", "img")]
    n = [masks[src].sum(1, keepdim=True).float() for src in ("txt", "img")]
    return _block_means(sums[0][..., 0], sums[0][..., 1], sums[1][..., 0], sums[1][..., 1], n[0], n[1], n[0], n[1])


def _row_sums(per_row: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of ``per_row`` over its query axis ``dim`` for the rows in ``rows`` (bool, broadcast to ``per_row``).

    Rows outside the set are selected out, never multiplied by 0: a NaN there (``0 / 0``) cannot leak in.
    """
    return torch.where(rows, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device)).sum(dim)


def _block_means(tt, ti, it, ii, n_tq, n_iq, n_tk, n_ik) -> dict[str, torch.Tensor]:
    """Block means from the block sums (``tt`` = text queries' mass on text keys, ...) and the set sizes (text and
    image queries, text and image keys; a self-attention block has the same sets on both sides)."""
    return {
        "txt2txt": _nan_div(tt, n_tq * n_tk), "txt2img": _nan_div(ti, n_tq * n_ik),
        "img2txt": _nan_div(it, n_iq * n_tk), "img2img": _nan_div(ii, n_iq * n_ik),
        "cross_modal": _nan_div(ti + it, n_tq * n_ik + n_iq * n_tk),
        "intra_modal": _nan_div(tt + ii, n_tq * n_tk + n_iq * n_ik),
    }


_ENTROPY_TABLES: dict[torch.device, torch.Tensor] = {}


def _row_entropy(att16: torch.Tensor, att: torch.Tensor, lookup: bool) -> torch.Tensor:
    """``-Σ_k p log p`` of every row ``[B, H, N]`` (terms with ``p <= 0`` count 0) of float16-rounded attention.

    With ``lookup`` (on a CPU, where ``log`` over ``[B, H, N, N]`` cost more than the rest of the statistics
    together) the term is looked up: a float16 takes one of 65,536 bit patterns, so a table of ``-p log p``
    per pattern and one ``embedding_bag`` (the lookup and the row sum in one pass) give the same numbers (to
    float32 rounding of the sums). Otherwise (a GPU) it is computed directly.

    Args:
        att16: float16 ``[B, H, N, N]`` attention, contiguous.
        att: the same as float32.
        lookup: use the table.
    """
    if not lookup:
        return torch.special.entr(att.clamp_min(0)).sum(-1)
    table = _ENTROPY_TABLES.get(att.device)
    if table is None:
        p = torch.arange(65536, dtype=torch.int32).to(torch.uint16).view(torch.float16).float()
        table = _ENTROPY_TABLES.setdefault(att.device, torch.where(p > 0, torch.special.entr(p), 0.0)[:, None])
    index = att16.view(torch.uint16).to(torch.int32).reshape(-1, att16.shape[-1])
    return torch.nn.functional.embedding_bag(index, table, mode="sum").view(att16.shape[:-1])


def _row_max(att16: torch.Tensor, att: torch.Tensor, bits: bool) -> torch.Tensor:
    """The largest weight of every row ``[B, H, N]``; with ``bits`` (on a CPU) read from the float16 bits (half
    the bytes): for values >= 0 the order of float16 bit patterns read as int16 is the order of the values."""
    if not bits:
        return att.amax(-1)
    return att16.view(torch.int16).amax(-1).view(torch.float16).float()


CPU_CHUNK_BYTES = 12 * 2**20  # on a CPU a layer's attention is reduced about this many bytes (whole examples) at a time


@dataclass
class _Rows:
    """The per-row numbers every metric of one layer is built from (see `_row_values`)."""

    mass: torch.Tensor  # [B, 8, H, N] each row's mass on each of KEY_SETS
    entropy: torch.Tensor  # [B, H, N] -Σ p log p
    top: torch.Tensor  # [B, H, N] the largest weight
    patch_rows: torch.Tensor | None  # [B, 2, H, P] per patch row: grid-distance-weighted mass on patches, and the
    #                                  mass on patches more than one grid cell away


def _row_values(att: torch.Tensor, sets: BlockSets, chunk_bytes: int | None) -> _Rows:
    """The per-row numbers of one layer's attention ``[B, H, N, N]``, in a few passes over it: its float16
    rounding and float32 copy, one matmul for every row's mass on every key set, the entropy, the row
    maximum, and two weighted row sums over the patch block.

    With ``chunk_bytes`` (on a CPU) the batch goes a few examples at a time, so that after the first read of
    the attention its copies and lookups stay in the cache. Not one example at a time: every operation is a
    parallel region whose threads wait for each other at its end (for milliseconds when other processes
    share the cores), so a few large chunks beat many small ones. On ViLT-B/32 (234 tokens, batch 8,
    2 threads) chunks of 2-4 examples ran the sweep at 0.93-0.95x the plain forward pass, one example at
    a time 0.90x, whole layers 0.82x.
    """
    step = len(att)
    if chunk_bytes and att.device.type == "cpu":
        step = max(1, chunk_bytes // (att[0].numel() * 4))
    if step >= len(att):
        return _row_values_chunk(att, sets, slice(None))
    parts = [_row_values_chunk(att[i : i + step], sets, slice(i, i + step)) for i in range(0, len(att), step)]
    cat = {name: torch.cat([getattr(p, name) for p in parts]) if getattr(parts[0], name) is not None else None
           for name in ("mass", "entropy", "top", "patch_rows")}
    return _Rows(**cat)


def _row_values_chunk(att: torch.Tensor, sets: BlockSets, rows: slice) -> _Rows:
    """`_row_values` of the examples ``rows`` of the batch (``att`` holds just those)."""
    # the precision a stored trace keeps (both paths agree exactly), in a contiguous copy
    att16 = att.to(torch.float16, memory_format=torch.contiguous_format)
    att = att16.float()
    b, h, n_q, n_k = att.shape
    # every row's mass on every key set in one matmul, laid out [b, 8, H, Q] (4x faster on a CPU than [.., Q, 8])
    mass = torch.bmm(sets.keys[rows], att.view(b, h * n_q, n_k).transpose(1, 2)).view(b, len(KEY_SETS), h, n_q)
    cpu = att.device.type == "cpu"
    entropy, top = _row_entropy(att16, att, lookup=cpu), _row_max(att16, att, bits=cpu)
    if sets.span is None:
        return _Rows(mass, entropy, top, None)
    block = att[:, None, :, sets.span[0] : sets.span[1], sets.span[0] : sets.span[1]]
    return _Rows(mass, entropy, top, (block * sets.grid[rows]).sum(-1))  # every weighting in one multiply


def _layer_values(att: torch.Tensor, sets: BlockSets, chunk_bytes: int | None = None) -> torch.Tensor:
    """Every built-in metric for one layer's attention ``[B, H, Q, K]``: float32 ``[B, H, M]`` (`BUILTIN_METRICS`),
    NaN where a metric does not apply to the block (`not_applicable`)."""
    rows = _row_values(att, sets, chunk_bytes)
    entropy_rows = rows.entropy * sets.inv_log  # normalised by the keys each query sees
    per_row = torch.cat([rows.mass, entropy_rows[:, None], rows.top[:, None]], 1)  # [B, 10, H, Q]
    # sums over the text and the image queries, rows outside each set selected out: [B, 2 (query set), 10, H]
    zero = torch.zeros((), device=att.device)
    sums = torch.where(sets.queries, per_row[:, None], zero).sum(-1)
    mass, entropy, top = sums[:, :, :8], sums[:, :, 8], sums[:, :, 9]
    c = sets.counts
    out = _block_means(mass[:, 0, 0], mass[:, 0, 1], mass[:, 1, 0], mass[:, 1, 1], c["tq"], c["iq"], c["tk"], c["ik"])
    cls_rows = torch.where(sets.cls_q, rows.mass[:, 6:8], zero).sum(-1)  # the text [CLS] query's row: [B, 2, H]
    out["cls_to_txt"], out["cls_to_img"] = cls_rows[:, 0], cls_rows[:, 1]
    for qi, (name, count) in enumerate((("txtq", c["tq"]), ("imgq", c["iq"]))):
        out[f"{name}_to_txt"], out[f"{name}_to_img"] = _nan_div(mass[:, qi, 0], count), _nan_div(mass[:, qi, 1], count)
    for ki, name in ((2, "to_cls"), (3, "to_sep"), (4, "to_imgcls")):
        out[name] = _nan_div(mass[:, :, ki].sum(1), c["q"])
    out["entropy"] = _nan_div(entropy.sum(1), c["entropy_q"])
    out["max_weight"] = _nan_div(top.sum(1), c["q"])
    out["img2img_nonlocal"], out["spatial_distance"] = _spatial(rows, sets)
    values = torch.stack([out[name] for name in BUILTIN_METRICS], dim=-1)
    return torch.where(sets.applies[:, None], values, torch.full((), float("nan"), device=att.device))


def _spatial(rows: _Rows, sets: BlockSets) -> tuple[torch.Tensor, torch.Tensor]:
    """``img2img_nonlocal`` and ``spatial_distance`` ``[B, H]`` from the patch rows (NaN without patches)."""
    if sets.span is None or rows.patch_rows is None:
        nan = torch.full(rows.top.shape[:2], float("nan"), device=rows.top.device)
        return nan, nan.clone()
    zero = torch.zeros((), device=rows.top.device)
    nonlocal_ = _nan_div(torch.where(sets.patch_q, rows.patch_rows[:, 1], zero).sum(-1), sets.far_cells)
    if rows.patch_rows.shape[1] > 2:  # several images: each patch row's mass on patches of its own image
        mass = rows.patch_rows[:, 2]
    else:
        mass = rows.mass[:, 5, :, sets.span[0] : sets.span[1]]  # each patch row's mass on patches
    defined = sets.patch_q & (mass > 0)  # a patch query with no mass on patches has no distance: left out
    distance = torch.where(defined, rows.patch_rows[:, 0] / torch.where(defined, mass, 1.0), zero)
    return nonlocal_, _nan_div(distance.sum(-1), defined.sum(-1).float())


class SummaryReducer:
    """Reduces a batch's attention in one block one layer at a time to every built-in per-head metric
    (`BUILTIN_METRICS`).

    The token sets, counts, entropy normalisers, grid weights and the metrics' applicability are built once;
    `add` takes the layers in order, e.g. from `ModelAdapter.stream_attentions` during the model's pass, so that
    no layer's attention has to outlive its reduction.

    Args:
        modality, special, valid: ``[B, Q]`` tensors of the block's queries, on the attention's device (see
            `token_masks`).
        patch_rc: ``[B, Q, 2]`` grid positions (row -1 for non-patches); the spatial metrics are NaN without it.
        include_special: count special tokens in the text and image sets.
        chunk_bytes: on a CPU, reduce about this many bytes of examples at a time (see `_row_values`); None
            reduces each layer whole.
        keys: the keys' tokens of a cross-attention block; None: a self-attention block (keys = queries).
        image_of: ``[B, Q]`` image of each query token (-1 none); needed only when a sequence holds several
            images (distances count within one image).
        causal: each query sees only the keys up to its position (entropy is normalised by those).
        n_visible: ``[B, Q]`` the keys each query sees, when known (a stored trace's `AttentionBlock.n_visible`);
            None derives it from ``causal`` and the keys' padding.
    """

    def __init__(self, modality, special, valid, patch_rc=None, include_special: bool = False,
                 chunk_bytes: int | None = CPU_CHUNK_BYTES, *, keys: StreamTokens | None = None, image_of=None,
                 causal: bool = False, n_visible: torch.Tensor | None = None):
        queries = StreamTokens(modality, special, valid, patch_rc, image_of)
        self.sets = build_block_sets(queries, keys, include_special, causal, n_visible, BUILTIN_METRICS)
        self.chunk_bytes = chunk_bytes
        self.layers: list[torch.Tensor] = []

    @classmethod
    def from_layouts(cls, queries: Sequence[TokenLayout], keys: Sequence[TokenLayout] | None = None, *,
                     causal: bool = False, n_visible: torch.Tensor | None = None, include_special: bool = False,
                     device: str | torch.device = "cpu", chunk_bytes: int | None = CPU_CHUNK_BYTES) -> SummaryReducer:
        """A reducer for one block of a batch from its layouts (one per example, padded to one length).

        Args:
            queries: the query stream's layouts.
            keys: the key stream's layouts for a cross-attention block; None for a self-attention block.
            causal, n_visible, include_special, chunk_bytes: as in the class.
            device: the attention's device.
        """
        q = StreamTokens.from_layouts(queries, device)
        k = StreamTokens.from_layouts(keys, device) if keys is not None else None
        if n_visible is not None:
            n_visible = torch.as_tensor(n_visible, device=device)
        return cls(q.modality, q.special, q.valid, q.patch_rc, include_special, chunk_bytes, keys=k,
                   image_of=q.image_of, causal=causal, n_visible=n_visible)

    def add(self, attention: torch.Tensor) -> None:
        """Reduce the next layer's attention ``[B, H, Q, K]`` (any float dtype)."""
        with torch.inference_mode():
            self.layers.append(_layer_values(attention.detach(), self.sets, self.chunk_bytes))

    def values(self) -> torch.Tensor:
        """float32 ``[B, L, H, M]`` (`BUILTIN_METRICS` order) of the layers added so far, on their device."""
        with torch.inference_mode():
            return torch.stack(self.layers, dim=1)

    def reasons(self, row: int = 0) -> dict[str, str]:
        """The built-in metrics that do not apply to example ``row``, each with why (the first rule it fails)."""
        out: dict[str, str] = {}
        for metrics, holds, reason in self.sets.rules:
            if not bool(holds[row]):
                for name in metrics:
                    out.setdefault(name, reason)
        return {name: out[name] for name in BUILTIN_METRICS if name in out}


def compute_layer_summaries(
    attentions: tuple[torch.Tensor, ...] | list[torch.Tensor], modality, special, valid, patch_rc=None,
    include_special: bool = False,
) -> tuple[list[str], torch.Tensor]:
    """Every built-in per-head metric for a batch of a self-attention block, on the attentions' device (a
    `SummaryReducer` over the layers).

    Args:
        attentions: one ``[B, H, N, N]`` tensor per layer.
        modality, special, valid: ``[B, N]`` tensors (see `token_masks`).
        patch_rc: ``[B, N, 2]`` grid positions (row -1 for non-patches); the spatial metrics are NaN without it.
        include_special: count special tokens in the text and image sets.

    Returns:
        ``(metric_names, values)`` with values float32 ``[B, L, H, M]``, still on the device.
    """
    reducer = SummaryReducer(modality, special, valid, patch_rc, include_special)
    for att in attentions:
        reducer.add(att)
    return list(BUILTIN_METRICS), reducer.values()


def not_applicable(source: Trace | Any, layouts: Mapping[str, TokenLayout] | None = None,
                   include_special: bool = False) -> dict[str, str]:
    """The built-in metrics that do not apply to a block, each with the reason (they come out NaN, never 0).

    E.g. ``txt2img`` on a vision-only or text-only self-attention block ("no text queries in this block"), every
    share of CLIP's towers, the spatial metrics on a cross-attention block. A UI shows ``n/a: <reason>``.

    Args:
        source: a `Trace` (its viewed block; `Trace.select` picks another), or a block spec (anything with
            ``query``, ``key`` and ``causal``, e.g. `vlcore.models.base.BlockSpec`) with ``layouts``.
        layouts: for a spec, one example's layout of each stream, by name (e.g. a trace's ``streams``).
        include_special: as in `compute_trace_summaries`.

    Returns:
        ``{metric: reason}`` for the metrics that do not apply, in `BUILTIN_METRICS` order.

    Raises:
        ValueError: a spec without the layouts of its streams.
    """
    if isinstance(source, Trace):
        block = source.block
        return SummaryReducer.from_layouts([source.layout], None if block.is_self else [source.key_layout],
                                           n_visible=torch.from_numpy(source.n_visible())[None],
                                           include_special=include_special).reasons(0)
    missing = [s for s in (source.query, source.key) if layouts is None or s not in layouts]
    if missing:
        raise ValueError(f"a block spec needs the layouts of its streams; missing {missing}")
    is_self = source.query == source.key
    return SummaryReducer.from_layouts([layouts[source.query]], None if is_self else [layouts[source.key]],
                                       causal=bool(source.causal), include_special=include_special).reasons(0)


def summaries_to_frame(example_ids: list[str], names: list[str], values: np.ndarray) -> pd.DataFrame:
    """Tidy frame from ``[B, L, H, M]`` values: one row per example, layer, head and metric."""
    b, n_layers, n_heads, m = values.shape
    idx = np.indices((b, n_layers, n_heads, m)).reshape(4, -1)
    return pd.DataFrame(
        {
            "example_id": pd.Categorical(np.asarray(example_ids, dtype=object)[idx[0]]),
            "layer": idx[1].astype(np.int16),
            "head": idx[2].astype(np.int16),
            "metric": pd.Categorical(np.asarray(names, dtype=object)[idx[3]], categories=names),
            "value": values.reshape(-1).astype(np.float32),
        }
    )


def compute_custom_metrics(traces: list[Trace]) -> tuple[list[str], np.ndarray] | None:
    """The registered custom metrics of each trace: ``(names, [B, L, H, C])``, or None when none is registered."""
    if not _CUSTOM:
        return None
    names = list(_CUSTOM)
    values = np.stack([
        np.stack([np.asarray(_CUSTOM[n].fn(t), dtype=np.float32) for n in names], -1) for t in traces
    ])
    return names, values


def compute_trace_summaries(trace: Trace, include_special: bool = False) -> pd.DataFrame:
    """The same per-head summaries as a sweep (plus custom metrics), from one stored trace's viewed block (tidy
    frame; `Trace.select` picks another block). Metrics that do not apply to the block are NaN
    (`not_applicable` says why).

    Raises:
        ValueError: the trace holds no attentions for the block.
    """
    if trace.attentions is None:
        raise ValueError(f"this trace has no attentions for block {trace.view!r}")
    block = trace.block
    reducer = SummaryReducer.from_layouts([trace.layout], None if block.is_self else [trace.key_layout],
                                          n_visible=torch.from_numpy(trace.n_visible())[None],
                                          include_special=include_special)
    att = torch.from_numpy(np.asarray(trace.attentions, dtype=np.float32))
    for layer in range(att.shape[0]):
        reducer.add(att[layer][None])
    names, values = list(BUILTIN_METRICS), reducer.values().numpy()
    custom = compute_custom_metrics([trace])
    if custom is not None:
        names, values = names + custom[0], np.concatenate([values, custom[1]], -1)
    return summaries_to_frame([trace.example_id], names, values)


def compute_custom_batch(attentions, batch, example_ids: list[str], model_id: str = "", spec: Any = None,
                         block: str = "self") -> tuple[list[str], np.ndarray] | None:
    """Custom metrics for a sweep batch: ``(names, [B, L, H, C])``, or None when none is registered.

    Custom metrics are functions of a `Trace`, so this copies each example's attentions to the host
    (padding removed) and builds a light trace per example: registering a custom metric makes sweeps
    slower by about the cost of a full-trace copy. The built-ins never pay this.

    Args:
        attentions: one ``[B, H, Q, K]`` tensor per layer (any device).
        batch: the `EncodedBatch` whose layouts the attentions follow.
        example_ids: ids, one per batch row.
        model_id: recorded in the light traces.
        spec: the block's spec (``query``, ``key``, ``causal``); None: a self-attention block on ``batch.main``.
        block: the block's name in the light traces.
    """
    if not _CUSTOM:
        return None
    query = spec.query if spec is not None else batch.main
    key = spec.key if spec is not None else query
    causal = bool(spec.causal) if spec is not None else False
    att = torch.stack([a.detach().half() for a in attentions], 1).cpu().numpy()  # [B, L, H, Q, K]
    traces = []
    for b, eid in enumerate(example_ids):
        q_lay, k_lay = batch.streams[query][b], batch.streams[key][b]
        rows, cols = np.flatnonzero(q_lay.valid), np.flatnonzero(k_lay.valid)
        arr = att[b][:, :, rows][:, :, :, cols]
        visible = np.minimum(np.arange(len(rows)) + 1 + len(cols) - len(rows), len(cols)).astype(np.int32) \
            if causal else None
        streams = {query: q_lay.trimmed(), key: k_lay.trimmed()}
        traces.append(Trace(eid, model_id, streams, {block: AttentionBlock(arr, query, key, visible)},
                            {name: None for name in streams}, block))
    return compute_custom_metrics(traces)
