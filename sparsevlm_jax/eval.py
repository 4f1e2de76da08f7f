"""`sparsevlm eval`: LLaVA's `model_vqa_loader` over a question JSONL, batched and resumable.

Questions (LLaVA's eval format, one JSON object per line):

    {"question_id": ..., "image": "rel/path.jpg", "text": "...", "category": ..., "answer": ...}

`category` and the gold `answer` are optional. Answers (one line per question, LLaVA's format):

    {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}

`prompt` is the question text as given (like LLaVA), `answer_id` a uuid4 hex, `metadata` the
sparsity statistics of that example (`stats_to_json`).

Everything that can be checked is checked before the first token is generated: the answers path
is writable, every line parses and has its fields, question ids are unique, every image file
exists, every prompt fits a bucket. The answers file is appended one batch at a time (flushed
and fsync'd), so an interrupted run loses at most the batch in flight; a rerun skips the
question ids already answered (a trailing partial line is cut off first).
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparsevlm_jax.batch import Buckets
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.sparse.config import SparseConfig

REQUIRED_FIELDS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("question_id", (str, int)),
    ("image", (str,)),
    ("text", (str,)),
)


# ----------------------------------------------------------------------------------------------
# Statistics as JSON


def check_kept(layers: Sequence[dict[str, Any]], num_image_tokens: int) -> None:
    """Checks the per-layer `kept` lists index each layer's visual range, in original order.

    `kept` at pruning layer i holds indices into that layer's valid visual tokens: at the first
    pruning layer the image's tokens, later the previous layer's kept tokens (in original
    order) followed by its recycled tokens. So indices are increasing and below the previous
    layer's kept + recycled count (the image token count at the first layer).

    Raises:
      RuntimeError: an index outside that range (an internal inconsistency, not bad input).
    """
    size = num_image_tokens
    for layer in layers:
        kept = [int(k) for k in layer["kept"]]
        if any(not 0 <= k < size for k in kept) or kept != sorted(set(kept)):
            raise RuntimeError(
                f"layer {layer['layer']}: kept indices {kept} do not index a visual range of "
                f"{size} tokens in order"
            )
        size = len(kept) + int(layer["recycled"])


def jsonable(x: Any) -> Any:
    """Plain JSON values from nested dicts / lists / numpy scalars and arrays."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def stats_to_json(
    stats: dict[str, Any], sparse: SparseConfig, num_image_tokens: int
) -> dict[str, Any]:
    """A `Result.stats` dict as plain JSON (`layers[*].kept` checked with `check_kept`).

    Sparse runs always name their capacity policy: `capacity` = {"policy", "capacities",
    "recycled_capacities"} (per pruning layer) as the prefill reported it, else as `sparse`
    configured it (the capacities then only for `static`, where they are fixed in advance).
    """
    out = jsonable(stats)
    if "layers" in out:
        check_kept(out["layers"], num_image_tokens)
    if sparse.enabled and "capacity" not in out:
        static = sparse.capacity == "static"
        out["capacity"] = {
            "policy": sparse.capacity,
            "capacities": list(sparse.capacities) if static else None,
            "recycled_capacities": list(sparse.recycled_capacities) if static else None,
        }
    return out


def sparse_to_json(sparse: SparseConfig) -> dict[str, Any]:
    """The sparsity settings of a run (every `SparseConfig` field), for machine-readable output."""
    return jsonable(dataclasses.asdict(sparse))


# ----------------------------------------------------------------------------------------------
# Questions


@dataclass(frozen=True)
class Question:
    """One line of the questions file (`line` is 1-based)."""

    question_id: str | int
    image: str
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


def image_path(question: Question, image_folder: str | os.PathLike) -> str:
    return os.path.join(os.fspath(image_folder), question.image)


def check_images(questions: Sequence[Question], image_folder: str | os.PathLike) -> None:
    """Raises InputError naming the first question whose image file is missing."""
    folder = os.fspath(image_folder)
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no such image folder")
    missing = [q for q in questions if not os.path.isfile(image_path(q, folder))]
    if missing:
        q = missing[0]
        more = (
            f" (and {len(missing) - 1} more questions with missing images)" if missing[1:] else ""
        )
        raise InputError(
            f"question_id {q.question_id!r} (line {q.line}): image {image_path(q, folder)}: "
            f"no such file{more}"
        )


def check_prompts(questions: Sequence[Question], processor: Any) -> None:
    """Tokenizes every prompt and checks it fits the processor's largest buckets.

    Raises:
      InputError: an empty prompt or one that is too long, naming the question and line.
    """
    buckets: Buckets = processor.buckets
    for q in questions:
        try:
            prefix, text = processor.encode(q.text)
            Buckets.pick(buckets.prefix, len(prefix), "prefix length")
            Buckets.pick(buckets.text, len(text), "prompt length after the image")
        except InputError as e:
            raise InputError(f"question_id {q.question_id!r} (line {q.line}): {e}") from None


# ----------------------------------------------------------------------------------------------
# Answers file


def check_writable(path: str | os.PathLike, what: str = "answers file") -> None:
    """Raises InputError unless `path` can be created or appended to (nothing is created).

    `what` names the file in the message ("answers file", "picture", ...).
    """
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not a {what}")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise InputError(f"{p}: {what} is not writable")
        return
    parent = p.parent
    if not parent.exists():
        raise InputError(f"{p}: cannot write the {what} (no directory {parent})")
    if not parent.is_dir():
        raise InputError(f"{p}: cannot write the {what} ({parent} is not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{p}: cannot write the {what} (directory {parent} is not writable)")


def answered_ids(path: str | os.PathLike) -> set[str | int]:
    """Question ids already in an answers file; cuts off a trailing partial line first.

    A line without its newline is what a killed writer leaves behind; it is removed so the
    next append starts on a fresh line. Complete lines must be JSON objects with a
    question_id.

    Raises:
      InputError: a complete line that is not an answer record.
    """
    p = Path(path)
    if not p.exists():
        return set()
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(p, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    done: set[str | int] = set()
    for lineno, raw in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            d = json.loads(raw)
            done.add(d["question_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{p}: line {lineno}: not an answer record") from None
    return done


def read_answers(path: str | os.PathLike) -> dict[str | int, str]:
    """question_id -> answer text of an answers file (complete lines only)."""
    out: dict[str | int, str] = {}
    with open(path, encoding="utf-8") as f:
        for raw in f:
            if raw.endswith("\n") and raw.strip():
                d = json.loads(raw)
                out[d["question_id"]] = d.get("text", "")
    return out


def append_lines(f: Any, records: Sequence[dict[str, Any]]) -> None:
    """Appends whole lines in one write, then flushes them to disk."""
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# Accuracy


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


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class EvalSummary:
    """What a run did: questions selected, answered before, answered now, accuracy."""

    selected: int
    already: int
    written: int
    accuracy: Accuracy | None


def run_eval(
    pipe: Any,
    questions: Sequence[Question],
    image_folder: str | os.PathLike,
    answers_path: str | os.PathLike,
    sparse: SparseConfig,
    *,
    model_id: str,
    batch_size: int = 1,
    limit: int | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> EvalSummary:
    """Answers the first `limit` questions (all when None) not yet in `answers_path`.

    `pipe` is a `LlavaPipeline`. The questions must already be validated (`read_questions`,
    `check_images`, `check_prompts`). Each batch of `batch_size` answers is appended, flushed
    and fsync'd before the next batch starts; `on_batch(n_written_so_far)` runs after each.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    selected = list(questions if limit is None else questions[:limit])
    done = answered_ids(answers_path)
    position = {q.question_id: i for i, q in enumerate(selected)}
    pending = [q for q in selected if q.question_id not in done]
    already = len(selected) - len(pending)
    written = 0
    f = None
    try:
        with tqdm(
            total=len(selected), initial=already, unit="q", disable=not progress, desc="eval"
        ) as bar:
            for lo in range(0, len(pending), batch_size):
                chunk = pending[lo : lo + batch_size]
                # A short last batch is padded with copies of its last question (answers
                # dropped) so it reuses the compiled program of the full batch size.
                padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
                results = pipe.generate(
                    [image_path(q, image_folder) for q in padded],
                    [q.text for q in padded],
                    sparse=sparse,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed + position[chunk[0].question_id],
                    batch_size=batch_size,
                )
                records = [
                    answer_record(q, r, model_id, sparse, pipe.cfg.num_image_tokens)
                    for q, r in zip(chunk, results[: len(chunk)], strict=True)
                ]
                if f is None:  # the file appears with the first finished batch
                    f = open(answers_path, "a", encoding="utf-8")
                append_lines(f, records)
                written += len(records)
                bar.update(len(records))
                if on_batch is not None:
                    on_batch(written)
    finally:
        if f is not None:
            f.close()
    answers = read_answers(answers_path) if Path(answers_path).exists() else {}
    return EvalSummary(len(selected), already, written, accuracy(selected, answers))


def answer_record(
    q: Question, result: Any, model_id: str, sparse: SparseConfig, num_image_tokens: int
) -> dict[str, Any]:
    """One answer line in LLaVA's format."""
    return {
        "question_id": q.question_id,
        "prompt": q.text,
        "text": result.text,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "metadata": stats_to_json(result.stats, sparse, num_image_tokens),
    }
