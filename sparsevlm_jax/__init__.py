"""sparsevlm-jax: LLaVA in JAX with SparseVLM visual-token pruning compiled into the prefill."""

from sparsevlm_jax import _hf_quiet  # noqa: F401  (first: before transformers loads)
from sparsevlm_jax.config import LlavaConfig, TextConfig, VisionConfig
from sparsevlm_jax.pipeline import LlavaPipeline, Result, load
from sparsevlm_jax.sparse.config import SparseConfig, named_presets, named_sparse_config

__version__ = "0.1.0"
__all__ = [
    "LlavaConfig",
    "LlavaPipeline",
    "Result",
    "SparseConfig",
    "TextConfig",
    "VisionConfig",
    "load",
    "named_presets",
    "named_sparse_config",
]
