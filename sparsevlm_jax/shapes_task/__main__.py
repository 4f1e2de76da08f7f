"""`python -m sparsevlm_jax.shapes_task`: write-test, evaluate and calibrate commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparsevlm_jax.shapes_task.testset import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_TEST_DIR,
    TASK_NAME,
    TEST_IMAGES,
    evaluate,
    sparse_config,
    write_sparse_defaults,
    write_test,
)


def main(argv: list[str] | None = None) -> int:
    """`write-test [DIR]`, `evaluate MODEL DIR` and `calibrate MODEL` commands."""
    from sparsevlm_jax.sparse.config import METHODS

    ap = argparse.ArgumentParser(prog="python -m sparsevlm_jax.shapes_task")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser(
        "write-test", help=f"write the {TASK_NAME} test images, questions.jsonl and README.md"
    )
    w.add_argument("out", nargs="?", default=DEFAULT_TEST_DIR, help="(%(default)s)")
    w.add_argument("--images", type=int, default=TEST_IMAGES, help="(%(default)s)")
    w.add_argument("--size", type=int, default=DEFAULT_IMAGE_SIZE)
    e = sub.add_parser("evaluate", help="dense / sparse accuracy of a model on a test dir")
    e.add_argument("model")
    e.add_argument("test_dir")
    e.add_argument("--sparse", choices=METHODS, default="dense")
    e.add_argument("--budget", type=int, default=None, help="named budget, e.g. 64")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--answers", default=None, help="write predictions JSONL here")
    c = sub.add_parser("calibrate", help="write MODEL/sparse_defaults.json (v1 capacities)")
    c.add_argument("model")
    c.add_argument("--examples", type=int, default=64)
    args = ap.parse_args(argv)
    if args.cmd == "calibrate":
        print(write_sparse_defaults(args.model, args.examples).read_text())
        return 0
    if args.cmd == "write-test":
        path = write_test(args.out, args.images, args.size)
        n = len(path.read_text().splitlines())
        print(f"wrote {n} {TASK_NAME} questions about {args.images} images to {path}")
        return 0
    sparse = sparse_config(args.model, args.sparse, args.budget)
    scores, rows = evaluate(args.model, args.test_dir, sparse, args.batch_size, args.limit)
    if args.answers:
        Path(args.answers).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
