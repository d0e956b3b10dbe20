"""Accuracy of an answering model on a list of examples (plain batched passes, no attentions)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from vlcore.analysis.answers import answer_in_gold
from vlcore.data.example import Example
from vlcore.errors import InputError
from vlcore.models.base import Capture, ModelAdapter

# The fixed regression subset of easy-VQA test questions (seeded, sorted indices).
SUBSET_SEED, SUBSET_SIZE = 0, 500


def fixed_subset(n_total: int, size: int = SUBSET_SIZE, seed: int = SUBSET_SEED) -> list[int]:
    """Sorted indices of a seeded subset of ``range(n_total)``.

    >>> fixed_subset(10, 3) == sorted(fixed_subset(10, 3))
    True
    """
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_total, size=min(size, n_total), replace=False))


def evaluate_accuracy(
    adapter: ModelAdapter,
    examples: Sequence[Example],
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Share of examples whose top prediction is one of their gold answers after VQA answer normalisation
    (`vlcore.analysis.answers.answer_in_gold`: a generated "Two." matches "2"; a classifier's labels compare as
    they are).

    Raises:
        InputError: the model's predictions are not answers (`ModelAdapter.answers_compare`: an image-text score),
            it gives none, or an example has no gold answer.
    """
    if not adapter.answers_compare:
        raise InputError(f"accuracy needs a model whose predictions are answers; {adapter.model_id} scores the "
                         "image-text pair itself")
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        if any(not e.answers for e in chunk):
            raise InputError("every example needs a gold answer to compute accuracy")
        batch = adapter.encode([e.load_image() for e in chunk], [e.question for e in chunk])
        with torch.no_grad():
            output = adapter.capture(batch, Capture(blocks=(), hidden=False)).output
        top = adapter.predict(output, top_k=1, batch=batch)
        if any(not t for t in top):
            raise InputError(f"accuracy needs a model that answers; {adapter.model_id} gave no prediction for "
                             f"{chunk[[not t for t in top].index(True)].example_id}")
        correct += sum(answer_in_gold(t[0][0], e.answers) for t, e in zip(top, chunk))
        if progress is not None:
            progress(min(start + batch_size, len(examples)), len(examples))
    return correct / max(len(examples), 1)
