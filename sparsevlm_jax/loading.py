"""Load whatever model directory a user points at: our checkpoint, or a source checkpoint.

A directory written by `checkpoint.save` is restored as it is; a llava-hf / transformers /
original LLaVA-1.5 directory is converted in memory by `convert` (nothing is written). With a
mesh, both go straight into the parameters' shardings (`sharding.param_shardings`): orbax
restores each device's shard, and source tensors are read shard by shard as they are placed,
so no host or device ever holds the whole model. This
module sits above both: `checkpoint` knows only our own format, `convert` reads source
checkpoints and writes ours through `checkpoint`, and neither imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sparsevlm_jax.checkpoint import CONFIG_FILE, CheckpointError, is_checkpoint, load, load_config
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.params import Params

if TYPE_CHECKING:
    from jax.sharding import Mesh


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
    path: str | Path,
    dtype: str | None = None,
    clip: str | Path | None = None,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> tuple[Params, LlavaConfig]:
    """Loads our checkpoint, or converts a transformers / original LLaVA directory in memory.

    Args:
        path: a directory written by `checkpoint.save`, a llava-hf / transformers LLaVA
            directory, or an original LLaVA-1.5 directory (then `clip` names the CLIP
            checkpoint directory).
        dtype: weight dtype ("float32" | "bfloat16" | "float16"); None keeps the stored one.
        clip: CLIP vision checkpoint directory, only for original LLaVA checkpoints.
        mesh: a ("data", "model") mesh (`sharding.make_mesh`): every parameter is loaded
            straight into its `sharding.param_shardings` layout; None: the first local device.
        progress: a progress bar while reading a source checkpoint.

    Returns:
        `(params, cfg)` with `jax.Array` leaves.

    Raises:
        CheckpointError: not a model directory, or a damaged checkpoint.
        ConversionError: a source checkpoint that cannot be converted.
        ConfigError: a head count that does not divide the mesh's model axis (before any read).
    """
    path = Path(path)
    if is_checkpoint(path):
        if clip is not None:
            raise CheckpointError(f"{path}: is a converted checkpoint; `clip` is not used")
        return load(path, dtype, _checkpoint_shardings(path, mesh))
    if (path / CONFIG_FILE).is_file():
        from convert.llava import load_transformers

        return load_transformers(path, dtype=dtype, clip=clip, progress=progress, mesh=mesh)
    raise CheckpointError(
        f"{path}: neither a sparsevlm-jax checkpoint nor a transformers/LLaVA directory "
        f"(no {CONFIG_FILE})"
    )


def _checkpoint_shardings(path: Path, mesh: Mesh | None) -> dict | None:
    """The parameter tree's shardings on `mesh` for our checkpoint at `path` (None: none)."""
    if mesh is None:
        return None
    from sparsevlm_jax.sharding import param_shardings

    return param_shardings(load_config(path), mesh)
