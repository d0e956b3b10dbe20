"""easy-VQA (MIT licensed), shipped on disk by the `easy-vqa` PyPI package.

Each question has one of 13 answers; images are 64x64 RGB with one coloured shape
on a light background. Example ids are ``easy_vqa/{split}/{question_index}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from vlcore.errors import DatasetError, InputError

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


def compute_shape_mask(image_seen: np.ndarray, background=None, tolerance: int = 24) -> np.ndarray:
    """Pixels that are not background: bool ``[h, w]``.

    Args:
        image_seen: uint8 ``[h, w, 3]``, the image as the model saw it (``trace.image``).
        background: the background RGB; None takes the most frequent colour on the image border.
        tolerance: a pixel is background when every channel is within this of the background.

    >>> img = np.full((4, 4, 3), 200, np.uint8); img[1:3, 1:3] = (255, 0, 0)
    >>> int(compute_shape_mask(img).sum())
    4
    """
    img = np.asarray(image_seen)
    if img.ndim != 3 or img.shape[2] != 3:
        raise InputError(f"expected an RGB image [h, w, 3]; got an array of shape {img.shape}")
    if background is None:
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).reshape(-1, 3)
        colours, counts = np.unique(border, axis=0, return_counts=True)
        background = colours[counts.argmax()]
    diff = np.abs(img.astype(np.int16) - np.asarray(background, dtype=np.int16)[None, None, :])
    return diff.max(-1) > tolerance
