"""Probing (issue 18): planted signals for both probes, honest baselines, masks on real easy-VQA images, probe
sweeps against extracted traces, VCR boxes and grounding words."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.conftest import TINY_WORDS, make_tiny_adapter
from vlcore.analysis.probe_labels import (
    compute_box_mask,
    compute_cover_grid,
    compute_mask_shape,
    easy_vqa_image_labels,
    parse_easy_vqa_facts,
)
from vlcore.analysis.probing import (
    ProbingError,
    _ridge_fold_accuracy,
    attention_inputs,
    compute_attention_probe,
    compute_control_labels,
    compute_layer_probes,
    rank_heads,
    representation_inputs,
    split_by_example,
    word_patch_share,
)
from vlcore.analysis.projection import TokenSet, _tokens_frame

COLOURS = {"black": (0, 0, 0), "gray": (128, 128, 128), "red": (255, 0, 0), "green": (0, 255, 0),
           "blue": (0, 0, 255), "yellow": (255, 255, 0), "teal": (0, 128, 128), "brown": (165, 42, 42)}


def planted_vectors(n_examples=300, per_example=3, layers=6, width=16, layer=3, classes=3, seed=0):
    """Token vectors in which only ``layer`` carries an example-level label linearly; the others are noise."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, n_examples)
    groups = np.repeat(np.arange(n_examples), per_example)
    vectors = rng.standard_normal((layers, len(groups), width)).astype(np.float32)
    directions = rng.standard_normal((classes, width)) * 2.0
    vectors[layer] += directions[label[groups]]
    return vectors, np.array([f"c{v}" for v in label[groups]]), groups.astype(str)


# -- representation probes --------------------------------------------------------------------------


def test_a_label_planted_in_layer_3_peaks_at_layer_3_and_the_control_stays_at_chance():
    vectors, labels, groups = planted_vectors()
    result = compute_layer_probes(vectors, labels, groups, folds=5)
    assert result["layer"].tolist() == list(range(6))
    assert int(result.loc[result["accuracy"].idxmax(), "layer"]) == 3
    assert result.loc[3, "accuracy"] > 0.95
    assert (result.drop(index=3)["accuracy"] < 0.5).all()  # chance is 1/3
    assert (result["control"] < 0.45).all() and (result["control"] > 0.2).all()
    assert result.loc[3, "selectivity"] > 0.5
    assert result["majority"].between(0.28, 0.42).all()
    assert (result["n_units"] == 300).all() and (result["n_classes"] == 3).all()


def test_one_hold_out_split_finds_the_same_layer():
    vectors, labels, groups = planted_vectors(seed=1)
    result = compute_layer_probes(vectors, labels, groups, folds=1)
    assert int(result.loc[result["accuracy"].idxmax(), "layer"]) == 3
    assert (result["n_test"] == 3 * 75).all()  # a quarter of the 300 examples, all their tokens


def test_one_blas_thread_gives_the_same_probe_and_restores_the_thread_count():
    from threadpoolctl import threadpool_info

    vectors, labels, groups = planted_vectors(n_examples=90, seed=6)
    compute_layer_probes(vectors, labels, groups, folds=3)  # loads every library the fit uses
    before = {p["filepath"]: p["num_threads"] for p in threadpool_info()}
    one = compute_layer_probes(vectors, labels, groups, folds=3, blas_threads=1)
    assert {p["filepath"]: p["num_threads"] for p in threadpool_info()} == before
    own = compute_layer_probes(vectors, labels, groups, folds=3, blas_threads=None)
    pd.testing.assert_frame_equal(one, own, atol=1e-6)


def test_the_closed_form_probe_predicts_as_sklearns_ridge_classifier():
    from sklearn.linear_model import RidgeClassifier

    vectors, labels, groups = planted_vectors(n_examples=120, width=8, seed=2)
    y = pd.factorize(labels)[0]
    fold = split_by_example(groups, 4)
    mine = _ridge_fold_accuracy(vectors[3], [y], fold, [0, 1, 2, 3], alpha=0.5)[0]
    for f in range(4):
        train = vectors[3][fold != f].astype(np.float64)
        centred = train - train.mean(0)
        alpha = 0.5 * np.trace(centred.T @ centred) / train.shape[1]  # the relative penalty, made absolute
        ref = RidgeClassifier(alpha=alpha).fit(train, y[fold != f]).score(vectors[3][fold == f], y[fold == f])
        assert mine[f] == pytest.approx(ref)


@pytest.mark.parametrize("folds", [1, 3, 5])
def test_no_example_lands_on_both_sides_of_a_split(folds):
    groups = np.repeat([f"ex{i}" for i in range(40)], np.arange(40) % 4 + 1)
    fold = split_by_example(groups, folds, seed=3)
    per_example = pd.Series(fold).groupby(groups).nunique()
    assert (per_example == 1).all()
    assert len(np.unique(fold)) == max(folds, 2)


def test_too_few_examples_or_one_class_is_a_clear_error():
    vectors, labels, groups = planted_vectors(n_examples=4)
    with pytest.raises(ProbingError, match="at least 5 examples"):
        compute_layer_probes(vectors, labels, groups, folds=5)
    with pytest.raises(ProbingError, match="at least two"):
        compute_layer_probes(vectors, np.full(len(labels), "same"), groups)


def test_the_control_moves_whole_examples_and_keeps_each_positions_labels():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(50), 4)
    keys = np.tile(["0,0", "0,1", "1,0", "1,1"], 50)
    labels = rng.integers(0, 2, len(groups)).astype(str)
    control = compute_control_labels(labels, groups, keys, seed=4)
    for key in np.unique(keys):  # every example has every position: each position's labels are permuted
        assert sorted(control[keys == key]) == sorted(labels[keys == key])
    per_example = pd.DataFrame({"g": groups, "l": labels, "c": control}).groupby("g").agg("".join)
    assert set(per_example["c"]) <= set(per_example["l"])  # each example's labels, in order, come from one example
    short = compute_control_labels(labels[:-1], groups[:-1], keys[:-1], seed=4)  # the last example lacks (1,1)
    assert len(short) == len(labels) - 1 and set(short[keys[:-1] == "1,1"]) <= set(labels[keys == "1,1"])
    example_labels = compute_control_labels(np.arange(30).astype(str), np.arange(30), seed=5)
    assert sorted(example_labels) == sorted(np.arange(30).astype(str))
    assert not (example_labels == np.arange(30).astype(str)).any()  # no example keeps its own label


# -- attention probes -------------------------------------------------------------------------------


def planted_pairs(n_examples=150, patches=16, layers=3, heads=4, head=(2, 1), seed=0):
    """Word–patch attention in which only one head attends more to the patches inside the word's region."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_examples), patches).astype(str)
    inside = rng.random(len(groups)) < 0.3
    feats = rng.dirichlet(np.ones(patches), size=(n_examples, layers, heads)).transpose(0, 3, 1, 2)
    feats = feats.reshape(-1, layers, heads).astype(np.float32)
    feats[:, head[0], head[1]] += np.where(inside, 0.3, 0.0)
    keys = np.tile([f"{r},{c}" for r in range(4) for c in range(4)], n_examples)
    return feats, inside, groups, keys


def test_an_attention_probe_recovers_the_planted_grounding_head():
    feats, inside, groups, keys = planted_pairs()
    probe = compute_attention_probe(feats, inside, groups, keys, folds=3)
    assert np.unravel_index(np.argmax(probe.weights), probe.weights.shape) == (2, 1)
    s = probe.summary.iloc[0]
    assert s["accuracy"] > 0.97 and s["auc"] > 0.99
    assert s["control"] <= s["majority"] + 0.03 and 0.4 < s["control_auc"] < 0.6
    assert s["selectivity"] > 0.2 and s["n_pairs"] == len(inside) and s["n_units"] == 150
    table, agreement = rank_heads(probe.weights, {"share": word_patch_share(feats, groups)})
    assert tuple(table.loc[0, ["layer", "head"]]) == (2, 1)
    assert table.loc[0, "share_rank"] == 1  # the planted head also has the largest share
    assert agreement.loc[0, "share"] == "share" and -1 <= agreement.loc[0, "spearman"] <= 1


def test_an_attention_probe_needs_both_labels():
    feats, inside, groups, keys = planted_pairs(n_examples=10)
    with pytest.raises(ProbingError, match="outside"):
        compute_attention_probe(feats, np.zeros(len(inside), bool), groups, keys)


def test_rank_agreement_matches_scipy_and_is_one_for_the_same_order():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    w, share = rng.standard_normal((4, 3)), rng.random((4, 3))
    table, agreement = rank_heads(w, {"same": w * 2 + 1, "other": share})
    assert agreement.set_index("share").loc["same", "spearman"] == pytest.approx(1.0)
    assert agreement.set_index("share").loc["other", "spearman"] == pytest.approx(spearmanr(w.ravel(), share.ravel())[0])
    assert (table["weight_rank"] == table["same_rank"]).all() and table["weight_rank"].tolist() == list(range(1, 13))


# -- labels on real easy-VQA images --------------------------------------------------------------------


def test_questions_reveal_the_shape_and_colour():
    assert parse_easy_vqa_facts("what is the red shape?", "circle") == {"shape": "circle", "color": "red"}
    assert parse_easy_vqa_facts("does the image not contain a triangle?", "no") == {"shape": "triangle"}
    assert parse_easy_vqa_facts("is no green shape present?", "no") == {"color": "green"}
    assert parse_easy_vqa_facts("is there a rectangle in the image?", "no") == {}
    labels = easy_vqa_image_labels("test")
    assert labels[0] == {"shape": "triangle", "color": "red"} and labels[1]["shape"] == "rectangle"


def test_shape_masks_match_the_shapes_easy_vqa_drew():
    """The generator (vzhou842/easy-VQA gen_data/images.py) draws one shape of a named colour, 8–32 px at 64 px,
    on a light background: the mask's most frequent colour is exactly the named colour, its bounding box is in the
    drawn size range, and how much of that box it fills names the shape."""
    import easy_vqa
    from PIL import Image

    from vlcore.data.easy_vqa import compute_shape_mask

    paths, labels = easy_vqa.get_test_image_paths(), easy_vqa_image_labels("test")
    shapes, colours = [], []
    for image_id in range(300):
        image = np.asarray(Image.open(paths[image_id]).convert("RGB"))
        mask = compute_shape_mask(image)
        known = labels[image_id]
        if "color" in known:
            values, counts = np.unique(image[mask], axis=0, return_counts=True)
            colours.append(tuple(int(v) for v in values[counts.argmax()]) == COLOURS[known["color"]])
        if "shape" in known:
            ys, xs = np.nonzero(mask)
            assert 7 <= max(np.ptp(ys), np.ptp(xs)) + 1 <= 34, image_id
            shapes.append(compute_mask_shape(mask) == known["shape"])
    assert all(colours) and len(colours) > 250
    assert np.mean(shapes) >= 0.98 and len(shapes) > 250  # misses: a few triangles of 8 px, rounded by the blur


def test_box_masks_and_patch_cover():
    mask = compute_box_mask((8, 12), [(2, 0, 6, 4)])
    assert mask.sum() == 16 and mask[:4, 2:6].all()
    cover = compute_cover_grid(mask, (2, 3), 4)
    assert cover.tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ProbingError, match="patch grid"):
        compute_cover_grid(mask, (3, 3), 4)


# -- token sets into probe inputs -----------------------------------------------------------------------


def toy_token_set():
    """Two examples: [CLS] two words [SEP], image CLS, two patches each; layer values encode the row."""
    rows = []
    for e in ("a", "b"):
        rows += [(e, 0, "[CLS]", 0, True, (-1, -1)), (e, 1, "red", 0, False, (-1, -1)),
                 (e, 2, "shape", 0, False, (-1, -1)), (e, 3, "[SEP]", 0, True, (-1, -1)),
                 (e, 4, "[IMG]", 1, True, (-1, -1)), (e, 5, "<patch 0,0>", 1, False, (0, 0)),
                 (e, 6, "<patch 0,1>", 1, False, (0, 1))]
    ex, tok, text, mod, spec, rc = zip(*rows)
    frame = _tokens_frame(ex, tok, text, mod, spec, np.array(rc), [None] * len(rows))
    vectors = np.arange(2 * len(rows) * 2, dtype=np.float32).reshape(2, len(rows), 2)
    return TokenSet(vectors, frame)


def test_token_kinds_pick_their_tokens_and_words_are_pooled_per_example():
    ts = toy_token_set()
    labels = pd.DataFrame({"shape": ["circle", "triangle"]}, index=pd.Index(["a", "b"], name="example_id"))
    v, y, g, keys = representation_inputs(ts, "cls", "shape", labels)
    assert v.shape == (2, 2, 2) and y.tolist() == ["circle", "triangle"] and keys is None
    assert g.tolist() == ["example:a", "example:b"]  # no image ids: the example is the unit
    v, y, g, _ = representation_inputs(ts, "text_mean", "shape", labels)
    np.testing.assert_allclose(v[1, 0], ts.vectors[1, [1, 2]].mean(0))  # the mean of a's two words
    v, y, g, _ = representation_inputs(ts, "image_cls", "shape", labels)
    np.testing.assert_array_equal(v[0], ts.vectors[0, [4, 11]])
    cover = pd.DataFrame({"example_id": ["a", "a", "b"], "row": [0, 0, 0], "col": [0, 1, 0], "cover": [0.9, 0.1, 0.5]})
    v, y, g, keys = representation_inputs(ts, "patch", "in_region", labels, cover)
    assert y.tolist() == ["inside", "outside", "inside"] and keys.tolist() == ["0,0", "0,1", "0,0"]  # b's (0,1): none
    with pytest.raises(ProbingError, match="token kind 'patch'"):
        representation_inputs(ts, "cls", "in_region", labels, cover)
    with pytest.raises(ProbingError, match="not known"):
        representation_inputs(ts, "cls", "colour", labels)


# -- probe sweeps ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_probe_sweep(tmp_path_factory):
    """A probe sweep of the demo model over 24 easy-VQA test questions (batches of 8)."""
    from vlcore.data.easy_vqa import easy_vqa_examples
    from vlcore.models.registry import load_adapter
    from vlcore.run.sweep import run_sweep

    adapter, examples = load_adapter("demo"), easy_vqa_examples("test", limit=24)
    out = run_sweep(adapter, examples, tmp_path_factory.mktemp("probe") / "sweep", dataset="easy_vqa/test",
                    batch_size=8, probe=True)
    return adapter, examples, out


def test_a_probe_sweep_stores_what_the_traces_say(demo_probe_sweep):
    from vlcore.run.extract import extract_trace
    from vlcore.data.easy_vqa import compute_shape_mask
    from vlcore.storage.sweeps import PROBE_FILE, load_sweep_probe

    adapter, examples, out = demo_probe_sweep
    assert (out / PROBE_FILE).exists() and not list(out.glob("part-*"))
    probe = load_sweep_probe(out)
    assert probe["example_ids"] == [e.example_id for e in examples]
    facts = easy_vqa_image_labels("test")
    assert probe["labels"]["shape"] == [facts[e.meta["image_id"]].get("shape") for e in examples]
    assert len(probe["word_text"]) >= 4 and set(probe["word_role"]) <= {"shape", "color"}
    for w, (text, tokens) in enumerate(zip(probe["word_text"], probe["word_tokens"])):
        ex = examples[probe["word_example"][w]]
        trace = extract_trace(adapter, ex.load_image(), ex.question, ex.example_id)
        assert [trace.tokens[t] for t in tokens] == [text]
        assert text == probe["labels"]["shape"][probe["word_example"][w]] or text == probe["labels"]["color"][probe["word_example"][w]]
        pairs = np.flatnonzero(probe["pair_word"] == w)
        idx, rc = trace.patch_positions()
        assert len(pairs) == len(idx)
        col = {(int(r), int(c)): int(i) for i, (r, c) in zip(idx, rc)}
        keys = [col[(int(r), int(c))] for r, c in probe["pair_rc"][pairs]]
        expected = trace.attentions[:, :, tokens[0], keys].astype(np.float32).transpose(2, 0, 1)  # [Q, L, H]
        np.testing.assert_allclose(probe["pair_attention"][pairs].astype(np.float32), expected, rtol=2e-3, atol=2e-5)
        cover = compute_cover_grid(compute_shape_mask(trace.image), trace.grid, trace.patch_px)
        np.testing.assert_allclose(probe["pair_cover"][pairs], cover[probe["pair_rc"][pairs, 0], probe["pair_rc"][pairs, 1]],
                                   atol=1e-3)


def test_a_probe_sweep_resumes_and_recomputes_a_damaged_probe_part(demo_probe_sweep, tmp_path):
    from vlcore.storage.sweeps import load_sweep_probe
    from vlcore.run.sweep import run_sweep, sweep_key

    adapter, examples, full = demo_probe_sweep
    polls = iter(range(100))
    out = run_sweep(adapter, examples, tmp_path / "s", batch_size=8, probe=True, should_stop=lambda: next(polls) >= 2)
    parts = sorted(out.glob("part-*.probe.safetensors"))
    assert len(parts) == 2 and not (out / "probe.safetensors").exists()
    parts[1].write_bytes(b"not safetensors")  # a damaged probe part: its batch is computed again
    run_sweep(adapter, examples, out, batch_size=8, probe=True)
    manifest = (out / "manifest.json").read_text()
    assert "without a readable probe part" in manifest
    a, b = load_sweep_probe(full), load_sweep_probe(out)
    assert a["example_ids"] == b["example_ids"] and a["word_text"] == b["word_text"]
    np.testing.assert_array_equal(a["pair_attention"], b["pair_attention"])
    ids = [e.example_id for e in examples]
    assert sweep_key(adapter, "d", ids, probe=True) != sweep_key(adapter, "d", ids)  # a probe sweep is its own sweep


def test_probes_run_on_the_demo_probe_sweep(demo_probe_sweep):
    from vlcore.run.probe_sweep import example_label_table, patch_cover_table
    from vlcore.storage.sweeps import load_sweep_probe
    from vlcore.analysis.projection import token_set_from_sweep
    from vlcore.storage.sweeps import load_sweep, load_sweep_vectors

    _, _, out = demo_probe_sweep
    preds, _ = load_sweep(out)
    probe = load_sweep_probe(out)
    ts = token_set_from_sweep(load_sweep_vectors(out), preds)
    labels = example_label_table(probe, preds)
    assert set(labels.columns) >= {"answer", "category", "shape", "color"}
    v, y, g, keys = representation_inputs(ts, "patch", "in_region", labels, patch_cover_table(probe))
    assert set(y) == {"inside", "outside"} and v.shape[1] == len(y) == len(keys)
    assert all(u.startswith("image:easy_vqa/test/") for u in g)  # questions about one image stay on one side
    assert len(set(g)) == len(set(labels["image"])) < len(labels)
    result = compute_layer_probes(v, y, g, keys, folds=3)
    assert len(result) == 5 and result["accuracy"].between(0, 1).all()
    feats, inside, _, _, words = attention_inputs(probe, "all", min_cover=0.25)
    assert feats.shape[1:] == (4, 4) and inside.any() and not inside.all()
    share = word_patch_share(feats, words)
    assert share.shape == (4, 4) and ((share > 0) & (share <= 1.0001)).all()
    with pytest.raises(ProbingError, match="no object words"):
        attention_inputs(probe, "object")


# -- VCR ---------------------------------------------------------------------------------------------------


@pytest.fixture
def vcr_adapter(tmp_path):
    import json

    d = tmp_path / "tok"
    d.mkdir()
    words = [*TINY_WORDS, "are", "casey", "and", "riley", "friends"]
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 40}))
    return make_tiny_adapter(d)


def test_vcr_object_words_ground_in_their_own_boxes(vcr_adapter, tmp_path):
    from tests.data._records import VCR_BOXES, write_vcr
    from vlcore.data.vcr import load_vcr_examples
    from vlcore.storage.sweeps import load_sweep_probe
    from vlcore.run.sweep import run_sweep

    (tmp_path / "vcr").mkdir()
    example = load_vcr_examples(write_vcr(tmp_path / "vcr"))[0]  # "Are Casey and Riley friends?"
    out = run_sweep(vcr_adapter, [example], tmp_path / "sweep", batch_size=1, probe=True)
    probe = load_sweep_probe(out)
    assert probe["word_text"] == ["casey", "riley"] and probe["word_role"] == ["object", "object"]
    seen = (40, 32)  # the tiny processor's 32-px shorter side, rounded down to 8 px: 80×60 -> 40×32, a 4×5 grid
    for w, box in enumerate(VCR_BOXES[:2]):
        scaled = (box[0] * seen[0] / 80, box[1] * seen[1] / 60, box[2] * seen[0] / 80, box[3] * seen[1] / 60)
        expected = compute_cover_grid(compute_box_mask(seen[::-1], [scaled]), (4, 5), 8)
        pairs = probe["pair_word"] == w
        rc = probe["pair_rc"][pairs]
        np.testing.assert_allclose(probe["pair_cover"][pairs], expected[rc[:, 0], rc[:, 1]], atol=1e-3)
        assert probe["pair_cover"][pairs].max() > 0.5
    union = compute_cover_grid(compute_box_mask(seen[::-1], [
        (b[0] * seen[0] / 80, b[1] * seen[1] / 60, b[2] * seen[0] / 80, b[3] * seen[1] / 60) for b in VCR_BOXES[:2]]),
        (4, 5), 8)
    np.testing.assert_allclose(probe["patch_cover"], union[probe["patch_rc"][:, 0], probe["patch_rc"][:, 1]], atol=1e-3)
