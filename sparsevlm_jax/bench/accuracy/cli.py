"""The accuracy benchmark's command line: `python -m sparsevlm_jax.bench.accuracy ...`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparsevlm_jax.bench.accuracy.evaluate import run
from sparsevlm_jax.bench.accuracy.methods import ablation_presets, parse_methods
from sparsevlm_jax.bench.accuracy.report import markdown


def main(argv: list[str] | None = None) -> int:
    from sparsevlm_jax.bench.timing import limit_blas_threads, prepare_environment
    from sparsevlm_jax.shapes_task import TEST_IMAGES, demo_model_path

    p = argparse.ArgumentParser(
        prog="python -m sparsevlm_jax.bench.accuracy",
        description=sys.modules[__package__].__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=str(demo_model_path()), help="checkpoint directory")
    p.add_argument(
        "--images", type=int, default=TEST_IMAGES, help="test images (544: 2078 questions)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[3] / "benchmarks" / "results",
        help="output directory",
    )
    p.add_argument("--methods", default="", help='e.g. "v1,fastv@64" (default: every preset)')
    p.add_argument(
        "--ablation",
        action="store_true",
        help="also measure SparseVLM+ with each of its four ingredients undone and v1.5 with "
        "each done, at 192 and 64 (writes ablation.md / ablation.png too)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="questions per generate call")
    p.add_argument("--fresh", action="store_true", help="ignore answers saved by an earlier run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        presets = parse_methods(args.methods)
        if args.ablation:
            presets += [q for q in ablation_presets() if q not in presets]
    except ValueError as e:
        p.error(str(e))
    prepare_environment()
    limit_blas_threads(1)
    command = "python -m sparsevlm_jax.bench.accuracy " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    report = run(
        args.model,
        args.images,
        args.out,
        command.strip(),
        presets,
        args.batch_size,
        args.fresh,
        not args.quiet,
    )
    print(markdown(report))
    return 0
