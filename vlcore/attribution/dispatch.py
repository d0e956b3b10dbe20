"""Gradient relevancy of one attention block, by the rule that fits the block: one entry point for pages and
the notebook.

- a cross block (e.g. ``text.cross``, text queries over image keys): the bi-modal rules
  (`vlcore.attribution.bimodal`), the query stream's default token over the key stream (the image);
- a self block whose model reads a query row (a [CLS] or image-CLS token): the single-stream rule
  (`vlcore.attribution.relevance`);
- a self block whose head pools every token (an attention-pooled image tower): through its pooling block
  (`vlcore.attribution.towers`);
- a generative model's generated tokens (``lm.generated``): the single-stream rule through the decoder's whole
  causal self-attention (`extract_generation_relevancy`).
"""

from __future__ import annotations

import numpy as np

from vlcore.models.base import ModelAdapter


def extract_block_relevancy(adapter: ModelAdapter, image, text: str, target: str | None = None,
                            block: str | None = None) -> np.ndarray:
    """float32 relevancy values of ``block`` (default: the adapter's default block) for ``target``.

    Returns:
        One value per token of the stream the map lies on: the block's keys for a cross block (``[K]``), its
        tokens for a self block (``[N]``), in the order of `vlcore.run.extract.extract_trace`.

    Raises:
        InputError: an unknown target, or a model with nothing to explain.
        NotImplementedError: the adapter has no gradient pass.
    """
    block = block or adapter.default_block
    spec = adapter.block_specs()[block]
    if adapter.generates and block == adapter.default_block:
        return extract_generation_relevancy(adapter, image, text, target)[0]
    if not spec.is_self:
        from vlcore.attribution.bimodal import extract_bimodal_relevancy

        return extract_bimodal_relevancy(adapter, image, text, target, query_stream=spec.query).values[spec.key]
    layout = adapter.encode([image], [text]).streams[spec.query][0].trimmed()
    if adapter.default_query(block, layout) is None:
        from vlcore.attribution.towers import extract_tower_relevancy

        return extract_tower_relevancy(adapter, image, text, target).maps[spec.query].values
    from vlcore.attribution.relevance import extract_relevancy

    return extract_relevancy(adapter, image, text, target, block=block).values


def extract_generation_relevancy(adapter: ModelAdapter, image, text: str, target: str | None = None) -> np.ndarray:
    """Gradient relevancy of a generative model's answer (Chefer et al. 2021, the self-attention rule
    ``R ← I; R ← R + Ā_l R`` with ``Ā_l = mean_h (∇A_l ⊙ A_l)^+``) through its decoder's whole causal
    self-attention, from one eager pass with grad (`GenerativeAdapter.attention_gradients` of ``lm.full``); the
    explained score is the summed log-probability of the answer's tokens (`target_score`).

    Returns:
        float32 ``[T, K]``: for each generating step (the rows of ``lm.generated``), its row of ``R - I`` over
        the decoder's tokens in trace order (the identity, a token's relevance to itself, left out so that the
        map shows what it read).

    Raises:
        InputError: an empty target.
        NotImplementedError: the adapter has no gradient pass.
    """
    from vlcore.attribution.relevance import relevancy_matrix
    from vlcore.models.generative import LM_FULL

    batch = adapter.encode([image], [text])
    grads = adapter.attention_gradients(batch, target, blocks=(LM_FULL,))
    rel = relevancy_matrix(grads.attentions[LM_FULL], grads.gradients[LM_FULL])
    rel -= np.eye(rel.shape[0])
    key = adapter.block_specs()[adapter.default_block].key
    layout = batch.streams[key][0]
    rows = rel[adapter.generated_query_positions(layout)]
    return rows[:, np.flatnonzero(layout.valid)].astype(np.float32)
