"""The questions file: parsing, validation, and the checks on images and prompts."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sparsevlm_jax.batch import Buckets
from sparsevlm_jax.errors import InputError

REQUIRED_FIELDS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("question_id", (str, int)),
    ("image", (str, list)),  # one image, or a list: several images in one prompt
    ("text", (str,)),
)


@dataclass(frozen=True)
class Question:
    """One line of the questions file (`line` is 1-based)."""

    question_id: str | int
    image: str | list[str]
    text: str
    line: int
    category: str | None = None
    answer: Any = None


def _parse_line(raw: str, name: str, lineno: int) -> Question:
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(f"{name}: line {lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise InputError(f"{name}: line {lineno}: expected a JSON object")
    for key, types in REQUIRED_FIELDS:
        if key not in d:
            raise InputError(f"{name}: line {lineno}: missing field {key!r}")
        if not isinstance(d[key], types) or isinstance(d[key], bool):
            kinds = " or ".join(t.__name__ for t in types)
            raise InputError(f"{name}: line {lineno}: field {key!r} must be a {kinds}")
    image = d["image"]
    if isinstance(image, list) and (not image or not all(isinstance(x, str) for x in image)):
        raise InputError(f"{name}: line {lineno}: field 'image' must be a non-empty list of paths")
    category = d.get("category")
    return Question(
        d["question_id"],
        d["image"],
        d["text"],
        lineno,
        None if category is None else str(category),
        d.get("answer"),
    )


def read_questions(path: str | os.PathLike) -> list[Question]:
    """Parses and validates a whole question file (blank lines are skipped).

    Raises:
      InputError: unreadable file, a malformed line or missing field (naming the line number),
        a duplicate question_id (naming it and both lines), or no questions at all.
    """
    name = os.fspath(path)
    questions: list[Question] = []
    seen: dict[str | int, int] = {}
    with open(name, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            q = _parse_line(raw, name, lineno)
            if q.question_id in seen:
                raise InputError(
                    f"{name}: line {lineno}: duplicate question_id {q.question_id!r} "
                    f"(first on line {seen[q.question_id]})"
                )
            seen[q.question_id] = lineno
            questions.append(q)
    if not questions:
        raise InputError(f"{name}: no questions")
    return questions


def image_path(question: Question, image_folder: str | os.PathLike) -> str | list[str]:
    """Where the question's image is: `image_folder/question.image` (a list of such paths
    when the question is about several images)."""
    if isinstance(question.image, list):
        return [os.path.join(os.fspath(image_folder), x) for x in question.image]
    return os.path.join(os.fspath(image_folder), question.image)


def _paths(question: Question, image_folder: str | os.PathLike) -> list[str]:
    path = image_path(question, image_folder)
    return path if isinstance(path, list) else [path]


def check_images(questions: Sequence[Question], image_folder: str | os.PathLike) -> None:
    """Raises InputError naming the first question whose image file is missing."""
    folder = os.fspath(image_folder)
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no such image folder")
    missing = [q for q in questions if not all(map(os.path.isfile, _paths(q, folder)))]
    if missing:
        q = missing[0]
        more = (
            f" (and {len(missing) - 1} more questions with missing images)" if missing[1:] else ""
        )
        path = next(p for p in _paths(q, folder) if not os.path.isfile(p))
        raise InputError(
            f"question_id {q.question_id!r} (line {q.line}): image {path}: no such file{more}"
        )


def check_prompts(questions: Sequence[Question], processor: Any) -> None:
    """Tokenizes every prompt and checks it fits the processor's largest buckets.

    Raises:
      InputError: an empty prompt or one that is too long, naming the question and line.
    """
    buckets: Buckets = processor.buckets
    for q in questions:
        try:
            spans = processor.encode_spans(q.text, len(q.image) if isinstance(q.image, list) else 1)
            prefix, text = spans[0], spans[-1]
            Buckets.pick(buckets.prefix, len(prefix), "prefix length")
            Buckets.pick(buckets.text, len(text), "prompt length after the image")
        except InputError as e:
            raise InputError(f"question_id {q.question_id!r} (line {q.line}): {e}") from None
