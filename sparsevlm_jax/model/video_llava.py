"""Video-LLaVA visual tokens: images through the image tower, frames through the video tower.

Video-LLaVA (`VideoLlavaForConditionalGeneration`) has two CLIP towers of one shape and one
projector. An image is one tower input whose selected-layer features drop the class token under
the "default" strategy (`num_image_tokens`, 256 at 224 px); a video's frames are one input each,
through the video tower, class token always kept (transformers' `get_video_features` ignores
the strategy): `video_tokens_per_frame` = patches + 1 (257; 8 frames = 2056 tokens).

As on LLaVA-NeXT (`model.llava_next`), the host builds each example's `visual_index` into a
per-example feature table and the device only gathers, so one program serves images, videos
and both in one prompt. Which tower inputs are images and which are frames is data, not shape:
both towers run on every input and the index selects (the vision cost doubles, small against
the decoder's on a 2k-token video prompt).

Letters: B batch, N tower inputs per example, F image features per input, G video features per
input (F + 1 under "default"), V visual slots, D text width.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparsevlm_jax.batch import PAD_SLOT
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.model.clip import project, tower_features

Array = jax.Array


def visual_tokens(
    params: dict[str, Any], cfg: LlavaConfig, pixel_values: Array, visual_index: Array
) -> Array:
    """Visual tokens [B, V, D].

    pixel_values [B, N, H, W, C] (images and frames, one tower input each; unused inputs are
    zeros no slot selects); visual_index [B, V] int32: row of the example's feature table, or
    `PAD_SLOT` (zeros; the caller masks those slots). The table has N*F image-tower rows
    (feature f of input t at t*F + f), then N*G video-tower rows (feature g of input t at
    N*F + t*G + g).
    """
    b, n = pixel_values.shape[:2]
    flat = pixel_values.reshape(b * n, *pixel_values.shape[2:])
    d = cfg.text.hidden_size
    image = tower_features(params, cfg, flat)
    video = tower_features(params, cfg, flat, tower="video_vision", keep_cls=True)
    table = jnp.concatenate(
        [project(params, image).reshape(b, -1, d), project(params, video).reshape(b, -1, d)],
        axis=1,
    )
    x = jnp.take_along_axis(table, jnp.maximum(visual_index, 0)[..., None], axis=1)
    return jnp.where((visual_index == PAD_SLOT)[..., None], jnp.zeros((), x.dtype), x)
