"""What one eval process locks, and which failures are the environment's rather than bugs.

A process locks (`locks.FileLock`) every file it will write, for its whole run, before it
loads the model: a single process the answers file; process p of N > 1 its part file, and
process 0 also the answers file it merges into (in that order: answers file first). A merge
locks each part file it folds in (`parts.merge_answers`). A second run on a locked file stops
with `locks.LockedError` (one line naming the file and the holder) or, with `wait`, waits for
the holder to end and then resumes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sparsevlm_jax.errors import InputError
from sparsevlm_jax.eval.locks import WAIT_HINT, FileLock
from sparsevlm_jax.eval.parts import part_path

# A full disk or quota, no permission, a read-only file system, a file removed under the run,
# a failing disk: reported on one line (exit 2), never as a bug.
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.EIO}
)


def environment_failure(e: BaseException) -> bool:
    """True for an OSError whose errno is one of `ENVIRONMENT_ERRNOS`."""
    return isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS


def os_error_line(e: OSError, path: str | os.PathLike | None = None) -> str:
    """`PATH: cause` for an OSError (its own file name first, else `path`)."""
    where = e.filename if e.filename is not None else path
    cause = e.strerror or str(e)
    return f"{os.fspath(where)}: {cause}" if where is not None else cause


@contextmanager
def environment_errors(path: str | os.PathLike | None = None) -> Iterator[None]:
    """Turns the environment's OSErrors (`environment_failure`) inside into one-line
    `InputError`s naming the file (its own, else `path`) and the cause; others pass."""
    try:
        yield
    except OSError as e:
        if not environment_failure(e):
            raise
        raise InputError(os_error_line(e, path)) from None


class Claim:
    """The locks of one process of an eval (`index` of `count`); a context manager.

    `acquire` takes them (see the module); `release_own` lets go of a part file once its
    process has answered its share (so process 0 can merge it), `release` of everything.
    """

    def __init__(
        self,
        answers_path: str | os.PathLike,
        index: int = 0,
        count: int = 1,
        wait: bool = False,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.answers_path = Path(answers_path)
        self.index, self.count = index, count
        self.wait, self.on_wait = wait, on_wait
        self._answers: FileLock | None = None
        self._own: FileLock | None = None

    def acquire(self) -> None:
        """Locks the answers file (a single process, or process 0), then the part file.

        Raises:
          LockedError: another live process holds one of them (and not `wait`).
          OSError: a lock file cannot be created.
        """
        try:
            if self.index == 0:
                self._answers = FileLock(self.answers_path, "answers file", WAIT_HINT)
                self._answers.acquire(self.wait, self._notify(self.answers_path))
            if self.count > 1:
                own = part_path(self.answers_path, self.index, self.count)
                hint = (
                    f"is --process-id {self.index} of {self.count} running twice? Give every "
                    f"process its own id (or pass --wait)"
                )
                self._own = FileLock(own, "part file", hint)
                self._own.acquire(self.wait, self._notify(own))
        except BaseException:
            self.release()
            raise

    def _notify(self, path: Path) -> Callable[[str], None] | None:
        if self.on_wait is None:
            return None
        on_wait = self.on_wait
        return lambda holder: on_wait(f"{path}: in use by {holder}; waiting for it (--wait)")

    def release_own(self) -> None:
        """Releases the part file (several processes); the answers file stays locked."""
        if self._own is not None:
            self._own.release()
            self._own = None

    def release(self) -> None:
        """Releases every lock this claim holds."""
        self.release_own()
        if self._answers is not None:
            self._answers.release()
            self._answers = None

    def __enter__(self) -> Claim:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
