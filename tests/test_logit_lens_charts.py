"""Known answers for the logit-lens charts (`vlcore.charts.logit_lens`), the image-share and sink analysis
(`vlcore.analysis.image_sinks`) and its chart (`vlcore.charts.image_sinks`), on planted inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlcore.analysis.image_sinks import (
    compute_head_sinks,
    compute_image_sink,
    compute_key_share,
    compute_layer_share,
    compute_normalised_entropy,
    compute_row_summaries,
    prompt_summaries,
)
from vlcore.charts.image_sinks import build_image_share_chart, head_summary_frame, image_share_frame
from vlcore.charts.logit_lens import (
    build_image_lens_chart,
    build_lens_prob_chart,
    build_lens_rank_chart,
    image_lens_frame,
    lens_frame,
)
from vlcore.errors import InputError, NoAttentionError
from vlcore.trace import (
    ROLE_GENERATED,
    ROLE_PATCH,
    ROLE_SPECIAL,
    ROLE_TEXT,
    AttentionBlock,
    ImageGrid,
    TokenLayout,
    Trace,
)

# ---------------------------------------------------------------------------------------------------------------
# image share, entropy, sinks
# ---------------------------------------------------------------------------------------------------------------


def test_key_share_is_the_mean_over_rows_of_the_mass_on_the_key_set():
    att = np.zeros((2, 1, 2, 4))
    att[0, 0, 0] = [0.7, 0.1, 0.2, 0.0]  # image keys 0 and 1: 0.8
    att[0, 0, 1] = [0.0, 0.2, 0.3, 0.5]  # 0.2
    att[1, 0, :] = [0.0, 0.0, 0.5, 0.5]  # 0
    share = compute_key_share(att, np.array([True, True, False, False]))
    np.testing.assert_allclose(share, [[0.5], [0.0]])


def test_normalised_entropy_divides_by_the_keys_each_row_sees():
    att = np.zeros((1, 2, 3, 4))
    att[0, 0, 0, 0] = 1.0  # sees one key: left out
    att[0, 0, 1, :2] = 0.5  # uniform over the 2 it sees: 1
    att[0, 0, 2] = [1.0, 0, 0, 0]  # one-hot over 4: 0
    att[0, 1, 0, 0] = 1.0
    att[0, 1, 1, :2] = [1.0, 0.0]  # one-hot: 0
    att[0, 1, 2] = 0.25  # uniform over 4: 1
    entropy = compute_normalised_entropy(att, np.array([1, 2, 4]))
    np.testing.assert_allclose(entropy, [[0.5, 0.5]])
    # without the counts every row is divided by log 4: row 1's uniform-over-2 is log 2 / log 4
    np.testing.assert_allclose(compute_normalised_entropy(att)[0, 0], (0 + 0.5 + 0) / 3)
    assert np.isnan(compute_normalised_entropy(att[:, :, :1], np.array([1]))).all()


def test_sink_is_the_first_layer_from_which_the_share_stays_below_the_cutoff():
    share = [0.5, 0.3, 0.2, 0.03, 0.05, 0.01, 0.02]  # early level 0.4, cutoff 0.04; layer 4 is back above
    sink = compute_image_sink(share, 0.1)
    assert sink.layer == 5 and sink.reference == pytest.approx(0.4) and sink.cutoff == pytest.approx(0.04)
    assert compute_image_sink(share, 0.2).layer == 3  # cutoff 0.08: below from layer 3 for good
    assert compute_image_sink(share, 0.01).layer is None  # cutoff 0.004: never below
    assert compute_image_sink([0.5, 0.3, 0.2, 0.01, 0.3], 0.1).layer is None  # recovers in the last layer


def test_sink_at_exactly_the_cutoff_is_not_below_it():
    assert compute_image_sink([0.5, 0.5, 0.05, 0.01], 0.1).layer == 3
    assert compute_image_sink([0.5, 0.5, 0.0499, 0.01], 0.1).layer == 2


def test_sink_reads_layer_numbers_and_skips_missing_layers():
    # layers 1, 3, 5 captured (layer 0 absent: the early level is layer 1's); layer 3 NaN is skipped
    sink = compute_image_sink([0.6, np.nan, 0.01], 0.1, layers=[1, 3, 5])
    assert sink.layer == 5 and sink.reference == pytest.approx(0.6)
    sink = compute_image_sink([0.6, 0.02, 0.01], 0.1, layers=[4, 6, 8])  # no early layer: the first present
    assert sink.layer == 6 and sink.reference == pytest.approx(0.6)
    assert compute_image_sink([np.nan, np.nan], 0.1).layer is None


def test_zero_early_share_has_no_sink():
    sink = compute_image_sink([0.0, 0.0, 0.0], 0.5)
    assert sink.layer is None and sink.cutoff == 0.0


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, float("nan")])
def test_a_threshold_outside_0_1_is_a_one_line_input_error(threshold):
    with pytest.raises(InputError, match=r"in \(0, 1\]"):
        compute_image_sink([0.5, 0.4], threshold)


def test_head_sinks_are_per_column_and_layer_share_is_the_mean_over_heads():
    share = np.array([[0.6, 0.2], [0.4, 0.2], [0.01, 0.3], [0.02, 0.01]])
    sinks = compute_head_sinks(share, 0.1)
    assert [s.layer for s in sinks] == [2, 3] and sinks[1].reference == pytest.approx(0.2)
    np.testing.assert_allclose(compute_layer_share(share), [0.4, 0.3, 0.155, 0.015])
    with pytest.raises(InputError):
        compute_head_sinks(share[:, 0])


def _generation_trace(att: np.ndarray) -> Trace:
    """A hand-built generative trace: ``lm`` = [bos, 4 patches (2 x 2), 'q', g0], ``generated`` = [g0, g1]; the
    block ``lm.generated`` is ``att`` ``[L, H, 2, 7]`` (row t sees 6 + t keys)."""
    grid = ImageGrid.regular(np.zeros((4, 4, 3), np.uint8), (2, 2), 2)
    roles = [ROLE_SPECIAL, *[ROLE_PATCH] * 4, ROLE_TEXT, ROLE_GENERATED]
    cells = [(-1, -1), (0, 0), (0, 1), (1, 0), (1, 1), (-1, -1), (-1, -1)]
    lm = TokenLayout.build(["<s>", "p", "p", "p", "p", "q", "g0"], roles, [-1, 0, 0, 0, 0, -1, -1], cells, (grid,))
    gen = TokenLayout.build(["g0", "g1"], [ROLE_GENERATED] * 2)
    block = AttentionBlock(att.astype(np.float16), "generated", "lm", np.array([6, 7], np.int32))
    return Trace("ex", "m", {"lm": lm, "generated": gen}, {"lm.generated": block}, {"lm": None, "generated": None},
                 "lm.generated")


def test_row_summaries_of_a_planted_generation_block():
    att = np.zeros((2, 1, 2, 7))
    att[0, 0, 0, 1:5] = 0.25  # layer 0: row 0 all on the 4 patches (share 1, entropy log 4 / log 6)
    att[0, 0, 1, :] = 1 / 7  # row 1 uniform over its 7 keys: share 4/7, entropy 1
    att[1, 0, :, 0] = 1.0  # layer 1: all on <s>: share 0, entropy 0
    table = compute_row_summaries(_generation_trace(att))
    assert table.layers == (0, 1) and table.rows == 2
    np.testing.assert_allclose(table.image_share, [[(1 + 4 / 7) / 2], [0.0]], rtol=1e-3)
    np.testing.assert_allclose(table.entropy, [[(np.log(4) / np.log(6) + 1) / 2], [0.0]], rtol=1e-3)
    with pytest.raises(NoAttentionError, match="lm.other"):
        compute_row_summaries(_generation_trace(att), "lm.other")


def test_prompt_summaries_read_the_meta_table():
    meta = {"prompt_head_summaries": {"layers": [0, 2], "entropy": [[0.9, 0.8], [0.7, 0.6]],
                                      "image_share": [[0.5, 0.4], [0.05, 0.02]], "rows": 12}}
    table = prompt_summaries(meta)
    assert table.layers == (0, 2) and table.rows == 12
    np.testing.assert_allclose(table.image_share, [[0.5, 0.4], [0.05, 0.02]])
    assert prompt_summaries({}) is None


def test_head_summary_frame_and_share_chart_place_the_sink_rules():
    frame = head_summary_frame(np.array([[0.1, 0.2], [0.3, 0.4]]), "image_share", [0, 3])
    assert frame[["layer", "head"]].values.tolist() == [[0, 0], [0, 1], [3, 0], [3, 1]]
    np.testing.assert_allclose(frame["mean"], [0.1, 0.2, 0.3, 0.4])
    share = np.array([0.6, 0.4, 0.01])
    sink = compute_image_sink(share, 0.1)
    data = image_share_frame({"generated": ([0, 1, 2], share)})
    spec = build_image_share_chart(data, sink, "generated").to_dict()
    rules = [layer for layer in spec["layer"] if layer["mark"]["type"] == "rule"]
    values = [spec["datasets"][layer["data"]["name"]][0] for layer in rules]
    assert values[0]["cutoff"] == pytest.approx(0.05) and values[1]["sink_layer"] == 2
    assert len(build_image_share_chart(data, compute_image_sink([0.6, 0.5, 0.4])).to_dict()["layer"]) == 2

# ---------------------------------------------------------------------------------------------------------------
# logit lens
# ---------------------------------------------------------------------------------------------------------------


def _lens() -> dict:
    """Two lens layers x three steps; step 2 is past the answer (rank -1)."""
    return {
        "top_tokens": [[["a", "b", "c", "d", "e"], ["x", "y", "z", "w", "v"], ["a"] * 5],
                       [["b", "a", "c", "d", "e"], ["y", "x", "z", "w", "v"], ["a"] * 5]],
        "top_probs": [[[0.4, 0.3, 0.1, 0.1, 0.05], [0.5, 0.2, 0.1, 0.1, 0.05], [0.2] * 5],
                      [[0.6, 0.2, 0.1, 0.05, 0.05], [0.9, 0.05, 0.01, 0.01, 0.01], [0.2] * 5]],
        "rank": [[1, 9, -1], [0, 0, -1]],
        "prob": [[0.3, 0.001, float("nan")], [0.6, 0.9, float("nan")]],
        "image_positions": [1, 2, 3, -1],
        "image_top_tokens": [[["cat", "dog", "a"], ["sky", "b", "c"], ["red", "x", "y"], ["z", "z", "z"]],
                             [["tree", "a", "b"], ["sun", "b", "c"], ["blue", "x", "y"], ["z", "z", "z"]]],
    }


def test_lens_frame_has_one_row_per_layer_and_answered_step():
    frame = lens_frame(_lens(), ("b", "y", "end"))
    assert len(frame) == 4  # step 2 (rank -1) left out
    row = frame[(frame["layer"] == 0) & (frame["step"] == 1)].iloc[0]
    assert row["rank"] == 9 and row["rank1"] == 10 and row["prob"] == pytest.approx(0.001)
    assert row["label"] == "1: y" and row["top1"] == "x" and row["layer_name"] == "embeddings"
    assert row["top"] == "x 0.500 · y 0.200 · z 0.100 · w 0.100 · v 0.050"


def test_rank_chart_is_a_log_scaled_layer_by_token_grid_with_the_top_5_in_the_tooltip():
    frame = lens_frame(_lens(), ("b", "y", "end"))
    spec = build_lens_rank_chart(frame).to_dict()
    color = spec["encoding"]["color"]
    assert color["field"] == "rank1" and color["scale"]["type"] == "log" and color["scale"]["domain"] == [1, 10]
    assert spec["encoding"]["x"]["sort"] == ["0: b", "1: y"] and spec["encoding"]["y"]["field"] == "layer"
    assert "top" in [t["field"] for t in spec["encoding"]["tooltip"]]
    data = spec["datasets"][spec["data"]["name"]]
    assert sorted((d["layer"], d["step"], d["rank"]) for d in data) == [(0, 0, 1), (0, 1, 9), (1, 0, 0), (1, 1, 0)]
    prob = build_lens_prob_chart(frame).to_dict()
    assert prob["mark"]["type"] == "line" and prob["encoding"]["y"]["field"] == "prob"


def test_image_lens_frame_writes_each_tokens_word_on_its_cell():
    grid = ImageGrid.regular(np.zeros((8, 12, 3), np.uint8), (2, 3), 4)  # non-square: 2 rows x 3 cols of 4 px
    roles = [ROLE_SPECIAL, ROLE_PATCH, ROLE_PATCH, ROLE_PATCH, ROLE_TEXT]
    layout = TokenLayout.build(["<s>", "p", "p", "p", "q"], roles, [-1, 0, 0, 0, -1],
                               [(-1, -1), (1, 2), (0, 0), (0, 1), (-1, -1)], (grid,))
    frame = image_lens_frame(layout, _lens(), 1)
    assert frame[["token", "row", "col", "word"]].values.tolist() == [[1, 1, 2, "tree"], [2, 0, 0, "sun"],
                                                                      [3, 0, 1, "blue"]]
    first = frame.iloc[0]
    assert (first["x"], first["x2"], first["y"], first["y2"], first["xc"], first["yc"]) == (8, 12, 4, 8, 10, 6)
    assert first["top"] == "tree · a · b"
    assert image_lens_frame(layout, _lens(), 0)["word"].tolist() == ["cat", "sky", "red"]
    spec = build_image_lens_chart(layout, frame).to_dict()
    marks = [layer["mark"]["type"] for layer in spec["layer"]]
    assert marks == ["image", "rect", "text"]
    text = spec["layer"][2]
    assert text["encoding"]["text"]["field"] == "word" and text["encoding"]["x"]["field"] == "xc"
    assert spec["height"] == 320 and spec["width"] == 480  # the image's 2:3 aspect
    json.dumps(spec)  # serialisable
