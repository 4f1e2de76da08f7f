"""The resumable answers file: answers appended batch by batch, reused by a rerun of the same
model and questions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

PROGRESS_FILE = "accuracy.progress.jsonl"


def model_digest(model: str | Path) -> str:
    """sha256 over the model directory's files (relative path and bytes, sorted)."""
    root = Path(model)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


class Progress:
    """Answers per method, appended one batch per line to a JSONL file, so a rerun resumes.

    Line 1 is a header (model digest, task, questions); each later line is
    {"method", "config", "lo", "seconds", "rows": [per question of the batch]}. A header that
    differs from this run's (or `fresh`) empties the file; a torn last line is ignored.
    """

    def __init__(self, path: Path, header: dict[str, Any], fresh: bool = False):
        self.path, self.header = path, header
        self.done: dict[tuple[str, int], dict[str, Any]] = {}
        lines = path.read_text().splitlines() if path.is_file() and not fresh else []
        if lines and _loads(lines[0]) == header:
            for line in lines[1:]:
                rec = _loads(line)
                if rec is not None:
                    self.done[(json.dumps(rec["config"], sort_keys=True), rec["lo"])] = rec
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(header) + "\n")

    def get(self, config: dict[str, Any], lo: int) -> dict[str, Any] | None:
        """The stored batch of `config` starting at question `lo`, or None."""
        return self.done.get((json.dumps(config, sort_keys=True), lo))

    def add(self, method: str, config: dict[str, Any], lo: int, seconds: float, rows: list):
        """Appends one batch (flushed and fsync'd)."""
        import os

        rec = {"method": method, "config": config, "lo": lo, "seconds": seconds, "rows": rows}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[(json.dumps(config, sort_keys=True), lo)] = rec

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _loads(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
