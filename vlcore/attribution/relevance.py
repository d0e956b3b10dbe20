"""Explanations of a prediction as per-token maps: raw attention, attention rollout, gradient relevancy.

Every map is a float32 ``[N]`` vector in the token order of a `Trace` of the same inputs
(``[text (CLS first, SEP last) | image CLS | patches row-major]``), so one overlay and one text
colouring render all three:

- **Raw attention** (`compute_raw_map`): the query's row of one layer's attention, one head or the
  mean over heads.
- **Attention rollout** (Abnar & Zuidema, 2020; `compute_rollout`): per layer
  ``Â_l = normalise_rows(mean_h A_l + I)``, then ``R = Â_{L-1} ··· Â_{s+1} Â_s`` from the start layer
  ``s`` to the last; the map is the query's row of ``R``.
- **Gradient-weighted relevancy** (Chefer, Gur & Wolf, ICCV 2021, single-stream rules;
  `extract_relevancy`): per layer ``Ā_l = mean_h clamp(∇A_l ⊙ A_l, min=0)`` with ``∇A_l`` the gradient
  of the explained answer's logit, ``R ← I`` then ``R ← R + Ā_l · R`` for ``l = 0 … L-1``; the map is
  the [CLS] row ``R[0]`` with ``R[0, 0]`` (the [CLS] token itself) set to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlcore.errors import InputError, NoAttentionError
from vlcore.trace import IMAGE, TEXT, Trace


def compute_raw_attention(trace: Trace, layer: int = -1, head: int | None = None, query: int = 0) -> np.ndarray:
    """One query's attention row: float32 ``[N]``.

    Args:
        trace: a trace with attentions.
        layer: layer index (negative counts from the end).
        head: head index, or None for the mean over heads.
        query: query token index; 0 is the text [CLS].
    """
    layer = layer % trace.n_layers
    return trace.head_attention(layer, head)[query]


def compute_raw_map(trace: Trace, layer: int = -1, head: int | None = None, query: int = 0) -> np.ndarray:
    """Raw attention as a map: the query's attention row, float32 ``[N]`` in trace order.

    Same as `compute_raw_attention`, with its inputs checked.

    Raises:
        NoAttentionError: the trace has no attentions.
        InputError: the layer, head or query is out of range.
    """
    _need_attentions(trace)
    _check_range("layer", layer, trace.n_layers, negative=True)
    if head is not None:
        _check_range("head", head, trace.n_heads)
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
        InputError: ``start_layer`` out of range.
    """
    _need_attentions(trace)
    _check_range("start_layer", start_layer, trace.n_layers, negative=True)
    return rollout_matrices(trace.attentions, start_layer % trace.n_layers).astype(np.float32)


def compute_rollout_map(trace: Trace, start_layer: int = 0, query: int = 0) -> np.ndarray:
    """The query's row of the rollout: float32 ``[N]`` in trace order (sums to 1)."""
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
        a_bar = np.clip(grad * att, 0.0, None).mean(0)
        rel = np.eye(att.shape[-1]) if rel is None else rel
        rel = rel + a_bar @ rel
    if rel is None:
        raise InputError("relevancy needs at least one layer of attentions and gradients; got none")
    return rel


@dataclass(frozen=True, eq=False)
class Relevancy:
    """Gradient-weighted relevancy of one (image, text) pair for one answer.

    Attributes:
        values: float32 ``[N]``, the [CLS] row of ``R`` in the token order of `extract_trace` for the same
            inputs (padding dropped). ``values[0]`` ([CLS] itself) is 0; the [SEP] and the image CLS keep
            their relevance (they are tokens the answer can depend on; views below leave them out).
        answer: the label explained (``"match"`` for an image-text-matching head).
        logit: the explained answer's logit.
        tokens: ``N`` token strings.
        modality: int8 ``[N]``; 0 text, 1 image.
        special: bool ``[N]``; [CLS], [SEP], image CLS.
        patch_rc: int16 ``[N, 2]``; (row, col) of patches, -1 elsewhere.
        grid: (rows, cols) of the patch grid.
        R: float32 ``[N, N]`` full relevancy matrix (rows queries) when asked for, else None.
    """

    values: np.ndarray
    answer: str
    logit: float
    tokens: tuple[str, ...]
    modality: np.ndarray
    special: np.ndarray
    patch_rc: np.ndarray
    grid: tuple[int, int]
    R: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("values", "modality", "special", "patch_rc", "R"):
            arr = getattr(self, name)
            if isinstance(arr, np.ndarray):
                arr.setflags(write=False)

    @property
    def text_index(self) -> np.ndarray:
        """Token indices of the text tokens without [CLS]/[SEP] (``[k_text]``)."""
        return np.flatnonzero((self.modality == TEXT) & ~self.special)

    @property
    def image_index(self) -> np.ndarray:
        """Token indices of the patches, row-major (``[k_patches]``)."""
        return np.flatnonzero((self.modality == IMAGE) & (self.patch_rc[:, 0] >= 0))

    @property
    def text(self) -> np.ndarray:
        """float32 ``[k_text]``: relevance of the text tokens, specials left out."""
        return self.values[self.text_index]

    @property
    def image(self) -> np.ndarray:
        """float32 ``[k_patches]``: relevance of the patches in row-major order."""
        return self.values[self.image_index]

    def to_grid(self) -> np.ndarray:
        """float32 ``[rows, cols]`` of patch relevance; NaN where no patch token exists."""
        grid = np.full(self.grid, np.nan, dtype=np.float32)
        idx = self.image_index
        rc = self.patch_rc[idx]
        grid[rc[:, 0], rc[:, 1]] = self.values[idx]
        return grid


def extract_relevancy(
    adapter, image, text: str, answer: str | None = None, keep_matrix: bool = False, image_pass: int = 0
) -> Relevancy:
    """Gradient-weighted relevancy (Chefer, Gur & Wolf, ICCV 2021) of one (image, text) pair.

    Runs one forward and backward pass through ``adapter.attention_gradients``.

    Args:
        adapter: a `ModelAdapter` with a gradient pass (ViLT VQA, ITM or NLVR2 heads).
        image: a PIL image (a pair for NLVR2).
        text: the question or caption.
        answer: the label to explain; None explains the predicted one.
        keep_matrix: also return the full ``[N, N]`` matrix as ``Relevancy.R``.
        image_pass: which image pass to explain for NLVR2.

    Returns:
        A `Relevancy` whose ``values`` line up with ``extract_trace(adapter, image, text, ...)``.

    Raises:
        InputError: an unknown answer, or a model head with no answer logit.
    """
    batch = adapter.encode([image], [text])
    padded = adapter.pass_batch(batch, image_pass).layouts[0]
    keep = np.flatnonzero(padded.valid)
    layout = padded.trimmed()
    block = adapter.default_block
    grads = adapter.attention_gradients(batch, answer, blocks=(block,), image_pass=image_pass)
    rel = relevancy_matrix(grads.attentions[block], grads.gradients[block])[np.ix_(keep, keep)]
    query = adapter.default_query(block, layout)
    values = rel[query].astype(np.float32)
    values[query] = 0.0
    return Relevancy(
        values=values,
        answer=grads.label,
        logit=grads.score,
        tokens=layout.tokens,
        modality=layout.modality,
        special=layout.special,
        patch_rc=layout.patch_rc,
        grid=layout.images[0].grid,
        R=rel.astype(np.float32) if keep_matrix else None,
    )


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


def _check_range(name: str, value: int, size: int, negative: bool = False) -> None:
    low = -size if negative else 0
    if not isinstance(value, (int, np.integer)) or not low <= value < size:
        raise InputError(f"{name} must be an integer in [{low}, {size - 1}]; got {value!r}")
