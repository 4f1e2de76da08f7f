"""Part files of several processes (`ANSWERS.part-<p>-of-<N>`), done ids, and their merge."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sparsevlm_jax.eval.answers import answered_ids, read_records
from sparsevlm_jax.eval.locks import FileLock, lock
from sparsevlm_jax.eval.questions import Question

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


def merge_answers(
    answers_path: str | os.PathLike,
    questions: Sequence[Question],
    wait: bool = False,
    on_wait: Callable[[str], None] | None = None,
) -> Merged:
    """Folds every part file into the answers file: one line per question id, in question order.

    The lines of the answers file and of the part files (complete lines only) are kept as
    written, the first line of a question id wins (a crash after the rename below leaves part
    files whose lines are already in the answers file). Ids that the question file does not
    have keep their order, after the others. The result goes to a temporary file in the same
    directory, fsync'd and renamed over the answers file (so a crash leaves either the old file
    or the new one, and the part files until the rename has happened); then the part files are
    removed. Only one process may merge, when no process appends any more: the caller holds
    the answers file's lock, and each part file is locked here (`wait`: until its writer ends,
    `on_wait(message)` first).

    Raises:
      LockedError: a part file is still being written by another run (and not `wait`).
    """
    held: list[FileLock] = []
    try:
        for path in part_files(answers_path):
            notify = None if on_wait is None else _waiting(on_wait, path)
            held.append(lock(path, "part file", wait, notify, LATE_WRITER))
        return _merge(Path(answers_path), [h.path for h in held], questions)
    finally:
        for h in held:
            h.release()


LATE_WRITER = (
    "a process of another run still appends to it; wait for that run to finish, or pass --wait"
)


def _waiting(on_wait: Callable[[str], None], path: Path) -> Callable[[str], None]:
    return lambda holder: on_wait(f"{path}: in use by {holder}; waiting for it (--wait)")


def _merge(answers: Path, parts: list[Path], questions: Sequence[Question]) -> Merged:
    """`merge_answers` once the part files are locked."""
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
