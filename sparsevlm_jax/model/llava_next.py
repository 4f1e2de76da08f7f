"""LLaVA-NeXT (LLaVA-1.6) visual tokens: tiles through the tower, packed by a host-side index.

The "anyres" layout of an image (best pinpoint, tiles, unpadding, one `image_newline` per row)
depends only on the image's size, so the host computes it (`sparsevlm_jax.anyres`) as an index
into the image's feature table and the device only gathers: every image runs the tower on
`max_tiles` tiles (unused ones are zero pixels whose features no slot selects), and one program
serves every aspect ratio of a visual bucket.

Letters: B batch, N tiles per example, F features per tile, V visual slots, D text width.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparsevlm_jax.batch import PAD_SLOT
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.model.clip import image_features

Array = jax.Array
NEWLINE_SLOT = -2  # visual_index of the learned `image_newline` token


def visual_tokens(
    params: dict[str, Any], cfg: LlavaConfig, pixel_values: Array, visual_index: Array
) -> Array:
    """Packed visual tokens [B, V, D].

    pixel_values [B, N, H, W, C] (tile 0 the base image, then the grid row-major);
    visual_index [B, V] int32: row t*F + f of the example's [N*F, D] feature table (patch f of
    tile t), `NEWLINE_SLOT`, or `PAD_SLOT` (zeros; the caller masks those slots).
    """
    b, n = pixel_values.shape[:2]
    feats = image_features(params, cfg, pixel_values.reshape(b * n, *pixel_values.shape[2:]))
    table = feats.reshape(b, n * feats.shape[1], feats.shape[-1])
    x = jnp.take_along_axis(table, jnp.maximum(visual_index, 0)[..., None], axis=1)
    newline = params["image_newline"].astype(x.dtype)
    x = jnp.where((visual_index == NEWLINE_SLOT)[..., None], newline, x)
    return jnp.where((visual_index == PAD_SLOT)[..., None], jnp.zeros((), x.dtype), x)
