"""Exact-match accuracy of answers against the questions' gold answers (LLaVA's GQA / VQA)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sparsevlm_jax.eval.questions import Question


def normalize_answer(text: Any) -> str:
    """Lower-cased, stripped, trailing '.' removed (LLaVA's GQA / VQA post-processing)."""
    return str(text).strip().lower().rstrip(".").strip()


def is_correct(prediction: str, gold: Any) -> bool:
    """Exact match after `normalize_answer`; a list of gold answers matches any of them."""
    golds = gold if isinstance(gold, list) else [gold]
    return any(normalize_answer(prediction) == normalize_answer(g) for g in golds)


@dataclass
class Accuracy:
    """Exact-match counts over the answered questions that carry a gold answer."""

    correct: int = 0
    total: int = 0
    by_category: dict[str, list[int]] | None = None

    def summary(self) -> list[str]:
        lines = [f"exact match: {self.correct}/{self.total} = {_pct(self.correct, self.total)}"]
        for cat, (c, n) in sorted((self.by_category or {}).items()):
            lines.append(f"  {cat}: {c}/{n} = {_pct(c, n)}")
        return lines


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.2f}%" if b else "n/a"


def accuracy(questions: Sequence[Question], answers: dict[str | int, str]) -> Accuracy | None:
    """Exact-match accuracy, or None when no question has a gold answer."""
    graded = [q for q in questions if q.answer is not None and q.question_id in answers]
    if not any(q.answer is not None for q in questions):
        return None
    acc = Accuracy(by_category={})
    for q in graded:
        ok = int(is_correct(answers[q.question_id], q.answer))
        acc.correct += ok
        acc.total += 1
        if q.category is not None:
            c = acc.by_category.setdefault(q.category, [0, 0])
            c[0] += ok
            c[1] += 1
    return acc
