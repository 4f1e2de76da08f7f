"""One writer per answers file: `sparsevlm eval` runs sharing a file, through the installed
command (real processes on a tiny converted model), plus the locks and the merge in-process.

A run holds `ANSWERS.lock` from before it loads the model to its end. To make "at once"
deterministic, the first run is stopped (SIGSTOP) as soon as its lock file names it, the second
is started against it, then the first is continued (or killed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sparsevlm_jax import eval as ev
from sparsevlm_jax.sparse.config import SparseConfig

NUM_QUESTIONS = 6
SPARSE = ["--sparse", "v1", "--layers", "1,2", "--scale", "1", "--bias", "0", "--capacity", "exact"]
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """`ckpt/` (the tiny model, converted), an image, `q.jsonl`, `xla-cache/`."""
    from tiny_models import save_tiny_llava, tiny_llava

    from sparsevlm_jax.cli import main

    d = tmp_path_factory.mktemp("locking")
    save_tiny_llava(tiny_llava(), d / "hf")
    assert main(["convert", str(d / "hf"), str(d / "ckpt"), "--dtype", "float32", "--quiet"]) == 0
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(d / "a.png")
    with open(d / "q.jsonl", "w") as f:
        for i in range(NUM_QUESTIONS):
            f.write(json.dumps({"question_id": f"q{i}", "image": "a.png", "text": "What?"}) + "\n")
    (d / "xla-cache").mkdir()
    return d


def sparsevlm() -> list[str]:
    exe = shutil.which("sparsevlm")
    return [exe] if exe else [sys.executable, "-m", "sparsevlm_jax.cli"]


def env(work: Path) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    out.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(work / "xla-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return out


def start(work: Path, answers: Path, *extra: str) -> subprocess.Popen:
    argv = [*sparsevlm(), "eval", "--model", str(work / "ckpt"), "--questions",
            str(work / "q.jsonl"), "--image-folder", str(work), "--answers", str(answers),
            "--quiet", "--max-new-tokens", "2", *SPARSE, *extra]  # fmt: skip
    return subprocess.Popen(
        argv, env=env(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def stopped_once_locked(proc: subprocess.Popen, locked: Path) -> None:
    """Waits (blocking on the file system, no timer) until `proc` wrote its pid into the lock
    file `locked`, then stops it."""
    import time

    deadline = time.monotonic() + TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        if locked.exists() and locked.read_text().split()[:1] == [str(proc.pid)]:
            proc.send_signal(signal.SIGSTOP)
            return
        time.sleep(0.01)
    raise AssertionError(f"no lock taken: {proc.communicate()[1][-2000:]}")


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def ids_in(path: Path) -> list[str]:
    return [json.loads(line)["question_id"] for line in path.read_text().splitlines()]


ALL = [f"q{i}" for i in range(NUM_QUESTIONS)]


def test_second_run_refuses_before_loading_then_the_first_completes(work):
    answers = work / "a.jsonl"
    first = start(work, answers)
    try:
        stopped_once_locked(first, ev.lock_path(answers))
        rc, out, err = finish(start(work, answers))
        first.send_signal(signal.SIGCONT)
    finally:
        first.send_signal(signal.SIGCONT)
    assert rc == 2 and out == "", err
    assert err.splitlines() == [
        f"sparsevlm: error: {answers}: answers file in use by another run (pid {first.pid} on "
        f"{os.uname().nodename}): wait for it to finish, or pass --wait to wait and then resume"
    ]
    rc, out, err = finish(first)
    assert rc == 0, err
    assert f"{NUM_QUESTIONS} answers written, 0 already there" in out
    assert ids_in(answers) == ALL
    assert not ev.lock_path(answers).exists()


def test_wait_resumes_after_the_first_run(work):
    answers = work / "w.jsonl"
    first = start(work, answers)
    try:
        stopped_once_locked(first, ev.lock_path(answers))
        second = start(work, answers, "--wait")
        waiting = second.stderr.readline()  # blocks until it waits for the lock
        first.send_signal(signal.SIGCONT)
        results = [finish(first), finish(second)]
    finally:
        first.send_signal(signal.SIGCONT)
    host = os.uname().nodename
    assert waiting == f"sparsevlm: {answers}: in use by pid {first.pid} on {host}; waiting for " \
        "it (--wait)\n"  # fmt: skip
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert f"0 answers written, {NUM_QUESTIONS} already there" in results[1][1]
    assert ids_in(answers) == ALL


def test_a_killed_holder_leaves_no_stale_lock(work):
    answers = work / "k.jsonl"
    first = start(work, answers)
    stopped_once_locked(first, ev.lock_path(answers))
    first.kill()
    finish(first)
    assert ev.lock_path(answers).read_text().split()[0] == str(first.pid)  # left behind
    rc, out, err = finish(start(work, answers))
    assert rc == 0, err
    assert ids_in(answers) == ALL and not ev.lock_path(answers).exists()


def test_two_processes_with_one_process_id(work):
    """The first waits to connect to a coordinator that never comes, holding its part file;
    the second with the same --process-id refuses at once."""
    answers = work / "p.jsonl"
    flags = ["--num-processes", "2", "--process-id", "1", "--coordinator", "localhost:9"]
    first = start(work, answers, *flags)
    try:
        part = ev.part_path(answers, 1, 2)
        stopped_once_locked(first, ev.lock_path(part))
        rc, out, err = finish(start(work, answers, *flags))
    finally:
        first.kill()
        finish(first)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"sparsevlm: error: {part}: part file in use by another run (pid "
                          f"{first.pid} ")  # fmt: skip
    assert "is --process-id 1 of 2 running twice?" in err
    assert not part.exists() and not answers.exists()


# ----------------------------------------------------------------------------------------------
# In-process: the locks, duplicates, a merge racing a late writer


class FakePipe:
    cfg = SimpleNamespace(num_image_tokens=16)

    def generate(self, images, prompts, **kw):
        return [SimpleNamespace(text=p, stats={}) for p in prompts]


def questions(n: int) -> list[ev.Question]:
    return [ev.Question(f"q{i}", f"{i}.png", f"question {i}?", i + 1) for i in range(n)]


def record(qid: str, text: str) -> str:
    return json.dumps({"question_id": qid, "text": text}) + "\n"


def test_lock_refuses_a_second_holder_and_removes_its_file(tmp_path):
    target = tmp_path / "a.jsonl"
    ev.lock_path(target).write_text("999999999 gone-host\n")  # a dead holder's lock file
    with ev.lock(target) as held:
        assert held.held
        with pytest.raises(ev.LockedError, match=f"pid {os.getpid()} on "):
            ev.lock(target)
    assert not ev.lock_path(target).exists()


def test_duplicates_are_reported_and_the_merge_keeps_the_first(tmp_path):
    answers = tmp_path / "a.jsonl"
    answers.write_text(record("q1", "first") + record("q0", "a") + record("q1", "second"))
    summary = ev.run_eval(FakePipe(), questions(3), "imgs", answers, SparseConfig(),
                          model_id="m", progress=False)  # fmt: skip
    assert summary.duplicates == {answers: 1} and summary.written == 1
    assert summary.duplicate_lines() == [
        f"{answers}: held 1 duplicate answer lines (question ids answered twice); the merge "
        "kept the first answer of each"
    ]
    got = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [(r["question_id"], r["text"]) for r in got] == [
        ("q0", "a"), ("q1", "first"), ("q2", "question 2?")]  # fmt: skip


def test_merge_refuses_a_part_file_still_being_written(tmp_path):
    answers = tmp_path / "a.jsonl"
    part = ev.part_path(answers, 1, 2)
    part.write_text(record("q1", "x"))
    with ev.lock(part, "part file"):  # a late writer of another run
        with pytest.raises(ev.LockedError, match="part-1-of-2: part file in use by another run"):
            ev.merge_answers(answers, questions(2))
    assert part.read_text() == record("q1", "x") and not answers.exists()
    assert ev.merge_answers(answers, questions(2)).parts == 1
    assert answers.read_text() == record("q1", "x") and sorted(os.listdir(tmp_path)) == ["a.jsonl"]
