"""Attention rows and per-head statistics rebuilt from one captured attention call (pure functions).

`vlcore.models.attention_capture` records, per layer, the queries and keys that sdpa saw and the mask the
model passed; this module turns them into what eager attention would have returned, for the rows asked for
only, and into per-head statistics without holding ``[head, N, N]``:

- `compute_attention_rows`: full rows ``[batch, head, rows, key]`` for chosen queries (generated tokens);
- `accumulate_head_sums`: per head, the entropy of each row divided by the log of the number of keys its
  query can see, and the share of the row on a key set (image tokens), summed over a query set.

Statistics take one of two routes, with equal results (tests check both against eager):

- fused (CPU, no soft-capping): one flash-attention call per layer that also returns each row's
  log-sum-exp. With values ``k`` it gives ``E_p[k]``, and the entropy is ``logsumexp(s) - scaling * q .
  E_p[k]``. The key-set share comes from an extra value column ``1_keyset`` (q and k padded with a zero
  column), or, when the key set or its complement is at most 1/8 of the keys (the text tokens of an
  image-heavy prompt), from ``exp(s - logsumexp)`` over those few keys, ``chunk_rows`` rows at a time.
  With a mask tensor the rows go ``chunk_rows`` at a time with that chunk's additive mask;
- chunked (GPU, soft-capping, float masks): the scores of ``chunk_rows`` rows over the keys any of them
  sees (about half the keys under a causal mask), reduced and dropped before the next chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vlcore.errors import NoAttentionError

CHUNK_ROWS = 256
_MIN = torch.finfo(torch.float32).min
# torch's CPU flash-attention kernel, the one sdpa runs on CPU; unlike sdpa it also returns the log-sum-exp
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# The fused route scores the key set (or its complement) explicitly when it is at most this share of the keys
EXPLICIT_SHARE_FRACTION = 1 / 8


class AttentionCaptureError(NoAttentionError):
    """The attention of a layer asked for could not be captured; the message says why and what to do."""


@dataclass(frozen=True)
class AttentionCall:
    """One layer's attention call as the model ran it.

    Attributes:
        layer: the decoder layer.
        query: ``[batch, n_heads, n_queries, head_dim]`` after rotary / M-RoPE (the model's tensor, not a copy).
        key: ``[batch, n_kv_heads, n_keys, head_dim]`` including the cache's keys; head ``h`` reads key head
            ``h // (n_heads // n_kv_heads)``; `expanded_key` is ``[batch, n_heads, n_keys, head_dim]``.
        mask: what the model passed: bool ``[batch or 1, 1, n_queries, n_keys]`` (True: the key is seen) or an
            additive float mask of that shape; None when sdpa relies on `causal`.
        causal: with ``mask`` None, query ``i`` sees keys ``j <= i`` (sdpa's ``is_causal``); else every key.
        scaling: the factor on ``q . k``.
        softcap: ``c`` in ``c * tanh(score / c)`` (Gemma 2), None without.
        query_start: the position of query 0 in the sequence.
        key_start: the position of key 0 (later than 0 in a sliding layer whose cache dropped old keys).
    """

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    scaling: float
    softcap: float | None
    query_start: int
    key_start: int

    @property
    def n_queries(self) -> int:
        return self.query.shape[2]

    @property
    def n_keys(self) -> int:
        return self.key.shape[2]

    @property
    def n_heads(self) -> int:
        return self.query.shape[1]

    @property
    def expanded_key(self) -> torch.Tensor:
        """``[batch, n_heads, n_keys, head_dim]``: the keys per query head (copied when heads are grouped)."""
        b, kv, k, d = self.key.shape
        return self.key[:, :, None].expand(b, kv, self.n_heads // kv, k, d).reshape(b, self.n_heads, k, d)


def compute_visible_keys(call: AttentionCall, rows: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each of the given query rows sees, by the model's own mask.

    Args:
        call: a captured call.
        rows: int ``[r]``, query indices within the call (0 .. n_queries - 1).
        cols: int ``[c]``, key indices within the call; None for every key.

    Returns:
        bool ``[batch or 1, 1 or n_heads, r, c or n_keys]``.
    """
    rows = rows.to(call.query.device)
    keys = torch.arange(call.n_keys, device=rows.device) if cols is None else cols.to(rows.device)
    if call.mask is None:
        if not call.causal:
            return torch.ones(1, 1, len(rows), len(keys), dtype=torch.bool, device=rows.device)
        return (keys[None, :] <= rows[:, None])[None, None]
    mask = call.mask.index_select(2, rows.to(call.mask.device))
    mask = mask if cols is None else mask.index_select(3, keys.to(mask.device))
    return mask if mask.dtype == torch.bool else mask > _MIN / 2


def _visible_counts(call: AttentionCall, rows: torch.Tensor) -> torch.Tensor:
    """Keys seen per row, ``[batch or 1, 1 or n_heads, r]``, without an ``[r, n_keys]`` tensor when the mask
    is sdpa's causal rule."""
    if call.mask is None:
        counts = rows + 1 if call.causal else torch.full_like(rows, call.n_keys)
        return counts.clamp_max(call.n_keys)[None, None]
    return compute_visible_keys(call, rows).sum(-1)


def _masked_scores(call: AttentionCall, rows: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scores of ``rows`` over keys ``lo:hi`` (the float32 minimum where a key is not seen) and the
    visibility ``[batch or 1, 1 or n_heads, r, hi - lo]``."""
    b, kv, _, d = call.key.shape
    q = call.query.index_select(2, rows).float()
    k = call.key[:, :, lo:hi].float()
    r, n_rep = len(rows), call.n_heads // kv
    scores = (q.reshape(b, kv, n_rep * r, d) @ k.transpose(-1, -2)).reshape(b, call.n_heads, r, hi - lo)
    scores = scores * call.scaling
    if call.softcap is not None:
        scores = torch.tanh(scores / call.softcap) * call.softcap
    visible = compute_visible_keys(call, rows)[..., lo:hi]
    if call.mask is not None and call.mask.dtype != torch.bool:
        scores = scores + call.mask.index_select(2, rows.to(call.mask.device))[..., lo:hi].float()
    return scores.masked_fill_(~visible, _MIN), visible


def compute_attention_rows(call: AttentionCall, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The attention weights of some query rows, as eager attention would return them.

    Rows whose query sees no key at all (a left-padding token) are all zeros (eager spreads them evenly).

    Args:
        call: a captured call.
        rows: query indices within the call.

    Returns:
        float32 ``[batch, n_heads, len(rows), n_keys]`` on the model's device; each row sums to 1.
    """
    rows = torch.as_tensor(rows, dtype=torch.long, device=call.query.device).reshape(-1)
    scores, visible = _masked_scores(call, rows, 0, call.n_keys)
    return torch.softmax(scores, dim=-1) * visible.any(-1, keepdim=True)


@dataclass
class HeadSums:
    """Running sums of per-head statistics over query rows (one layer); `HeadSummaries` holds the means.

    Attributes:
        entropy: float64 ``[batch, n_heads]``: sum over rows of the entropy divided by log(visible keys),
            over rows that see at least two keys.
        key_mass: float64 ``[batch, n_heads]``: sum over rows of the attention on the key set.
        n_entropy_rows: ``[batch]`` rows in the entropy sum; n_mass_rows: ``[batch]`` rows that see a key.
    """

    entropy: torch.Tensor
    key_mass: torch.Tensor
    n_entropy_rows: torch.Tensor
    n_mass_rows: torch.Tensor

    @classmethod
    def zeros(cls, batch: int, n_heads: int) -> HeadSums:
        z = torch.zeros(batch, n_heads, dtype=torch.float64)
        return cls(z, z.clone(), torch.zeros(batch, dtype=torch.float64), torch.zeros(batch, dtype=torch.float64))

    def add(self, entropy: torch.Tensor, mass: torch.Tensor | None, n_visible: torch.Tensor,
            weight: torch.Tensor) -> None:
        """Add rows: entropy, mass ``[batch, n_heads, r]``; n_visible ``[batch or 1, 1 or n_heads, r]``;
        weight bool ``[batch, r]`` (the row is in the query set)."""
        n = n_visible.expand_as(entropy).double()
        w = weight.double()[:, None]
        self.entropy += (torch.where(n > 1, entropy.double() / n.clamp_min(2).log(), 0.0) * w).sum(-1).cpu()
        self.n_entropy_rows += (w[:, 0] * (n[:, 0] > 1)).sum(-1).cpu()
        self.n_mass_rows += (w[:, 0] * (n[:, 0] > 0)).sum(-1).cpu()
        if mass is not None:
            self.key_mass += (torch.where(n > 0, mass.double(), 0.0) * w).sum(-1).cpu()


def _positions_mask(mask, start: int, length: int, batch: int, device) -> torch.Tensor:
    """``mask`` (bool ``[batch, n_positions]`` over absolute positions; None: every position) cut to positions
    ``start .. start + length - 1`` -> bool ``[batch, length]``; positions past its end are False."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask, dtype=torch.bool).to(device)
    if mask.ndim != 2 or mask.shape[0] != batch:
        raise AttentionCaptureError(f"A query or key set must be bool [batch={batch}, positions]; "
                                    f"got shape {tuple(mask.shape)}. Pass one row per example.")
    out = torch.zeros(batch, length, dtype=torch.bool, device=device)
    lo, hi = max(start, 0), min(start + length, mask.shape[1])
    if hi > lo:
        out[:, lo - start:hi - start] = mask[:, lo:hi]
    return out


def _chunk_stats(call: AttentionCall, rows: torch.Tensor, keys: torch.Tensor | None):
    """Entropy, key-set share ``[batch, n_heads, r]`` and visible counts of ``rows`` from their scores over
    the span of keys any of them sees."""
    if call.mask is None:
        lo, hi = 0, (int(rows[-1]) + 1 if call.causal else call.n_keys)
    else:
        cols = compute_visible_keys(call, rows).flatten(0, 2).any(0).nonzero()
        lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1)
    scores, visible = _masked_scores(call, rows, lo, hi)
    scores -= scores.amax(-1, keepdim=True)
    e = scores.exp()
    z = e.sum(-1)
    entropy = z.log() - (e * scores).sum(-1) / z  # H = log Z - E_p[s - max]
    mass = None if keys is None else (e @ keys[:, None, lo:hi, None].float()).squeeze(-1) / z
    return entropy, mass, visible.sum(-1)


def _can_fuse(call: AttentionCall) -> bool:
    return (_FLASH_CPU is not None and call.query.device.type == "cpu" and call.softcap is None
            and (call.mask is None or call.mask.dtype == torch.bool))


def _fused_stats(call: AttentionCall, rows: torch.Tensor, keys: torch.Tensor | None, chunk_rows: int):
    """As `_chunk_stats`, from one flash-attention call that returns each row's log-sum-exp."""
    q, k = call.query.index_select(2, rows).float(), call.expanded_key.float()
    d = q.shape[-1]
    few = keys is not None and min(int(keys.sum(-1).max()), int((~keys).sum(-1).max()))
    explicit = keys is not None and few <= EXPLICIT_SHARE_FRACTION * call.n_keys
    v = k
    if keys is not None and not explicit:  # the key set as a value column; one head size for the kernel:
        v = torch.cat([k, keys[:, None, :, None].float().expand(*k.shape[:3], 1)], -1)
        q, k = F.pad(q, (0, 1)), F.pad(k, (0, 1))  # a zero column in q and k leaves the scores alone
    bias = None
    if call.mask is not None:
        bias = torch.zeros(call.mask.shape[:2] + (len(rows), call.n_keys), device=q.device)
        bias.masked_fill_(~call.mask.index_select(2, rows), -torch.inf)
    out, lse = _FLASH_CPU(q, k, v, 0.0, call.causal, attn_mask=bias, scale=call.scaling)
    entropy = lse - call.scaling * (q[..., :d] * out[..., :d]).sum(-1)
    if keys is None:
        mass = None
    else:
        mass = _explicit_share(call, rows, q[..., :d], k[..., :d], lse, keys, chunk_rows) if explicit else out[..., d]
    return entropy, mass, _visible_counts(call, rows)


def _explicit_share(call: AttentionCall, rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor,
                    keys: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """Each row's share on the key set ``[batch, n_heads, r]``, from ``exp(score - lse)`` over the key set or
    its complement, whichever is smaller (image tokens fill most of a multimodal prompt: their complement is
    the few text tokens)."""
    complement = int(keys.sum()) * 2 > keys.numel()
    chosen = ~keys if complement else keys
    cols = chosen.any(0).nonzero().flatten()
    share = torch.zeros(lse.shape, device=lse.device)
    for part in torch.arange(len(rows), device=rows.device).split(chunk_rows):
        scores = (q[:, :, part] @ k[:, :, cols].transpose(-1, -2)) * call.scaling
        seen = compute_visible_keys(call, rows[part], cols) & chosen[:, None, None, cols]
        probs = torch.where(seen, torch.exp(scores - lse[:, :, part, None]), 0.0)
        share[:, :, part] = probs.sum(-1)
    return 1 - share if complement else share


def accumulate_head_sums(call: AttentionCall, sums: HeadSums, query_set=None, key_set=None,
                         chunk_rows: int = CHUNK_ROWS, fused: bool | None = None) -> None:
    """Add one call's per-head entropy and key-set share to ``sums``.

    Args:
        call: a captured call.
        sums: from ``HeadSums.zeros(batch, n_heads)``, updated in place.
        query_set: bool ``[batch, positions]`` over absolute positions: the query rows to average over
            (None: all). Rows that see no key never count.
        key_set: bool ``[batch, positions]``: the keys whose share is summed (e.g. image tokens); None: none.
        chunk_rows: query rows per chunk (the fused route takes every row at once under sdpa's causal rule).
        fused: force the fused (True) or chunked (False) route; None picks fused where it applies.
    """
    b, device = call.query.shape[0], call.query.device
    in_set = _positions_mask(query_set, call.query_start, call.n_queries, b, device)
    keys = None if key_set is None else _positions_mask(key_set, call.key_start, call.n_keys, b, device)
    fused = _can_fuse(call) if fused is None else fused
    if fused and call.mask is None:
        blocks = [torch.arange(call.n_queries, device=device)] if in_set.any() else []
    else:
        blocks = in_set.any(0).nonzero().flatten().split(chunk_rows)
    for rows in blocks:
        if fused:
            entropy, mass, n_visible = _fused_stats(call, rows, keys, chunk_rows)
        else:
            entropy, mass, n_visible = _chunk_stats(call, rows, keys)
        sums.add(entropy, mass, n_visible, in_set[:, rows])


@dataclass(frozen=True)
class HeadSummaries:
    """Per-head statistics over a query set.

    Attributes:
        entropy: float32 ``[batch, layer, head]``: mean entropy of the rows, each divided by the log of the
            number of keys its query can see (1 = even over every visible key, 0 = one key); rows that see
            fewer than two keys are left out. NaN where no row counted.
        key_mass: float32 ``[batch, layer, head]``: mean share of each row's attention on the key set; NaN
            where no row counted or no key set was given.
        n_rows: int64 ``[batch]``: query rows averaged in ``key_mass`` (rows that see at least one key).
        layers: the layers, in order.
    """

    entropy: np.ndarray
    key_mass: np.ndarray
    n_rows: np.ndarray
    layers: tuple[int, ...]

    @classmethod
    def from_sums(cls, sums: dict[int, HeadSums], has_key_set: bool) -> HeadSummaries:
        """The means of per-layer `HeadSums` (keys: layers)."""
        layers = tuple(sorted(sums))
        with np.errstate(invalid="ignore", divide="ignore"):
            ent = np.stack([(sums[i].entropy / sums[i].n_entropy_rows[:, None]).numpy() for i in layers], 1)
            mass = np.stack([(sums[i].key_mass / sums[i].n_mass_rows[:, None]).numpy() for i in layers], 1)
        if not has_key_set:
            mass[:] = np.nan
        return cls(ent.astype(np.float32), mass.astype(np.float32),
                   sums[layers[0]].n_mass_rows.numpy().astype(np.int64), layers)
