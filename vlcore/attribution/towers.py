"""Explanations per tower for models whose towers meet only in a score (two-tower models).

Chefer et al.'s two-tower notebook applies the single-stream relevancy rule to each tower on its own: the image's
relevance is the image CLS row of ``R`` over the vision tower's self-attention, the text's the row of the token the
text tower pools. Here the same is read from the adapter's description, never from a family's name:

- each self-attention block is a tower; its query is ``adapter.default_query(block, layout)``;
- a tower with no single query row (a vision tower read by an attention-pooling head) is explained
  through its **pooling block**: a block whose keys are that tower's stream and whose query stream is one token
  (e.g. ``vision.pool``, the probe over the patches). The probe starts with no relevance on the patches and
  the cross-attention rule (Chefer et al. 2021, bi-modal, ``R^{pk} += Ā^{pk} R^{kk}``) gives
  ``Ā_pool · R_self``, with ``Ā_pool = mean_h (∇A ⊙ A)^+`` of the head. Rollout likewise is
  ``mean_h A_pool · rollout(self)`` (the head has no residual from the probe).

Maps are float32 ``[N]`` in the tower stream's token order (padding dropped), so a `Trace` of the same inputs
renders them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlcore.attribution.relevance import relevancy_matrix, rollout_matrices
from vlcore.errors import InputError, NoAttentionError
from vlcore.trace import TokenLayout, Trace


@dataclass(frozen=True, eq=False)
class TowerMap:
    """One tower's explanation.

    Attributes:
        block: the tower's self-attention block, e.g. ``vision.self``.
        stream: its stream.
        values: float32 ``[N]`` in the stream's (trimmed) token order; the query's own entry is 0.
        layout: the stream's layout.
        query: the token whose row was read, or None when read through ``pooled_by``.
        pooled_by: the pooling block the map went through, or None.
    """

    block: str
    stream: str
    values: np.ndarray
    layout: TokenLayout
    query: int | None
    pooled_by: str | None = None

    def __post_init__(self) -> None:
        self.values.setflags(write=False)

    def to_grid(self, image: int = 0) -> np.ndarray:
        """float32 ``[rows, cols]`` of the patches' values on one image's grid (NaN where no patch)."""
        return self.layout.to_grid(self.values, image)


@dataclass(frozen=True, eq=False)
class TowerRelevancy:
    """Gradient relevancy of one (image, text) pair, per tower.

    Attributes:
        maps: stream name -> `TowerMap` (e.g. ``vision`` and ``text``).
        label: the target explained (``"match"`` or a class label).
        score: its logit.
    """

    maps: dict[str, TowerMap]
    label: str
    score: float


def pooling_block(specs: dict, block: str) -> str | None:
    """The block that pools ``block``'s stream: keys on that stream, queries from another stream. None if none.

    >>> from vlcore.models.base import BlockSpec
    >>> specs = {"vision.self": BlockSpec("vision", "vision", 2, 2), "vision.pool": BlockSpec("probe", "vision", 1, 2)}
    >>> pooling_block(specs, "vision.self")
    'vision.pool'
    """
    stream = specs[block].query
    return next((name for name, spec in specs.items() if spec.key == stream and spec.query != stream), None)


def compute_pooled_map(pool: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """A one-query pooling row composed with a tower's ``[N, N]`` matrix (rollout or relevancy).

    Args:
        pool: ``[H, 1, N]`` (or ``[1, N]``) pooling weights: attention probabilities, or ``(∇A ⊙ A)^+``.
        matrix: ``[N, N]`` rows queries.

    Returns:
        float64 ``[N]``: ``mean_h pool · matrix``.

    >>> compute_pooled_map(np.array([[[1.0, 0.0]]]), np.array([[0.5, 0.5], [0.0, 1.0]])).tolist()
    [0.5, 0.5]
    """
    pool = np.asarray(pool, np.float64)
    row = pool.reshape(-1, pool.shape[-1]).mean(0) if pool.ndim == 3 else pool.reshape(-1)
    return row @ np.asarray(matrix, np.float64)


def compute_tower_rollout(trace: Trace, block: str, query: int | None, start_layer: int = 0) -> np.ndarray:
    """Attention rollout of one tower from its query row, or into its pooling block when ``query`` is None.

    Args:
        trace: a trace holding ``block`` (and the pooling block when ``query`` is None).
        block: a self-attention block, e.g. ``vision.self``.
        query: the query token (``adapter.default_query(block, layout)``); None reads through the pooling block.
        start_layer: the first layer folded in.

    Returns:
        float32 ``[N]`` in ``block``'s token order (sums to 1).

    Raises:
        NoAttentionError: the trace lacks the attentions.
        InputError: no query and no pooling block.
    """
    view = trace.select(block)
    if view.attentions is None:
        raise NoAttentionError(f"trace {trace.example_id} has no attentions for {block}; extract its full trace")
    rollout = rollout_matrices(view.attentions, start_layer % view.n_layers)
    if query is not None:
        return rollout[query].astype(np.float32)
    pool = _pool_of(trace, block)
    return compute_pooled_map(trace.blocks[pool].attentions[-1].astype(np.float64), rollout).astype(np.float32)


def _pool_of(trace: Trace, block: str) -> str:
    stream = trace.blocks[block].query
    for name, other in trace.blocks.items():
        if other.key == stream and other.query != stream and trace.streams[other.query].n_tokens == 1:
            if other.attentions is None:
                raise NoAttentionError(f"trace {trace.example_id} has no attentions for {name}")
            return name
    raise InputError(f"{block} has no query token and no pooling block reads it; pick a query token")


def extract_tower_relevancy(adapter, image, text: str, target: str | None = None) -> TowerRelevancy:
    """Chefer's relevancy on each tower separately (one forward and backward pass).

    Args:
        adapter: a `ModelAdapter` with a gradient pass and self-attention blocks per tower.
        image: a PIL image.
        text: the caption (or, zero-shot, a label's prompt to see the label's text relevance).
        target: ``"match"``, a class label, or None (the adapter's default).

    Returns:
        A `TowerRelevancy` with one `TowerMap` per self-attention block's stream.

    Raises:
        InputError: an unknown target; a tower with neither a query row nor a pooling block.
    """
    batch = adapter.encode([image], [text])
    specs = adapter.block_specs()
    grads = adapter.attention_gradients(batch, target)
    maps = {}
    for name, spec in specs.items():
        if not spec.is_self or name not in grads.attentions:
            continue
        padded = batch.streams[spec.query][0]
        keep = np.flatnonzero(padded.valid)
        layout = padded.trimmed()
        rel = relevancy_matrix(grads.attentions[name], grads.gradients[name])
        query = adapter.default_query(name, layout)
        pool = None
        if query is not None:
            values = rel[keep[query]][keep].astype(np.float32)
            values[query] = 0.0
        else:
            pool = pooling_block(specs, name)
            if pool is None or pool not in grads.attentions:
                raise InputError(f"{name} has no query token and no pooling block; it cannot be explained alone")
            weights = [np.maximum(_numpy(g) * _numpy(a), 0.0) for a, g in
                       zip(grads.attentions[pool], grads.gradients[pool])]
            values = compute_pooled_map(weights[-1], rel)[keep].astype(np.float32)
        maps[spec.query] = TowerMap(name, spec.query, values, layout, query, pool)
    return TowerRelevancy(maps, grads.label, grads.score)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)
