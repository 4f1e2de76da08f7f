"""One writer per file: an exclusive `flock` on a lock file beside it (`FILE.lock`).

The lock file holds the holder's pid and host, for the message a second writer gets. The
kernel releases a `flock` when its process dies, so a SIGKILLed run never leaves a stale lock:
its lock file stays behind (with a dead pid) and the next run simply locks it again. A holder
removes the lock file before releasing it; whoever locked a file that was removed meanwhile
opens the new one and locks again (so two processes never both hold `FILE.lock`).

`flock` also works between hosts on NFS (Linux emulates it with POSIX byte-range locks there).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Callable
from pathlib import Path

from sparsevlm_jax.errors import InputError

SUFFIX = ".lock"
WAIT_HINT = "wait for it to finish, or pass --wait to wait and then resume"


class LockedError(InputError):
    """Another live process holds the lock of a file (one line: the file and the holder)."""


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of `path`: `path` + ".lock", beside it."""
    return Path(f"{os.fspath(path)}{SUFFIX}")


def _holder(fd: int) -> str:
    """`pid 1234 on host`, as the holder wrote it into the lock file (else "an unknown process")."""
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    except OSError:
        text = []
    if len(text) >= 2 and text[0].isdigit():
        return f"pid {text[0]} on {text[1]}"
    return "an unknown process"


class FileLock:
    """An exclusive lock on `path` (held through `FILE.lock`); a context manager."""

    def __init__(
        self, path: str | os.PathLike, what: str = "answers file", hint: str = WAIT_HINT
    ) -> None:
        self.path = Path(path)
        self.what = what
        self.hint = hint  # the end of the message a second writer gets
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True between a successful `acquire` and `release`."""
        return self._fd is not None

    def acquire(self, wait: bool = False, on_wait: Callable[[str], None] | None = None) -> None:
        """Takes the lock; with `wait`, blocks until the holder ends (`on_wait(holder)` first).

        Raises:
          LockedError: another process holds it and not `wait` (naming the file and holder).
          OSError: the lock file cannot be created (a read-only or full file system, ...).
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: lock already held")
        target = lock_path(self.path)
        while True:
            fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if not self._try(fd):
                    holder = _holder(fd)
                    if not wait:
                        raise LockedError(
                            f"{self.path}: {self.what} in use by another run ({holder}): "
                            f"{self.hint}"
                        )
                    if on_wait is not None:
                        on_wait(holder)
                        on_wait = None
                    fcntl.flock(fd, fcntl.LOCK_EX)
                if _same_file(fd, target):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # locked a lock file its holder had just removed: lock the new one
        self._fd = fd
        try:  # the holder's name is only for messages: a full disk must not stop the run here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass

    @staticmethod
    def _try(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def release(self) -> None:
        """Removes the lock file and releases the lock (nothing when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            lock_path(self.path).unlink(missing_ok=True)
        except OSError:
            pass  # a read-only directory now: the lock file stays, unlocked (harmless)
        finally:
            os.close(fd)

    def __enter__(self) -> FileLock:
        if self._fd is None:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    """True when `path` still names the open lock file `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def lock(
    path: str | os.PathLike,
    what: str = "answers file",
    wait: bool = False,
    on_wait: Callable[[str], None] | None = None,
    hint: str = WAIT_HINT,
) -> FileLock:
    """An acquired `FileLock` on `path` (see `FileLock.acquire`)."""
    held = FileLock(path, what, hint)
    held.acquire(wait, on_wait)
    return held
