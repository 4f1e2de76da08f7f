"""The eval loop: a process's share of the questions answered batch by batch, then merged."""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsevlm_jax.errors import InputError
from sparsevlm_jax.eval.answers import Appender, duplicate_lines, read_answers
from sparsevlm_jax.eval.claim import Claim, environment_failure, os_error_line
from sparsevlm_jax.eval.parts import Merged, done_ids, merge_answers, part_files, part_path
from sparsevlm_jax.eval.questions import DEFAULT_FRAMES, Question, visual_input
from sparsevlm_jax.eval.scoring import Accuracy, accuracy
from sparsevlm_jax.eval.stats import sparse_to_json, stats_to_json
from sparsevlm_jax.sparse.config import SparseConfig

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
    duplicates: dict[Path, int] = field(default_factory=dict)  # file -> lines repeating an id

    def duplicate_lines(self) -> list[str]:
        """One line per file that held duplicate question ids when the run started."""
        return [
            f"{path}: held {n} duplicate answer lines (question ids answered twice); the merge "
            "kept the first answer of each"
            for path, n in self.duplicates.items()
        ]

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
    claim: Claim | None = None,
    wait: bool = False,
) -> EvalSummary:
    """Answers this process's share of the first `limit` questions (all when None), skipping
    those already answered in `answers_path` or its part files; merges when it is the last step.

    `pipe` is a `LlavaPipeline`. The questions must already be validated (`read_questions`,
    `check_images`, `check_prompts`). Each batch of `batch_size` answers is appended, flushed
    and fsync'd before the next batch starts; `on_batch(n_written_so_far)` runs after each.
    With several processes (`share.count` > 1) every process must call this with the same
    arguments but its own `share.index`; `barrier(name)` waits for all of them (`sparsevlm_jax.
    distributed.barrier`): after answering, and after process 0 has merged.

    `claim` holds this process's locks (`Claim`, taken by the caller before loading the model);
    None takes them here (`wait`: waits for another run holding one). A full disk, a removed
    file and the like while appending or merging raise `InputError` saying what is safe.

    Raises:
      LockedError: another run writes a file this process needs (and not `wait`).
      InputError: bad arguments, unanswered questions after a merge, the environment's failures.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if share.count > 1 and barrier is None:
        raise ValueError("several processes need a barrier")
    with ExitStack() as held:
        if claim is None:
            claim = held.enter_context(Claim(answers_path, share.index, share.count, wait))
        return _run(
            pipe, questions, image_folder, answers_path, sparse, model_id, batch_size, limit,
            dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p), seed,
            progress, on_batch, share, barrier, claim,
        )  # fmt: skip


def _run(
    pipe: Any,
    questions: Sequence[Question],
    image_folder: str | os.PathLike,
    answers_path: str | os.PathLike,
    sparse: SparseConfig,
    model_id: str,
    batch_size: int,
    limit: int | None,
    generation: dict[str, Any],
    seed: int,
    progress: bool,
    on_batch: Callable[[int], None] | None,
    share: Share,
    barrier: Callable[[str], None] | None,
    claim: Claim,
) -> EvalSummary:
    """`run_eval` once this process holds its locks."""
    selected = list(questions if limit is None else questions[:limit])
    mine, out = share.of(selected), share.path(answers_path)
    done = done_ids(answers_path, out)
    duplicates: dict[Path, int] = {}
    if share.index == 0:
        for path in (Path(answers_path), *part_files(answers_path)):
            if n := duplicate_lines(path):
                duplicates[path] = n
    # A single process merges the part files of an earlier run with several, or duplicates.
    must_merge = share.count == 1 and bool(part_files(answers_path) or duplicates)
    pending = [q for q in mine if q.question_id not in done]
    seeds = {q.question_id: seed + i for i, q in enumerate(selected)}
    desc = "eval" if share.count == 1 else f"eval {share.index}/{share.count}"
    bar = _progress(len(mine), len(mine) - len(pending), desc, progress)
    try:
        with bar:
            written = _answer(
                pipe, pending, image_folder, out, sparse, model_id, batch_size, seeds,
                generation, bar, on_batch,
            )  # fmt: skip
    except OSError as e:
        if not environment_failure(e):
            raise
        raise InputError(_write_failure(e, answers_path, out, mine)) from None
    merged = None
    if share.count > 1:
        claim.release_own()  # process 0 locks every part file to merge it
        barrier("sparsevlm-eval-answered")
        failure = None
        if share.index == 0:
            try:
                merged = _merge(answers_path, questions, claim)
            except InputError as e:  # the others must still pass the barrier below
                failure = e
        barrier("sparsevlm-eval-merged")
        if failure is not None:
            raise failure
    elif must_merge:
        merged = _merge(answers_path, questions, claim)
    answers = read_answers(answers_path) if share.index == 0 else {}
    if share.count > 1 and share.index == 0:
        check_complete(answers_path, selected, answers)
    acc = accuracy(selected, answers) if share.index == 0 else None
    return EvalSummary(
        out, len(selected), len(mine), len(mine) - len(pending), written, merged, acc, duplicates
    )


def _write_failure(
    e: OSError, answers_path: str | os.PathLike, out: Path, mine: Sequence[Question]
) -> str:
    """The one-line message for an environment failure while appending to `out`."""
    try:
        done = done_ids(answers_path, out)  # cuts a torn line the rollback could not
        missing = sum(q.question_id not in done for q in mine)
        safe = f"{len(mine) - missing} of {len(mine)} answers are safe"
        rerun = f"rerun the same command to answer only the {missing} missing"
    except (OSError, InputError):
        safe, rerun = "the answers on disk are safe", "rerun the same command to resume"
    first = "free some space, then " if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{os_error_line(e, out)} (while appending answers): {safe}; {first}{rerun}"


def _merge(answers_path: str | os.PathLike, questions: Sequence[Question], claim: Claim) -> Merged:
    """`merge_answers` (waiting for late writers as the claim says); the environment's
    failures become one line saying nothing was lost."""
    try:
        return merge_answers(answers_path, questions, claim.wait, claim.on_wait)
    except OSError as e:
        if not environment_failure(e):
            raise
        raise InputError(
            f"{os_error_line(e, answers_path)} (while merging the part files into "
            f"{answers_path}): no answer was lost (the answers file and part files are as they "
            "were); rerun the same command to merge them"
        ) from None


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
    with Appender(out) as f:  # the file appears with the first finished batch
        for lo in range(0, len(pending), batch_size):
            chunk = pending[lo : lo + batch_size]
            # A short last batch is padded with copies of its last question (answers
            # dropped) so it reuses the compiled program of the full batch size.
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
            results = pipe.generate(
                [visual_input(q, image_folder, DEFAULT_FRAMES) for q in padded],
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
            f.append(records)
            written += len(records)
            bar.update(len(records))
            if on_batch is not None:
                on_batch(written)
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
