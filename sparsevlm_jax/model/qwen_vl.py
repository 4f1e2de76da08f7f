"""Qwen2-VL / Qwen2.5-VL as a family of the staged model: its tower's merged tokens spliced
into the shared sequence contract.

The tower (`model.qwen_vision`) turns every item of an example (images, videos' frame pairs)
into merged visual tokens, one per 28x28 pixels, in a per-example feature table; the batch's
`visual_index` says which row each visual slot holds, like LLaVA-NeXT's. Positions are not
built here: the host computes the (t, h, w) M-RoPE triples (`sparsevlm_jax.mrope`) and the
batch carries them (`Batch.positions`), so the decoder and the pruning only see a [B, L, 3]
position array.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.model import qwen_vision

Array = jax.Array


def visual_tokens(
    params: dict[str, Any], cfg: LlavaConfig, inputs: Any, visual_index: Array
) -> Array:
    """Visual tokens [B, V, D] of the region's slots.

    inputs: the batch's `qwen_vision.VisionInputs` (patches, rotary ids and attention
    segments, padded to a patch bucket); visual_index [B, V] int32: row of the example's
    merged-token table (items in prompt order), or `PAD_SLOT` / `TEXT_SLOT` (zeros here; the
    caller fills text slots and masks padding).
    """
    table = qwen_vision.visual_features(params["vision"], cfg.qwen_vision, inputs)
    x = jnp.take_along_axis(table, jnp.maximum(visual_index, 0)[..., None], axis=1)
    return jnp.where((visual_index < 0)[..., None], jnp.zeros((), x.dtype), x)
