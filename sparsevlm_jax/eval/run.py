"""The eval loop: a process's share of the questions answered batch by batch, then merged."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsevlm_jax.errors import InputError
from sparsevlm_jax.eval.answers import append_lines, read_answers
from sparsevlm_jax.eval.parts import Merged, done_ids, merge_answers, part_files, part_path
from sparsevlm_jax.eval.questions import Question, image_path
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
) -> EvalSummary:
    """Answers this process's share of the first `limit` questions (all when None), skipping
    those already answered in `answers_path` or its part files; merges when it is the last step.

    `pipe` is a `LlavaPipeline`. The questions must already be validated (`read_questions`,
    `check_images`, `check_prompts`). Each batch of `batch_size` answers is appended, flushed
    and fsync'd before the next batch starts; `on_batch(n_written_so_far)` runs after each.
    With several processes (`share.count` > 1) every process must call this with the same
    arguments but its own `share.index`; `barrier(name)` waits for all of them (`sparsevlm_jax.
    distributed.barrier`): after answering, and after process 0 has merged.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if share.count > 1 and barrier is None:
        raise ValueError("several processes need a barrier")
    selected = list(questions if limit is None else questions[:limit])
    mine, out = share.of(selected), share.path(answers_path)
    done = done_ids(answers_path, out)
    stray_parts = share.count == 1 and bool(part_files(answers_path))
    pending = [q for q in mine if q.question_id not in done]
    seeds = {q.question_id: seed + i for i, q in enumerate(selected)}
    generation = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    desc = "eval" if share.count == 1 else f"eval {share.index}/{share.count}"
    bar = _progress(len(mine), len(mine) - len(pending), desc, progress)
    with bar:
        written = _answer(
            pipe, pending, image_folder, out, sparse, model_id, batch_size, seeds, generation,
            bar, on_batch,
        )  # fmt: skip
    merged = None
    if share.count > 1:
        barrier("sparsevlm-eval-answered")
        if share.index == 0:
            merged = merge_answers(answers_path, questions)
        barrier("sparsevlm-eval-merged")
    elif stray_parts:  # answers of an earlier run with several processes
        merged = merge_answers(answers_path, questions)
    answers = read_answers(answers_path) if share.index == 0 else {}
    if share.count > 1 and share.index == 0:
        check_complete(answers_path, selected, answers)
    acc = accuracy(selected, answers) if share.index == 0 else None
    return EvalSummary(
        out, len(selected), len(mine), len(mine) - len(pending), written, merged, acc
    )


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
    f = None
    try:
        for lo in range(0, len(pending), batch_size):
            chunk = pending[lo : lo + batch_size]
            # A short last batch is padded with copies of its last question (answers
            # dropped) so it reuses the compiled program of the full batch size.
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
            results = pipe.generate(
                [image_path(q, image_folder) for q in padded],
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
            if f is None:  # the file appears with the first finished batch
                f = open(out, "a", encoding="utf-8")
            append_lines(f, records)
            written += len(records)
            bar.update(len(records))
            if on_batch is not None:
                on_batch(written)
    finally:
        if f is not None:
            f.close()
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
