"""Checkpoint conversion: llava-hf / transformers / original LLaVA-1.5 (+ CLIP) -> sparsevlm-jax.

    python -m convert SRC DST [--clip CLIP_DIR] [--dtype bfloat16|float32|float16|keep]

Public API:
    convert_checkpoint(src, dst, dtype="bfloat16", clip=None, progress=True, overwrite=False)
    load_transformers(src, dtype=None, clip=None) -> (params, cfg)
    load_model(path, dtype=None, clip=None) -> (params, cfg)   # our checkpoint or a source dir
"""

from convert.errors import ConversionError
from convert.llava import (
    convert_checkpoint,
    convert_to_numpy,
    load_transformers,
    read_config,
    tokenizer_files,
)
from convert.readers import WeightsError, open_weights
from sparsevlm_jax.checkpoint import load_model

__all__ = [
    "ConversionError",
    "WeightsError",
    "convert_checkpoint",
    "convert_to_numpy",
    "load_model",
    "load_transformers",
    "open_weights",
    "read_config",
    "tokenizer_files",
]
