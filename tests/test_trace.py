"""Trace helpers: token masks, blocks and grid placement on a hand-built trace."""

from __future__ import annotations

import numpy as np
import pytest

from vlcore.trace import BLOCKS, Trace


def hand_trace(n_layers: int = 1, n_heads: int = 2) -> Trace:
    # [CLS] a b [SEP] | [IMG] p(0,0) p(0,1) p(0,2) p(1,0) p(1,1) p(1,2)   (2x3 grid)
    tokens = ("[CLS]", "a", "b", "[SEP]", "[IMG]") + tuple(f"p{i}" for i in range(6))
    n = len(tokens)
    modality = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1], dtype=np.int8)
    special = np.array([1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    rc = np.full((n, 2), -1, dtype=np.int16)
    rc[5:] = [(r, c) for r in range(2) for c in range(3)]
    rng = np.random.default_rng(0)
    att = rng.random((n_layers, n_heads, n, n)).astype(np.float32)
    att /= att.sum(-1, keepdims=True)
    return Trace.from_arrays("ex", "m", tokens, modality, special, rc, (2, 3), np.zeros((16, 24, 3), np.uint8), 8,
                 att.astype(np.float16), None)


def test_modality_indices_exclude_special_by_default():
    t = hand_trace()
    assert t.text_index().tolist() == [1, 2]
    assert t.text_index(include_special=True).tolist() == [0, 1, 2, 3]
    assert t.image_index().tolist() == [5, 6, 7, 8, 9, 10]
    assert t.image_index(include_special=True).tolist() == [4, 5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize("block", BLOCKS)
def test_block_rows_are_queries_cols_are_keys(block):
    t = hand_trace()
    rows, cols = t.block_index(block)
    expect = {"txt": [1, 2], "img": [5, 6, 7, 8, 9, 10]}
    assert rows.tolist() == expect[block[:3]] and cols.tolist() == expect[block[4:]]
    sub = t.block_attention(0, 1, block)
    full = t.attentions[0, 1].astype(np.float32)
    assert np.array_equal(sub, full[np.ix_(rows, cols)])


def test_mean_over_heads_and_read_only():
    t = hand_trace()
    assert np.allclose(t.head_attention(0, None), t.attentions[0].astype(np.float32).mean(0))
    with pytest.raises(ValueError):
        t.attentions[0, 0, 0, 0] = 1.0


def test_to_grid_places_values_by_row_and_col():
    t = hand_trace()
    values = np.arange(t.n_tokens, dtype=np.float32)
    grid = t.to_grid(values)
    assert grid.shape == (2, 3)
    assert grid[1, 2] == 10 and grid[0, 1] == 6 and grid[1, 0] == 8


def test_unknown_block_is_rejected():
    with pytest.raises(ValueError, match="block must be one of"):
        hand_trace().block_index("img2cat")


def test_a_pair_score_is_never_marked_correct_or_incorrect():
    base = Trace.from_arrays("ex", "m", ("[CLS]", "a", "[SEP]"), np.zeros(3, np.int8), np.array([1, 0, 1], bool),
                             np.full((3, 2), -1, np.int16), (0, 0), np.zeros((0, 0, 3), np.uint8), 8, None, None,
                             prediction=(("match", 0.9),), gold=("circle",))
    assert base.correct is False  # an answer that is not the gold one
    pair = Trace.from_arrays("ex", "m", base.tokens, base.modality, base.special, base.patch_rc, (0, 0),
                             np.zeros((0, 0, 3), np.uint8), 8, None, None, prediction=(("match", 0.9),),
                             gold=("circle",), meta={"answers_compare": False})
    assert pair.correct is None
