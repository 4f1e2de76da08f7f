"""The training script's command line: `python -m sparsevlm_jax.train --out DIR ...`."""

from __future__ import annotations

import argparse
import json
import sys

from sparsevlm_jax.train.config import TrainConfig
from sparsevlm_jax.train.loop import train


def main(argv: list[str] | None = None) -> int:
    """`python -m sparsevlm_jax.train --out DIR [--steps N] [--resume]`."""
    # The package's docstring (recipe and outputs) is the description, as before the split.
    description = sys.modules[__package__].__doc__
    ap = argparse.ArgumentParser(prog="python -m sparsevlm_jax.train", description=description)
    ap.add_argument("--out", required=True, help="run directory (checkpoints, exported model)")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--preset", default="demo", choices=("demo", "tiny"))
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument(
        "--vision-steps",
        type=int,
        default=TrainConfig.vision_steps,
        help="phase 1: train the vision tower alone on the per-patch heads for N steps",
    )
    ap.add_argument("--vision-lr", type=float, default=TrainConfig.vision_lr)
    ap.add_argument("--images-per-batch", type=int, default=TrainConfig.images_per_batch)
    ap.add_argument("--questions-per-image", type=int, default=TrainConfig.questions_per_image)
    ap.add_argument("--aux-weight", type=float, default=TrainConfig.aux_weight)
    ap.add_argument("--attn-weight", type=float, default=TrainConfig.attn_weight)
    ap.add_argument("--save-every", type=int, default=TrainConfig.save_every)
    ap.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    ap.add_argument("--val-images", type=int, default=TrainConfig.val_images)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument(
        "--init-from",
        default=None,
        help="fine-tune: start from this model (our checkpoint format, e.g. the bundled "
        "sparsevlm_jax/demo_model) instead of a random init",
    )
    ap.add_argument(
        "--count-share",
        type=float,
        default=None,
        help="fraction of each image's questions that are count questions (default: a quarter)",
    )
    ap.add_argument("--log-dir", default="benchmarks/train_logs")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    tc = TrainConfig(
        preset=args.preset,
        steps=args.steps,
        images_per_batch=args.images_per_batch,
        questions_per_image=args.questions_per_image,
        lr=args.lr,
        vision_steps=args.vision_steps,
        vision_lr=args.vision_lr,
        aux_weight=args.aux_weight,
        attn_weight=args.attn_weight,
        seed=args.seed,
        save_every=args.save_every,
        eval_every=args.eval_every,
        val_images=args.val_images,
        init_from=args.init_from,
        count_share=args.count_share,
    )
    last = train(args.out, tc, args.resume, args.log_dir, not args.no_progress, args.max_minutes)
    print(json.dumps(last))
    return 0
