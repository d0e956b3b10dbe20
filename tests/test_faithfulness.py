"""Perturbation curves and the pointing game, on a model built to read one patch and on planted maps."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import grey_image
from tests.test_relevance import QUESTION, make_planted_adapter
from vlcore.data.example import Example
from vlcore.errors import InputError
from vlcore.run.extract import extract_trace
from vlcore.data.easy_vqa import compute_shape_mask
from vlcore.attribution.faithfulness import (
    METHODS,
    compute_auc,
    compute_patch_coverage,
    compute_perturbation_curve,
    compute_perturbation_curves,

    evaluate_faithfulness,
    pointing_chance,
    pointing_hit,
    top_patch,
)
from vlcore.attribution.relevance import extract_relevancy
from vlcore.trace import Trace

CELL = (2, 4)


@pytest.fixture(scope="module")
def planted(tiny_tokenizer_dir):
    return make_planted_adapter(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def red_image():
    return grey_image(48, 32, red_cell=CELL)


@pytest.fixture(scope="module")
def relevancy(planted, red_image):
    return extract_relevancy(planted, red_image, QUESTION)


def test_positive_order_drops_faster_than_random(planted, red_image, relevancy):
    pos = compute_perturbation_curve(planted, red_image, QUESTION, relevancy.values, order="positive")
    rnd = compute_perturbation_curve(planted, red_image, QUESTION, relevancy.values, order="random", n_random=5)
    neg = compute_perturbation_curve(planted, red_image, QUESTION, relevancy.values, order="negative")
    assert pos.answer == rnd.answer == "red" and pos.n_patches == 24
    assert pos.fractions[0] == 0.0 and len(pos.fractions) == len(pos.probabilities) == 10
    assert pos.probabilities[0] > 0.9  # the unperturbed input
    assert pos.probabilities[1] < 0.3  # the red patch goes first: 2 of 24 patches removed
    assert pos.auc < rnd.auc < neg.auc
    assert pos.n_removed.tolist() == [0, 2, 5, 7, 10, 12, 14, 17, 19, 22]
    # the red patch is the last removed in negative order: the probability holds until then
    assert (neg.probabilities[:-1] > 0.9).all()


def test_unperturbed_probability_matches_the_trace(planted, red_image, relevancy):
    trace = extract_trace(planted, red_image, QUESTION, "x")
    curve = compute_perturbation_curve(planted, red_image, QUESTION, relevancy.values)
    assert curve.probabilities[0] == pytest.approx(trace.prediction[0][1], abs=1e-5)


def test_batched_fractions_equal_one_at_a_time(tiny_adapter, noise_image):
    values = np.random.default_rng(0).random(extract_trace(tiny_adapter, noise_image, QUESTION, "x").n_tokens)
    full = compute_perturbation_curve(tiny_adapter, noise_image, QUESTION, values, answer="blue")
    for i in (1, 5, 9):
        one = compute_perturbation_curve(tiny_adapter, noise_image, QUESTION, values, answer="blue",
                                         fractions=(full.fractions[i],))
        assert one.probabilities[1] == pytest.approx(full.probabilities[i], abs=1e-5)


def test_random_order_is_seeded(tiny_adapter, noise_image):
    values = np.zeros(extract_trace(tiny_adapter, noise_image, QUESTION, "x").n_tokens)
    a = compute_perturbation_curve(tiny_adapter, noise_image, QUESTION, values, order="random", seed=3)
    b = compute_perturbation_curve(tiny_adapter, noise_image, QUESTION, values, order="random", seed=3)
    c = compute_perturbation_curve(tiny_adapter, noise_image, QUESTION, values, order="random", seed=4)
    assert np.array_equal(a.probabilities, b.probabilities) and not np.array_equal(a.probabilities, c.probabilities)


def test_several_maps_in_one_pass(planted, red_image, relevancy):
    curves = compute_perturbation_curves(planted, red_image, QUESTION, {"rel": relevancy.values, "flat":
                                         np.zeros_like(relevancy.values)}, n_random=2)
    assert set(curves) == {("rel", "positive"), ("rel", "negative"), ("flat", "positive"), ("flat", "negative"),
                           ("random", "random")}
    assert curves[("rel", "positive")].auc < curves[("flat", "positive")].auc


def test_auc_is_the_trapezoid_rule_from_zero():
    assert compute_auc(np.array([0.0, 0.1, 0.9]), np.array([1.0, 1.0, 1.0])) == pytest.approx(0.9)
    assert compute_auc(np.array([0.0, 0.5]), np.array([1.0, 0.0])) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"order": "sideways"}, "order must be one of"),
        ({"fractions": (0.5, 0.2)}, "fractions must be increasing"),
        ({"fractions": (0.0, 0.5)}, "fractions must be increasing"),
        ({"answer": "giraffe"}, "not one of"),
    ],
)
def test_bad_perturbation_inputs(tiny_adapter, noise_image, kwargs, message):
    values = np.zeros(extract_trace(tiny_adapter, noise_image, QUESTION, "x").n_tokens)
    with pytest.raises(InputError, match=message):
        compute_perturbation_curve(tiny_adapter, noise_image, QUESTION, values, **kwargs)


def test_a_map_of_the_wrong_length_is_refused(tiny_adapter, noise_image):
    with pytest.raises(InputError, match="token order of extract_trace"):
        compute_perturbation_curve(tiny_adapter, noise_image, QUESTION, np.zeros(5))


# -- pointing game ----------------------------------------------------------------------------------


def easy_vqa_like(background=(236, 240, 250), colour=(200, 30, 30)) -> np.ndarray:
    """64x64, flat background, a filled circle centred at (x=44, y=20), radius 9 (anti-aliasing free)."""
    img = Image.new("RGB", (64, 64), background)
    ImageDraw.Draw(img).ellipse((35, 11, 53, 29), fill=colour)
    return np.asarray(img)


def grid_trace(image: np.ndarray, patch: int = 8) -> Trace:
    rows, cols = image.shape[0] // patch, image.shape[1] // patch
    tokens = ("[CLS]", "q", "[SEP]", "[IMG]") + tuple(f"p{r},{c}" for r in range(rows) for c in range(cols))
    n = len(tokens)
    rc = np.full((n, 2), -1, np.int16)
    rc[4:] = [(r, c) for r in range(rows) for c in range(cols)]
    modality = np.array([0, 0, 0] + [1] * (n - 3), np.int8)
    special = np.zeros(n, bool)
    special[[0, 2, 3]] = True
    return Trace.from_arrays("ex", "m", tokens, modality, special, rc, (rows, cols), image, patch, None, None)


def planted_map(trace: Trace, cell: tuple[int, int]) -> np.ndarray:
    values = np.full(trace.n_tokens, 0.01, np.float32)
    values[0] = 5.0  # the [CLS] itself is never a patch: it must not count
    idx, rc = trace.patch_positions()
    values[idx[(rc[:, 0] == cell[0]) & (rc[:, 1] == cell[1])]] = 1.0
    return values


def test_shape_mask_is_the_non_background_pixels():
    img = easy_vqa_like()
    mask = compute_shape_mask(img)
    ys, xs = np.nonzero(mask)
    assert ys.min() >= 11 and ys.max() <= 29 and xs.min() >= 35 and xs.max() <= 53
    assert 200 < mask.sum() < 19 * 19  # about pi * 9.5^2
    assert not mask[0].any() and not mask[:, 0].any()
    assert np.array_equal(compute_shape_mask(img, background=(236, 240, 250)), mask)
    # a shape in a corner does not fool the border vote
    corner = easy_vqa_like().copy()
    corner[:6, :6] = (0, 0, 0)
    assert compute_shape_mask(corner)[:6, :6].all()


def test_pointing_hit_and_miss_with_planted_maps():
    img = easy_vqa_like()
    trace = grid_trace(img)
    mask = compute_shape_mask(img)
    assert top_patch(trace, planted_map(trace, (2, 5))) == (2, 5)
    assert pointing_hit(trace, planted_map(trace, (2, 5)), mask)  # the circle's centre (y 20, x 44)
    assert not pointing_hit(trace, planted_map(trace, (7, 0)), mask)  # the far corner
    coverage = compute_patch_coverage(trace, mask)
    assert coverage.shape == (8, 8) and coverage[2, 5] == 1.0 and coverage[7, 0] == 0.0
    # an edge patch: touched (any pixel) but less than half covered
    edge = tuple(int(v) for v in np.argwhere((coverage > 0) & (coverage < 0.5))[0])
    assert pointing_hit(trace, planted_map(trace, edge), mask)
    assert not pointing_hit(trace, planted_map(trace, edge), mask, min_overlap=0.5)
    assert pointing_chance(trace, mask) == pytest.approx((coverage > 0).mean())
    assert pointing_chance(trace, mask, min_overlap=0.5) < pointing_chance(trace, mask)


def test_shape_mask_on_a_real_easy_vqa_image():
    from vlcore.data.easy_vqa import easy_vqa_examples

    image = np.asarray(easy_vqa_examples("test", 1)[0].load_image())
    mask = compute_shape_mask(image)
    assert 0 < mask.sum() < 0.5 * mask.size


def test_evaluate_faithfulness_on_the_planted_model(planted):
    examples = [
        Example(f"planted/{i}", QUESTION, image=grey_image(48, 32, red_cell=cell), answers=("red",))
        for i, cell in enumerate([(2, 4), (0, 0), (3, 5)])
    ]
    details, seen = [], []
    # layer 0 for raw attention: the planted model's last layer is uniform
    table = evaluate_faithfulness(planted, examples, limit=3, n_random=2, details=details, layer=0,
                                  progress=lambda done, total, s: seen.append((done, total)))
    assert seen[-1] == (3, 3)
    assert table["method"].tolist() == list(METHODS) and (table["n"] == 3).all()
    rows = table.set_index("method")
    # the grey background is the "background"; the red patch is the shape: every method points at it
    assert (rows["pointing_accuracy"] == 1.0).all()
    assert rows.loc["relevancy", "auc_positive"] < rows.loc["relevancy", "auc_random"]
    assert len(details[0]) == 9 and details[0]["correct"].all()
    with pytest.raises(InputError, match="at least one example"):
        evaluate_faithfulness(planted, [])
