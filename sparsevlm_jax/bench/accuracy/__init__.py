"""Accuracy benchmark: what pruning costs the bundled demo model, per method and named budget.

    python -m sparsevlm_jax.bench.accuracy [--model DIR] [--images 544] [--out DIR]
        [--methods v1,fastv@64] [--batch-size 16] [--fresh]

Asks the model every question of the first N test images of the shapes task (N = 544: 2078
questions; the same questions as `python -m sparsevlm_jax.shapes_task write-test`), greedy,
exact match, through `LlavaPipeline.generate` in batches of 16, once dense and once per named
preset (`named_presets()`: v1, v1.5, v2.0, FastV and random at their named budgets, schedules
scaled to the model's visual tokens; v1 under the default capacity policy of
`sparsevlm_jax.calibrated`: static with the model's calibrated capacities when
`sparse_defaults.json` has them, else bucketed). Per method it reports accuracy per question
type and overall with 95% Wilson intervals, retention (accuracy ÷ dense accuracy), mean
equivalent visual tokens (SPEC §6) and the analytic prefill FLOPs reduction vs dense (SPEC §8),
and compares SparseVLM v1 / v1.5 / v2.0, FastV and random at each named budget.

Outputs in --out (written atomically): `accuracy.json` (below), `accuracy.md` (tables) and
`accuracy.png` (accuracy vs equivalent visual tokens, one line per method, interval bars; needs
matplotlib, the `plots` extra). Answers are appended batch by batch to
`accuracy.progress.jsonl`, so an interrupted run resumes where it stopped (same model files,
questions and configs; `--fresh` starts over); the file is removed once the outputs exist.

accuracy.json: {"command", "date", "hardware", "model", "model_sha256", "task",
"num_image_tokens", "num_layers", "num_images", "num_questions", "batch_size", "z",
"answer_prior": {"overall", "per_type"}, "notes", "results": [per method, dense first:
{"method", "family", "budget", "budget_tokens", "config", "n", "correct", "accuracy",
"ci": [lo, hi], "per_type": {type: {"n", "correct", "accuracy", "ci"}}, "retention",
"equivalent_tokens", "equivalent_tokens_range": [min, max], "flops_ratio",
"flops_reduction", "overflow_examples", "seconds", "first_batch_seconds" (compiling
included), "correct_bits": "1101..." (per question, in question order)}]}.
"""

# Modules: `stats` (Wilson intervals), `questions` (the test questions, the answer prior),
# `methods` (`--methods` and the configs measured), `progress` (the resumable answers file),
# `evaluate` (answering and summarising; writes the outputs), `report` (the markdown tables
# and the plot), `cli` (`python -m sparsevlm_jax.bench.accuracy`, see __main__).

from sparsevlm_jax.bench.accuracy.cli import main
from sparsevlm_jax.bench.accuracy.evaluate import (
    answer_all,
    answer_rows,
    hardware,
    run,
    summarize,
)
from sparsevlm_jax.bench.accuracy.methods import config_json, method_configs, parse_methods
from sparsevlm_jax.bench.accuracy.progress import PROGRESS_FILE, Progress, model_digest
from sparsevlm_jax.bench.accuracy.questions import Item, answer_prior, question_items
from sparsevlm_jax.bench.accuracy.report import (
    FAMILY_LABELS,
    figure,
    markdown,
    markdown_equal_budgets,
)
from sparsevlm_jax.bench.accuracy.stats import Z95, proportion, wilson

__all__ = [
    "FAMILY_LABELS",
    "PROGRESS_FILE",
    "Z95",
    "Item",
    "Progress",
    "answer_all",
    "answer_prior",
    "answer_rows",
    "config_json",
    "figure",
    "hardware",
    "main",
    "markdown",
    "markdown_equal_budgets",
    "method_configs",
    "model_digest",
    "parse_methods",
    "proportion",
    "question_items",
    "run",
    "summarize",
    "wilson",
]
