"""Explanations of a prediction as per-token maps: raw attention (more methods build on this)."""

from __future__ import annotations

import numpy as np

from vlcore.trace import Trace


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
