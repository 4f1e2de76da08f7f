"""Which model a command runs and how it is opened: path, config, processor, pipeline.

Everything that can be checked without reading weights is checked first (the directory, its
config, the prompt's fit in a bucket); a damaged checkpoint is reported as an input error.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from sparsevlm_jax.cli.errors import input_error_types
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.errors import InputError


def default_model_path() -> str | None:
    """The model used when `--model` is not given: the bundled demo model, if installed."""
    from sparsevlm_jax.checkpoint import is_checkpoint
    from sparsevlm_jax.shapes_task import demo_model_path

    path = demo_model_path()
    return str(path) if is_checkpoint(path) else None


def resolve_model(model: str | None) -> Path:
    """--model, or the bundled default; InputError when there is neither or it is missing."""
    path = model if model is not None else default_model_path()
    if path is None:
        raise InputError(
            "a model is required: pass --model CKPT (a checkpoint written by `sparsevlm "
            "convert`, or a llava-hf / original LLaVA directory); no bundled model is installed"
        )
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such model directory")
    if not p.is_dir():
        raise InputError(f"{p}: is not a directory (a model is a checkpoint directory)")
    return p


def model_config(path: Path, clip: str | None) -> LlavaConfig:
    """The config of the model directory `path` (no weights read)."""
    from sparsevlm_jax.loading import load_model_config

    return load_model_config(path, clip)


def processor_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--template / --image-mode as `Processor.from_pretrained` keyword arguments."""
    out: dict[str, Any] = {}
    if args.template is not None:
        out["template"] = args.template
    if args.image_mode is not None:
        out["image_mode"] = args.image_mode
    for name in ("min_pixels", "max_pixels"):  # Qwen-VL's resize bounds
        if getattr(args, name, None) is not None:
            out[name] = getattr(args, name)
    return out


def make_processor(args: argparse.Namespace, path: Path, cfg: LlavaConfig) -> Any:
    """The model's `Processor` (tokenizer + image settings), without loading weights."""
    from sparsevlm_jax.processing import Processor

    return Processor.from_pretrained(path, cfg, **processor_overrides(args))


def _raised_in(e: BaseException, packages: tuple[str, ...]) -> bool:
    tb = e.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if any(f"{os.sep}{p}{os.sep}" in name for p in packages):
            return True
        tb = tb.tb_next
    return False


def load_pipeline(args: argparse.Namespace, path: Path, cfg: LlavaConfig, mesh: Any = None) -> Any:
    """`LlavaPipeline.from_pretrained`, with a damaged checkpoint reported as an input error.

    Our checkpoints' array list is checked first; an error raised inside orbax / tensorstore
    while reading the weights (a deleted or corrupt data file) becomes a CheckpointError.
    mesh: a `MeshShape` (`cli.mesh.check_mesh`) or `Mesh`: the weights are read straight
    into their shards on it; None: one device.
    """
    from sparsevlm_jax import checkpoint
    from sparsevlm_jax.checkpoint import CheckpointError
    from sparsevlm_jax.pipeline import LlavaPipeline

    if checkpoint.is_checkpoint(path):
        checkpoint.check_arrays(path, cfg)
    try:
        return LlavaPipeline.from_pretrained(
            path, dtype=args.dtype, clip=args.clip, mesh=mesh, **processor_overrides(args)
        )
    except Exception as e:
        if isinstance(e, input_error_types()) or not _raised_in(e, ("orbax", "tensorstore")):
            raise
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        text = str(root).strip()
        first = text.splitlines()[0] if text else type(root).__name__
        raise CheckpointError(f"{path}: cannot read the weights ({first})") from e


def check_prompt(
    processor: Any, prompt: str, num_images: int = 1, placeholders: list[str] | None = None
) -> None:
    """Tokenizes the prompt about `num_images` images (or the visual items `placeholders`
    mark) and checks it fits a bucket (InputError otherwise, e.g. when its <image> markers do
    not match the images)."""
    from sparsevlm_jax.batch import Buckets

    n = len(placeholders) if placeholders is not None else num_images
    spans = processor.encode_spans(prompt, n, placeholders)
    prefix, text = spans[0], spans[-1]
    Buckets.pick(processor.buckets.prefix, len(prefix), "prefix length")
    Buckets.pick(processor.buckets.text, len(text), "prompt length after the image")
