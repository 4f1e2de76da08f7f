"""Checkpoint conversion: llava-hf / transformers / original LLaVA-1.5 (+ CLIP) -> sparsevlm-jax.

    python -m convert SRC DST [--clip CLIP_DIR] [--dtype bfloat16|float32|float16|keep]

Public API:
    convert_checkpoint(src, dst, dtype="bfloat16", clip=None, progress=True, overwrite=False)
    load_transformers(src, dtype=None, clip=None, mesh=None) -> (params, cfg)
        (each parameter read block by block straight onto its devices / mesh shards)

Opening "our checkpoint or a source directory" is `sparsevlm_jax.loading.load_model` (above
both this package and `sparsevlm_jax.checkpoint`, which this package writes through).
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

__all__ = [
    "ConversionError",
    "WeightsError",
    "convert_checkpoint",
    "convert_to_numpy",
    "load_transformers",
    "open_weights",
    "read_config",
    "tokenizer_files",
]
