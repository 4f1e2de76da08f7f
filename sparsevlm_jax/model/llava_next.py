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
from sparsevlm_jax.model.clip import project, tower_features

Array = jax.Array
NEWLINE_SLOT = -2  # visual_index of the learned `image_newline` token


def visual_tokens(
    params: dict[str, Any], cfg: LlavaConfig, pixel_values: Array, visual_index: Array
) -> Array:
    """Packed visual tokens [B, V, D].

    pixel_values [B, N, H, W, C] (an image's tiles: the base image, then the grid row-major;
    a video's frames); visual_index [B, V] int32: row of the example's feature table,
    `NEWLINE_SLOT`, or `PAD_SLOT` (zeros; the caller masks those slots). The table has N*F
    rows, patch f of tile t at t*F + f; on video families N*P more follow, the tiles' pooled
    grids (`pooled`): pooled patch p of tile t at N*F + t*P + p.
    """
    b, n = pixel_values.shape[:2]
    feats = tower_features(params, cfg, pixel_values.reshape(b * n, *pixel_values.shape[2:]))
    rows = [project(params, feats).reshape(b, -1, cfg.text.hidden_size)]
    if cfg.takes_video:
        rows.append(project(params, pooled(cfg, feats)).reshape(b, -1, cfg.text.hidden_size))
    table = jnp.concatenate(rows, axis=1) if len(rows) > 1 else rows[0]
    x = jnp.take_along_axis(table, jnp.maximum(visual_index, 0)[..., None], axis=1)
    newline = params["image_newline"].astype(x.dtype)
    x = jnp.where((visual_index == NEWLINE_SLOT)[..., None], newline, x)
    return jnp.where((visual_index == PAD_SLOT)[..., None], jnp.zeros((), x.dtype), x)


def pooled(cfg: LlavaConfig, feats: Array) -> Array:
    """LLaVA-NeXT-Video's spatial pooling: tower features [M, g*g, D] on the g x g patch grid
    -> [M, (g/s)^2, D], s x s windows averaged (or maxed), row-major like the grid."""
    m, _, d = feats.shape
    g, s = cfg.vision.image_size // cfg.vision.patch_size, cfg.spatial_pool_stride
    x = feats.reshape(m, g // s, s, g // s, s, d)
    reduce = jnp.mean if cfg.spatial_pool_mode == "average" else jnp.max
    out = reduce(x.astype(jnp.float32), axis=(2, 4)).astype(feats.dtype)
    return out.reshape(m, (g // s) ** 2, d)
