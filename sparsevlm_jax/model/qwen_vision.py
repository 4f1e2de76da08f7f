"""The Qwen2-VL and Qwen2.5-VL vision towers over padded, fixed-capacity patch batches.

transformers runs the tower on one packed sequence of every image's patches and separates the
images (and the frames of a video) with `cu_seqlens`. Here each example of a batch is one row
of a fixed capacity of P patches (`sparsevlm_jax.qwen_images.patch_capacity`), so a jitted
tower compiles once per (B, P) bucket. Everything data-dependent is computed on the host from
the grids (`qwen_images.prepare`) and travels in `VisionInputs`:

- the patches already permuted into *tower order*: Qwen2.5's window order (transformers'
  `window_index`, merge groups of 2x2 patches moved together) or, for Qwen2-VL, the
  processor's order itself;
- the 2-D rotary position ids (row, column of every patch) in the same order;
- one attention *segment id* per patch, in place of `cu_seqlens`: a patch attends to the
  patches of its own segment only. Full-attention segments are the frames of the images
  (`segments`); Qwen2.5's windowed blocks use the windows (`window_segments`). Padding patches
  each get a segment of their own (ids above every valid one), so they attend to themselves
  only and no valid patch ever sees them: a padded example computes exactly what it computes
  alone;
- `reverse_index`: which merged tower row is output token j (transformers' `argsort(
  window_index)`), so the output is in transformers' order (the processor's, image by image).

Attention is dense (one [P, P] masked softmax per head) below `TILE_MIN_PATCHES`; from there on
it runs in tiles of `block` rows with an online softmax, and each query tile visits only the
key tiles its segments reach (`block_ranges`, computed on the host): windows are 64 patches,
so Qwen2.5's windowed blocks cost O(P * 64) instead of O(P^2), and the memory stays linear.

Parameters are plain nested dicts (`vision_param_shapes`), blocks stacked on a leading [L]
axis and run by `lax.scan`. Compute runs in the parameters' dtype (or `dtype`), norms,
softmax and rotary embeddings in float32.

Letters: B batch, P patch capacity, G = P / merge_unit merged rows (= V output tokens),
D tower width, N heads, H head dim, K patch dim = C * temporal_patch * patch * patch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sparsevlm_jax.config_qwen import KINDS, QwenVisionConfig  # noqa: F401 - re-exported
from sparsevlm_jax.model.clip import activation, layer_norm
from sparsevlm_jax.model.llama import NEG_INF, apply_rope, attend, layer_params, linear, rms_norm

Array = jax.Array


@struct.dataclass
class VisionInputs:
    """One batch's padded tower inputs, all per-patch arrays in tower order (module docstring).

    patches         [B, P, K] float32  normalised patch rows (padding rows 0)
    pos_hw          [B, P, 2] int32    rotary row, column of each patch (padding 0)
    segments        [B, P] int32       full-attention segment (a frame of an image); padding
                                       rows have ids >= PAD_SEGMENT, one per row
    window_segments [B, P] int32       windowed-attention segment (Qwen2.5), else = segments
    reverse_index   [B, G] int32       output token j = merged tower row reverse_index[b, j]
    num_tokens      [B] int32          valid output tokens of each example (a prefix of G)
    block_ranges    [Q, 2, 2] int32    query tile q: key tiles [lo, hi) for full attention
                                       ([q, 0]) and windowed attention ([q, 1]); Q = P // block
    block           static int         attention tile rows (= P: one dense tile)
    """

    patches: Any
    pos_hw: Any
    segments: Any
    window_segments: Any
    reverse_index: Any
    num_tokens: Any
    block_ranges: Any
    block: int = struct.field(pytree_node=False)

    @property
    def capacity(self) -> int:
        """P, the static patch capacity."""
        return int(self.patches.shape[1])

    def token_mask(self) -> Array:
        """[B, G] bool: the valid output tokens."""
        g = self.reverse_index.shape[1]
        return jnp.arange(g)[None, :] < jnp.asarray(self.num_tokens)[:, None]


PAD_SEGMENT = 1 << 24  # padding rows: segment PAD_SEGMENT + row (valid ids stay below it)
# Attention tiling (`qwen_images.attention_block`): dense below TILE_MIN_PATCHES patches (one
# [P, P] tile: at 2,048 patches and 16 heads 256 MiB of float32 scores per example), tiles of
# the largest of ATTENTION_TILES dividing P from there on.
TILE_MIN_PATCHES = 2048
ATTENTION_TILES = (512, 256, 128)


# --------------------------------------------------------------------------------------------
# Parameters and the checkpoint name table


def _lin(d_in: int, d_out: int, bias: bool = True, lead: tuple[int, ...] = ()) -> dict:
    out = {"kernel": (*lead, d_in, d_out)}
    if bias:
        out["bias"] = (*lead, d_out)
    return out


def _norm(d: int, bias: bool, lead: tuple[int, ...] = ()) -> dict:
    out = {"scale": (*lead, d)}
    if bias:
        out["bias"] = (*lead, d)
    return out


def vision_param_shapes(vcfg: QwenVisionConfig) -> dict[str, Any]:
    """Nested dict of shape tuples (the tree under the top-level "vision" key):

    patch_embed/kernel              [K, D]       Conv3d weight.reshape(D, -1).T
    blocks/norm1, blocks/norm2      {scale [L, D]} (+ bias: Qwen2-VL's LayerNorm)
    blocks/qkv                      {kernel [L, D, 3D], bias [L, 3D]}
    blocks/proj                     {kernel [L, D, D], bias [L, D]}
    blocks/fc1, blocks/fc2          Qwen2-VL: [L, D, M], [L, M, D] (+ biases)
    blocks/gate_proj, up_proj, down_proj   Qwen2.5-VL: [L, D, M] x2, [L, M, D] (+ biases)
    merger/ln_q                     {scale [D]} (+ bias: Qwen2-VL)
    merger/mlp_0                    {kernel [4D, 4D], bias [4D]}
    merger/mlp_2                    {kernel [4D, out_hidden_size], bias}
    """
    d, m, lead = vcfg.embed_dim, vcfg.intermediate_size, (vcfg.depth,)
    ln_bias = not vcfg.windowed
    blocks = {
        "norm1": _norm(d, ln_bias, lead),
        "norm2": _norm(d, ln_bias, lead),
        "qkv": _lin(d, 3 * d, True, lead),
        "proj": _lin(d, d, True, lead),
    }
    if vcfg.windowed:
        blocks |= {
            "gate_proj": _lin(d, m, True, lead),
            "up_proj": _lin(d, m, True, lead),
            "down_proj": _lin(m, d, True, lead),
        }
    else:
        blocks |= {"fc1": _lin(d, m, True, lead), "fc2": _lin(m, d, True, lead)}
    hm = d * vcfg.merge_unit
    return {
        "patch_embed": {"kernel": (vcfg.patch_dim, d)},
        "blocks": blocks,
        "merger": {
            "ln_q": _norm(d, ln_bias),
            "mlp_0": _lin(hm, hm),
            "mlp_2": _lin(hm, vcfg.out_hidden_size),
        },
    }


# Transform kinds, the values of `convert.names` (COPY, LINEAR) plus the patch embedding's.
COPY = "copy"
LINEAR = "linear"
CONV3D = "conv3d"  # Conv3d [D, C, T, P, P] -> kernel [C*T*P*P, D]: w.reshape(D, -1).T

_B = r"blocks\.(?P<layer>\d+)\."
# Applied to a tensor name after its `visual.` / `model.visual.` prefix; first match wins, a
# None target is a known-ignorable tensor. Same form as `convert.names.BODY_RULES`.
VISION_NAME_RULES: tuple[tuple[str, str | None, str], ...] = (
    (r"patch_embed\.proj\.weight", "vision/patch_embed/kernel", CONV3D),
    (_B + r"(?P<n>norm[12])\.weight", "vision/blocks/{n}/scale", COPY),
    (_B + r"(?P<n>norm[12])\.bias", "vision/blocks/{n}/bias", COPY),
    (_B + r"attn\.(?P<p>qkv|proj)\.weight", "vision/blocks/{p}/kernel", LINEAR),
    (_B + r"attn\.(?P<p>qkv|proj)\.bias", "vision/blocks/{p}/bias", COPY),
    (_B + r"mlp\.(?P<p>fc1|fc2|gate_proj|up_proj|down_proj)\.weight", "vision/blocks/{p}/kernel",
     LINEAR),
    (_B + r"mlp\.(?P<p>fc1|fc2|gate_proj|up_proj|down_proj)\.bias", "vision/blocks/{p}/bias",
     COPY),
    (r"merger\.ln_q\.weight", "vision/merger/ln_q/scale", COPY),
    (r"merger\.ln_q\.bias", "vision/merger/ln_q/bias", COPY),
    (r"merger\.mlp\.(?P<i>[02])\.weight", "vision/merger/mlp_{i}/kernel", LINEAR),
    (r"merger\.mlp\.(?P<i>[02])\.bias", "vision/merger/mlp_{i}/bias", COPY),
    (r"rotary_pos_emb\.inv_freq", None, COPY),
)  # fmt: skip


def transform(kind: str, w: np.ndarray) -> np.ndarray:
    """A source tensor in our layout (COPY, LINEAR: transposed, CONV3D: flattened)."""
    if kind == LINEAR:
        return w.T
    if kind == CONV3D:
        return w.reshape(w.shape[0], -1).T
    return w


def params_from_state_dict(
    state: Mapping[str, np.ndarray], vcfg: QwenVisionConfig, dtype: Any = jnp.float32
) -> dict[str, Any]:
    """The tree under "vision" from a tower's tensors named without the `visual.` prefix
    (e.g. `model.model.visual.state_dict()` as numpy arrays), through `VISION_NAME_RULES`.

    Raises:
      ValueError: an unknown name, a wrong shape, or a parameter missing.
    """
    flat_shapes = _flatten(vision_param_shapes(vcfg), "vision/")
    out = {k: np.zeros(s, np.float32) for k, s in flat_shapes.items()}
    filled = {k: np.zeros(s[0] if k.startswith("vision/blocks/") else 1, bool) for k, s in
              flat_shapes.items()}  # fmt: skip
    for name, w in state.items():
        target = _resolve(name)
        if target is None:
            raise ValueError(f"unknown Qwen vision tensor {name!r}")
        if target == "ignored":
            continue
        key, layer, kind = target
        if key not in out:
            raise ValueError(f"{name!r} -> {key}: not a parameter of a {vcfg.kind} tower")
        w = transform(kind, np.asarray(w, np.float32))
        dst = out[key] if layer is None else out[key][layer]
        if w.shape != dst.shape:
            raise ValueError(f"{name!r}: shape {w.shape} where {key} needs {dst.shape}")
        dst[...] = w
        filled[key][0 if layer is None else layer] = True
    missing = [k for k, f in filled.items() if not f.all()]
    if missing:
        raise ValueError(f"Qwen vision parameters missing from the state: {missing[:4]}")
    tree: dict[str, Any] = {}
    for key, arr in out.items():
        node = tree
        *parents, last = key.split("/")[1:]
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = jnp.asarray(arr, dtype)
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{prefix}{k}/")
        else:
            out[prefix + k] = v
    return out


def _resolve(name: str) -> tuple[str, int | None, str] | str | None:
    for body, key, kind in VISION_NAME_RULES:
        m = re.fullmatch(body, name)
        if m is None:
            continue
        if key is None:
            return "ignored"
        groups = m.groupdict()
        layer = groups.pop("layer", None)
        return key.format(**groups), None if layer is None else int(layer), kind
    return None


# --------------------------------------------------------------------------------------------
# The tower


def rotary_inv_freq(vcfg: QwenVisionConfig) -> np.ndarray:
    """[H/4] float32: the axial rotary frequencies (the same for rows and columns)."""
    spatial = vcfg.head_dim // 2
    exponent = np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)
    return (1.0 / (np.float32(vcfg.rope_theta) ** exponent)).astype(np.float32)


def rotary_cos_sin(pos_hw: Array, vcfg: QwenVisionConfig) -> tuple[Array, Array]:
    """cos, sin [B, P, H] float32 for pos_hw [B, P, 2]: angles (row, column, row, column)."""
    f = pos_hw.astype(jnp.float32)[..., None] * jnp.asarray(rotary_inv_freq(vcfg))  # [B,P,2,H/4]
    half = f.reshape(*f.shape[:-2], -1)  # [B, P, H/2]: row freqs, then column freqs
    emb = jnp.concatenate([half, half], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _norm_apply(x: Array, p: dict[str, Array], vcfg: QwenVisionConfig) -> Array:
    if vcfg.windowed:
        return rms_norm(x, p["scale"], vcfg.norm_eps)
    return layer_norm(x, p, vcfg.norm_eps)


def _act(name: str, x: Array) -> Array:
    if name == "silu":
        return jax.nn.silu(x)
    return activation(name, x)


def _mlp(lp: dict[str, Any], vcfg: QwenVisionConfig, h: Array) -> Array:
    if vcfg.windowed:
        gate = _act(vcfg.hidden_act, linear(h, lp["gate_proj"]))
        return linear(gate * linear(h, lp["up_proj"]), lp["down_proj"])
    return linear(_act(vcfg.hidden_act, linear(h, lp["fc1"])), lp["fc2"])


def segment_attend(q: Array, k: Array, v: Array, seg: Array, ranges: Array, block: int) -> Array:
    """Attention within segments: [B, P, N*H] from q, k, v [B, P, N, H], seg [B, P].

    Row t attends row s iff seg[b, t] == seg[b, s]. With block == P one dense masked softmax;
    otherwise query tile i (rows [i*block, (i+1)*block)) visits key tiles [ranges[i, 0],
    ranges[i, 1]) with an online softmax in float32 (ranges [P // block, 2], which must cover
    every key of the tile's segments).
    """
    b, p, n, h = q.shape
    if block >= p:
        return attend(q, k, v, seg[:, :, None] == seg[:, None, :])
    scale = 1.0 / math.sqrt(h)

    def query_tile(args):
        i, lo, hi = args
        qi = jax.lax.dynamic_slice_in_dim(q, i * block, block, axis=1)
        si = jax.lax.dynamic_slice_in_dim(seg, i * block, block, axis=1)

        def key_tile(j, carry):
            m, l, acc = carry
            kj = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=1)
            vj = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=1)
            sj = jax.lax.dynamic_slice_in_dim(seg, j * block, block, axis=1)
            mask = (si[:, :, None] == sj[:, None, :])[:, None]  # [B, 1, Q, S]
            s = jnp.einsum("bqnh,bsnh->bnqs", qi, kj, preferred_element_type=jnp.float32)
            s = jnp.where(mask, s * scale, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            w = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            wv = w.astype(v.dtype)
            pv = jnp.einsum("bnqs,bsnh->bnqh", wv, vj, preferred_element_type=jnp.float32)
            return m_new, l * corr + jnp.sum(w, axis=-1), acc * corr[..., None] + pv

        init = (
            jnp.full((b, n, block), NEG_INF, jnp.float32),
            jnp.zeros((b, n, block), jnp.float32),
            jnp.zeros((b, n, block, h), jnp.float32),
        )
        _, l, acc = jax.lax.fori_loop(lo, hi, key_tile, init)
        out = acc / jnp.maximum(l, 1e-30)[..., None]  # every row sees itself: l >= 1
        return jnp.moveaxis(out, 1, 2).reshape(b, block, n * h).astype(v.dtype)

    tiles = p // block
    outs = jax.lax.map(query_tile, (jnp.arange(tiles), ranges[:, 0], ranges[:, 1]))
    return jnp.moveaxis(outs, 0, 1).reshape(b, p, n * h)  # [tiles, B, block, NH] -> [B, P, NH]


def vision_block(
    lp: dict[str, Any],
    vcfg: QwenVisionConfig,
    x: Array,
    cos_sin: tuple[Array, Array],
    seg: Array,
    ranges: Array,
    block: int,
) -> Array:
    """One pre-norm block on x [B, P, D] (attention within `seg`, then the MLP)."""
    b, p, d = x.shape
    nh, hd = vcfg.num_heads, vcfg.head_dim
    h = _norm_apply(x, lp["norm1"], vcfg)
    qkv = linear(h, lp["qkv"]).reshape(b, p, 3, nh, hd)
    cos, sin = cos_sin
    q = apply_rope(qkv[:, :, 0], cos, sin)
    k = apply_rope(qkv[:, :, 1], cos, sin)
    x = x + linear(segment_attend(q, k, qkv[:, :, 2], seg, ranges, block), lp["proj"])
    return x + _mlp(lp, vcfg, _norm_apply(x, lp["norm2"], vcfg))


def merge(params: dict[str, Any], vcfg: QwenVisionConfig, x: Array) -> Array:
    """The patch merger: x [B, P, D] (tower order) -> [B, G, out_hidden_size]."""
    pm = params["merger"]
    b, p, d = x.shape
    h = _norm_apply(x, pm["ln_q"], vcfg).reshape(b, p // vcfg.merge_unit, d * vcfg.merge_unit)
    return linear(activation("gelu", linear(h, pm["mlp_0"])), pm["mlp_2"])


def visual_features(
    params: dict[str, Any],
    vcfg: QwenVisionConfig,
    inputs: VisionInputs,
    dtype: Any = None,
) -> Array:
    """The merged visual tokens [B, G, out_hidden_size], G = P / merge_unit, in transformers'
    order (example b's images one after another, as `visual(...).pooler_output` gives them);
    rows >= inputs.num_tokens[b] are 0.

    params: the tree under "vision" (`vision_param_shapes`), any float dtype; compute runs in
    `dtype` (default: the patch embedding's dtype). Jit with `vcfg` static, e.g.
    `jax.jit(visual_features, static_argnums=(1,))`: one program per (B, P) bucket.
    """
    dtype = jnp.dtype(params["patch_embed"]["kernel"].dtype if dtype is None else dtype)
    x = jnp.asarray(inputs.patches).astype(dtype) @ params["patch_embed"]["kernel"].astype(dtype)
    cos_sin = rotary_cos_sin(jnp.asarray(inputs.pos_hw), vcfg)
    segs = (jnp.asarray(inputs.segments), jnp.asarray(inputs.window_segments))
    ranges = jnp.asarray(inputs.block_ranges)
    full = jnp.asarray(vcfg.full_attention_layers())

    def body(x, i):
        seg = jnp.where(full[i], segs[0], segs[1])
        rng = jnp.where(full[i], ranges[:, 0], ranges[:, 1])
        lp = layer_params(params["blocks"], i)
        return vision_block(lp, vcfg, x, cos_sin, seg, rng, inputs.block), None

    x, _ = jax.lax.scan(body, x, jnp.arange(vcfg.depth))
    y = merge(params, vcfg, x)
    y = jnp.take_along_axis(y, jnp.asarray(inputs.reverse_index)[..., None], axis=1)
    return jnp.where(inputs.token_mask()[..., None], y, jnp.zeros((), y.dtype))
