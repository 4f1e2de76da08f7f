"""The questions asked: the shapes task's test questions, and the accuracy of a blind model
answering each type's most frequent answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sparsevlm_jax.bench.accuracy.stats import proportion


@dataclass(frozen=True)
class Item:
    """One test question: its id (as in the written test set), image index, text, gold
    answer and type."""

    question_id: str
    image: int
    text: str
    answer: str
    category: str


def question_items(num_images: int, image_size: int) -> tuple[list[Any], list[Item]]:
    """(PIL image per test image [num_images], the questions in test-set order)."""
    from PIL import Image

    from sparsevlm_jax import shapes_task as st

    images, items = [], []
    for i, ex in enumerate(st.test_examples(num_images, image_size)):
        images.append(Image.fromarray(ex.image))
        for j, q in enumerate(ex.questions):
            items.append(Item(st.question_id(i, j), i, q.text, q.answer, q.category))
    return images, items


def answer_prior(items: Sequence[Item]) -> dict[str, Any]:
    """Accuracy of a blind model answering each type's most frequent gold answer."""
    from sparsevlm_jax.shapes_task import CATEGORIES

    per_type: dict[str, dict[str, Any]] = {}
    total = 0
    for cat in [c for c in CATEGORIES if any(it.category == c for it in items)]:
        golds = [it.answer for it in items if it.category == cat]
        top = max(set(golds), key=golds.count)
        per_type[cat] = {**proportion(golds.count(top), len(golds)), "answer": top}
        total += golds.count(top)
    return {"overall": proportion(total, len(items)), "per_type": per_type}
