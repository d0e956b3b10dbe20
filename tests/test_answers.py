"""VQA answer normalisation (`vlcore.analysis.answers`): known answers from the official VQA evaluation's rules, the
places that compare a prediction with gold answers (`Trace.correct`, a sweep's prediction rows, accuracy), and the
bundled ViLT demo's labels, which must compare exactly as before."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import DEMO_DIR
from vlcore.analysis.answers import answer_in_gold, normalize_answer, vqa_accuracy
from vlcore.data.example import Example
from vlcore.run.sweep import prediction_row
from vlcore.trace import TokenLayout, Trace


@pytest.mark.parametrize("given, expected", [
    ("Two.", "2"), ("the Red", "red"), ("Yes!", "yes"), ("  A   dog ", "dog"), ("An apple", "apple"),
    ("2.5", "2.5"), ("$5.00", "$5.00"),  # a period before a digit stays
    ("1,000", "1000"),  # a comma inside a number goes, the digits join
    ("yes, it is", "yes it is"), ("black-and-white", "black and white"), ("(left)", "left"),
    ("Mr. Smith", "mr smith"), ("10:30", "10:30"), ("it's", "it's"),
    ("ten", "10"), ("none", "0"), ("zero", "0"), ("three dogs", "3 dogs"),
    ("dont", "don't"), ("Isnt", "isn't"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"),
    ("oclock", "o'clock"), ("Thats it.", "that's it"),
    ("the", ""), ("", ""),
])
def test_known_answers(given, expected):
    assert normalize_answer(given) == expected


def test_normalising_is_idempotent_on_every_known_answer():
    for given in ("Two.", "the Red", "Yes!", "1,000 cats", "black-and-white", "couldnt've", "Mr. Smith", "2.5"):
        once = normalize_answer(given)
        assert normalize_answer(once) == once


def test_matching_normalises_both_sides_and_keeps_different_answers_apart():
    assert answer_in_gold("Red.", ["red"]) and answer_in_gold("red", ["The red."]) and answer_in_gold("Two", ["2"])
    assert not answer_in_gold("red", ["reddish"]) and not answer_in_gold("2", ["2.5"]) and not answer_in_gold(None, ["red"])
    assert not answer_in_gold("yes", []) and not answer_in_gold("no", ["yes", "not"])


def test_vqa_accuracy_is_the_leave_one_out_mean_of_min_one_matches_over_three():
    gold = ["2", "2", "two", "3"] + ["4"] * 6  # three humans said 2 (once as a word)
    assert vqa_accuracy("Two.", gold) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("4", gold) == 1.0 and vqa_accuracy("5", gold) == 0.0
    assert vqa_accuracy("3", gold) == pytest.approx((1 * 0 + 9 * 1 / 3) / 10)
    assert np.isnan(vqa_accuracy("4", []))


def _trace(prediction: str, gold: tuple[str, ...]) -> Trace:
    return Trace.from_arrays("ex", "m", ("[CLS]", "a", "[SEP]"), np.zeros(3, np.int8), np.array([1, 0, 1], bool),
                             np.full((3, 2), -1, np.int16), (0, 0), np.zeros((0, 0, 3), np.uint8), 8, None, None,
                             prediction=((prediction, 0.9),), gold=gold)


def test_a_trace_with_a_generated_answer_is_correct_after_normalisation():
    assert _trace("Red.", ("red",)).correct is True
    assert _trace("Two", ("2", "3")).correct is True
    assert _trace("Red.", ("blue",)).correct is False


def test_a_sweep_row_marks_a_generated_answer_correct_after_normalisation():
    layout = TokenLayout.build(["q"], [0])
    example = Example(example_id="e", question="what color?", answers=("red",), source="generic")
    assert prediction_row(example, [("Red.", 0.5)], [layout], False)["correct"] is True
    assert prediction_row(example, [("Blue.", 0.5)], [layout], False)["correct"] is False
    assert prediction_row(example, [("Red.", 0.5)], [layout], False, answers=False)["correct"] is None


def test_the_demo_models_labels_and_the_datasets_answers_compare_exactly_as_before():
    """Every label of the bundled ViLT and every easy-VQA gold answer is its own normal form, so a classifier's
    "correct" (and the demo's accuracy) cannot change: an exact match and a normalised match agree."""
    from vlcore.data.easy_vqa import easy_vqa_examples

    labels = list(json.loads((DEMO_DIR / "config.json").read_text())["id2label"].values())
    answers = {a for e in easy_vqa_examples("test") for a in e.answers}
    assert labels and answers
    assert [normalize_answer(x) for x in labels] == labels
    assert sorted(normalize_answer(x) for x in answers) == sorted(answers)
