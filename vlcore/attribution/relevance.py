"""Explanations of a prediction as per-token maps: raw attention, attention rollout, gradient relevancy.

Every map is a float32 ``[N]`` vector over the keys of one attention block of a `Trace` of the same inputs
(the trace's viewed block; `Trace.select` picks another), in the token order of its `TokenLayout`, so one
overlay and one text colouring render all three. The row explained is the block's **default query**, the token
whose row the model's prediction reads (a [CLS] or an image CLS): the adapter says which
(`ModelAdapter.default_query`), a trace keeps it (`trace_query`).

- **Raw attention** (`compute_raw_map`): the query's row of one layer's attention, one head or the
  mean over heads.
- **Attention rollout** (Abnar & Zuidema, 2020; `compute_rollout`, self-attention blocks): per layer
  ``Â_l = normalise_rows(mean_h A_l + I)``, then ``R = Â_{L-1} ··· Â_{s+1} Â_s`` from the start layer
  ``s`` to the last; the map is the query's row of ``R``.
- **Gradient-weighted relevancy** (Chefer, Gur & Wolf, ICCV 2021, single-stream rules;
  `extract_relevancy`, self-attention blocks): per layer ``Ā_l = mean_h clamp(∇A_l ⊙ A_l, min=0)`` with
  ``∇A_l`` the gradient of the explained target's score, ``R ← I`` then ``R ← R + Ā_l · R`` for
  ``l = 0 … L-1``; the map is the default query's row ``R[q]`` with ``R[q, q]`` (the query itself) set to 0.

A cross-attention block (e.g. ``text.cross``: text queries, image keys) has no square matrix to roll out or
to propagate single-stream relevancy through: those raise an `InputError` saying so (the bi-modal rules,
`vlcore.attribution.bimodal`, propagate through it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlcore.errors import InputError, NoAttentionError
from vlcore.trace import ROLE_IMAGE_SUMMARY, ROLE_PATCH, ROLE_SPECIAL, TEXT, TokenLayout, Trace

QUERY_META = "default_query"  # Trace.meta key: {block: the adapter's default query index, or None}


def trace_query(trace: Trace) -> int:
    """The query row that explains the prediction in the trace's viewed block.

    The adapter's `ModelAdapter.default_query`, when the trace recorded it (``trace.meta["default_query"]``,
    one entry per block); otherwise read from the layout: the first special text token ([CLS]), else the first
    image summary token (an image CLS).

    Raises:
        InputError: no single query explains this block (a pooled head): pass ``query`` explicitly.
    """
    recorded = trace.meta.get(QUERY_META)
    if isinstance(recorded, dict) and trace.view in recorded:
        query = recorded[trace.view]
    else:
        query = layout_query(trace.layout)
    if query is None:
        raise InputError(f"no single query token explains block {trace.view!r} of trace {trace.example_id} (its "
                         "prediction reads a pooled summary); pick a query token to explain")
    return int(query)


def layout_query(layout: TokenLayout) -> int | None:
    """The first special text token, else the first image summary token, else None (no summary query)."""
    text_special = np.flatnonzero((layout.role == ROLE_SPECIAL) & (layout.modality == TEXT))
    if len(text_special):
        return int(text_special[0])
    return layout.first(ROLE_IMAGE_SUMMARY)


def compute_raw_attention(trace: Trace, layer: int = -1, head: int | None = None, query: int | None = None) -> np.ndarray:
    """One query's attention row over the viewed block's keys: float32 ``[K]``.

    Args:
        trace: a trace with attentions.
        layer: layer index (negative counts from the end).
        head: head index, or None for the mean over heads.
        query: query token index; None: the block's default query (`trace_query`).
    """
    layer = layer % trace.n_layers
    return trace.head_attention(layer, head)[trace_query(trace) if query is None else query]


def compute_raw_map(trace: Trace, layer: int = -1, head: int | None = None, query: int | None = None) -> np.ndarray:
    """Raw attention as a map: the query's attention row, float32 ``[K]`` in the key stream's trace order.

    Same as `compute_raw_attention`, with its inputs checked.

    Raises:
        NoAttentionError: the trace has no attentions.
        InputError: the layer, head or query is out of range, or no default query exists.
    """
    _need_attentions(trace)
    _check_range("layer", layer, trace.n_layers, negative=True)
    if head is not None:
        _check_range("head", head, trace.n_heads)
    query = trace_query(trace) if query is None else query
    _check_range("query", query, trace.n_tokens)
    return compute_raw_attention(trace, layer, head, query).astype(np.float32)


def rollout_matrices(attentions: np.ndarray, start_layer: int = 0) -> np.ndarray:
    """Attention rollout of a stack of attentions.

    Args:
        attentions: ``[L, H, N, N]`` attention probabilities (rows queries).
        start_layer: first layer folded in (0 = all layers).

    Returns:
        float64 ``[N, N]``: ``Â_{L-1} ··· Â_{start}`` with ``Â_l = normalise_rows(mean_h A_l + I)``.

    >>> a = np.full((2, 1, 2, 2), 0.5)
    >>> rollout_matrices(a).round(3).tolist()
    [[0.625, 0.375], [0.375, 0.625]]
    """
    n = attentions.shape[-1]
    eye = np.eye(n)
    rollout = eye.copy()
    for layer in range(start_layer, attentions.shape[0]):
        a_hat = attentions[layer].astype(np.float64).mean(0) + eye
        a_hat /= a_hat.sum(-1, keepdims=True)
        rollout = a_hat @ rollout
    return rollout


def compute_rollout(trace: Trace, start_layer: int = 0) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020) of a trace: float32 ``[N, N]`` (rows queries).

    Args:
        trace: a trace with attentions.
        start_layer: the first layer multiplied in; negative counts from the end.

    Raises:
        NoAttentionError: the trace has no attentions.
        InputError: ``start_layer`` out of range, or a cross-attention block.
    """
    _need_attentions(trace)
    stored = stored_rollout(trace)
    if stored is not None:
        return stored
    _need_self_block(trace.view, trace.block.is_self, trace.block.query, trace.block.key, "attention rollout")
    _check_range("start_layer", start_layer, trace.n_layers, negative=True)
    return rollout_matrices(trace.attentions, start_layer % trace.n_layers).astype(np.float32)


def stored_rollout(trace: Trace) -> np.ndarray | None:
    """The rollout rows the model computed during its pass for the viewed block, when it keeps only some rows of
    a self-attention (a generative model keeps its generated tokens' rows of the decoder): float32 ``[Q, K]``,
    rolled out over every layer (from layer 0), composed with the vision tower's rollout where the trace has it
    (``Trace.meta["rollout"]``, `vlcore.models.generative`). None when there is none for this block."""
    stored = trace.meta.get("rollout") or {}
    if stored.get("block") != trace.view:
        return None
    rows = np.asarray(stored.get("composed") or stored["lm"], dtype=np.float32)
    if rows.shape != (trace.n_tokens, len(trace.key_layout.tokens)):
        return None
    return rows


def rollout_is_composed(trace: Trace) -> bool:
    """Whether `stored_rollout` spreads the image tokens' share through the vision tower's rollout."""
    stored = trace.meta.get("rollout") or {}
    return stored.get("block") == trace.view and bool(stored.get("composed"))


def compute_rollout_map(trace: Trace, start_layer: int = 0, query: int | None = None) -> np.ndarray:
    """The query's row of the rollout: float32 ``[N]`` in trace order (sums to 1); ``query`` None: the block's
    default query (`trace_query`)."""
    query = trace_query(trace) if query is None else query
    _check_range("query", query, trace.n_tokens)
    return compute_rollout(trace, start_layer)[query]


def relevancy_matrix(attentions, gradients) -> np.ndarray:
    """Chefer et al.'s single-stream relevancy from per-layer attentions and their gradients.

    Args:
        attentions: per layer ``[H, N, N]`` (numpy or torch), in layer order.
        gradients: per layer ``[H, N, N]``, the gradient of the explained logit.

    Returns:
        float64 ``[N, N]``: ``R`` after ``R ← I; R ← R + Ā_l · R`` with ``Ā_l = mean_h (∇A_l ⊙ A_l)^+``.

    >>> a = np.array([[[0.0, 1.0], [0.0, 1.0]]]); g = np.ones_like(a)
    >>> relevancy_matrix([a], [g]).tolist()
    [[1.0, 1.0], [0.0, 2.0]]
    """
    rel = None
    for att, grad in zip(attentions, gradients):
        att, grad = _numpy64(att), _numpy64(grad)
        a_bar = np.maximum(grad * att, 0.0).mean(0)
        rel = np.eye(att.shape[-1]) if rel is None else rel
        rel = rel + a_bar @ rel
    if rel is None:
        raise InputError("relevancy needs at least one layer of attentions and gradients; got none")
    return rel


@dataclass(frozen=True, eq=False)
class Relevancy:
    """Gradient-weighted relevancy of one (image, text) pair for one target, in one self-attention block.

    Attributes:
        values: float32 ``[N]``, the default query's row of ``R`` in the token order of the block's stream in
            `extract_trace` for the same inputs (padding dropped). ``values[query]`` (the query itself) is 0; other
            special tokens and image summaries keep their relevance (tokens the prediction can depend on; the views
            below leave them out).
        answer: the target explained (an answer label, ``"match"`` for an image-text score).
        logit: the explained target's score.
        layout: the block's stream's `TokenLayout` (what each of the ``N`` tokens is).
        block: the block explained.
        query: the query token whose row ``values`` is.
        R: float32 ``[N, N]`` full relevancy matrix (rows queries) when asked for, else None.
    """

    values: np.ndarray
    answer: str
    logit: float
    layout: TokenLayout
    block: str = ""
    query: int = 0
    R: np.ndarray | None = None

    def __post_init__(self) -> None:
        for arr in (self.values, self.R):
            if isinstance(arr, np.ndarray):
                arr.setflags(write=False)

    # Views of the layout (one copy of it: the layout's own arrays).
    @property
    def tokens(self) -> tuple[str, ...]:
        return self.layout.tokens

    @property
    def modality(self) -> np.ndarray:
        return self.layout.modality

    @property
    def special(self) -> np.ndarray:
        return self.layout.special

    @property
    def patch_rc(self) -> np.ndarray:
        return self.layout.patch_rc

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the first image's grid; (0, 0) without an image."""
        return self.layout.images[0].grid if self.layout.images else (0, 0)

    @property
    def text_index(self) -> np.ndarray:
        """Token indices of the text tokens without special tokens (``[k_text]``)."""
        lay = self.layout
        return np.flatnonzero((lay.modality == TEXT) & ~lay.special & lay.valid)

    @property
    def image_index(self) -> np.ndarray:
        """Token indices of the image patches, in sequence order (``[k_patches]``)."""
        return self.layout.index(ROLE_PATCH)

    @property
    def text(self) -> np.ndarray:
        """float32 ``[k_text]``: relevance of the text tokens, specials left out."""
        return self.values[self.text_index]

    @property
    def image(self) -> np.ndarray:
        """float32 ``[k_patches]``: relevance of the patches in sequence order."""
        return self.values[self.image_index]

    def to_grid(self, image: int = 0) -> np.ndarray:
        """float32 ``[rows, cols]`` of one image's patch relevance; NaN where no patch token exists."""
        return self.layout.to_grid(self.values, image)


def extract_relevancy(
    adapter, image, text: str, answer: str | None = None, keep_matrix: bool = False, image_pass: int = 0,
    block: str | None = None,
) -> Relevancy:
    """Gradient-weighted relevancy (Chefer, Gur & Wolf, ICCV 2021, single-stream rules) of one (image, text) pair.

    Runs one forward and backward pass through ``adapter.attention_gradients``.

    Args:
        adapter: a `ModelAdapter` with a gradient pass.
        image: a PIL image (a pair for NLVR2).
        text: the question or caption.
        answer: the target to explain; None explains the predicted one.
        keep_matrix: also return the full ``[N, N]`` matrix as ``Relevancy.R``.
        image_pass: which image pass to explain for NLVR2.
        block: a self-attention block (default ``adapter.default_block``).

    Returns:
        A `Relevancy` whose ``values`` line up with the block's stream in ``extract_trace(adapter, image, text,
        ...)``, explaining the adapter's default query of the block.

    Raises:
        InputError: an unknown target, a model head with nothing to explain, a cross-attention block, or a block
            whose prediction no single query reads.
    """
    block = block or adapter.default_block
    spec = adapter.block_specs().get(block)
    if spec is None:
        raise InputError(f"{adapter.model_id} has no attention block {block!r}; its blocks: {list(adapter.block_specs())}")
    _need_self_block(block, spec.is_self, spec.query, spec.key, "single-stream gradient relevancy")
    batch = adapter.encode([image], [text])
    padded = adapter.pass_batch(batch, image_pass).streams[spec.query][0]
    keep = np.flatnonzero(padded.valid)
    layout = padded.trimmed()
    query = adapter.default_query(block, layout)
    if query is None:
        raise InputError(f"no single query token of {block!r} explains {adapter.model_id}'s prediction (it reads a "
                         "pooled summary); single-stream relevancy needs one")
    grads = adapter.attention_gradients(batch, answer, blocks=(block,), image_pass=image_pass)
    rel = relevancy_matrix(grads.attentions[block], grads.gradients[block])[np.ix_(keep, keep)]
    values = rel[query].astype(np.float32)
    values[query] = 0.0
    return Relevancy(values=values, answer=grads.label, logit=grads.score, layout=layout, block=block, query=int(query),
                     R=rel.astype(np.float32) if keep_matrix else None)


def _numpy64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _need_attentions(trace: Trace) -> None:
    if trace.attentions is None:
        raise NoAttentionError(
            f"trace {trace.example_id} has no attentions (a summary-only sweep); open the example to extract "
            "its full trace"
        )


def _need_self_block(name: str, is_self: bool, query: str, key: str, method: str) -> None:
    if not is_self:
        raise InputError(
            f"{method} needs a self-attention block (queries and keys the same tokens); {name!r} is a cross-attention "
            f"block ({query} queries over {key} keys), which has no square matrix to propagate through. Pick a "
            "self-attention block, or use the bi-modal rules (vlcore.attribution.bimodal) for a cross block."
        )


def _check_range(name: str, value: int, size: int, negative: bool = False) -> None:
    low = -size if negative else 0
    if not isinstance(value, (int, np.integer)) or not low <= value < size:
        raise InputError(f"{name} must be an integer in [{low}, {size - 1}]; got {value!r}")
