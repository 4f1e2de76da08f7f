"""`python -m convert SRC DST [--clip DIR] [--dtype ...]`: write a sparsevlm-jax checkpoint."""

from __future__ import annotations

import argparse
import resource
import sys
import time

from convert.errors import ConversionError
from convert.llava import convert_checkpoint
from sparsevlm_jax.checkpoint import CheckpointError, load_metadata


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a LLaVA-1.5 checkpoint (llava-hf hub, transformers save_pretrained, "
        "or original LLaVA + CLIP) to a sparsevlm-jax orbax checkpoint.",
    )
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("dst", help="checkpoint directory to create")
    p.add_argument("--clip", help="CLIP checkpoint directory (original LLaVA checkpoints only)")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32", "float16", "keep"],
        help="weight dtype to store (keep: the source's float dtype); default bfloat16, which "
        "moves a float32 source's features by ~1%%: comparisons with the source want float32 "
        "or keep",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> str:
    """Converts as the parsed arguments say; returns the one-line summary.

    Raises:
        ConversionError, CheckpointError: bad input (one-line messages).
    """
    start = time.perf_counter()
    cfg = convert_checkpoint(
        args.src,
        args.dst,
        dtype=None if args.dtype == "keep" else args.dtype,
        clip=args.clip,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    from sparsevlm_jax.cli.info import visual_summary  # LLaVA-NeXT: family + count range

    tower = (f"{cfg.qwen_vision.depth}-block ViT" if cfg.qwen
             else f"{cfg.vision.num_hidden_layers}-layer CLIP")  # fmt: skip

    return (
        f"wrote {args.dst}: {cfg.text.num_hidden_layers}-layer decoder, {tower}, "
        f"{visual_summary(cfg)}, "
        f"{describe_dtype(load_metadata(args.dst))}, {time.perf_counter() - start:.1f} s, "
        f"peak RSS {peak_gib:.2f} GiB"
    )


def describe_dtype(metadata: dict) -> str:
    """e.g. "bfloat16 weights (source float32; --dtype float32 or keep to match it)"."""
    conv = metadata.get("conversion") or {}
    stored, source = conv.get("dtype", "?"), conv.get("source_dtype")
    if source is None or source == stored:
        return f"{stored} weights (as the source)" if source else f"{stored} weights"
    return f"{stored} weights (source {source}; --dtype {source} or keep to match it)"


def main(argv: list[str] | None = None) -> int:
    """Runs the converter; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except (ConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # bad input, as `sparsevlm convert`
    return 0
