"""How each dataset task is run, through the adapter contract only (no model family or task name is read here).

| Task | How it runs |
|---|---|
| VQA | top-k answers with probabilities against the gold answer(s) (`vlcore.run.extract`) |
| VCR + a model that scores image-text matches | score question + each answer (Q→A), then question + picked answer + each rationale (QA→R); the score is the adapter's target ``"match"`` (`ModelAdapter.target_score`) |
| VCR + an answering model | the question alone, top answers |
| WebQA | the question with each image fact; per-image answers against the gold ``A`` |
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from vlcore.data.example import Example
from vlcore.errors import InputError
from vlcore.models.base import Capture, ModelAdapter

MATCH = "match"  # the target of an image-text score (`ModelAdapter.target_score`)


@dataclass(frozen=True)
class ChoiceResult:
    """Scores of one multiple-choice stage.

    Attributes:
        texts: the texts scored (question + choice, as the model read them).
        scores: image-text match probability per choice.
        pick: index of the best choice.
        gold: index of the gold choice, if known.
        truncated: per text, whether it was cut to the model's text positions.
    """

    texts: tuple[str, ...]
    scores: tuple[float, ...]
    pick: int
    gold: int | None
    truncated: tuple[bool, ...]

    @property
    def correct(self) -> bool | None:
        return None if self.gold is None else self.pick == self.gold


def score_texts(adapter: ModelAdapter, image, texts: list[str]) -> tuple[list[float], list[bool]]:
    """Image-text match probabilities of several texts against one image, in one batch (the probability of the
    adapter's ``"match"`` target in each row).

    Raises:
        InputError: the model does not score image-text matches.
    """
    batch = adapter.encode([image] * len(texts), texts)
    with torch.no_grad():
        output = adapter.capture(batch, Capture(blocks=(), hidden=False)).output
        try:
            _, probs, _ = adapter.target_score(output, MATCH)
        except InputError as exc:
            raise InputError(
                f"multiple-choice scoring needs an image-text-matching model (one that scores the target "
                f"{MATCH!r}); {adapter.model_id} does not ({exc}). Pick an image-text-matching checkpoint."
            ) from exc
    return [float(p) for p in probs.float().cpu()], list(batch.truncated)


def run_vcr_choices(adapter: ModelAdapter, example: Example) -> tuple[ChoiceResult, ChoiceResult | None]:
    """Q→A then QA→R with an image-text-matching head.

    Returns:
        ``(q2a, qa2r)``; ``qa2r`` is None when the example has no rationales. QA→R conditions on
        the picked answer (what the model believes), as in the VCR Q→AR protocol.
    """
    if not example.answer_choices:
        raise InputError(f"example {example.example_id} has no answer choices; VCR scoring needs them")
    image = example.load_image()
    texts = [f"{example.question} {a}" for a in example.answer_choices]
    scores, cut = score_texts(adapter, image, texts)
    pick = max(range(len(scores)), key=scores.__getitem__)
    q2a = ChoiceResult(tuple(texts), tuple(scores), pick, example.answer_label, tuple(cut))
    if not example.rationale_choices:
        return q2a, None
    base = f"{example.question} {example.answer_choices[pick]}"
    texts = [f"{base} {r}" for r in example.rationale_choices]
    scores, cut = score_texts(adapter, image, texts)
    pick_r = max(range(len(scores)), key=scores.__getitem__)
    return q2a, ChoiceResult(tuple(texts), tuple(scores), pick_r, example.rationale_label, tuple(cut))


@dataclass(frozen=True)
class FactAnswer:
    """A VQA model's answer to the question on one WebQA image fact."""

    title: str
    positive: bool
    prediction: tuple[tuple[str, float], ...]
    matches_gold: bool | None


def run_webqa_facts(adapter: ModelAdapter, example: Example, images: list, top_k: int = 3) -> list[FactAnswer]:
    """Run the question on each image fact (``images[i]`` is fact ``i``'s image; None skips it).

    Text facts are not seen: an image-text model reads one image and one text.
    A prediction matches the gold when it occurs in a gold answer (WebQA answers are sentences).
    """
    facts = [f for f in example.facts if f.kind == "image"]
    pairs = [(f, im) for f, im in zip(facts, images) if im is not None]
    if not pairs:
        raise InputError(f"example {example.example_id} has no readable image facts")
    batch = adapter.encode([im for _, im in pairs], [example.question] * len(pairs))
    with torch.no_grad():
        output = adapter.capture(batch, Capture(blocks=(), hidden=False)).output
    preds = adapter.predict(output, top_k=top_k, batch=batch)
    gold = " ".join(example.answers).lower()
    out = []
    for (fact, _), pred in zip(pairs, preds):
        top = pred[0][0].lower() if pred else None
        hit = bool(re.search(rf"\b{re.escape(top)}\b", gold)) if gold and top else None
        out.append(FactAnswer(fact.title, fact.positive, tuple(pred), hit))
    return out
