"""Analytic prefill cost (SPEC §8).

Per decoder layer processing n tokens with hidden size d and MLP size m the SparseVLM authors
count `4nd² + 2n²d + 3ndm` multiply-accumulates (MACs); FLOPs are reported as 2 × MACs. (FastV
counts the MLP as 2ndm; every number this project prints uses the 3ndm convention.)
"""

from __future__ import annotations

import numpy as np

from sparsevlm_jax.config import TextConfig

CONVENTION = "FLOPs = 2 x MACs, MACs/layer = 4nd^2 + 2n^2d + 3ndm (SparseVLM, SPEC §8)"


def layer_macs(n: np.ndarray | int, d: int, m: int) -> np.ndarray:
    n = np.asarray(n, np.float64)
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def prefill_flops(tokens_per_layer: np.ndarray, cfg: TextConfig) -> np.ndarray:
    """FLOPs of a prefill whose layer j processes tokens_per_layer[..., j] tokens.

    tokens_per_layer: [..., num_layers]; returns [...] (float64).
    """
    macs = layer_macs(tokens_per_layer, cfg.hidden_size, cfg.intermediate_size)
    return 2.0 * macs.sum(axis=-1)
