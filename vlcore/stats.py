"""Per-head attention statistics as tidy DataFrames (``example_id, layer, head, metric, value``).

One implementation, written in torch over a batch, serves both paths: a sweep calls it on the
model's device inside the batch loop (only ``[B, L, H, M]`` numbers leave the device), and a stored
`Trace` is fed through it on the CPU. Both paths round the attention to float16 first (a stored
trace keeps float16), so they agree to float32 precision. Rows of an attention matrix are queries,
columns keys. Every formula is in ``docs/statistics.md``.

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


def _masked_mean(per_row: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_row`` ``[B, H, N]`` over the rows in ``rows`` (bool ``[B, N]`` or ``[B, H, N]``); NaN when none.

    Rows outside the set are selected out, never multiplied by 0: a NaN there (``0 / 0``) cannot leak in.
    """
    rows = rows if rows.dim() == 3 else rows[:, None]
    total = torch.where(rows, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device)).sum(-1)
    return _nan_div(total, rows.sum(-1).to(per_row.dtype).expand_as(total))


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
    keys = torch.stack([masks["txt"], masks["img"]], dim=-1).to(attention.dtype)  # [B, N, 2]
    if row_mass is None:
        row_mass = torch.matmul(attention, keys[:, None]).float()  # [B, H, N, 2]: each row's mass per key set
    sums, cells = {}, {}
    for qi, src in enumerate(("txt", "img")):
        q = masks[src].float()
        for ki, dst in enumerate(("txt", "img")):
            sums[src, dst] = torch.where(masks[src][:, None], row_mass[..., ki], 0.0).sum(-1)
            cells[src, dst] = (q.sum(1) * keys[..., ki].float().sum(1))[:, None]
    out = {f"{s}2{d}": _nan_div(sums[s, d], cells[s, d]) for s, d in sums}
    cross, intra = (("txt", "img"), ("img", "txt")), (("txt", "txt"), ("img", "img"))
    for name, pairs in (("cross_modal", cross), ("intra_modal", intra)):
        out[name] = _nan_div(sum(sums[p] for p in pairs), sum(cells[p] for p in pairs))
    return out


def _grid_distances(patch_rc: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean and Chebyshev distances ``[B, N, N]`` between patch cells; 0 where either is no patch."""
    rc = patch_rc.float()
    diff = rc[:, :, None, :] - rc[:, None, :, :]
    pair = (patch[:, :, None] & patch[:, None, :]).float()
    euclid = diff.pow(2).sum(-1).sqrt() * pair
    cheb = diff.abs().amax(-1) * pair
    return euclid, cheb


def _layer_metrics(att: torch.Tensor, m: dict[str, torch.Tensor], euclid, far) -> dict[str, torch.Tensor]:
    """Every built-in metric ``[B, H]`` for one layer's attention ``[B, H, N, N]``."""
    fl = {k: v.float() for k, v in m.items()}
    queries = fl["txt"] + fl["img"]  # the non-special (or all, with include_special) valid queries

    def mean_over(q: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:  # per_row [B, H, N]
        return _masked_mean(per_row, q > 0)

    # each row's mass on every key set, in one matmul: [B, H, N, 8]
    sets = ("txt", "img", "cls", "sep", "imgcls", "patch", "txt_all", "img_all")
    mass = torch.matmul(att, torch.stack([fl[k] for k in sets], -1)[:, None].to(att.dtype)).float()
    out = compute_block_means(att, m, row_mass=mass)
    out["cls_to_txt"], out["cls_to_img"] = mass[:, :, 0, 6], mass[:, :, 0, 7]  # the text [CLS] row
    for src in ("txt", "img"):
        for ki, dst in enumerate(("txt", "img")):
            out[f"{src}q_to_{dst}"] = mean_over(fl[src], mass[..., ki])
    plogp = torch.where(att > 0, att * att.clamp_min(1e-45).log(), torch.zeros_like(att)).sum(-1)  # [B, H, N]
    n_keys = fl["valid"].sum(1)[:, None, None]
    out["entropy"] = mean_over(queries, _nan_div(-plogp, n_keys.log()))
    out["max_weight"] = mean_over(queries, att.amax(-1))
    for ki, name in ((2, "to_cls"), (3, "to_sep"), (4, "to_imgcls")):
        out[name] = _masked_mean(mass[..., ki], queries > 0)
    if euclid is not None:
        patch_q = fl["patch"] * fl["img"]
        out["img2img_nonlocal"] = _nan_div((att * far[:, None]).sum((-1, -2)), far.sum((-1, -2))[:, None])
        weighted = (att * euclid[:, None]).sum(-1)  # [B, H, N]
        defined = (patch_q > 0)[:, None] & (mass[..., 5] > 0)  # a patch query with no patch mass has no distance
        out["spatial_distance"] = _masked_mean(_nan_div(weighted, mass[..., 5]), defined)
    else:
        nan = torch.full_like(out["txt2txt"], float("nan"))
        out["img2img_nonlocal"], out["spatial_distance"] = nan, nan.clone()
    return out


def compute_layer_summaries(
    attentions: tuple[torch.Tensor, ...] | list[torch.Tensor], modality, special, valid, patch_rc=None,
    include_special: bool = False,
) -> tuple[list[str], torch.Tensor]:
    """Every built-in per-head metric for a batch, on the attentions' device.

    Args:
        attentions: one ``[B, H, N, N]`` tensor per layer.
        modality, special, valid: ``[B, N]`` tensors (see `token_masks`).
        patch_rc: ``[B, N, 2]`` grid positions (row -1 for non-patches); the spatial metrics are NaN without it.
        include_special: count special tokens in the text and image sets.

    Returns:
        ``(metric_names, values)`` with values float32 ``[B, L, H, M]``, still on the device.
    """
    masks = token_masks(modality, special, valid, patch_rc, include_special)
    euclid = far = None
    if patch_rc is not None:
        euclid, cheb = _grid_distances(patch_rc, masks["patch"])
        pair = (masks["patch"] & masks["img"])
        far = ((cheb > 1) & pair[:, :, None] & pair[:, None, :]).float()  # not self, not the 8 neighbours
    per_layer = []
    for att in attentions:
        att = att.half().float()  # the precision a stored trace keeps: both paths agree exactly
        metrics = _layer_metrics(att, masks, euclid, far)
        per_layer.append(torch.stack([metrics[name] for name in BUILTIN_METRICS], dim=-1))
    return list(BUILTIN_METRICS), torch.stack(per_layer, dim=1)


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
        batch: the `EncodedBatch` with the layout (``tokens``, ``modality``, ``special``, ``patch_rc``,
            ``valid``, ``grids``, ``images``).
        example_ids: ids, one per batch row.
        model_id: recorded in the light traces.
    """
    if not _CUSTOM:
        return None
    att = torch.stack([a.detach().half() for a in attentions], 1).cpu().numpy()  # [B, L, H, N, N]
    traces = []
    for b, eid in enumerate(example_ids):
        keep = np.flatnonzero(batch.valid[b])
        traces.append(Trace(
            eid, model_id, tuple(batch.tokens[b][i] for i in keep), batch.modality[b][keep], batch.special[b][keep],
            batch.patch_rc[b][keep], batch.grids[b], batch.images[b], 0, att[b][:, :, keep][:, :, :, keep], None,
        ))
    return compute_custom_metrics(traces)
