"""`sparsevlm eval`: LLaVA's `model_vqa_loader` over a question JSONL, batched and resumable,
in one process or shared between several.

Questions (LLaVA's eval format, one JSON object per line):

    {"question_id": ..., "image": "rel/path.jpg", "text": "...", "category": ..., "answer": ...}

`category` and the gold `answer` are optional. Answers (one line per question, LLaVA's format):

    {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}

`prompt` is the question text as given (like LLaVA), `metadata` the sparsity statistics of that
example (`stats_to_json`, without wall-clock timings) and `answer_id` a uuid5 of the model id,
question id, prompt and sparsity settings: the same run writes the same bytes, whichever
process answered which question, so answer files can be compared byte for byte.

Everything that can be checked is checked before the first token is generated: the answers path
is writable, every line parses and has its fields, question ids are unique, every image file
exists, every prompt fits a bucket. Answers are appended one batch at a time (flushed and
fsync'd), so an interrupted run loses at most the batch in flight; a rerun skips the question
ids already answered (a trailing partial line is cut off first).

One writer per file (`claim`, `locks`): a process holds an exclusive lock on every file it
appends to (and process 0 on the answers file it merges into) from before the model loads to
its end; a second run on one of them stops with one line naming the file and the holder, or
waits for it (`wait`). A full disk, a quota, a read-only file system or a file removed under
the run is the environment's failure, not a bug: the batch being appended is cut back at once
(no torn line) and one line says how many answers are safe; a rerun resumes.

Several processes (`num_processes` N > 1, e.g. one per host, `sparsevlm_jax.distributed`):
question i of the selected list belongs to process p = i % N, which appends its answers to
its own part file `ANSWERS.part-<p>-of-<N>`. A question is skipped when the answers file or ANY
part file (of any N) already holds it, so a restart after an interruption, even with another N,
answers every question exactly once. When every process has answered its share (a barrier),
process 0 merges the answers file and all part files in question order (`merge_answers`: a
temporary file, fsync'd, renamed over the answers file, then the part files removed) and the
others wait for it (a second barrier). A single process appends straight to the answers file
(and merges only when it finds part files of an earlier run). Both write the same lines in
question order, so one process and N processes give the same bytes, as long as a batch's
composition cannot change an answer: `--batch-size 1`, or a capacity policy that does not depend
on the batch (`bucketed` compiles a pruned stage for the batch's largest budget and records it).

Modules: `questions` (the questions file and its checks), `answers` (one answers or part file:
records, resuming, appending), `parts` (part files of several processes and their merge),
`locks` (one writer per file), `claim` (what a process locks; the environment's failures),
`scoring` (exact-match accuracy), `stats` (pruning statistics as JSON) and `run` (the loop).
This package re-exports their public names.
"""

from __future__ import annotations

from sparsevlm_jax.eval.answers import (
    Appender,
    answered_ids,
    check_writable,
    duplicate_lines,
    read_answers,
    read_records,
)
from sparsevlm_jax.eval.claim import (
    ENVIRONMENT_ERRNOS,
    Claim,
    environment_errors,
    environment_failure,
    os_error_line,
)
from sparsevlm_jax.eval.locks import FileLock, LockedError, lock, lock_path
from sparsevlm_jax.eval.parts import Merged, done_ids, merge_answers, part_files, part_path
from sparsevlm_jax.eval.questions import (
    REQUIRED_FIELDS,
    Question,
    check_images,
    check_prompts,
    image_path,
    read_questions,
)
from sparsevlm_jax.eval.run import (
    ANSWER_ID_NAMESPACE,
    TIMINGS,
    EvalSummary,
    Share,
    answer_id,
    answer_record,
    check_complete,
    run_eval,
)
from sparsevlm_jax.eval.scoring import Accuracy, accuracy, is_correct, normalize_answer
from sparsevlm_jax.eval.stats import check_kept, jsonable, sparse_to_json, stats_to_json

__all__ = [
    "ANSWER_ID_NAMESPACE",
    "ENVIRONMENT_ERRNOS",
    "REQUIRED_FIELDS",
    "TIMINGS",
    "Accuracy",
    "Appender",
    "Claim",
    "EvalSummary",
    "FileLock",
    "LockedError",
    "Merged",
    "Question",
    "Share",
    "accuracy",
    "answer_id",
    "answer_record",
    "answered_ids",
    "check_complete",
    "check_images",
    "check_kept",
    "check_prompts",
    "check_writable",
    "done_ids",
    "duplicate_lines",
    "environment_errors",
    "environment_failure",
    "image_path",
    "is_correct",
    "jsonable",
    "lock",
    "lock_path",
    "merge_answers",
    "normalize_answer",
    "os_error_line",
    "part_files",
    "part_path",
    "read_answers",
    "read_questions",
    "read_records",
    "run_eval",
    "sparse_to_json",
    "stats_to_json",
]
