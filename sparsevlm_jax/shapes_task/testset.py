"""The shapes task's test set on disk, its scoring, evaluation and v1 calibration.

`write_test` writes the deterministic test split (PNG images, LLaVA-format questions.jsonl
naming the task version, README.md); `evaluate` answers it with a model; `calibrate_model`
computes static v1 capacities on the validation split for `sparse_defaults.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from sparsevlm_jax.shapes_task.task import (
    CATEGORIES,
    DEFAULT_IMAGE_SIZE,
    OBJECT_SIDES,
    PATCH,
    TASK_VERSION,
    Example,
    example,
)

# ----------------------------------------------------------------------------------------------
# Test set

TASK_NAME = f"shapes-{TASK_VERSION}"  # what test-set records and READMEs call this task
TEST_IMAGES = 544  # test images of the standard test set: 2078 questions (>= 2000)
DEFAULT_TEST_DIR = f"{TASK_NAME}-test"  # write-test's default output directory


def test_examples(num_images: int = TEST_IMAGES, size: int = DEFAULT_IMAGE_SIZE) -> list[Example]:
    """The test split: one question of each type per image (where the scene allows it)."""
    return [example("test", i, size) for i in range(num_images)]


def question_id(image_index: int, question_index: int) -> str:
    """The id of question j of test image i in written test sets, e.g. "00017-2"."""
    return f"{image_index:05d}-{question_index}"


def readme_text(out: str | Path, num_images: int, num_questions: int, size: int) -> str:
    """The README.md written into test set `out`: task version, contents, how to evaluate."""
    return (
        f"# Test set of the shapes task, version {TASK_VERSION} ({TASK_NAME})\n\n"
        f"{num_questions} questions about {num_images} images ({size} px): test images "
        f"0..{num_images - 1} of `sparsevlm_jax.shapes_task` (task {TASK_VERSION}: every object "
        f"inside one {PATCH}-px patch, side {OBJECT_SIDES[0]}-{OBJECT_SIDES[1]} px), written by\n"
        f"`python -m sparsevlm_jax.shapes_task write-test` (same files on every machine).\n\n"
        "- `images/NNNNN.png`: the images (lossless).\n"
        '- `questions.jsonl`: LLaVA question format, one per line: `question_id` ("NNNNN-j"), '
        f'`image`, `text`, `category`, `answer` (gold) and `task` ("{TASK_NAME}").\n\n'
        "Evaluate (greedy, exact match, accuracy per category):\n\n"
        f"    sparsevlm eval --model sparsevlm_jax/demo_model --questions {out}/questions.jsonl "
        f"\\\n        --image-folder {out}/images --answers answers.jsonl --batch-size 16 "
        "--max-new-tokens 4\n"
    )


def write_test(
    out: str | Path = DEFAULT_TEST_DIR,
    num_images: int = TEST_IMAGES,
    size: int = DEFAULT_IMAGE_SIZE,
) -> Path:
    """Writes `out/images/NNNNN.png`, `out/questions.jsonl` (LLaVA question format) and
    `out/README.md` (the task version and how to evaluate).

    Each JSONL line: question_id ("NNNNN-j"), image (relative to `out/images`), text,
    category, answer, task (`TASK_NAME`, e.g. "shapes-v2"). Returns the JSONL path.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ex in enumerate(test_examples(num_images, size)):
        name = f"{i:05d}.png"
        Image.fromarray(ex.image).save(out / "images" / name)
        for j, q in enumerate(ex.questions):
            lines.append(
                {
                    "question_id": question_id(i, j),
                    "image": name,
                    "text": q.text,
                    "category": q.category,
                    "answer": q.answer,
                    "task": TASK_NAME,
                }
            )
    path = out / "questions.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    (out / "README.md").write_text(readme_text(out, num_images, len(lines), size))
    return path


def read_test(test_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a written test set's questions.jsonl.

    Raises:
      ValueError: the set was written for another task version (or before versions were
        recorded), so its gold answers do not describe this version's images.
    """
    path = Path(test_dir) / "questions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tasks = {r.get("task", "shapes-v1 (unversioned)") for r in rows}
    if tasks != {TASK_NAME}:
        raise ValueError(
            f"{path}: written for {', '.join(sorted(tasks))}, not {TASK_NAME}: rewrite it with "
            "`python -m sparsevlm_jax.shapes_task write-test`"
        )
    return rows


def score(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall and per category of rows with `answer` (gold) and `prediction`."""
    out: dict[str, Any] = {}
    for cat in (*CATEGORIES, None):
        sel = [r for r in rows if cat is None or r["category"] == cat]
        if sel:
            acc = sum(r["prediction"].strip().lower() == r["answer"] for r in sel) / len(sel)
            out[cat or "overall"] = {"accuracy": acc, "n": len(sel)}
    return out


def evaluate(
    model: str | Path,
    test_dir: str | Path,
    sparse: Any = None,
    batch_size: int = 16,
    limit: int | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Runs `LlavaPipeline.generate` on a written test set; (scores, rows with predictions).

    Raises:
      ValueError: the test set is of another task version (`read_test`).
    """
    from tqdm import tqdm

    from sparsevlm_jax.pipeline import LlavaPipeline
    from sparsevlm_jax.sparse.config import SparseConfig

    test_dir = Path(test_dir)
    rows = read_test(test_dir)
    rows = rows[:limit] if limit else rows
    pipe = LlavaPipeline.from_pretrained(model)
    sparse = sparse or SparseConfig()
    for lo in tqdm(range(0, len(rows), batch_size), desc="eval"):
        chunk = rows[lo : lo + batch_size]
        images = [Image.open(test_dir / "images" / r["image"]).convert("RGB") for r in chunk]
        res = pipe.generate(
            images,
            [r["text"] for r in chunk],
            sparse=sparse,
            max_new_tokens=4,
            batch_size=batch_size,
        )
        for r, a in zip(chunk, res, strict=True):
            r["prediction"] = a.text
    return score(rows), rows


def calibrate_model(
    model: str | Path, num_examples: int = 64, budgets: tuple[int, ...] = (192, 128, 64)
) -> dict[int, Any]:
    """Static v1 configs per named budget from `num_examples` validation questions.

    Runs `sparsevlm_jax.calibrated.calibrate` (100th percentile) at the default v1
    pruning layers; returns {budget: `static` SparseConfig}, which
    `calibrated.write_sparse_defaults` stores as `sparse_defaults.json` beside the model.
    """
    from sparsevlm_jax.calibrated import calibrate
    from sparsevlm_jax.checkpoint import load
    from sparsevlm_jax.sparse.config import SparseConfig

    params, cfg = load(model)
    proc = _processor(model, cfg)
    pairs = []
    i = 0
    while len(pairs) < num_examples:
        ex = example("val", i, cfg.vision.image_size)
        pairs += [(Image.fromarray(ex.image), q.text) for q in ex.questions]
        i += 1
    pairs = pairs[:num_examples]
    batches = [
        proc([p[0] for p in pairs[lo : lo + 16]], [p[1] for p in pairs[lo : lo + 16]])
        for lo in range(0, len(pairs), 16)
    ]
    layers = cfg.text.num_hidden_layers
    return {
        b: calibrate(params, cfg, SparseConfig.v1(b, layers, capacity="exact"), batches)
        for b in budgets
    }


def _processor(model: str | Path, cfg: Any) -> Any:
    """The `Processor` of a checkpoint directory."""
    from sparsevlm_jax.processing import Processor

    return Processor.from_pretrained(model, cfg)


def write_sparse_defaults(model: str | Path, num_examples: int = 64) -> Path:
    """Calibrates `model` and writes `sparse_defaults.json` into its directory (atomically)."""
    from sparsevlm_jax import calibrated

    source = f"{num_examples} questions of the {TASK_NAME} task's val split"
    return calibrated.write_sparse_defaults(
        model, calibrate_model(model, num_examples), 100.0, source
    )


def sparse_config(model: str | Path, method: str, budget: int | None) -> Any:
    """The named preset `method`@`budget` for `model` under the default capacity policy
    (`calibrated.default_capacity`: v1 static with the model's calibrated capacities when
    they fit, else bucketed); a note on stderr says when calibrated ones do not fit."""
    from sparsevlm_jax.calibrated import default_capacity
    from sparsevlm_jax.checkpoint import load_config
    from sparsevlm_jax.sparse.config import named_sparse_config

    cfg = load_config(model)
    sparse = named_sparse_config(method, budget, cfg.text.num_hidden_layers, cfg.num_image_tokens)
    sparse, note = default_capacity(sparse, model)
    if note is not None:
        print(f"note: {note}", file=sys.stderr)
    return sparse
