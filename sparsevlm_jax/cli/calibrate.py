"""`sparsevlm calibrate`: v1's static capacities from the user's questions, stored beside the model.

For each named budget, SparseVLM v1 runs `exact` over the first N questions
(`calibrated.calibrate`); the capacities hold the chosen percentile of the kept and
recycled counts seen per pruning layer. They are written to `sparse_defaults.json` in the
model directory (atomically, replacing the file), where `generate`, `eval`, `visualize` and
`demo` pick them up as v1's default static capacities (`sparsevlm_jax.calibrated`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sparsevlm_jax.cli.errors import EXIT_OK
from sparsevlm_jax.cli.models import load_pipeline, make_processor, model_config, resolve_model
from sparsevlm_jax.cli.options import comma_ints
from sparsevlm_jax.cli.sparsity import check_budget, default_layers
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.sparse.config import NEXT_BUDGETS, SparseConfig


def check_calibrate_args(args: argparse.Namespace) -> None:
    """InputError for --examples, --percentile or --batch-size out of range."""
    if args.examples < 1:
        raise InputError(f"--examples must be >= 1, got {args.examples}")
    if not 0 <= args.percentile <= 100:
        raise InputError(f"--percentile must be in [0, 100], got {args.percentile:g}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")


def v1_configs(
    args: argparse.Namespace, num_layers: int, num_visual: int, variable: bool = False
) -> dict[int, Any]:
    """Named budget -> the `exact` v1 config to calibrate, checked against the model
    (`variable`: visual counts vary per image, LLaVA-NeXT's 640 / 320 names too)."""
    budgets = comma_ints(args.budgets, "--budgets")
    layers = comma_ints(args.layers, "--layers") if args.layers else default_layers(num_layers)
    out = {}
    for b in dict.fromkeys(budgets):
        check_budget("v1", b, num_visual, variable)
        rule = NEXT_BUDGETS.get(b, b) if variable else b
        sparse = SparseConfig.v1(rule, num_layers, layers, capacity="exact")
        sparse = sparse.replace(budget_name=b)
        sparse.validate_for(num_layers)
        out[b] = sparse
    return out


def make_batches(pipe: Any, questions: Sequence[Any], folder: str, size: int) -> list[tuple]:
    """(batch, real rows) pairs of `size` questions; a short last one repeats its last row so
    every batch reuses one compiled program."""
    from sparsevlm_jax.eval.questions import DEFAULT_FRAMES, visual_input

    out = []
    for lo in range(0, len(questions), size):
        chunk = list(questions[lo : lo + size])
        padded = chunk + [chunk[-1]] * (size - len(chunk))
        items = [visual_input(q, folder, DEFAULT_FRAMES) for q in padded]
        batch, _ = pipe.processor(items, [q.text for q in padded])
        out.append((batch, len(chunk)))
    return out


def _counted(batches: list[tuple], bar: Any) -> Iterator[tuple]:
    for batch, n in batches:
        yield batch, n
        bar.update(n)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrates every requested budget, writes sparse_defaults.json, prints the capacities."""
    from tqdm import tqdm

    from sparsevlm_jax import eval as ev
    from sparsevlm_jax.calibrated import calibrate, sparse_defaults_path, write_sparse_defaults

    check_calibrate_args(args)
    path = resolve_model(args.model)
    ev.check_writable(sparse_defaults_path(path), "calibration file")
    questions = ev.read_questions(args.questions)[: args.examples]
    ev.check_images(questions, args.image_folder)
    cfg = model_config(path, args.clip)
    variable = cfg.variable_visual
    configs = v1_configs(args, cfg.text.num_hidden_layers, cfg.num_image_tokens, variable)
    processor = make_processor(args, path, cfg)
    size = min(args.batch_size, len(questions))
    if size > max(processor.buckets.batch):
        raise InputError(
            f"--batch-size must be in 1..{max(processor.buckets.batch)}, got {args.batch_size}"
        )
    ev.check_prompts(questions, processor)
    pipe = load_pipeline(args, path, cfg)
    batches = make_batches(pipe, questions, args.image_folder, size)
    calibrated = {}
    total = len(configs) * len(questions)
    with tqdm(total=total, unit="q", desc="calibrate", disable=args.quiet) as bar:
        for budget, sparse in configs.items():
            bar.set_postfix_str(f"v1@{budget}")
            calibrated[budget] = calibrate(
                pipe.params, pipe.cfg, sparse, _counted(batches, bar), args.percentile
            )
    source = f"{len(questions)} questions of {Path(args.questions).name}"
    written = write_sparse_defaults(path, calibrated, args.percentile, source)
    for budget, sparse in calibrated.items():
        print(
            f"v1@{budget}: layers {_ints(sparse.layers)}, capacities {_ints(sparse.capacities)}, "
            f"recycled {_ints(sparse.recycled_capacities)}"
        )
    print(f"wrote {written} ({source}, percentile {args.percentile:g})")
    return EXIT_OK


def _ints(values: Sequence[int]) -> str:
    return ",".join(map(str, values))
