"""One answers (or part) file: writability, its complete records, resuming, appending."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsevlm_jax.errors import InputError


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


def duplicate_lines(path: str | os.PathLike) -> int:
    """How many complete lines of an answers or part file repeat a question id of an earlier
    line of the same file (what two runs writing one file at once leave behind)."""
    seen: set[str | int] = set()
    count = 0
    for _, d in read_records(path):
        count += d["question_id"] in seen
        seen.add(d["question_id"])
    return count


class Appender:
    """Appends whole answer lines to a file this process holds the lock of.

    Each `append` writes its lines and fsyncs them; when the write or the fsync fails (a full
    disk, a quota, an I/O error) the file is cut back at once to its size before the call, so
    it never ends in a torn line. The file is created by the first `append`. After each
    append, the path must still name the file written to: one removed or replaced under the
    run raises `FileNotFoundError` (ENOENT) instead of writing on into a file nobody sees.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Appends `records` as lines (all or none of them).

        Raises:
          OSError: the write, the fsync or the file's removal (see the class).
        """
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o666)  # fmt: skip
        fd = self._fd
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)
                os.fsync(fd)
            except OSError:
                pass  # the next run cuts the torn line (`answered_ids`)
            raise
        self._check_still_there()

    def _check_still_there(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        own = os.fstat(self._fd)
        if st is None or (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino):
            raise FileNotFoundError(
                errno.ENOENT, "removed or replaced while this run was appending to it",
                os.fspath(self.path),
            )  # fmt: skip

    def close(self) -> None:
        """Closes the file (nothing when no append happened)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
