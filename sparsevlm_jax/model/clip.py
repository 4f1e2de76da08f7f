"""CLIP ViT vision tower and the LLaVA projector.

Pre-LayerNorm ViT with a class token and learned positions (HF `CLIPVisionModel`). LLaVA reads
the hidden state after `cfg.vision_layers_used` encoder layers (`vision_feature_layer=-2`: the
penultimate), so later layers never run and `post_layernorm` is never applied.

Letters: B batch, P patches (+1 class token), D vision width.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from sparsevlm_jax.config import LlavaConfig, VisionConfig
from sparsevlm_jax.model.llama import layer_params, linear

Array = jax.Array


def layer_norm(x: Array, p: dict[str, Array], eps: float) -> Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def activation(name: str, x: Array) -> Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    raise NotImplementedError(f"unsupported activation {name!r}")


def patch_embed(p: dict[str, Any], cfg: VisionConfig, pixel_values: Array) -> Array:
    """pixel_values [B, H, W, C] -> patch embeddings [B, Np, D] (a stride-P convolution)."""
    b, h, w, c = pixel_values.shape
    ps = cfg.patch_size
    if h != cfg.image_size or w != cfg.image_size or c != cfg.num_channels:
        raise ValueError(
            f"pixel_values must be [B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}], "
            f"got {pixel_values.shape}"
        )
    x = pixel_values.reshape(b, h // ps, ps, w // ps, ps, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // ps) * (w // ps), ps * ps * c)
    return x @ p["patch_embedding"].astype(x.dtype)


def encoder_layer(lp: dict[str, Any], cfg: VisionConfig, x: Array) -> Array:
    """One pre-LN CLIP encoder layer on x [B, P, D]."""
    b, t, d = x.shape
    nh, hd = cfg.num_attention_heads, cfg.head_dim
    h = layer_norm(x, lp["layer_norm1"], cfg.layer_norm_eps)
    q = linear(h, lp["q_proj"]).reshape(b, t, nh, hd)
    k = linear(h, lp["k_proj"]).reshape(b, t, nh, hd)
    v = linear(h, lp["v_proj"]).reshape(b, t, nh, hd)
    s = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    a = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bnqk,bknh->bqnh", a, v).reshape(b, t, d)
    x = x + linear(o, lp["out_proj"])
    h = layer_norm(x, lp["layer_norm2"], cfg.layer_norm_eps)
    return x + linear(activation(cfg.hidden_act, linear(h, lp["fc1"])), lp["fc2"])


def image_features(params: dict[str, Any], cfg: LlavaConfig, pixel_values: Array) -> Array:
    """Projected image features [B, num_image_tokens, D_text] ready to splice into the prompt.

    pixel_values [B, H, W, C] (normalised, channels last).
    """
    return project(params, tower_features(params, cfg, pixel_values))


def project(params: dict[str, Any], x: Array) -> Array:
    """The multimodal projector: tower features [..., D_vision] -> [..., D_text]."""
    pp = params["projector"]
    return linear(activation("gelu", linear(x, pp["linear_1"])), pp["linear_2"])


def tower_features(
    params: dict[str, Any],
    cfg: LlavaConfig,
    pixel_values: Array,
    tower: str = "vision",
    keep_cls: bool = False,
) -> Array:
    """The selected layer's tower features [B, num_image_tokens, D_vision] (CLS dropped under
    the "default" strategy unless `keep_cls`), before the projector.

    pixel_values [B, H, W, C] (normalised, channels last). `tower`: the params subtree to run
    ("vision"; Video-LLaVA's video tower "video_vision", same shape, whose features keep CLS).
    """
    vp, vc = params[tower], cfg.vision
    dtype = jnp.dtype(cfg.dtype)
    x = patch_embed(vp, vc, pixel_values.astype(dtype))
    cls = jnp.broadcast_to(vp["class_embedding"].astype(dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + vp["position_embedding"].astype(dtype)
    x = layer_norm(x, vp["pre_layrnorm"], vc.layer_norm_eps)
    n = cfg.vision_layers_used

    def body(x, i):
        return encoder_layer(layer_params(vp["layers"], i), vc, x), None

    x, _ = jax.lax.scan(body, x, jnp.arange(n), unroll=n if cfg.unroll_layers else 1)
    if cfg.vision_feature_select_strategy == "default" and not keep_cls:
        x = x[:, 1:]
    return x
