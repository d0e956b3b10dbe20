"""Comparing a model's answer with gold answers the way the official VQA evaluation does.

A generative model writes "Red." or "Two" where the gold answer is "red" or "2"; a classifier's labels are already
in the gold answers' form. Both are compared after the VQA normalisation (`normalize_answer`): punctuation stripped
the VQA way (commas inside numbers and a period before a digit kept apart: "2.5" stays), lower case, number words as
digits, the articles a/an/the dropped, contractions written with their apostrophes. Sweeps' ``correct`` column,
`vlcore.trace.Trace.correct` and `vlcore.run.evaluate.evaluate_accuracy` all use `answer_in_gold`.

The normaliser is defined in `vlcore.trace` (the bottom layer, so that ``Trace.correct`` can use it without
importing upwards) and re-exported here, beside the VQA accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

from vlcore.trace import answer_in_gold, normalize_answer

__all__ = ["answer_in_gold", "normalize_answer", "vqa_accuracy"]


def vqa_accuracy(prediction: str | None, gold: Sequence[str]) -> float:
    """The VQA accuracy of one answer: ``min(1, matches / 3)`` over the gold answers, averaged over the ``n``
    leave-one-out subsets of the ``n`` gold answers (the official evaluation's rule for its 10 human answers);
    answers are compared after `normalize_answer`. With one gold answer it is 1.0 on a match, else 0.0.

    Args:
        prediction: the model's answer (None: no answer, 0.0).
        gold: the gold answers, repeats included (VQAv2 keeps all 10 human answers).

    Returns:
        A float in [0, 1]; NaN without gold answers.

    >>> vqa_accuracy("Two.", ["2", "2", "two", "3"] + ["4"] * 6)
    0.9
    >>> vqa_accuracy("red", ["red"]), vqa_accuracy(None, ["red"])
    (1.0, 0.0)
    """
    if not gold:
        return float("nan")
    if prediction is None:
        return 0.0
    key = normalize_answer(prediction)
    hits = [normalize_answer(g) == key for g in gold]
    if len(hits) == 1:
        return float(hits[0])
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(hits)
