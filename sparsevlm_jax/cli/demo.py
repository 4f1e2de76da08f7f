"""`sparsevlm demo`: the bundled model's dense and pruned answers, or a random model's mechanics."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparsevlm_jax.cli.errors import EXIT_OK
from sparsevlm_jax.cli.models import default_model_path, resolve_model
from sparsevlm_jax.cli.options import comma_ints
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.sparse.config import V1_BUDGETS


def cmd_demo(args: argparse.Namespace) -> int:
    """Runs `demo.run_model_demo` on the bundled (or given) model, or `demo.run_demo`."""
    from sparsevlm_jax.demo import run_demo, run_model_demo

    model = args.model if args.model is not None else default_model_path()
    if not args.random and model is not None:
        if args.num_images < 1:
            raise InputError(f"--num-images must be >= 1, got {args.num_images}")
        run_model_demo(resolve_model(model), args.num_images, out=args.out)
        return EXIT_OK

    budgets = comma_ints(args.budgets, "--budgets")
    for b in budgets:
        if b not in V1_BUDGETS:
            raise InputError(
                f"--budgets: no v1 budget named {b}; named budgets: "
                f"{', '.join(map(str, sorted(V1_BUDGETS, reverse=True)))}"
            )
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"{args.out}: exists and is not a directory")
    run_demo(budgets, args.max_new_tokens, args.out, fast_compile=not args.optimized)
    return EXIT_OK
