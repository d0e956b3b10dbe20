"""Per-head attention statistics as tidy DataFrames (``example_id, layer, head, metric, value``).

One implementation, written in torch over a batch (`SummaryReducer`, one layer at a time), serves
both paths: a sweep feeds it each layer's attention on the model's device during the forward pass
(only ``[B, L, H, M]`` numbers leave the device; `vlcore.run.sweep.summarize_batch`), and a stored `Trace`
is fed through it on the CPU (`compute_trace_summaries`). Both paths round the attention to float16
first (a stored trace keeps float16), so they agree to float32 precision. Rows of an attention matrix
are queries, columns keys. Every formula, and the rule for rows where a value is undefined, is in
``docs/statistics.md``.

Token sets (per example; padding is never counted):

- ``txt`` / ``img``: text tokens / image tokens *without* [CLS], [SEP] and the image CLS, unless
  ``include_special=True`` (then the specials join their modality).
- ``patch``: image tokens with a grid position (never the image CLS).
- ``cls``, ``sep``, ``imgcls``: the text [CLS] (first text token), the text [SEP]s, the image CLS.

Custom metrics: `register_metric` adds a function of a `Trace` returning ``[layer, head]``; it is
computed wherever the built-ins are (single traces, sweeps, the statistics page).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from vlcore.trace import IMAGE, TEXT, Trace

BLOCK_METRICS = ("txt2txt", "txt2img", "img2txt", "img2img")
SUMMARY_COLUMNS = ["example_id", "layer", "head", "metric", "value"]

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
    "entropy": "row entropy / log(number of keys), mean over queries (1 uniform, 0 one-hot)",
    "max_weight": "largest weight of a row, mean over queries",
    "to_cls": "attention to the text [CLS], mean over queries",
    "to_sep": "attention to the text [SEP], mean over queries",
    "to_imgcls": "attention to the image CLS, mean over queries",
    "spatial_distance": "attention-weighted grid distance (in patches) from a patch query to patch keys",
}
BUILTIN_METRICS = tuple(METRICS)


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
    """Built-in metrics followed by the registered custom ones."""
    return list(METRICS) + list(_CUSTOM)


def custom_metric_names() -> list[str]:
    """The registered custom metrics (they need each example's full attentions)."""
    return list(_CUSTOM)


def metric_description(name: str) -> str:
    return METRICS.get(name) or (_CUSTOM[name].description if name in _CUSTOM else name)


# ---------------------------------------------------------------------------------------
# Batched torch core
# ---------------------------------------------------------------------------------------


def token_masks(
    modality: torch.Tensor, special: torch.Tensor, valid: torch.Tensor, patch_rc: torch.Tensor | None = None,
    include_special: bool = False,
) -> dict[str, torch.Tensor]:
    """Boolean ``[B, N]`` token sets (see the module docstring).

    Args:
        modality: int ``[B, N]``; 0 text, 1 image.
        special: bool ``[B, N]``.
        valid: bool ``[B, N]``; False for padding.
        patch_rc: int ``[B, N, 2]``; row -1 for non-patches. Without it, every non-special image token
            counts as a patch.
        include_special: put [CLS]/[SEP]/image CLS into the text and image sets.
    """
    keep = valid if include_special else valid & ~special
    text, image = modality == TEXT, modality == IMAGE
    first_text = torch.zeros_like(special)
    first_text[:, 0] = True  # ViLT puts [CLS] first
    patch = valid & (patch_rc[..., 0] >= 0) if patch_rc is not None else valid & image & ~special
    return {
        "txt": keep & text,
        "img": keep & image,
        "patch": patch,
        "cls": valid & special & text & first_text,
        "sep": valid & special & text & ~first_text,
        "imgcls": valid & special & image,
        "txt_all": valid & text,
        "img_all": valid & image,
        "valid": valid,
    }


def _nan_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / den.where(den > 0, torch.full_like(den, float("nan")))


def compute_block_means(
    attention: torch.Tensor, masks: dict[str, torch.Tensor], row_mass: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Mean attention in each modality block of every head of one layer.

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
    return _block_means(sums[0][..., 0], sums[0][..., 1], sums[1][..., 0], sums[1][..., 1], n[0], n[1])


def _row_sums(per_row: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of ``per_row`` over its query axis ``dim`` for the rows in ``rows`` (bool, broadcast to ``per_row``).

    Rows outside the set are selected out, never multiplied by 0: a NaN there (``0 / 0``) cannot leak in.
    """
    return torch.where(rows, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device)).sum(dim)


def _block_means(tt, ti, it, ii, n_txt, n_img) -> dict[str, torch.Tensor]:
    """Block means from the block sums (``tt`` = text queries' mass on text keys, ...) and the set sizes."""
    return {
        "txt2txt": _nan_div(tt, n_txt * n_txt), "txt2img": _nan_div(ti, n_txt * n_img),
        "img2txt": _nan_div(it, n_img * n_txt), "img2img": _nan_div(ii, n_img * n_img),
        "cross_modal": _nan_div(ti + it, 2 * n_txt * n_img), "intra_modal": _nan_div(tt + ii, n_txt * n_txt + n_img * n_img),
    }


KEY_SETS = ("txt", "img", "cls", "sep", "imgcls", "patch", "txt_all", "img_all")  # a row's mass on each: one matmul


@dataclass(frozen=True)
class _BatchSets:
    """What every layer of a batch shares, computed once per batch (`_batch_sets`)."""

    keys: torch.Tensor  # [B, 8, N] float32 0/1: the key sets of KEY_SETS
    queries: torch.Tensor  # [B, 2, 1, 1, N] bool: the text and the image queries
    n_txt: torch.Tensor  # [B, 1] float32
    n_img: torch.Tensor  # [B, 1] float32
    log_n_keys: torch.Tensor  # [B, 1] float32: log of the number of valid keys (entropy normaliser)
    span: tuple[int, int] | None  # the columns holding every patch of the batch; None without patches
    patch_q: torch.Tensor | None  # [B, 1, P] bool: the spatial metrics' queries (patch ∩ img) inside span
    grid: torch.Tensor | None  # [B, 2, 1, P, P] float32: grid distance between patches (0 for non-patches) and
    #                            1 where query and key are more than one grid cell apart
    far_cells: torch.Tensor | None  # [B, 1] float32: number of far (query, key) pairs


def _batch_sets(masks: dict[str, torch.Tensor], patch_rc: torch.Tensor | None) -> _BatchSets:
    """Token sets, counts and the patch block's grid weights of a batch (see `_BatchSets`)."""
    keys = torch.stack([masks[k] for k in KEY_SETS], 1).float()
    n_keys = masks["valid"].sum(1, keepdim=True).float()
    counts = [masks[k].sum(1, keepdim=True).float() for k in ("txt", "img")]
    span = patch_q = grid = far_cells = None
    cols = torch.nonzero(masks["patch"].any(0)).flatten().tolist() if patch_rc is not None else []
    if cols:
        lo, hi = cols[0], cols[-1] + 1
        patch, pq = masks["patch"][:, lo:hi], (masks["patch"] & masks["img"])[:, lo:hi]
        rc = patch_rc[:, lo:hi].float()
        diff = rc[:, :, None, :] - rc[:, None, :, :]
        distance = diff.pow(2).sum(-1).sqrt() * (patch[:, :, None] & patch[:, None, :])
        far = (diff.abs().amax(-1) > 1) & pq[:, :, None] & pq[:, None, :]  # not self, not the 8 neighbours
        span, patch_q, far_cells = (lo, hi), pq[:, None], far.sum((1, 2)).float()[:, None]
        grid = torch.stack([distance, far.float()], 1)[:, :, None]
    queries = torch.stack([masks["txt"], masks["img"]], 1)[:, :, None, None]
    return _BatchSets(keys, queries, counts[0], counts[1], n_keys.log(), span, patch_q, grid, far_cells)


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


def _row_values(att: torch.Tensor, sets: _BatchSets, chunk_bytes: int | None) -> _Rows:
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


def _row_values_chunk(att: torch.Tensor, sets: _BatchSets, rows: slice) -> _Rows:
    """`_row_values` of the examples ``rows`` of the batch (``att`` holds just those)."""
    # the precision a stored trace keeps (both paths agree exactly), in a contiguous copy
    att16 = att.to(torch.float16, memory_format=torch.contiguous_format)
    att = att16.float()
    b, h, n, _ = att.shape
    # every row's mass on every key set in one matmul, laid out [b, 8, H, N] (4x faster on a CPU than [.., N, 8])
    mass = torch.bmm(sets.keys[rows], att.view(b, h * n, n).transpose(1, 2)).view(b, len(KEY_SETS), h, n)
    cpu = att.device.type == "cpu"
    entropy, top = _row_entropy(att16, att, lookup=cpu), _row_max(att16, att, bits=cpu)
    if sets.span is None:
        return _Rows(mass, entropy, top, None)
    block = att[:, None, :, sets.span[0] : sets.span[1], sets.span[0] : sets.span[1]]
    return _Rows(mass, entropy, top, (block * sets.grid[rows]).sum(-1))  # both weightings in one multiply


def _layer_values(att: torch.Tensor, sets: _BatchSets, chunk_bytes: int | None = None) -> torch.Tensor:
    """Every built-in metric for one layer's attention ``[B, H, N, N]``: float32 ``[B, H, M]`` (`BUILTIN_METRICS`)."""
    rows = _row_values(att, sets, chunk_bytes)
    per_row = torch.cat([rows.mass, rows.entropy[:, None], rows.top[:, None]], 1)  # [B, 10, H, N]
    # sums over the text and the image queries, rows outside each set selected out: [B, 2 (query set), 10, H]
    sums = torch.where(sets.queries, per_row[:, None], torch.zeros((), device=att.device)).sum(-1)
    mass, entropy, top = sums[:, :, :8], sums[:, :, 8], sums[:, :, 9]
    n_q = sets.n_txt + sets.n_img  # Q = txt ∪ img (disjoint)
    out = _block_means(mass[:, 0, 0], mass[:, 0, 1], mass[:, 1, 0], mass[:, 1, 1], sets.n_txt, sets.n_img)
    out["cls_to_txt"], out["cls_to_img"] = rows.mass[:, 6, :, 0], rows.mass[:, 7, :, 0]  # the text [CLS] row
    for qi, (src, count) in enumerate((("txt", sets.n_txt), ("img", sets.n_img))):
        out[f"{src}q_to_txt"], out[f"{src}q_to_img"] = _nan_div(mass[:, qi, 0], count), _nan_div(mass[:, qi, 1], count)
    for ki, name in ((2, "to_cls"), (3, "to_sep"), (4, "to_imgcls")):
        out[name] = _nan_div(mass[:, :, ki].sum(1), n_q)
    out["entropy"] = _nan_div(entropy.sum(1), n_q * sets.log_n_keys)
    out["max_weight"] = _nan_div(top.sum(1), n_q)
    out["img2img_nonlocal"], out["spatial_distance"] = _spatial(rows, sets)
    return torch.stack([out[name] for name in BUILTIN_METRICS], dim=-1)


def _spatial(rows: _Rows, sets: _BatchSets) -> tuple[torch.Tensor, torch.Tensor]:
    """``img2img_nonlocal`` and ``spatial_distance`` ``[B, H]`` from the patch rows (NaN without patches)."""
    if sets.span is None or rows.patch_rows is None:
        nan = torch.full(rows.top.shape[:2], float("nan"), device=rows.top.device)
        return nan, nan.clone()
    zero = torch.zeros((), device=rows.top.device)
    nonlocal_ = _nan_div(torch.where(sets.patch_q, rows.patch_rows[:, 1], zero).sum(-1), sets.far_cells)
    mass = rows.mass[:, 5, :, sets.span[0] : sets.span[1]]  # each patch row's mass on patches
    defined = sets.patch_q & (mass > 0)  # a patch query with no mass on patches has no distance: left out
    distance = torch.where(defined, rows.patch_rows[:, 0] / torch.where(defined, mass, 1.0), zero)
    return nonlocal_, _nan_div(distance.sum(-1), defined.sum(-1).float())


class SummaryReducer:
    """Reduces a batch's attention one layer at a time to every built-in per-head metric (`BUILTIN_METRICS`).

    The token sets, counts and grid weights are built once; `add` takes the layers in order, e.g. from a
    forward hook during the model's pass, so that no layer's attention has to outlive its reduction.

    Args:
        modality, special, valid: ``[B, N]`` tensors on the attention's device (see `token_masks`).
        patch_rc: ``[B, N, 2]`` grid positions (row -1 for non-patches); the spatial metrics are NaN without it.
        include_special: count special tokens in the text and image sets.
        chunk_bytes: on a CPU, reduce about this many bytes of examples at a time (see `_row_values`); None
            reduces each layer whole.
    """

    def __init__(self, modality, special, valid, patch_rc=None, include_special: bool = False,
                 chunk_bytes: int | None = CPU_CHUNK_BYTES):
        self.sets = _batch_sets(token_masks(modality, special, valid, patch_rc, include_special), patch_rc)
        self.chunk_bytes = chunk_bytes
        self.layers: list[torch.Tensor] = []

    def add(self, attention: torch.Tensor) -> None:
        """Reduce the next layer's attention ``[B, H, N, N]`` (any float dtype)."""
        with torch.inference_mode():
            self.layers.append(_layer_values(attention.detach(), self.sets, self.chunk_bytes))

    def values(self) -> torch.Tensor:
        """float32 ``[B, L, H, M]`` (`BUILTIN_METRICS` order) of the layers added so far, on their device."""
        with torch.inference_mode():
            return torch.stack(self.layers, dim=1)


def compute_layer_summaries(
    attentions: tuple[torch.Tensor, ...] | list[torch.Tensor], modality, special, valid, patch_rc=None,
    include_special: bool = False,
) -> tuple[list[str], torch.Tensor]:
    """Every built-in per-head metric for a batch, on the attentions' device (a `SummaryReducer` over the layers).

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
    """The same per-head summaries as a sweep (plus custom metrics), from one stored trace (tidy frame)."""
    if trace.attentions is None:
        raise ValueError("this trace has no attentions")
    att = torch.from_numpy(np.asarray(trace.attentions, dtype=np.float32))
    names, values = compute_layer_summaries(
        [att[layer][None] for layer in range(att.shape[0])],
        torch.from_numpy(trace.modality.astype(np.int64))[None],
        torch.from_numpy(trace.special.copy())[None],
        torch.ones((1, trace.n_tokens), dtype=torch.bool),
        patch_rc=torch.from_numpy(trace.patch_rc.astype(np.int64))[None],
        include_special=include_special,
    )
    values = values.numpy()
    custom = compute_custom_metrics([trace])
    if custom is not None:
        names, values = names + custom[0], np.concatenate([values, custom[1]], -1)
    return summaries_to_frame([trace.example_id], names, values)


def compute_custom_batch(attentions, batch, example_ids: list[str], model_id: str = "") -> tuple[list[str], np.ndarray] | None:
    """Custom metrics for a sweep batch: ``(names, [B, L, H, C])``, or None when none is registered.

    Custom metrics are functions of a `Trace`, so this copies each example's attentions to the host
    (padding removed) and builds a light trace per example: registering a custom metric makes sweeps
    slower by about the cost of a full-trace copy. The built-ins never pay this.

    Args:
        attentions: one ``[B, H, N, N]`` tensor per layer (any device).
        batch: the `EncodedBatch` whose main stream's layouts the attentions follow.
        example_ids: ids, one per batch row.
        model_id: recorded in the light traces.
    """
    if not _CUSTOM:
        return None
    att = torch.stack([a.detach().half() for a in attentions], 1).cpu().numpy()  # [B, L, H, N, N]
    traces = []
    for b, eid in enumerate(example_ids):
        keep = np.flatnonzero(batch.valid[b])
        traces.append(Trace.single(eid, model_id, batch.layouts[b].trimmed(), att[b][:, :, keep][:, :, :, keep], None))
    return compute_custom_metrics(traces)
