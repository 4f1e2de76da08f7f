"""`sparsevlm eval` shared between processes: `jax.distributed` on localhost, CPU, gloo.

Real processes (the installed `sparsevlm` console script) on a tiny converted model: one
process, then two processes (a free localhost port as the coordinator) must write the same
answers file byte for byte; two processes of which one is killed mid-run (then the other too),
restarted, must complete it to the same bytes, every question exactly once. The protocol itself
(shares, part files, merge, resumption with another process count) is also driven in threads
with a fake pipeline, and the merge and the flag checks are tested as functions.

`--sparse v1 --capacity exact --batch-size 1`: a batch's composition (which differs between
one and two processes) cannot change what is recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sparsevlm_jax import distributed
from sparsevlm_jax import eval as ev
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.sparse.config import SparseConfig

PROMPTS = ("What is in the image?", "Describe the image in detail.", "What color is the car?",
           "Is there a cat on the table?")  # fmt: skip
NUM_QUESTIONS = 8
SPARSE = ["--sparse", "v1", "--layers", "1,2", "--scale", "1", "--bias", "0", "--capacity", "exact"]
GEN = ["--max-new-tokens", "4", "--batch-size", "1"]
TIMEOUT_S = 240


# ----------------------------------------------------------------------------------------------
# Real processes


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """`ckpt/` (the tiny model, converted), two images, `q.jsonl`, `xla-cache/`."""
    pytest.importorskip("torch")
    from tiny_models import save_tiny_llava, tiny_llava

    from sparsevlm_jax.cli import main

    d = tmp_path_factory.mktemp("multihost")
    save_tiny_llava(tiny_llava(), d / "hf")
    assert main(["convert", str(d / "hf"), str(d / "ckpt"), "--dtype", "float32", "--quiet"]) == 0
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(d / name)
    with open(d / "q.jsonl", "w") as f:
        for i in range(NUM_QUESTIONS):
            q = {"question_id": f"q{i}", "image": "ab"[i % 2] + ".png", "text": PROMPTS[i % 4]}
            if i % 3 == 0:
                q["answer"] = "yes"
            f.write(json.dumps(q) + "\n")
    (d / "xla-cache").mkdir()
    return d


def sparsevlm() -> list[str]:
    """The installed console script (else the module)."""
    exe = shutil.which("sparsevlm")
    return [exe] if exe else [sys.executable, "-m", "sparsevlm_jax.cli"]


def env(work: Path, **extra: str) -> dict[str, str]:
    """CPU, a compilation cache shared by every run, no inherited distributed settings."""
    out = {k: v for k, v in os.environ.items() if k not in distributed.ENV.values()}
    out.pop("XLA_FLAGS", None)
    out.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(work / "xla-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        **extra,
    )
    return out


def eval_argv(work: Path, answers: Path, *extra: str) -> list[str]:
    return [*sparsevlm(), "eval", "--model", str(work / "ckpt"), "--questions",
            str(work / "q.jsonl"), "--image-folder", str(work), "--answers", str(answers),
            "--quiet", *SPARSE, *GEN, *extra]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two(work: Path, answers: Path) -> list[subprocess.Popen]:
    """Processes 0 and 1 of two: process 0 by flags, process 1 by JAX's environment variables."""
    address = f"localhost:{free_port()}"
    flags = ["--coordinator", address, "--num-processes", "2", "--process-id", "0"]
    variables = dict(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    return [
        subprocess.Popen(eval_argv(work, answers, *flags), env=env(work), **PIPES),
        subprocess.Popen(eval_argv(work, answers), env=env(work, **variables), **PIPES),
    ]


PIPES = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen]) -> list[str]:
    """Waits for every process; returns their stdouts; fails with their stderr unless all
    exit 0."""
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.fixture(scope="module")
def single(work) -> bytes:
    """The answers file of one process."""
    answers = work / "single.jsonl"
    (out,) = finish([subprocess.Popen(eval_argv(work, answers), env=env(work), **PIPES)])
    assert f"{NUM_QUESTIONS} answers written, 0 already there" in out
    assert "exact match:" in out
    ids = [json.loads(line)["question_id"] for line in answers.read_text().splitlines()]
    assert ids == [f"q{i}" for i in range(NUM_QUESTIONS)]
    return answers.read_bytes()


def test_two_processes_write_the_single_process_file(work, single):
    answers = work / "two.jsonl"
    out0, out1 = finish(start_two(work, answers))
    assert answers.read_bytes() == single
    assert ev.part_files(answers) == []
    half = NUM_QUESTIONS // 2
    assert f"{answers}.part-0-of-2: {half} answers written, 0 already there" in out0
    assert f"{answers}.part-1-of-2: {half} answers written, 0 already there" in out1
    assert f"{NUM_QUESTIONS} answers in question order, merged from 2 part files" in out0
    assert "exact match:" in out0 and "exact match:" not in out1


def test_killed_process_then_restart_completes_the_file(work, single):
    """SIGKILL process 1 once its part file holds an answer, then SIGTERM process 0 (as a
    scheduler ends the job); both restarted finish the file: the single-process bytes."""
    answers = work / "killed.jsonl"
    part1 = ev.part_path(answers, 1, 2)
    procs = start_two(work, answers)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while procs[1].poll() is None and lines_in(part1) < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert procs[1].poll() is None, procs[1].communicate()[1][-3000:]  # still running
        procs[1].send_signal(signal.SIGKILL)
        procs[0].send_signal(signal.SIGTERM)  # ends it (JAX's notifier would swallow it)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert [p.returncode for p in procs] == [-signal.SIGTERM, -signal.SIGKILL]
    assert 1 <= lines_in(part1) < NUM_QUESTIONS // 2
    assert not answers.exists()
    with open(part1, "a") as f:  # a line torn by the kill
        f.write('{"question_id": "q')

    out0, out1 = finish(start_two(work, answers))
    assert answers.read_bytes() == single
    assert ev.part_files(answers) == []
    assert "already there" in out1 and "merged from 2 part files" in out0


# ----------------------------------------------------------------------------------------------
# The protocol, in threads with a fake pipeline


class FakePipe:
    """Answers from the prompt and the image path; stats with wall-clock timings."""

    cfg = SimpleNamespace(num_image_tokens=16)

    def generate(self, images, prompts, *, sparse, seed, batch_size, **generation):
        assert len(images) == len(prompts) == batch_size
        return [
            SimpleNamespace(
                text=f"{Path(i).name}: {p}",
                stats={"prefill_seconds": time.perf_counter(), "decode_seconds": 0.5},
            )
            for i, p in zip(images, prompts, strict=True)
        ]


def fake_questions(n: int) -> list[ev.Question]:
    return [ev.Question(f"q{i}", f"{i}.png", f"question {i}?", i + 1) for i in range(n)]


def run_processes(
    answers: Path | list[Path],
    questions: list[ev.Question],
    n: int,
    *,
    fail: int | None = None,
    **kw,
) -> list[ev.EvalSummary | BaseException]:
    """`run_eval` as n processes (threads) with a shared barrier; process `fail` dies after
    its first answer (the barrier is broken, so the others stop too). `answers` may name one
    path per process (hosts that do not share a directory)."""
    paths = answers if isinstance(answers, list) else [answers] * n
    wall = threading.Barrier(n)
    results: list = [None] * n

    def barrier(name: str) -> None:
        wall.wait(timeout=30)

    def die(written: int) -> None:
        raise KeyboardInterrupt("killed")

    def process(p: int) -> None:
        try:
            results[p] = ev.run_eval(
                FakePipe(), questions, "imgs", paths[p], SparseConfig(), model_id="m",
                progress=False, share=ev.Share(p, n), barrier=barrier,
                on_batch=die if p == fail else None, **kw,
            )  # fmt: skip
        except BaseException as e:
            if p == fail:  # a dead process never reaches the barrier
                wall.abort()
            results[p] = e

    threads = [threading.Thread(target=process, args=(p,)) for p in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_any_process_count_writes_the_same_bytes(tmp_path):
    questions = fake_questions(7)
    files = {}
    for n in (1, 2, 3):
        answers = tmp_path / f"a{n}.jsonl"
        summaries = run_processes(answers, questions, n)
        files[n] = answers.read_bytes()
        assert ev.part_files(answers) == []
        assert [s.written for s in summaries] == [len(range(p, 7, n)) for p in range(n)]
        assert summaries[0].accuracy is None and (n == 1) == (summaries[0].merged is None)
    assert files[1] == files[2] == files[3]
    records = [json.loads(line) for line in files[1].decode().splitlines()]
    assert [r["question_id"] for r in records] == [f"q{i}" for i in range(7)]
    assert all(r["metadata"] == {} for r in records)  # no wall-clock timings


def test_interrupted_run_resumes_with_another_process_count(tmp_path):
    questions, reference = fake_questions(9), tmp_path / "ref.jsonl"
    run_processes(reference, questions, 1)
    answers = tmp_path / "a.jsonl"
    results = run_processes(answers, questions, 3, fail=1)
    assert isinstance(results[1], KeyboardInterrupt)
    assert all(isinstance(r, threading.BrokenBarrierError) for r in (results[0], results[2]))
    assert not answers.exists()
    assert [lines_in(ev.part_path(answers, p, 3)) for p in range(3)] == [3, 1, 3]
    with open(ev.part_path(answers, 1, 3), "a") as f:
        f.write('{"question_id": "q4", "te')  # torn by the interruption
    # Restarted with two processes: what the three wrote counts as answered.
    summaries = run_processes(answers, questions, 2)
    assert [s.already for s in summaries] == [4, 3] and [s.written for s in summaries] == [1, 1]
    assert summaries[0].merged == ev.Merged(9, 5)  # 2 parts of two, 3 of three
    assert answers.read_bytes() == reference.read_bytes()
    assert ev.part_files(answers) == []


def test_unshared_answers_directories_are_reported(tmp_path):
    (tmp_path / "host0").mkdir()
    (tmp_path / "host1").mkdir()
    paths = [tmp_path / "host0" / "a.jsonl", tmp_path / "host1" / "a.jsonl"]
    results = run_processes(paths, fake_questions(4), 2)
    assert isinstance(results[0], InputError) and isinstance(results[1], ev.EvalSummary)
    assert "2 of 4 questions unanswered after the merge (first 'q1')" in str(results[0])
    assert "share the answers directory" in str(results[0])


def test_single_process_folds_in_stray_part_files(tmp_path):
    questions, reference = fake_questions(5), tmp_path / "ref.jsonl"
    run_processes(reference, questions, 1)
    lines = reference.read_bytes().splitlines(True)
    answers = tmp_path / "a.jsonl"
    ev.part_path(answers, 1, 2).write_bytes(lines[3] + lines[1])
    (summary,) = run_processes(answers, questions, 1)
    assert summary.written == 3 and summary.already == 2 and summary.merged.parts == 1
    assert answers.read_bytes() == reference.read_bytes()
    assert ev.part_files(answers) == []


# ----------------------------------------------------------------------------------------------
# The merge


def record(qid: str, text: str = "x") -> str:
    return json.dumps({"question_id": qid, "text": text}) + "\n"


def test_merge_orders_dedups_and_cuts_torn_lines(tmp_path):
    answers = tmp_path / "a.jsonl"
    answers.write_text(record("q3") + record("extra1"))
    ev.part_path(answers, 0, 2).write_text(record("q0") + record("q2", "first") + '{"quest')
    ev.part_path(answers, 1, 2).write_text(record("extra2") + record("q1"))
    ev.part_path(answers, 2, 3).write_text(record("q2", "second") + record("q4"))
    (tmp_path / "a.jsonl.part-x-of-2").write_text("not ours")
    (tmp_path / "b.jsonl.part-0-of-2").write_text("another answers file's")
    merged = ev.merge_answers(answers, fake_questions(5))
    assert (merged.answers, merged.parts) == (7, 3)
    got = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in got] == ["q0", "q1", "q2", "q3", "q4", "extra1", "extra2"]
    assert got[2]["text"] == "first"
    assert ev.part_files(answers) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.jsonl", "a.jsonl.part-x-of-2", "b.jsonl.part-0-of-2"]  # fmt: skip


def test_merge_crash_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    answers = tmp_path / "a.jsonl"
    answers.write_text(record("q1"))
    part = ev.part_path(answers, 0, 2)
    part.write_text(record("q0"))

    def crash(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk on fire"):
        ev.merge_answers(answers, fake_questions(2))
    assert answers.read_text() == record("q1") and part.read_text() == record("q0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.jsonl.part-0-of-2"]
    monkeypatch.undo()
    ev.merge_answers(answers, fake_questions(2))
    assert answers.read_text() == record("q0") + record("q1")


def test_done_ids_cut_only_the_own_file(tmp_path):
    answers = tmp_path / "a.jsonl"
    own, other = ev.part_path(answers, 0, 2), ev.part_path(answers, 1, 2)
    own.write_text(record("q0") + '{"question_id": "q2"')
    other.write_text(record("q1") + '{"question_id": "q3"')
    answers.write_text(record("q4"))
    assert ev.done_ids(answers, own) == {"q0", "q1", "q4"}
    assert own.read_text() == record("q0")
    assert other.read_text().endswith('"q3"')
    other.write_text("[1, 2]\n")
    with pytest.raises(InputError, match=r"part-1-of-2: line 1: not an answer record"):
        ev.done_ids(answers, own)


def test_answer_ids_are_deterministic():
    q = ev.Question("q0", "a.png", "What?", 1)
    sparse = SparseConfig(method="v1", layers=(1, 2), scale=1.0)
    a = ev.answer_id(q, "tiny", sparse)
    assert a == ev.answer_id(q, "tiny", sparse) and len(a) == 32
    assert a != ev.answer_id(q, "other", sparse)
    assert a != ev.answer_id(ev.Question(0, "a.png", "What?", 1), "tiny", sparse)
    assert a != ev.answer_id(q, "tiny", SparseConfig())


# ----------------------------------------------------------------------------------------------
# Flags and environment


def test_cluster_from_flags_and_environment():
    assert distributed.cluster_from(environ={}) == distributed.Cluster()
    assert not distributed.cluster_from(num_processes=1, process_id=0, environ={}).multi
    c = distributed.cluster_from("h:1234", 4, 3, environ={})
    assert (c.multi, c.num_processes, c.process_id, c.coordinator) == (True, 4, 3, "h:1234")
    environ = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:99", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": "1"}  # fmt: skip
    assert distributed.cluster_from(environ=environ) == distributed.Cluster(2, 1, "10.0.0.1:99")
    # Flags win over the environment.
    assert distributed.cluster_from(process_id=0, environ=environ).process_id == 0


@pytest.mark.parametrize(
    "flags, environ, needle",
    [
        ((None, 2, 2), {}, "--process-id must be in 0..1, got 2"),
        ((None, 2, -1), {}, "--process-id must be in 0..1, got -1"),
        ((None, 0, None), {}, "--num-processes must be >= 1, got 0"),
        ((None, 2, 0), {}, "2 processes need process 0's address (--coordinator HOST:PORT"),
        (("h:1", 2, None), {}, "2 processes: say which one this is (--process-id"),
        ((None, None, 1), {}, "--process-id needs the process count"),
        (("h:1", None, None), {}, "--coordinator needs the process count"),
        (("h", 2, 0), {}, "--coordinator must be HOST:PORT"),
        (("h:0", 2, 0), {}, "--coordinator must be HOST:PORT"),
        ((None, None, None), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES must be an int"),
        ((None, None, None), {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5",
                              "JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_PROCESS_ID must be in"),
    ],
)  # fmt: skip
def test_inconsistent_settings_are_one_line_errors(flags, environ, needle):
    with pytest.raises(InputError) as e:
        distributed.cluster_from(*flags, environ=environ)
    assert needle in str(e.value) and "\n" not in str(e.value)
