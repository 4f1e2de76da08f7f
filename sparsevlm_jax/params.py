"""The parameter tree of a LLaVA model, described once.

`param_specs(cfg)` is the single description of every parameter (shape and dtype); random
init, abstract shapes for orbax restore and the converter's expected key set are all derived
from it. The tree is a nested dict of arrays:

    vision/class_embedding                [Dv]
    vision/patch_embedding                [P*P*C, Dv]   rows ordered (row, col, channel)
    vision/position_embedding             [Np+1, Dv]
    vision/pre_layrnorm/{scale,bias}      [Dv]
    vision/layers/<name>/...              stacked on a leading [Lv] axis:
        layer_norm1, layer_norm2          {scale, bias} [Lv, Dv]
        q_proj, k_proj, v_proj, out_proj  {kernel [Lv, Dv, Dv], bias [Lv, Dv]}
        fc1                               {kernel [Lv, Dv, Mv], bias [Lv, Mv]}
        fc2                               {kernel [Lv, Mv, Dv], bias [Lv, Dv]}
    projector/linear_1                    {kernel [Dv, D], bias [D]}
    projector/linear_2                    {kernel [D, D], bias [D]}
    text/embed_tokens                     [Vocab, D]
    text/layers/<name>/...                stacked on a leading [L] axis:
        input_layernorm, post_attention_layernorm   {scale [L, D]}
        q_proj {kernel [L, D, N*H]}, k_proj / v_proj {kernel [L, D, K*H]},
        o_proj {kernel [L, N*H, D]}      (+ biases when attention_bias; o_proj's when
                                          `TextConfig.o_bias`: Qwen2 has q/k/v biases only)
        gate_proj, up_proj {kernel [L, D, M]}, down_proj {kernel [L, M, D]} (+ bias when mlp_bias)
    text/norm/scale                       [D]
    text/lm_head                          [D, Vocab]   (absent when tie_word_embeddings)
    image_newline                         [D]          (LLaVA-NeXT only)
    video_vision/...                      (Video-LLaVA only) the video tower, the same tree as
                                          vision/ (which is then its image tower)

Qwen2-VL / Qwen2.5-VL: `vision/` is their tower (`model.qwen_vision.vision_param_shapes`, patch
merger included) and there is no `projector/`.

Kernels are stored `[in, out]` (HF Linear weights transposed); the vision tower keeps all of
CLIP's layers (only `cfg.vision_layers_used` run) and drops `post_layernorm`, which LLaVA never
applies.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm_jax.config import LlavaConfig

Params = dict[str, Any]


def _linear(d_in: int, d_out: int, bias: bool, lead: tuple[int, ...] = ()) -> dict:
    out = {"kernel": lead + (d_in, d_out)}
    if bias:
        out["bias"] = lead + (d_out,)
    return out


def _norm(d: int, bias: bool, lead: tuple[int, ...] = ()) -> dict:
    out = {"scale": lead + (d,)}
    if bias:
        out["bias"] = lead + (d,)
    return out


def param_shapes(cfg: LlavaConfig) -> Params:
    """Nested dict of parameter shapes (tuples), the layout documented in this module."""
    v, t = cfg.vision, cfg.text
    lv, lt = (v.num_hidden_layers,), (t.num_hidden_layers,)
    dv, d = v.hidden_size, t.hidden_size
    vision = {
        "class_embedding": (dv,),
        "patch_embedding": (v.patch_size * v.patch_size * v.num_channels, dv),
        "position_embedding": (v.num_patches + 1, dv),
        "pre_layrnorm": _norm(dv, True),
        "layers": {
            "layer_norm1": _norm(dv, True, lv),
            "q_proj": _linear(dv, dv, True, lv),
            "k_proj": _linear(dv, dv, True, lv),
            "v_proj": _linear(dv, dv, True, lv),
            "out_proj": _linear(dv, dv, True, lv),
            "layer_norm2": _norm(dv, True, lv),
            "fc1": _linear(dv, v.intermediate_size, True, lv),
            "fc2": _linear(v.intermediate_size, dv, True, lv),
        },
    }
    projector = {
        "linear_1": _linear(dv, d, cfg.projector_bias),
        "linear_2": _linear(d, d, cfg.projector_bias),
    }
    qh, kvh = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    text = {
        "embed_tokens": (t.vocab_size, d),
        "layers": {
            "input_layernorm": _norm(d, False, lt),
            "q_proj": _linear(d, qh, t.attention_bias, lt),
            "k_proj": _linear(d, kvh, t.attention_bias, lt),
            "v_proj": _linear(d, kvh, t.attention_bias, lt),
            "o_proj": _linear(qh, d, t.o_bias, lt),
            "post_attention_layernorm": _norm(d, False, lt),
            "gate_proj": _linear(d, t.intermediate_size, t.mlp_bias, lt),
            "up_proj": _linear(d, t.intermediate_size, t.mlp_bias, lt),
            "down_proj": _linear(t.intermediate_size, d, t.mlp_bias, lt),
        },
        "norm": _norm(d, False),
    }
    if not t.tie_word_embeddings:
        text["lm_head"] = (d, t.vocab_size)
    if cfg.qwen:  # Qwen-VL: its own tower, whose patch merger is the projector
        from sparsevlm_jax.model.qwen_vision import vision_param_shapes

        return {"vision": vision_param_shapes(cfg.qwen_vision), "text": text}
    out = {"vision": vision, "projector": projector, "text": text}
    if cfg.separate_video_tower:  # Video-LLaVA: frames through a tower of the same shape
        out["video_vision"] = jax.tree.map(lambda s: s, vision, is_leaf=_is_shape)
    if cfg.anyres:
        out["image_newline"] = (d,)  # LLaVA-NeXT's learned end-of-row token
    return out


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple)


def abstract_params(cfg: LlavaConfig) -> Params:
    """`jax.ShapeDtypeStruct` leaves in `cfg.param_dtype` (for orbax restore and lowering)."""
    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg), is_leaf=_is_shape
    )


def flatten(tree: Params, prefix: str = "") -> dict[str, Any]:
    """`{"text/layers/q_proj/kernel": leaf, ...}` for a nested dict."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> Params:
    """Inverse of `flatten`."""
    out: Params = {}
    for key, v in flat.items():
        node = out
        *parents, last = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


def init_params(
    cfg: LlavaConfig, seed: int = 0, std: float = 0.02, overrides: dict[str, float] | None = None
) -> Params:
    """Random parameters (numpy RNG, so identical on every backend).

    Norm scales are 1 and biases 0; every other weight is N(0, std). `overrides` maps a flat
    key suffix (e.g. `"text/layers/q_proj/kernel"`) to another std, used by tests that need
    peaked attention.
    """
    rng = np.random.default_rng(seed)
    overrides = overrides or {}
    dtype = jnp.dtype(cfg.param_dtype)
    flat = {}
    for key, shape in flatten(param_shapes(cfg)).items():
        if key.endswith("/scale"):
            arr = np.ones(shape, np.float32)
        elif key.endswith("/bias"):
            arr = np.zeros(shape, np.float32)
        else:
            s = next((v for k, v in overrides.items() if key.endswith(k)), std)
            arr = rng.normal(0.0, s, shape).astype(np.float32)
        flat[key] = jnp.asarray(arr, dtype)
    return unflatten(flat)


def cast_params(params: Params, dtype: str) -> Params:
    return jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)


def count_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
