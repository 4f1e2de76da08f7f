"""`sparsevlm eval`: LLaVA's `model_vqa_loader` over a question JSONL, batched and resumable,
in one process or shared between several.

Questions (LLaVA's eval format, one JSON object per line):

    {"question_id": ..., "image": "rel/path.jpg", "text": "...", "category": ..., "answer": ...}

`category` and the gold `answer` are optional. Answers (one line per question, LLaVA's format):

    {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}

`prompt` is the question text as given (like LLaVA), `metadata` the sparsity statistics of that
example (`stats_to_json`, without wall-clock timings) and `answer_id` a uuid5 of the model id,
question id, prompt and sparsity settings: the same run writes the same bytes, whichever
process answered which question, so answer files can be compared byte for byte.

Everything that can be checked is checked before the first token is generated: the answers path
is writable, every line parses and has its fields, question ids are unique, every image file
exists, every prompt fits a bucket. Answers are appended one batch at a time (flushed and
fsync'd), so an interrupted run loses at most the batch in flight; a rerun skips the question
ids already answered (a trailing partial line is cut off first).

Several processes (`num_processes` N > 1, e.g. one per host, `sparsevlm_jax.distributed`):
question i of the selected list belongs to process p = i % N, which appends its answers to
its own part file `ANSWERS.part-<p>-of-<N>`. A question is skipped when the answers file or ANY
part file (of any N) already holds it, so a restart after an interruption, even with another N,
answers every question exactly once. When every process has answered its share (a barrier),
process 0 merges the answers file and all part files in question order (`merge_answers`: a
temporary file, fsync'd, renamed over the answers file, then the part files removed) and the
others wait for it (a second barrier). A single process appends straight to the answers file
(and merges only when it finds part files of an earlier run). Both write the same lines in
question order, so one process and N processes give the same bytes, as long as a batch's
composition cannot change an answer: `--batch-size 1`, or a capacity policy that does not depend
on the batch (`bucketed` compiles a pruned stage for the batch's largest budget and records it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
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


def _complete_lines(path: Path, data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every complete non-blank line of an answers or part file.

    Raises:
      InputError: a complete line that is not an answer record (a JSON object with a
        question_id), naming the file and line.
    """
    try:
        text = data[: data.rfind(b"\n") + 1].decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not an answers file (not UTF-8 text)") from None
    out: list[tuple[str, dict[str, Any]]] = []
    # Split on "\n" only: a JSON string may hold U+2028 and other characters splitlines() breaks on.
    for lineno, raw in enumerate(text.split("\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            d = json.loads(raw)
            hash(d["question_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}: line {lineno}: not an answer record") from None
        out.append((raw, d))
    return out


def read_records(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of the complete lines of a file that may be growing (none if missing).

    Never modifies the file: another process may be appending to it; a trailing line without
    its newline is ignored (it is still being written, or its writer was killed).
    """
    p = Path(path)
    return _complete_lines(p, p.read_bytes()) if p.exists() else []


def answered_ids(path: str | os.PathLike) -> set[str | int]:
    """Question ids already in an answers file this process owns; cuts off a trailing partial
    line first.

    A line without its newline is what a killed writer leaves behind; it is removed so the
    next append starts on a fresh line.

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
    return {d["question_id"] for _, d in _complete_lines(p, data[:end])}


def read_answers(path: str | os.PathLike) -> dict[str | int, str]:
    """question_id -> answer text of an answers file (complete lines only)."""
    return {d["question_id"]: d.get("text", "") for _, d in read_records(path)}


def append_lines(f: Any, records: Sequence[dict[str, Any]]) -> None:
    """Appends whole lines in one write, then flushes them to disk."""
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# Part files of several processes, and their merge

_PART = re.compile(r"\.part-(\d+)-of-(\d+)$")


def part_path(answers_path: str | os.PathLike, process: int, num_processes: int) -> Path:
    """Where process `process` of `num_processes` appends its share: `ANSWERS.part-<p>-of-<N>`."""
    return Path(f"{os.fspath(answers_path)}.part-{process}-of-{num_processes}")


def part_files(answers_path: str | os.PathLike) -> list[Path]:
    """Every part file of `answers_path` on disk, whatever the process count that wrote it,
    sorted by (N, p)."""
    p = Path(answers_path)
    if not p.parent.is_dir():
        return []
    found = []
    for q in p.parent.iterdir():
        m = _PART.search(q.name)
        if m and q.name[: m.start()] == p.name and q.is_file():
            found.append(((int(m.group(2)), int(m.group(1))), q))
    return [q for _, q in sorted(found)]


def done_ids(answers_path: str | os.PathLike, own_path: str | os.PathLike) -> set[str | int]:
    """Question ids answered in the answers file or in any of its part files.

    `own_path` is the file this process appends to (the answers file itself for a single
    process): its trailing partial line is cut off (`answered_ids`). The other files are only
    read (other processes may be appending to them).

    Raises:
      InputError: a complete line of any of these files that is not an answer record.
    """
    own = Path(own_path)
    done = answered_ids(own)
    for path in (Path(answers_path), *part_files(answers_path)):
        if path != own:
            done |= {d["question_id"] for _, d in read_records(path)}
    return done


@dataclass
class Merged:
    """What `merge_answers` did: answer lines written, part files folded in."""

    answers: int
    parts: int


def merge_answers(answers_path: str | os.PathLike, questions: Sequence[Question]) -> Merged:
    """Folds every part file into the answers file: one line per question id, in question order.

    The lines of the answers file and of the part files (complete lines only) are kept as
    written, the first line of a question id wins (a crash after the rename below leaves part
    files whose lines are already in the answers file). Ids that the question file does not
    have keep their order, after the others. The result goes to a temporary file in the same
    directory, fsync'd and renamed over the answers file (so a crash leaves either the old file
    or the new one, and the part files until the rename has happened); then the part files are
    removed. Only one process may merge, when no process appends any more.
    """
    answers, parts = Path(answers_path), part_files(answers_path)
    lines: dict[str | int, str] = {}
    for path in (answers, *parts):
        for raw, d in read_records(path):
            lines.setdefault(d["question_id"], raw)
    order = {q.question_id: i for i, q in enumerate(questions)}
    extra = {qid: i for i, qid in enumerate(qid for qid in lines if qid not in order)}
    ids = sorted(lines, key=lambda k: (0, order[k]) if k in order else (1, extra[k]))
    sources = [p for p in (answers, *parts) if p.exists()]
    if sources:
        _replace(answers, "".join(lines[k] + "\n" for k in ids), sources[0].stat().st_mode)
    for path in parts:
        path.unlink()
    if parts:
        _fsync_dir(answers.parent)
    return Merged(len(ids), len(parts))


def _replace(path: Path, text: str, mode: int) -> None:
    """Writes `text` to a temporary file beside `path`, fsyncs it and renames it onto `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".merge", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode & 0o777)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Makes a rename or unlink in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

TIMINGS = ("prefill_seconds", "decode_seconds")  # wall clock: left out of answer records
ANSWER_ID_NAMESPACE = uuid.UUID("5d6c0b8e-2f0a-4c55-9a43-7b1f3c9e2d10")  # sparsevlm's answers


@dataclass(frozen=True)
class Share:
    """The questions one process answers: question i of the selected list when
    i % count == index. `Share()` is the single process (everything, into the answers file)."""

    index: int = 0
    count: int = 1

    def of(self, selected: Sequence[Question]) -> list[Question]:
        return [q for i, q in enumerate(selected) if i % self.count == self.index]

    def path(self, answers_path: str | os.PathLike) -> Path:
        """The file this process appends to: the answers file, or its part file."""
        if self.count == 1:
            return Path(answers_path)
        return part_path(answers_path, self.index, self.count)


@dataclass
class EvalSummary:
    """What a process did: the file it appended to, the questions selected, its share of
    them, those answered before, answered now, the merge it did (process 0, or a single process
    that found part files) and the accuracy of the answers file (process 0 only)."""

    path: Path
    selected: int
    share: int
    already: int
    written: int
    merged: Merged | None
    accuracy: Accuracy | None

    def line(self) -> str:
        """One line saying what this process wrote."""
        of = f"{self.share} of {self.selected}" if self.share != self.selected else self.selected
        return (
            f"{self.path}: {self.written} answers written, {self.already} already there "
            f"({of} questions)"
        )


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
    share: Share = Share(),
    barrier: Callable[[str], None] | None = None,
) -> EvalSummary:
    """Answers this process's share of the first `limit` questions (all when None), skipping
    those already answered in `answers_path` or its part files; merges when it is the last step.

    `pipe` is a `LlavaPipeline`. The questions must already be validated (`read_questions`,
    `check_images`, `check_prompts`). Each batch of `batch_size` answers is appended, flushed
    and fsync'd before the next batch starts; `on_batch(n_written_so_far)` runs after each.
    With several processes (`share.count` > 1) every process must call this with the same
    arguments but its own `share.index`; `barrier(name)` waits for all of them (`sparsevlm_jax.
    distributed.barrier`): after answering, and after process 0 has merged.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if share.count > 1 and barrier is None:
        raise ValueError("several processes need a barrier")
    selected = list(questions if limit is None else questions[:limit])
    mine, out = share.of(selected), share.path(answers_path)
    done = done_ids(answers_path, out)
    stray_parts = share.count == 1 and bool(part_files(answers_path))
    pending = [q for q in mine if q.question_id not in done]
    seeds = {q.question_id: seed + i for i, q in enumerate(selected)}
    generation = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    desc = "eval" if share.count == 1 else f"eval {share.index}/{share.count}"
    bar = _progress(len(mine), len(mine) - len(pending), desc, progress)
    with bar:
        written = _answer(
            pipe, pending, image_folder, out, sparse, model_id, batch_size, seeds, generation,
            bar, on_batch,
        )  # fmt: skip
    merged = None
    if share.count > 1:
        barrier("sparsevlm-eval-answered")
        if share.index == 0:
            merged = merge_answers(answers_path, questions)
        barrier("sparsevlm-eval-merged")
    elif stray_parts:  # answers of an earlier run with several processes
        merged = merge_answers(answers_path, questions)
    answers = read_answers(answers_path) if share.index == 0 else {}
    if share.count > 1 and share.index == 0:
        check_complete(answers_path, selected, answers)
    acc = accuracy(selected, answers) if share.index == 0 else None
    return EvalSummary(
        out, len(selected), len(mine), len(mine) - len(pending), written, merged, acc
    )


def check_complete(
    answers_path: str | os.PathLike, selected: Sequence[Question], answers: dict[str | int, Any]
) -> None:
    """After a merge: every selected question must be answered.

    Raises:
      InputError: some are not: the processes did not write to one shared directory (each
        process appends to its part file beside the answers file, process 0 merges the part
        files it sees).
    """
    missing = [q.question_id for q in selected if q.question_id not in answers]
    if missing:
        raise InputError(
            f"{answers_path}: {len(missing)} of {len(selected)} questions unanswered after the "
            f"merge (first {missing[0]!r}): do all processes share the answers directory?"
        )


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="q", disable=not enabled, desc=desc)


def _answer(
    pipe: Any,
    pending: Sequence[Question],
    image_folder: str | os.PathLike,
    out: Path,
    sparse: SparseConfig,
    model_id: str,
    batch_size: int,
    seeds: dict[str | int, int],
    generation: dict[str, Any],
    bar: Any,
    on_batch: Callable[[int], None] | None,
) -> int:
    """Answers `pending` batch by batch, appending each batch to `out`; returns the count.

    A batch's seed is that of its first question (the seed plus its index in the selected
    list), so it does not depend on which process answers it."""
    written = 0
    f = None
    try:
        for lo in range(0, len(pending), batch_size):
            chunk = pending[lo : lo + batch_size]
            # A short last batch is padded with copies of its last question (answers
            # dropped) so it reuses the compiled program of the full batch size.
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
            results = pipe.generate(
                [image_path(q, image_folder) for q in padded],
                [q.text for q in padded],
                sparse=sparse,
                seed=seeds[chunk[0].question_id],
                batch_size=batch_size,
                **generation,
            )
            records = [
                answer_record(q, r, model_id, sparse, pipe.cfg.num_image_tokens)
                for q, r in zip(chunk, results[: len(chunk)], strict=True)
            ]
            if f is None:  # the file appears with the first finished batch
                f = open(out, "a", encoding="utf-8")
            append_lines(f, records)
            written += len(records)
            bar.update(len(records))
            if on_batch is not None:
                on_batch(written)
    finally:
        if f is not None:
            f.close()
    return written


def answer_id(q: Question, model_id: str, sparse: SparseConfig) -> str:
    """A uuid5 (hex) of the model id, question id, prompt and sparsity settings: the same
    question asked of the same model the same way gets the same id, in any process."""
    key = json.dumps(
        [model_id, q.question_id, q.text, sparse_to_json(sparse)],
        ensure_ascii=False,
        sort_keys=True,
    )
    return uuid.uuid5(ANSWER_ID_NAMESPACE, key).hex


def answer_record(
    q: Question, result: Any, model_id: str, sparse: SparseConfig, num_image_tokens: int
) -> dict[str, Any]:
    """One answer line in LLaVA's format; deterministic (no wall-clock timings, `answer_id`)."""
    stats = {k: v for k, v in result.stats.items() if k not in TIMINGS}
    return {
        "question_id": q.question_id,
        "prompt": q.text,
        "text": result.text,
        "answer_id": answer_id(q, model_id, sparse),
        "model_id": model_id,
        "metadata": stats_to_json(stats, sparse, num_image_tokens),
    }
