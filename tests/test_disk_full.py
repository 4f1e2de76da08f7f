"""A disk that fills up under `sparsevlm eval` and `sparsevlm convert` (the installed command,
real processes): one line, exit 2, no torn answers line, no output or temporary directory left.

The full disk is a real tmpfs of a few KiB when this process may mount one (root). Elsewhere
the same tests run against a simulated one: a `sitecustomize` put on the subprocesses' path
makes `os.write` to files under the directory fail with ENOSPC once they hold the given number
of bytes, and `shutil.disk_usage` report what is left (orbax's own writes, in C++, are not
covered there; `test_convert_disk_filling_while_writing` then stands in with a writer that
fails as tensorstore does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparsevlm_jax import checkpoint
from sparsevlm_jax.cli import main

NUM_QUESTIONS = 8
SPARSE = ["--sparse", "v1", "--layers", "1,2", "--scale", "1", "--bias", "0", "--capacity", "exact"]
TIMEOUT_S = 240
SMALL, LARGE = 8 * 1024, 256 * 1024  # room for ~5 answer lines of the tiny model; for all

SITECUSTOMIZE = """
import errno, os, shutil
_dir = os.environ.get("SPARSEVLM_TEST_FULL_DIR")
if _dir:
    _limit = int(os.environ["SPARSEVLM_TEST_FULL_BYTES"])
    _write, _usage = os.write, shutil.disk_usage

    def _used():  # in whole pages, as tmpfs counts
        sizes = [e.stat().st_size for e in os.scandir(_dir) if e.is_file()]
        return sum(-(-n // 4096) * 4096 for n in sizes)

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(_dir + os.sep):
            room = _limit - _used() + (-os.fstat(fd).st_size % 4096)
            if room < len(data):
                if room > 0:
                    _write(fd, bytes(data[:room]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _write(fd, data)

    def disk_usage(path):
        u = _usage(path)
        if os.path.abspath(path).startswith(_dir):
            return type(u)(u.total, u.used, max(0, _limit - _used()))
        return u

    os.write, shutil.disk_usage = write, disk_usage
"""


class FullDisk:
    """A directory on a small file system: a tmpfs when mountable, else simulated."""

    def __init__(self, root: Path, size: int) -> None:
        self.dir = root / "full"
        self.dir.mkdir()
        self.size = size
        self.mounted = self._mount()
        if not self.mounted:
            (root / "site").mkdir()
            (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
            self.site = root / "site"

    def _mount(self) -> bool:
        if os.geteuid() != 0 or not shutil.which("mount"):
            return False
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.dir)]
        return subprocess.run(cmd, capture_output=True).returncode == 0

    def resize(self, size: int) -> None:
        """Frees (or takes) room."""
        self.size = size
        if self.mounted:
            cmd = ["mount", "-o", f"remount,size={size}", str(self.dir)]
            subprocess.run(cmd, check=True, capture_output=True)

    def env(self) -> dict[str, str]:
        if self.mounted:
            return {}
        path = os.pathsep.join(filter(None, [str(self.site), os.environ.get("PYTHONPATH")]))
        return {"PYTHONPATH": path, "SPARSEVLM_TEST_FULL_DIR": str(self.dir),
                "SPARSEVLM_TEST_FULL_BYTES": str(self.size)}  # fmt: skip

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.dir)], capture_output=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """`hf/` (a tiny llava-hf model), `ckpt/` (converted), an image, `q.jsonl`, `xla-cache/`."""
    from tiny_models import save_tiny_llava, tiny_llava

    d = tmp_path_factory.mktemp("diskfull")
    save_tiny_llava(tiny_llava(), d / "hf")
    assert main(["convert", str(d / "hf"), str(d / "ckpt"), "--dtype", "float32", "--quiet"]) == 0
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(d / "a.png")
    with open(d / "q.jsonl", "w") as f:
        for i in range(NUM_QUESTIONS):
            f.write(json.dumps({"question_id": f"q{i}", "image": "a.png", "text": "What?"}) + "\n")
    (d / "xla-cache").mkdir()
    return d


@pytest.fixture
def disk(tmp_path):
    full = FullDisk(tmp_path, SMALL)
    yield full
    full.close()


def sparsevlm(*args: str, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = shutil.which("sparsevlm")
    argv = [exe] if exe else [sys.executable, "-m", "sparsevlm_jax.cli"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    environ.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   **extra_env)  # fmt: skip
    return subprocess.run(
        [*argv, *args], env=environ, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsevlm: error: "), proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_eval_disk_full_then_resumed_after_freeing_space(work, disk):
    answers = disk.dir / "a.jsonl"
    args = ["eval", "--model", str(work / "ckpt"), "--questions", str(work / "q.jsonl"),
            "--image-folder", str(work), "--answers", str(answers), "--quiet",
            "--max-new-tokens", "2", *SPARSE]  # fmt: skip
    environ = {"JAX_COMPILATION_CACHE_DIR": str(work / "xla-cache")}
    proc = sparsevlm(*args, extra_env={**environ, **disk.env()})
    line = one_error_line(proc, f"{answers}: No space left on device (while appending answers)")
    data = answers.read_bytes()
    assert data.endswith(b"\n")  # no torn line, right away
    safe = [json.loads(x)["question_id"] for x in data.decode().splitlines()]
    assert 1 <= len(safe) < NUM_QUESTIONS and len(set(safe)) == len(safe)
    assert f"{len(safe)} of {NUM_QUESTIONS} answers are safe; free some space, then rerun" in line
    assert f"answer only the {NUM_QUESTIONS - len(safe)} missing" in line
    assert sorted(os.listdir(disk.dir)) == ["a.jsonl"]  # no lock file left

    disk.resize(LARGE)
    proc = sparsevlm(*args, extra_env={**environ, **disk.env()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{NUM_QUESTIONS - len(safe)} answers written, {len(safe)} already there" in proc.stdout
    ids = [json.loads(x)["question_id"] for x in answers.read_text().splitlines()]
    assert ids[: len(safe)] == safe and sorted(ids) == sorted(f"q{i}" for i in range(8))


def test_visualize_on_a_full_disk_is_one_line(work, disk):
    out = disk.dir / "kept.png"
    proc = sparsevlm("visualize", "--model", str(work / "ckpt"), "--image", str(work / "a.png"),
                     "--prompt", "What?", *SPARSE, "--out", str(out),
                     extra_env=disk.env())  # fmt: skip
    one_error_line(proc, f"{out}: No space left on device")
    assert os.listdir(disk.dir) == []  # no picture, no temporary file


def test_convert_refuses_early_without_the_room(work, disk):
    dst = disk.dir / "ckpt"
    proc = sparsevlm("convert", str(work / "hf"), str(dst), "--dtype", "float32", "--quiet",
                     extra_env=disk.env())  # fmt: skip
    line = one_error_line(proc, f"{dst}: not enough free space for the checkpoint: it needs ")
    assert line.endswith(f"{disk.dir} has 8.0 KiB free"), line
    assert " MiB, " in line  # the projected size (~1 MiB of float32 weights + margin)
    assert proc.stdout == "" and os.listdir(disk.dir) == []


def test_convert_disk_filling_while_writing(work, tmp_path, monkeypatch, capsys):
    """The room was there when checked, and gone while orbax wrote (another writer): one
    line, exit 2, and neither the checkpoint nor its temporary directory is left."""
    full = FullDisk(tmp_path, 64 * 1024)
    try:
        monkeypatch.setattr(checkpoint, "check_free_space", lambda path, needed: None)
        if not full.mounted:  # fail as tensorstore does, from orbax's writer

            def failing():
                raise ValueError(
                    "RESOURCE_EXHAUSTED: Error writing ...: Failed to write 4 bytes "
                    "to file 14: No space left on device [os_error_code='28']"
                )

            monkeypatch.setattr(checkpoint, "_params_checkpointer", failing)
        dst = full.dir / "ckpt"
        rc = main(["convert", str(work / "hf"), str(dst), "--dtype", "float32", "--quiet"])
        out, err = capsys.readouterr()
        assert rc == 2 and out == "", err
        assert err.splitlines() == [
            f"sparsevlm: error: {dst}: cannot write the checkpoint: No space left on device"
        ]
        assert os.listdir(full.dir) == []
    finally:
        full.close()
