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
    ("text", (str,)),
)
# "image": one image, or a list (several images in one prompt); "video": a video file or a
# folder of frames (video models), after the images; a line needs at least one of them.
DEFAULT_FRAMES = 8


@dataclass(frozen=True)
class Question:
    """One line of the questions file (`line` is 1-based)."""

    question_id: str | int
    image: str | list[str] | None
    text: str
    line: int
    category: str | None = None
    answer: Any = None
    video: str | None = None
    frames: int | None = None  # the line's own "frames", else the command's --frames


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
    image, video, frames = d.get("image"), d.get("video"), d.get("frames")
    if image is None and video is None:
        raise InputError(f"{name}: line {lineno}: missing field 'image' (or 'video')")
    if image is not None and not isinstance(image, str | list):
        raise InputError(f"{name}: line {lineno}: field 'image' must be a str or list")
    if isinstance(image, list) and (not image or not all(isinstance(x, str) for x in image)):
        raise InputError(f"{name}: line {lineno}: field 'image' must be a non-empty list of paths")
    if video is not None and not isinstance(video, str):
        raise InputError(f"{name}: line {lineno}: field 'video' must be a str")
    bad_frames = not isinstance(frames, int) or isinstance(frames, bool) or frames < 1
    if frames is not None and bad_frames:
        raise InputError(f"{name}: line {lineno}: field 'frames' must be an int >= 1")
    category = d.get("category")
    return Question(
        d["question_id"],
        image,
        d["text"],
        lineno,
        None if category is None else str(category),
        d.get("answer"),
        video,
        frames,
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
    when the question is about several images, or has a video too: the video's path last)."""
    folder = os.fspath(image_folder)
    if question.video is not None:
        return [*_image_paths(question, folder), os.path.join(folder, question.video)]
    if isinstance(question.image, list):
        return _image_paths(question, folder)
    return os.path.join(folder, question.image)


def _image_paths(question: Question, folder: str) -> list[str]:
    images = question.image if isinstance(question.image, list) else [question.image]
    return [os.path.join(folder, x) for x in images if x is not None]


def visual_input(question: Question, image_folder: str | os.PathLike, frames: int) -> Any:
    """What the processor takes for the question: its image path(s), or with a video the
    image paths then the video's sampled frames (`question.frames`, else `frames`)."""
    if question.video is None:
        return image_path(question, image_folder)
    from sparsevlm_jax.video import load_video

    *images, video = image_path(question, image_folder)
    return [*images, load_video(video, question.frames or frames)]


def placeholders(question: Question) -> list[str]:
    """The prompt markers of the question's visual items: its images', then its video's."""
    from sparsevlm_jax.processing import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

    n = len(_image_paths(question, ""))
    return [IMAGE_PLACEHOLDER] * n + [VIDEO_PLACEHOLDER] * (question.video is not None)


def _paths(question: Question, image_folder: str | os.PathLike) -> list[str]:
    path = image_path(question, image_folder)
    return path if isinstance(path, list) else [path]


def _exists(path: str) -> bool:
    return os.path.isfile(path) or os.path.isdir(path)


def check_images(questions: Sequence[Question], image_folder: str | os.PathLike) -> None:
    """Raises InputError naming the first question whose image file is missing."""
    folder = os.fspath(image_folder)
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no such image folder")
    missing = [q for q in questions if not all(map(_exists, _paths(q, folder)))]
    if missing:
        q = missing[0]
        more = (
            f" (and {len(missing) - 1} more questions with missing images)" if missing[1:] else ""
        )
        path = next(p for p in _paths(q, folder) if not _exists(p))
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
            marks = placeholders(q)
            spans = processor.encode_spans(q.text, len(marks), marks)
            prefix, text = spans[0], spans[-1]
            Buckets.pick(buckets.prefix, len(prefix), "prefix length")
            Buckets.pick(buckets.text, len(text), "prompt length after the image")
        except InputError as e:
            raise InputError(f"question_id {q.question_id!r} (line {q.line}): {e}") from None
