"""Task runners: VCR multiple choice with an image-text-matching head, WebQA per-image answers."""

from __future__ import annotations

import pytest

from tests.conftest import grey_image, make_tiny_adapter
from vlcore.data.example import Example, Fact
from vlcore.errors import InputError
from vlcore.run.tasks import run_vcr_choices, run_webqa_facts, score_texts


def vcr_example() -> Example:
    return Example(
        "vcr/val/0", "is the cat red ?", image=grey_image(48, 32),
        answer_choices=("yes the cat is red .", "no it is blue .", "there is a dog .", "the image is red ."),
        rationale_choices=("the cat is red .", "a dog is in the image .", "blue is the color .", "what is it ?"),
        answer_label=1, rationale_label=0, source="vcr",
    )


def test_vcr_with_an_itm_head_scores_every_choice_and_picks_the_best(tiny_tokenizer_dir):
    adapter = make_tiny_adapter(tiny_tokenizer_dir, arch="ViltForImageAndTextRetrieval")
    q2a, qa2r = run_vcr_choices(adapter, vcr_example())
    assert len(q2a.scores) == 4 and len(qa2r.scores) == 4
    assert all(0 < s < 1 for s in q2a.scores + qa2r.scores)
    assert q2a.pick == max(range(4), key=q2a.scores.__getitem__)
    assert qa2r.texts[0].startswith(f"is the cat red ? {vcr_example().answer_choices[q2a.pick]}")
    assert q2a.correct == (q2a.pick == 1)
    # each score equals scoring that text alone: batching does not change the result
    alone, _ = score_texts(adapter, grey_image(48, 32), [q2a.texts[2]])
    assert alone[0] == pytest.approx(q2a.scores[2], abs=1e-5)


def test_vcr_with_a_vqa_head_is_refused_with_the_fix(tiny_adapter):
    with pytest.raises(InputError, match="image-text-matching"):
        run_vcr_choices(tiny_adapter, vcr_example())


def test_webqa_runs_the_question_on_each_image_fact(tiny_adapter):
    facts = (
        Fact("image", "a red cat", "caption one", True, image_id="1"),
        Fact("image", "a blue dog", "caption two", False, image_id="2"),
        Fact("text", "cats", "cats are red", True),
    )
    ex = Example("webqa/train/x", "what is the color of the cat ?", answers=("The cat is red.",), facts=facts,
                 source="webqa")
    answers = run_webqa_facts(tiny_adapter, ex, [grey_image(32, 32), grey_image(48, 32)])
    assert [a.title for a in answers] == ["a red cat", "a blue dog"] and answers[0].positive
    assert all(len(a.prediction) == 3 for a in answers)
    top = answers[0].prediction[0][0]
    assert answers[0].matches_gold == (top.lower() in "the cat is red .".split())
