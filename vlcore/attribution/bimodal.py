"""Gradient relevancy through self- and cross-attention: the bi-modal rules of Chefer, Gur & Wolf, "Generic
Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers" (ICCV 2021).

Every stream ``s`` (e.g. ``text`` and ``vision``) has a relevancy map towards every stream ``t``, ``R^{st}``
``[N_s, N_t]``: how much token ``t_j`` contributed to the representation of token ``s_i``. They start as
``R^{ss} = I`` and ``R^{st} = 0`` and are updated layer by layer, in the order the model applies its attention
layers, with ``Ā = E_h[(∇A ⊙ A)^+]`` (the head mean of the gradient-weighted probabilities, clamped at 0; eq. 5):

- a **self-attention** layer of stream ``s`` (eq. 6-7): ``R^{sy} += Ā · R^{sy}`` for every stream ``y``;
- a **cross-attention** layer, queries ``q`` over keys ``k`` (eq. 10-11):
  ``R^{qk} += (R̂^{qq})ᵀ · Ā · R̂^{kk}`` and ``R^{qq} += Ā · R^{kq}``; with more than two streams, also
  ``R^{qy} += Ā · R^{ky}`` for every other ``y`` (the keys bring their own relevancy along; absent in the paper,
  which has two modalities).

``R̂^{xx}`` is the paper's normalisation of a self-relevancy map before it enters a cross rule (eq. 8-9): the
identity (the residual) is taken out, each row of ``R^{xx} - I`` is scaled to sum to 1, and the identity is put
back. A row of ``R^{xx} - I`` that sums to 0 (a token nothing has been mixed into yet) stays 0, so ``R̂`` keeps the
identity row (the reference code divides by zero there).

The explanation of one query token (e.g. the first text token, which an image-text matching head reads) is its
row of ``R^{qs}`` for every stream ``s``: ``R^{text, vision}`` on the image grid is the main map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vlcore.errors import InputError
from vlcore.trace import TokenLayout


def compute_head_mean(attention, gradient) -> np.ndarray:
    """``Ā = mean_h clamp(∇A ⊙ A, min=0)`` (eq. 5).

    Args:
        attention: ``[H, Q, K]`` probabilities (array or tensor).
        gradient: ``[H, Q, K]`` gradient of the explained score with respect to them.

    Returns:
        float64 ``[Q, K]``.

    >>> compute_head_mean(np.ones((2, 1, 2)), np.array([[[1.0, -1.0]], [[3.0, 1.0]]])).tolist()
    [[2.0, 0.5]]
    """
    a, g = _numpy64(attention), _numpy64(gradient)
    return np.maximum(g * a, 0.0).mean(0)


def normalize_self_relevance(relevance: np.ndarray) -> np.ndarray:
    """``R̂ = normalise_rows(R - I) + I`` (eq. 8-9); rows of ``R - I`` summing to 0 stay 0.

    >>> normalize_self_relevance(np.array([[1.5, 0.5], [0.0, 1.0]])).tolist()
    [[1.5, 0.5], [0.0, 1.0]]
    """
    eye = np.eye(relevance.shape[0])
    bar = relevance - eye
    sums = bar.sum(-1, keepdims=True)
    bar = np.divide(bar, sums, out=np.zeros_like(bar), where=sums != 0)
    return bar + eye


def compute_bimodal_relevance(attentions: Mapping[str, Sequence], gradients: Mapping[str, Sequence],
                              streams: Mapping[str, tuple[str, str]],
                              order: Sequence[tuple[str, int]]) -> dict[tuple[str, str], np.ndarray]:
    """Apply the bi-modal rules over the layers in ``order``.

    Args:
        attentions: block name -> per layer ``[H, Q, K]`` probabilities.
        gradients: block name -> per layer ``[H, Q, K]`` gradients of the explained score.
        streams: block name -> ``(query stream, key stream)`` (a self block has the same stream twice).
        order: ``[(block, layer), ...]`` in the order the model applies the layers.

    Returns:
        ``{(s, t): R^{st}}`` float64 ``[N_s, N_t]`` for every ordered pair of streams.

    Raises:
        InputError: an ordered layer with no probabilities, or stream sizes that disagree between blocks.
    """
    sizes = _stream_sizes(attentions, streams)
    relevance = {(s, t): np.eye(n) if s == t else np.zeros((n, sizes[t])) for s, n in sizes.items() for t in sizes}
    for block, layer in order:
        if block not in attentions or not 0 <= layer < len(attentions[block]):
            raise InputError(f"the layer order names {block!r} layer {layer}, which has no probabilities; blocks "
                             f"given: { {b: len(a) for b, a in attentions.items()} }")
        a_bar = compute_head_mean(attentions[block][layer], gradients[block][layer])
        q, k = streams[block]
        if q == k:  # eq. 6-7
            for y in sizes:
                relevance[q, y] = relevance[q, y] + a_bar @ relevance[q, y]
            continue
        update = {(q, k): normalize_self_relevance(relevance[q, q]).T @ a_bar @ normalize_self_relevance(relevance[k, k])}
        for y in sizes:  # eq. 11 for y = q; the keys' relevancy for streams beyond the pair
            if y != k:
                update[q, y] = a_bar @ relevance[k, y]
        for key, delta in update.items():
            relevance[key] = relevance[key] + delta
    return relevance


def _stream_sizes(attentions: Mapping[str, Sequence], streams: Mapping[str, tuple[str, str]]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for block, layers in attentions.items():
        if not len(layers):
            continue
        n_q, n_k = (int(n) for n in layers[0].shape[-2:])
        for stream, n in zip(streams[block], (n_q, n_k)):
            if sizes.setdefault(stream, n) != n:
                raise InputError(f"stream {stream!r} has {sizes[stream]} tokens in one block and {n} in {block!r}")
    return sizes


@dataclass(frozen=True)
class BimodalRelevancy:
    """The relevancy of every token of every stream for one query token.

    Attributes:
        label: the target explained.
        score: its score (a logit, log-odds, log-probability or similarity).
        query_stream: the stream of the explained token.
        query: its index in ``layouts[query_stream]``.
        layouts: each stream's layout, padding trimmed.
        values: stream -> float32 ``[N_stream]``, the query's row of ``R^{query_stream, stream}`` in that stream's
            token order; the query's relevance to itself (1 plus what flowed back) is set to 0.
        matrices: the full ``R^{st}`` maps (trimmed), when asked for.
    """

    label: str
    score: float
    query_stream: str
    query: int
    layouts: dict[str, TokenLayout]
    values: dict[str, np.ndarray]
    matrices: dict[tuple[str, str], np.ndarray] | None = None

    def to_grid(self, stream: str | None = None, image: int = 0) -> np.ndarray:
        """float32 ``[rows, cols]``: the relevance of one image's patches on its grid (NaN where no patch).
        ``stream`` defaults to the first stream holding an image."""
        stream = stream or next(name for name, lay in self.layouts.items() if lay.images)
        return self.layouts[stream].to_grid(self.values[stream], image)


def extract_bimodal_relevancy(adapter, image, text: str, target: str | None = None, query_stream: str | None = None,
                              keep_matrices: bool = False) -> BimodalRelevancy:
    """Gradient relevancy of one (image, text) pair by the bi-modal rules, through ``adapter.attention_gradients``.

    Args:
        adapter: a `ModelAdapter` with a gradient pass; with several blocks it must say in which order the model
            applies them (``block_order(target)`` -> ``[(block, layer), ...]``).
        image: a PIL image.
        text: the question or caption.
        target: what to explain (see ``adapter.target_score``); None: the prediction.
        query_stream: the stream of the token to explain; None: the adapter's main stream. Its query is the
            adapter's ``default_query`` for a block reading that stream.
        keep_matrices: also return every ``R^{st}``.

    Raises:
        InputError: an unknown target or query stream (and what the adapter raises).
        NotImplementedError: the adapter has no gradient pass, or several blocks and no ``block_order``.
    """
    batch = adapter.encode([image], [text])
    specs = adapter.block_specs()
    grads = adapter.attention_gradients(batch, target)
    order = _block_order(adapter, specs, grads.label)
    streams = {name: (spec.query, spec.key) for name, spec in specs.items() if name in grads.attentions}
    full = compute_bimodal_relevance(grads.attentions, grads.gradients, streams, order)
    keep = {name: np.flatnonzero(layouts[0].valid) for name, layouts in batch.streams.items()}
    layouts = {name: layouts[0].trimmed() for name, layouts in batch.streams.items()}
    matrices = {(s, t): r[np.ix_(keep[s], keep[t])] for (s, t), r in full.items()}
    query_stream = query_stream or adapter.main_stream
    if query_stream not in layouts:
        raise InputError(f"no stream {query_stream!r} to explain from; streams: {sorted(layouts)}")
    block = adapter.default_block if specs[adapter.default_block].query == query_stream else \
        next(name for name, spec in specs.items() if spec.query == query_stream)
    query = adapter.default_query(block, layouts[query_stream])
    if query is None:
        raise InputError(f"{adapter.model_id} has no single query token in {query_stream!r} to explain from")
    values = {s: matrices[query_stream, s][query].astype(np.float32) for s in layouts if (query_stream, s) in matrices}
    values[query_stream][query] = 0.0
    return BimodalRelevancy(grads.label, grads.score, query_stream, int(query), layouts, values,
                            matrices if keep_matrices else None)


def _block_order(adapter, specs: Mapping, label: str) -> list[tuple[str, int]]:
    return list(adapter.block_order(label))


def _numpy64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)
