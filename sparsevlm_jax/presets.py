"""Named model shapes (no weights): LLaVA-1.5-7B/13B and a CPU-sized `mini`.

Used for abstract lowering (FLOPs, compile time, memory) and benchmarks. `mini` keeps what
decides the pruning's cost structure — 576 visual tokens and 32 decoder layers, so the default
pruning layers apply — and shrinks the widths so it runs on two CPU cores in seconds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsevlm_jax.batch import Batch
from sparsevlm_jax.config import LlavaConfig, TextConfig, VisionConfig

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


SHAPES = {"llava-1.5-7b": llava_1_5_7b, "llava-1.5-13b": llava_1_5_13b, "mini": mini}


def abstract_batch(cfg: LlavaConfig, batch: int = 1, prefix: int = 48, text: int = 64) -> Batch:
    """ShapeDtypeStructs of one bucket (defaults: vicuna_v1's 35-token prefix, ~60-token
    question)."""
    s = cfg.vision.image_size
    return Batch(
        prefix_ids=jax.ShapeDtypeStruct((batch, prefix), jnp.int32),
        prefix_mask=jax.ShapeDtypeStruct((batch, prefix), jnp.bool_),
        text_ids=jax.ShapeDtypeStruct((batch, text), jnp.int32),
        text_mask=jax.ShapeDtypeStruct((batch, text), jnp.bool_),
        pixel_values=jax.ShapeDtypeStruct((batch, s, s, cfg.vision.num_channels), jnp.float32),
    )
