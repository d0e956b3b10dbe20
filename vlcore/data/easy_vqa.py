"""easy-VQA (MIT licensed), shipped on disk by the `easy-vqa` PyPI package.

Each question has one of 13 answers; images are 64x64 RGB with one coloured shape
on a light background. Example ids are ``easy_vqa/{split}/{question_index}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from vlcore.errors import DatasetError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class EasyVQARecord:
    """One easy-VQA question."""

    example_id: str
    question: str
    answer: str
    image_id: int
    image_path: str
    split: str


@lru_cache(maxsize=2)
def load_easy_vqa(split: str) -> tuple[EasyVQARecord, ...]:
    """Load every question of an easy-VQA split, in the package's order.

    Args:
        split: "train" (38,575 questions) or "test" (9,673 questions).

    Returns:
        A tuple of records, index ``i`` having id ``easy_vqa/{split}/{i}``.

    Raises:
        DatasetError: on an unknown split or when the package is missing.
    """
    if split not in SPLITS:
        raise DatasetError(f"easy-VQA has splits {SPLITS}; got {split!r}. Pick one of those.")
    try:
        import easy_vqa
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        raise DatasetError("easy-VQA needs the `easy-vqa` package: pip install easy-vqa==1.0") from exc
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    return tuple(
        EasyVQARecord(f"easy_vqa/{split}/{i}", q, a, int(img), paths[img], split)
        for i, (q, a, img) in enumerate(zip(questions, answers, image_ids))
    )


def easy_vqa_answers() -> list[str]:
    """The 13 easy-VQA answers, in the package's order."""
    import easy_vqa

    return list(easy_vqa.get_answers())


SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")


def answer_category(answer: str) -> str:
    """easy-VQA question category from its answer: "shape", "yes/no" or "color".

    >>> answer_category("teal"), answer_category("circle"), answer_category("no")
    ('color', 'shape', 'yes/no')
    """
    if answer in SHAPES:
        return "shape"
    if answer in YES_NO:
        return "yes/no"
    return "color"


def to_example(record: EasyVQARecord):
    """Map an easy-VQA record into an `Example` (image loaded lazily)."""
    from vlcore.data.example import Example

    return Example(
        example_id=record.example_id,
        question=record.question,
        image_path=record.image_path,
        answers=(record.answer,),
        category=answer_category(record.answer),
        source="easy_vqa",
        meta={"image_id": record.image_id, "split": record.split},
    )


def easy_vqa_examples(split: str, limit: int | None = None) -> list:
    """`Example` records of an easy-VQA split, first ``limit`` of them."""
    records = load_easy_vqa(split)
    return [to_example(r) for r in records[:limit]]
