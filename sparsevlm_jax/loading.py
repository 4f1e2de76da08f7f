"""Load whatever model directory a user points at: our checkpoint, or a source checkpoint.

A directory written by `checkpoint.save` is restored as it is; a llava-hf / transformers /
original LLaVA-1.5 directory is converted in memory by `convert` (nothing is written). This
module sits above both: `checkpoint` knows only our own format, `convert` reads source
checkpoints and writes ours through `checkpoint`, and neither imports this module.
"""

from __future__ import annotations

from pathlib import Path

from sparsevlm_jax.checkpoint import CONFIG_FILE, CheckpointError, is_checkpoint, load, load_config
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.params import Params


def load_model_config(path: str | Path, clip: str | Path | None = None) -> LlavaConfig:
    """The config of our checkpoint or of a transformers / LLaVA directory (no weights read).

    Raises:
        CheckpointError: the directory is neither (no config.json).
        ConversionError: a source config that cannot be converted.
    """
    path = Path(path)
    if is_checkpoint(path):
        return load_config(path)
    if (path / CONFIG_FILE).is_file():
        from convert.llava import read_config

        return read_config(path, clip)
    raise CheckpointError(
        f"{path}: not a checkpoint (no {CONFIG_FILE}; expected a directory written by "
        "`sparsevlm convert`, or a llava-hf / original LLaVA directory)"
    )


def load_model(
    path: str | Path, dtype: str | None = None, clip: str | Path | None = None
) -> tuple[Params, LlavaConfig]:
    """Loads our checkpoint, or converts a transformers / original LLaVA directory in memory.

    Args:
        path: a directory written by `checkpoint.save`, a llava-hf / transformers LLaVA
            directory, or an original LLaVA-1.5 directory (then `clip` names the CLIP
            checkpoint directory).
        dtype: weight dtype ("float32" | "bfloat16" | "float16"); None keeps the stored one.
        clip: CLIP vision checkpoint directory, only for original LLaVA checkpoints.

    Returns:
        `(params, cfg)` with `jax.Array` leaves.

    Raises:
        CheckpointError: not a model directory, or a damaged checkpoint.
        ConversionError: a source checkpoint that cannot be converted.
    """
    path = Path(path)
    if is_checkpoint(path):
        if clip is not None:
            raise CheckpointError(f"{path}: is a converted checkpoint; `clip` is not used")
        return load(path, dtype)
    if (path / CONFIG_FILE).is_file():
        from convert.llava import load_transformers

        return load_transformers(path, dtype=dtype, clip=clip)
    raise CheckpointError(
        f"{path}: neither a sparsevlm-jax checkpoint nor a transformers/LLaVA directory "
        f"(no {CONFIG_FILE})"
    )
