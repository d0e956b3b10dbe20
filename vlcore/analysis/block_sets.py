"""The token sets of one attention block over a batch, and when each built-in statistic applies to it.

`vlcore.analysis.stats` computes every per-head statistic from these: each side of a block (its queries, its keys)
has its own sets, read from that side's `TokenLayout` (never from positions): text and image tokens without the
special ones, patches, the text [CLS] (the first special text token), the other special text tokens, the image
summaries. The entropy normaliser of each query is the log of the keys it sees (all valid keys, or under a causal
mask those up to its position). `applicability_rules` says when a metric means something for a block; where it
does not, the statistic is NaN and `vlcore.analysis.stats.not_applicable` gives the rule's reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlcore.trace import IMAGE, TEXT, TokenLayout


@dataclass(frozen=True)
class StreamTokens:
    """What the token sets of one side of a block (its queries or its keys) are built from, over a batch.

    Attributes:
        modality: int ``[B, N]``; ``TEXT`` or ``IMAGE``.
        special: bool ``[B, N]``.
        valid: bool ``[B, N]``; False for padding.
        patch_rc: int ``[B, N, 2]`` grid cell of patch tokens, row -1 elsewhere; None: every non-special image
            token counts as a patch and the spatial metrics are NaN.
        image_of: int ``[B, N]`` the image a token belongs to (-1 none); None: one image.
    """

    modality: torch.Tensor
    special: torch.Tensor
    valid: torch.Tensor
    patch_rc: torch.Tensor | None = None
    image_of: torch.Tensor | None = None

    @classmethod
    def from_layouts(cls, layouts: Sequence[TokenLayout], device: str | torch.device = "cpu") -> StreamTokens:
        """The tensors of a batch of layouts of one stream (padded to one length, as `EncodedBatch` holds them)."""
        def stack(name: str, dtype) -> torch.Tensor:
            return torch.from_numpy(np.stack([getattr(lay, name) for lay in layouts]).astype(dtype)).to(device)

        return cls(stack("modality", np.int64), stack("special", bool), stack("valid", bool),
                   stack("patch_rc", np.int64), stack("image_of", np.int64))


def token_masks(
    modality: torch.Tensor, special: torch.Tensor, valid: torch.Tensor, patch_rc: torch.Tensor | None = None,
    include_special: bool = False,
) -> dict[str, torch.Tensor]:
    """Boolean ``[B, N]`` token sets (see the module docstring).

    Args:
        modality: int ``[B, N]``; ``TEXT`` or ``IMAGE``.
        special: bool ``[B, N]``.
        valid: bool ``[B, N]``; False for padding.
        patch_rc: int ``[B, N, 2]``; row -1 for non-patches. Without it, every non-special image token
            counts as a patch.
        include_special: put the special text tokens and image summaries into the text and image sets.
    """
    keep = valid if include_special else valid & ~special
    text, image = modality == TEXT, modality == IMAGE
    text_special = valid & special & text
    first = text_special & (text_special.cumsum(1) == 1)  # the first special text token ([CLS]), wherever it is
    patch = valid & (patch_rc[..., 0] >= 0) if patch_rc is not None else valid & image & ~special
    return {
        "txt": keep & text,
        "img": keep & image,
        "patch": patch,
        "cls": first,
        "sep": text_special & ~first,
        "imgcls": valid & special & image,
        "txt_all": valid & text,
        "img_all": valid & image,
        "valid": valid,
    }


KEY_SETS = ("txt", "img", "cls", "sep", "imgcls", "patch", "txt_all", "img_all")  # a row's mass on each: one matmul

ONE_MODALITY = "its keys are all of one modality: the share is 0 or 1 by construction"


def applicability_rules(q: dict[str, torch.Tensor], k: dict[str, torch.Tensor], counts: dict[str, torch.Tensor],
                        is_self: bool, patch_q: torch.Tensor | None, far_cells: torch.Tensor | None) -> list:
    """When each built-in metric applies to a block: ``[(metrics, applies [B] bool, reason when not)]``.

    A metric applies to an example when every rule naming it holds; otherwise it is NaN and `not_applicable`
    gives the first failing rule's reason.
    """
    has = {name: counts[name][:, 0] > 0 for name in counts}
    any_k = {name: k[name].any(1) for name in ("txt_all", "img_all", "cls", "sep", "imgcls")}
    one = torch.ones_like(has["tq"])
    has_patch_q = patch_q.flatten(1).any(1) if patch_q is not None else ~one
    has_far = far_cells[:, 0] > 0 if far_cells is not None else ~one
    return [
        (("txt2txt", "txt2img", "txtq_to_txt", "txtq_to_img"), has["tq"], "no text queries in this block"),
        (("img2txt", "img2img", "imgq_to_txt", "imgq_to_img", "img2img_nonlocal", "spatial_distance"), has["iq"],
         "no image queries in this block"),
        (("txt2txt", "img2txt"), has["tk"], "no text keys in this block"),
        (("txt2img", "img2img"), has["ik"], "no image keys in this block"),
        (("cross_modal",), (has["tq"] & has["ik"]) | (has["iq"] & has["tk"]),
         "text and image never meet in this block (no text query reads an image key, no image query a text key)"),
        (("intra_modal",), (has["tq"] & has["tk"]) | (has["iq"] & has["ik"]),
         "no text→text or image→image cells in this block"),
        (("cls_to_txt", "cls_to_img"), q["cls"].any(1), "no text [CLS] query in this block"),
        (("cls_to_txt", "cls_to_img"), any_k["txt_all"] & any_k["img_all"], ONE_MODALITY),
        (("txtq_to_txt", "txtq_to_img", "imgq_to_txt", "imgq_to_img"), has["tk"] & has["ik"], ONE_MODALITY),
        (("entropy", "max_weight", "to_cls", "to_sep", "to_imgcls"), has["q"], "no text or image queries in this block"),
        (("entropy",), has["entropy_q"], "every query sees a single key: its entropy is 0 by construction"),
        (("to_cls",), any_k["cls"], "no text [CLS] key in this block"),
        (("to_sep",), any_k["sep"], "no text [SEP] (or other special text) key in this block"),
        (("to_imgcls",), any_k["imgcls"], "no image summary key (image CLS) in this block"),
        (("img2img_nonlocal", "spatial_distance"), one if is_self else ~one,
         "queries and keys are different streams: no grid distance between them"),
        (("img2img_nonlocal", "spatial_distance"), has_patch_q, "no image patch queries in this block"),
        (("img2img_nonlocal",), has_far, "no two patches more than one grid cell apart"),
    ]


@dataclass(frozen=True)
class BlockSets:
    """What every layer of a batch shares, computed once per batch (`build_block_sets`)."""

    keys: torch.Tensor  # [B, 8, K] float32 0/1: the key sets of KEY_SETS
    queries: torch.Tensor  # [B, 2, 1, 1, Q] bool: the text and the image queries
    cls_q: torch.Tensor  # [B, 1, 1, Q] bool: the text [CLS] query
    counts: dict[str, torch.Tensor]  # [B, 1] float32: tq, iq, tk, ik (text / image queries / keys), q, entropy_q
    inv_log: torch.Tensor  # [B, 1, Q] float32: 1 / log(keys the query sees); 0 where it sees one key or none
    span: tuple[int, int] | None  # the columns holding every patch of the batch; None without patches
    patch_q: torch.Tensor | None  # [B, 1, P] bool: the spatial metrics' queries (patch ∩ img) inside span
    grid: torch.Tensor | None  # [B, 2 or 3, 1, P, P] float32: grid distance between patches of one image (0 for
    #                            non-patches), 1 where query and key are more than one cell apart on one image,
    #                            and (several images) 1 where the key is a patch of the query's image
    far_cells: torch.Tensor | None  # [B, 1] float32: number of far (query, key) pairs
    rules: list  # `applicability_rules`
    applies: torch.Tensor  # [B, M] bool: the built-in metric applies to the example (``metrics`` order)


def visible_keys(k_valid: torch.Tensor, n_q: int, causal: bool) -> torch.Tensor:
    """int64 ``[B, Q]``: the valid keys each query sees; under a causal mask, those at or before its position
    (the queries aligned with the last keys)."""
    n_k = k_valid.shape[1]
    if not causal:
        return k_valid.sum(1, keepdim=True).expand(-1, n_q)
    last = torch.arange(n_q, device=k_valid.device) + (n_k - n_q)  # the last key each query sees
    seen = k_valid.long().cumsum(1)[:, last.clamp(0, n_k - 1)]
    return torch.where(last >= 0, seen, torch.zeros_like(seen))


def build_block_sets(q_tokens: StreamTokens, k_tokens: StreamTokens | None, include_special: bool, causal: bool,
                      n_visible: torch.Tensor | None, metrics: Sequence[str]) -> BlockSets:
    """Token sets, counts, entropy normalisers, the patch block's grid weights and the applicability of every
    metric for a batch (see `BlockSets`); ``k_tokens`` None: a self-attention block."""
    is_self = k_tokens is None
    k_tokens = q_tokens if is_self else k_tokens
    q = token_masks(q_tokens.modality, q_tokens.special, q_tokens.valid, q_tokens.patch_rc, include_special)
    k = q if is_self else token_masks(k_tokens.modality, k_tokens.special, k_tokens.valid, k_tokens.patch_rc,
                                      include_special)
    keys = torch.stack([k[name] for name in KEY_SETS], 1).float()
    seen = n_visible if n_visible is not None else visible_keys(k["valid"], q["valid"].shape[1], causal)
    seen = seen.to(q["valid"].device).float()
    inv_log = torch.where(seen > 1, 1.0 / seen.clamp_min(2).log(), 0.0)[:, None]
    queries = torch.stack([q["txt"], q["img"]], 1)
    counts = {"tq": q["txt"], "iq": q["img"], "tk": k["txt"], "ik": k["img"], "q": q["txt"] | q["img"],
              "entropy_q": (q["txt"] | q["img"]) & (seen > 1)}
    counts = {name: m.sum(1, keepdim=True).float() for name, m in counts.items()}
    span = patch_q = grid = far_cells = None
    patch_rc = q_tokens.patch_rc
    cols = torch.nonzero(q["patch"].any(0)).flatten().tolist() if is_self and patch_rc is not None else []
    if cols:
        span, patch_q, grid, far_cells = patch_block(q, patch_rc, q_tokens.image_of, cols[0], cols[-1] + 1)
    rules = applicability_rules(q, k, counts, is_self, patch_q, far_cells)
    applies = torch.ones(len(keys), len(metrics), dtype=torch.bool, device=keys.device)
    for names, holds, _ in rules:
        for name in names:
            applies[:, list(metrics).index(name)] &= holds
    return BlockSets(keys, queries[:, :, None, None], q["cls"][:, None, None], counts, inv_log, span, patch_q, grid,
                      far_cells, rules, applies)


def patch_block(q: dict, patch_rc: torch.Tensor, image_of: torch.Tensor | None, lo: int, hi: int):
    """The spatial metrics' inputs on the columns ``lo:hi`` that hold every patch: ``(span, patch_q, grid,
    far_cells)`` (see `BlockSets`). Distances and far pairs count only between patches of one image."""
    patch, pq = q["patch"][:, lo:hi], (q["patch"] & q["img"])[:, lo:hi]
    rc = patch_rc[:, lo:hi].float()
    diff = rc[:, :, None, :] - rc[:, None, :, :]
    pairs = patch[:, :, None] & patch[:, None, :]
    several = image_of is not None and bool((image_of[:, lo:hi].where(patch, 0) > 0).any())
    if several:  # a distance between cells of two images means nothing
        img = image_of[:, lo:hi]
        pairs = pairs & (img[:, :, None] == img[:, None, :])
    distance = diff.pow(2).sum(-1).sqrt() * pairs
    far = (diff.abs().amax(-1) > 1) & pq[:, :, None] & pq[:, None, :] & pairs  # not self, not the 8 neighbours
    weights = [distance, far.float()] + ([pairs.float()] if several else [])
    return (lo, hi), pq[:, None], torch.stack(weights, 1)[:, :, None], far.sum((1, 2)).float()[:, None]
