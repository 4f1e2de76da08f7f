"""Named model shapes (no weights): LLaVA-1.5-7B/13B, LLaVA-NeXT-7B and CPU-sized minis.

Used for abstract lowering (FLOPs, compile time, memory) and benchmarks. `mini` keeps what
decides the pruning's cost structure — 576 visual tokens and 32 decoder layers, so the default
pruning layers apply — and shrinks the widths so it runs on two CPU cores in seconds.
`llava-next-7b` is LLaVA-NeXT (1.6) Vicuna-7B: CLIP-L/336 tiles on llava-v1.6's five
pinpoints (1,176-2,928 visual tokens per image), the Llama-7B decoder; `mini-next` is `mini`
with the same anyres tiling.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from sparsevlm_jax.batch import Batch
from sparsevlm_jax.config import LlavaConfig, TextConfig, VisionConfig

if TYPE_CHECKING:
    from sparsevlm_jax.anyres import AnyresSpec

CLIP_L_336 = VisionConfig()  # ViT-L/14 at 336 px: 576 patches, 24 layers, width 1024


def llava_1_5_7b(dtype: str = "bfloat16") -> LlavaConfig:
    return LlavaConfig(vision=CLIP_L_336, text=TextConfig(), param_dtype=dtype, dtype=dtype)


def llava_1_5_13b(dtype: str = "bfloat16") -> LlavaConfig:
    text = TextConfig(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
    )
    return LlavaConfig(vision=CLIP_L_336, text=text, param_dtype=dtype, dtype=dtype)


def mini(dtype: str = "float32") -> LlavaConfig:
    vision = VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    text = TextConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=32,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
    )
    return LlavaConfig(vision=vision, text=text, param_dtype=dtype, dtype=dtype)


# llava-hf/llava-v1.6-vicuna-7b-hf's image_grid_pinpoints, (height, width).
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def llava_next_7b(dtype: str = "bfloat16") -> LlavaConfig:
    """LLaVA-NeXT Vicuna-7B (llava-v1.6-vicuna-7b): the 1.5-7B shape with anyres tiling."""
    return llava_1_5_7b(dtype).replace(family="llava_next", image_grid_pinpoints=NEXT_PINPOINTS)


def mini_next(dtype: str = "float32") -> LlavaConfig:
    """`mini` with LLaVA-NeXT's anyres tiling (336-px tiles, llava-v1.6's pinpoints)."""
    return mini(dtype).replace(family="llava_next", image_grid_pinpoints=NEXT_PINPOINTS)


def _video(cfg: LlavaConfig) -> LlavaConfig:
    """LLaVA-NeXT-Video on a LLaVA-NeXT shape: `<video>` after `<image>`, 2x2 average pooling
    (144 tokens a 336-px frame), the hub's linear RoPE scaling by 2."""
    text = dataclasses.replace(cfg.text, rope_scaling=(("factor", 2.0), ("rope_type", "linear")))
    video = 32001 if text.vocab_size > 32001 else text.vocab_size - 2  # mini: in its vocabulary
    return cfg.replace(family="llava_next_video", video_token_index=video, text=text)


def llava_next_video_7b(dtype: str = "bfloat16") -> LlavaConfig:
    """LLaVA-NeXT-Video-7B (llava-hf/LLaVA-NeXT-Video-7B-hf): LLaVA-NeXT-7B's shape."""
    return _video(llava_next_7b(dtype))


def mini_next_video(dtype: str = "float32") -> LlavaConfig:
    """`mini-next` as LLaVA-NeXT-Video (144 tokens a frame)."""
    return _video(mini_next(dtype))


def video_llava_7b(dtype: str = "bfloat16") -> LlavaConfig:
    """Video-LLaVA-7B (LanguageBind/Video-LLaVA-7B-hf): two ViT-L/14 towers at 224 px (256
    tokens an image, 257 a frame: 2,056 for 8 frames), Vicuna-7B."""
    vision = dataclasses.replace(CLIP_L_336, image_size=224)
    cfg = llava_1_5_7b(dtype).replace(vision=vision)
    return cfg.replace(family="video_llava", image_token_index=32000, video_token_index=32001)


SHAPES = {
    "llava-1.5-7b": llava_1_5_7b,
    "llava-1.5-13b": llava_1_5_13b,
    "llava-next-7b": llava_next_7b,
    "mini": mini,
    "mini-next": mini_next,
    "llava-next-video-7b": llava_next_video_7b,
    "mini-next-video": mini_next_video,
    "video-llava-7b": video_llava_7b,
}


def anyres_spec(cfg: LlavaConfig) -> AnyresSpec:
    """The tiling of a llava_next shape as llava-hf's processor does it (CLIP mean / std,
    shortest edge = the tile size)."""
    from sparsevlm_jax.anyres import AnyresSpec
    from sparsevlm_jax.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return AnyresSpec(
        pinpoints=cfg.image_grid_pinpoints,
        tile_size=cfg.vision.image_size,
        patch_size=cfg.vision.patch_size,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        shortest_edge=cfg.vision.image_size,
    )


def abstract_batch(
    cfg: LlavaConfig,
    batch: int = 1,
    prefix: int = 48,
    text: int = 64,
    visual: int | None = None,
    tiles: int | None = None,
) -> Batch:
    """ShapeDtypeStructs of one bucket (defaults: vicuna_v1's 35-token prefix, ~60-token
    question). `visual`: the visual slots of a llava_next bucket (its `visual_index` width;
    the pixels are then `tiles` tower inputs per example, default `max_tiles`; a video's
    frames are tower inputs too)."""
    s, c = cfg.vision.image_size, cfg.vision.num_channels
    if cfg.variable_visual:  # a visual index: anyres images, videos
        if visual is None:
            raise ValueError(f"a {cfg.family} batch needs its visual slot count")
        n = tiles if tiles is not None else cfg.max_tiles
        pixels = jax.ShapeDtypeStruct((batch, n, s, s, c), jnp.float32)
        index = jax.ShapeDtypeStruct((batch, visual), jnp.int32)
    else:
        pixels, index = jax.ShapeDtypeStruct((batch, s, s, c), jnp.float32), None
    return Batch(
        prefix_ids=jax.ShapeDtypeStruct((batch, prefix), jnp.int32),
        prefix_mask=jax.ShapeDtypeStruct((batch, prefix), jnp.bool_),
        text_ids=jax.ShapeDtypeStruct((batch, text), jnp.int32),
        text_mask=jax.ShapeDtypeStruct((batch, text), jnp.bool_),
        pixel_values=pixels,
        visual_index=index,
    )
