"""One answers (or part) file: writability, its complete records, resuming, appending."""

from __future__ import annotations

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


def append_lines(f: Any, records: Sequence[dict[str, Any]]) -> None:
    """Appends whole lines in one write, then flushes them to disk."""
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())
