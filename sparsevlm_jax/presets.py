"""Named model shapes (no weights): LLaVA-1.5-7B/13B, LLaVA-NeXT-7B, Qwen2(.5)-VL-7B and
CPU-sized minis.

Used for abstract lowering (FLOPs, compile time, memory) and benchmarks. `mini` keeps what
decides the pruning's cost structure — 576 visual tokens and 32 decoder layers, so the default
pruning layers apply — and shrinks the widths so it runs on two CPU cores in seconds.
`llava-next-7b` is LLaVA-NeXT (1.6) Vicuna-7B: CLIP-L/336 tiles on llava-v1.6's five
pinpoints (1,176-2,928 visual tokens per image), the Llama-7B decoder; `mini-next` is `mini`
with the same anyres tiling. `qwen2.5-vl-7b` / `qwen2-vl-7b` are the hub's
Qwen/Qwen2.5-VL-7B-Instruct / Qwen/Qwen2-VL-7B-Instruct (config.json, not transformers'
class defaults, which describe other sizes); `mini-qwen` is `mini`'s decoder with M-RoPE and
q/k/v biases behind a two-block Qwen2.5 tower.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from sparsevlm_jax.batch import Batch
from sparsevlm_jax.config import LlavaConfig, TextConfig, VisionConfig
from sparsevlm_jax.config_qwen import QwenVisionConfig

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


# Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen2-VL-7B-Instruct: the same Qwen2-7B decoder
# (transformers' Qwen2_5_VLConfig defaults are the 72B decoder and a 3584-wide tower: not these).
QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, QWEN_VISION_START = 151655, 151656, 151652


def _qwen_7b_text(max_positions: int) -> TextConfig:
    return TextConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=max_positions,
        attention_bias=True,  # q/k/v only:
        attention_out_bias=False,
        bos_token_id=151643,
        eos_token_id=151645,
        mrope_section=(16, 24, 24),
    )


def _qwen(family: str, vision: Any, text: TextConfig, dtype: str, **ids: int) -> LlavaConfig:
    ids = {"image_token_index": QWEN_IMAGE_TOKEN, "video_token_index": QWEN_VIDEO_TOKEN,
           "vision_start_token_id": QWEN_VISION_START, **ids}  # fmt: skip
    tps = vision.tokens_per_second if family == "qwen2_5_vl" else None
    return LlavaConfig(family=family, qwen_vision=vision, text=text, param_dtype=dtype,
                       dtype=dtype, tokens_per_second=tps, **ids)  # fmt: skip


def qwen2_5_vl_7b(dtype: str = "bfloat16") -> LlavaConfig:
    """Qwen2.5-VL-7B-Instruct: a 32-block windowed tower (width 1280, SwiGLU 3420, 112-px
    windows, full attention in blocks 7 / 15 / 23 / 31) merged to 3584; the Qwen2-7B decoder
    (28 layers, 28 heads, 4 kv heads), M-RoPE (16, 24, 24)."""
    vision = QwenVisionConfig(
        kind="qwen2_5_vl", depth=32, embed_dim=1280, num_heads=16, intermediate_size=3420,
        out_hidden_size=3584, hidden_act="silu", window_size=112,
        fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2.0,
    )  # fmt: skip
    return _qwen("qwen2_5_vl", vision, _qwen_7b_text(128000), dtype)


def qwen2_vl_7b(dtype: str = "bfloat16") -> LlavaConfig:
    """Qwen2-VL-7B-Instruct: a 32-block tower (width 1280, quick-GELU MLP 5120, attention
    within frames) merged to 3584; the decoder of `qwen2.5-vl-7b`."""
    vision = QwenVisionConfig(
        kind="qwen2_vl", depth=32, embed_dim=1280, num_heads=16, intermediate_size=5120,
        out_hidden_size=3584, hidden_act="quick_gelu",
    )  # fmt: skip
    return _qwen("qwen2_vl", vision, _qwen_7b_text(32768), dtype)


def mini_qwen(dtype: str = "float32") -> LlavaConfig:
    """`mini`'s decoder (32 layers, width 256, 4 heads of 64) with M-RoPE (8, 12, 12) and
    q/k/v biases, behind a two-block Qwen2.5 tower (width 64, block 1 full attention)."""
    text = dataclasses.replace(
        mini(dtype).text, rms_norm_eps=1e-6, rope_theta=1e6, attention_bias=True,
        attention_out_bias=False, mrope_section=(8, 12, 12),
    )  # fmt: skip
    vision = QwenVisionConfig(
        kind="qwen2_5_vl", depth=2, embed_dim=64, num_heads=4, intermediate_size=128,
        out_hidden_size=text.hidden_size, hidden_act="silu", window_size=112,
        fullatt_block_indexes=(1,), tokens_per_second=2.0,
    )  # fmt: skip
    v = text.vocab_size  # ids inside the mini vocabulary
    return _qwen("qwen2_5_vl", vision, text, dtype, image_token_index=v - 4,
                 video_token_index=v - 3, vision_start_token_id=v - 6)  # fmt: skip


SHAPES = {
    "llava-1.5-7b": llava_1_5_7b,
    "llava-1.5-13b": llava_1_5_13b,
    "llava-next-7b": llava_next_7b,
    "mini": mini,
    "mini-next": mini_next,
    "llava-next-video-7b": llava_next_video_7b,
    "mini-next-video": mini_next_video,
    "video-llava-7b": video_llava_7b,
    "qwen2.5-vl-7b": qwen2_5_vl_7b,
    "qwen2-vl-7b": qwen2_vl_7b,
    "mini-qwen": mini_qwen,
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
    patches: int | None = None,
) -> Batch:
    """ShapeDtypeStructs of one bucket (defaults: vicuna_v1's 35-token prefix, ~60-token
    question). `visual`: the visual slots of a llava_next bucket (its `visual_index` width;
    the pixels are then `tiles` tower inputs per example, default `max_tiles`; a video's
    frames are tower inputs too). Qwen-VL: the pixels are the tower's `VisionInputs` of
    `patches` patch rows per example (default 4 x `visual`), plus [B, L, 3] M-RoPE
    positions."""
    if cfg.qwen:
        if visual is None:
            raise ValueError(f"a {cfg.family} batch needs its visual slot count")
        return _abstract_qwen_batch(cfg, batch, prefix, text, visual, patches)
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


def _abstract_qwen_batch(
    cfg: LlavaConfig, batch: int, prefix: int, text: int, visual: int, patches: int | None
) -> Batch:
    """`abstract_batch` of a Qwen-VL bucket: `qwen_images.pack`'s shapes at a patch capacity
    (its attention tiles as `qwen_images.attention_block` picks them)."""
    from sparsevlm_jax.model.qwen_vision import VisionInputs
    from sparsevlm_jax.qwen_images import attention_block

    vcfg = cfg.qwen_vision
    p = patches if patches is not None else vcfg.merge_unit * visual
    block = attention_block(p)

    def i32(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.int32)

    inputs = VisionInputs(
        patches=jax.ShapeDtypeStruct((batch, p, vcfg.patch_dim), jnp.float32),
        pos_hw=i32(batch, p, 2),
        segments=i32(batch, p),
        window_segments=i32(batch, p),
        reverse_index=i32(batch, p // vcfg.merge_unit),
        num_tokens=i32(batch),
        block_ranges=i32(p // block, 2, 2),
        block=block,
    )
    return Batch(
        prefix_ids=i32(batch, prefix),
        prefix_mask=jax.ShapeDtypeStruct((batch, prefix), jnp.bool_),
        text_ids=i32(batch, text),
        text_mask=jax.ShapeDtypeStruct((batch, text), jnp.bool_),
        pixel_values=inputs,
        visual_index=i32(batch, visual),
        positions=i32(batch, prefix + visual + text, 3),
    )
