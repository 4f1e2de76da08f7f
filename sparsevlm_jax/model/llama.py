"""Llama decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, stacked layers.

Einsum letters: B batch, T query length, S key length, K kv-heads, G query heads per kv-head,
H head dim, D model dim, M MLP dim.

Layers are stacked on a leading axis (see `sparsevlm_jax.params`); a *stage* (consecutive
layers with the same sequence length) runs as one `lax.scan` that indexes the stack, so the
weights are never sliced or copied per stage. Every token carries an explicit position and a
validity flag: invalid slots (padding, unused capacity) are never attended to.

Prefill attention skips what the causal mask throws away (`CausalMask`): slot order is causal
order (query slot t sees key slot s iff s <= t and s is valid, whatever the positions), so the
query axis is cut into a few static blocks and block i only forms scores against the keys up
to its own end. Shapes stay static and the masks exact; about (n-1)/2n of the score and
softmax work of n blocks is never done. Long sequences (>= `attention.FLASH_MIN_LENGTH` slots)
tile the keys too, with an online softmax (`attention.flash_causal_attend`): memory linear in
the length, only the causal half of the tiles visited. With `SPARSEVLM_ATTENTION=cudnn` (or
`auto` on a GPU in bf16/fp16) the prefill uses `jax.nn.dot_product_attention`'s cuDNN kernel
instead, which skips the masked half itself (`attention_implementation`).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm_jax.config import TextConfig
from sparsevlm_jax.model import attention

Array = jax.Array
NEG_INF = -1e30  # finite, so fully masked rows (padding slots) give no NaNs


class KV(NamedTuple):
    """Keys and values of a stack of layers: k, v [L, B, S, K, H]."""

    k: Array
    v: Array


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """RMSNorm in float32, cast back to x's dtype before the scale (as transformers does)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def linear(x: Array, p: dict[str, Array]) -> Array:
    y = x @ p["kernel"].astype(x.dtype)
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


def rope_inv_freq(cfg: TextConfig) -> np.ndarray:
    """Inverse frequencies [H/2] for the config's RoPE type (default, linear, llama3)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    sc = dict(cfg.rope_scaling)
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        pass
    elif kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    else:
        raise NotImplementedError(f"RoPE type {kind!r} is not supported (default, linear, llama3)")
    return inv.astype(np.float32)


def rope_cos_sin(
    positions: Array, inv_freq: np.ndarray, mrope_section: tuple[int, ...] = ()
) -> tuple[Array, Array]:
    """cos, sin [B, T, H] in float32 for integer positions (HF's half-split layout).

    positions [B, T], or [B, T, 3] (t, h, w) for M-RoPE: frequency band j of the H/2 takes its
    angle from the stream that `mrope_section` assigns it (bands [0, s0) from t, the next s1
    from h, the last s2 from w: transformers' `recomposition_frequencies`). Equal streams give
    the one-dimensional rotation, so text tokens (p, p, p) may use 1-D positions.
    """
    if positions.ndim == 3:
        stream = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)  # [H/2]
        pos = jnp.take(positions, jnp.asarray(stream), axis=-1)  # [B, T, H/2]
        freqs = pos.astype(jnp.float32) * jnp.asarray(inv_freq)
    else:
        freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, heads, H]; rotation in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def qkv(lp: dict[str, Any], cfg: TextConfig, h: Array, positions: Array):
    """Projected, rotated q [B,T,N,H] and k, v [B,T,K,H] from normed hidden states h;
    positions [B,T] or [B,T,3] (M-RoPE, `rope_cos_sin`)."""
    b, t, _ = h.shape
    q = linear(h, lp["q_proj"]).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
    k = linear(h, lp["k_proj"]).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
    v = linear(h, lp["v_proj"]).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg), cfg.mrope_section)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_probs(q: Array, k: Array, mask: Array) -> Array:
    """Softmax attention probabilities [B, K, G, T, S] in float32.

    q [B,T,N,H], k [B,S,K,H], mask [B,T,S] (True = may attend).
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(h)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    return jax.nn.softmax(scores, axis=-1)


def attend(q: Array, k: Array, v: Array, mask: Array | CausalMask) -> Array:
    """Attention output [B, T, N*H]; q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] (True = may
    attend) or a `CausalMask` over the T = S slots (computes only the unmasked blocks)."""
    if isinstance(mask, CausalMask):
        return causal_attend(q, k, v, mask)
    b, t, n, h = q.shape
    if not DEFERRED_NORMALIZATION:
        probs = attention_probs(q, k, mask).astype(v.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
        return out.reshape(b, t, n * h)
    # The softmax's division moves after the product with the values: one pass less over
    # the [T, S] weights (the division then touches [T, H]); the same result up to rounding.
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores / math.sqrt(h), NEG_INF)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    total = jnp.sum(weights, axis=-1)  # [B,K,G,T], >= 1
    out = jnp.einsum(
        "bkgts,bskh->bkgth", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    out = (out / total[..., None]).astype(v.dtype)
    return jnp.moveaxis(out, 3, 1).reshape(b, t, n * h)


DEFERRED_NORMALIZATION = True


# Query blocks of the prefill attention. On two CPU cores (mini shape, 640 slots) 4 blocks
# took 3.5 ms against 6.1 ms unblocked, 8 blocks 3.9 ms, 16 blocks 4.4 ms
# (shared/notes/attention-cpu.md); blocks shorter than MIN_QUERY_BLOCK rows cost more in
# per-block overhead than they save.
QUERY_BLOCKS = 4
MIN_QUERY_BLOCK = 128
BLOCK_ALIGN = 8
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


@dataclass(frozen=True)
class CausalMask:
    """Causal self-attention over one sequence's slots, computed block by block.

    Query slot t may attend key slot s iff s <= t and valid[s] (slot order is causal order).
    `ends` are the static exclusive ends of the query blocks (the last is the length): block
    i covers rows [ends[i-1], ends[i]) and forms scores against keys [0, ends[i]) only. The
    result equals the dense masked softmax: the skipped keys are exactly the masked ones.
    """

    valid: Array  # [B, T] bool
    ends: tuple[int, ...]
    unroll: bool = False  # Python loops, not `fori_loop`s, in the tiled path (FLOP counting)

    def dense(self) -> Array:
        """The same mask as a [B, T, T] array."""
        return causal_mask(self.valid)


def query_block_ends(
    length: int, blocks: int | None = None, min_block: int = MIN_QUERY_BLOCK
) -> tuple[int, ...]:
    """Static ends of about `blocks` (default `QUERY_BLOCKS`) equal query blocks of a
    `length`-slot sequence, each at least `min_block` rows, interior ends multiples of 8."""
    n = QUERY_BLOCKS if blocks is None else blocks
    n = max(1, min(n, length // max(min_block, 1)))
    if n == 1:
        return (length,)
    step = -(-length // n)
    step = -(-step // BLOCK_ALIGN) * BLOCK_ALIGN
    return (*range(step, length, step), length)


def causal_attend(q: Array, k: Array, v: Array, mask: CausalMask) -> Array:
    """Causal self-attention [B, T, N*H] of q [B,T,N,H], k/v [B,T,K,H], block by block.

    Long sequences (`attention.flash_block`: T >= `attention.FLASH_MIN_LENGTH` slots) with more
    than one query block run `attention.flash_causal_attend`, tiled over keys too (online
    softmax, memory linear in T; its own static tiles, not `mask.ends`); shorter ones, or a
    single block (`query_blocks=1`: the whole causal score matrix, as the FLOPs count traces
    it), form each query block's whole score rows against its causal key prefix here.
    """
    block = attention.flash_block(q.shape[1]) if len(mask.ends) > 1 else None
    if block is not None:
        return attention.flash_causal_attend(q, k, v, mask.valid, block, mask.unroll)
    outs, start = [], 0
    for end in mask.ends:
        rows = jnp.arange(start, end)
        allowed = (jnp.arange(end)[None, :] <= rows[:, None])[None] & mask.valid[:, None, :end]
        outs.append(attend(q[:, start:end], k[:, :end], v[:, :end], allowed))
        start = end
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def attention_implementation(dtype: Any, head_dim: int) -> str:
    """The prefill's attention: "xla" (the block-skipping `causal_attend`) or "cudnn"
    (`jax.nn.dot_product_attention`'s fused cuDNN kernel), from `SPARSEVLM_ATTENTION` (read
    when a program is traced): "xla"; "cudnn" (bf16/fp16 on an NVIDIA GPU only); "auto"
    (default) = "cudnn" on a GPU in bf16/fp16 when jax's cuDNN checks pass, else "xla"."""
    choice = os.environ.get("SPARSEVLM_ATTENTION", "auto").strip().lower() or "auto"
    if choice not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"SPARSEVLM_ATTENTION={choice!r}; known: {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if choice != "auto":
        return choice
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() != "gpu" or not half:
        return "xla"
    return "cudnn" if _cudnn_traces(jnp.dtype(dtype).name, head_dim) else "xla"


@functools.cache
def _cudnn_traces(dtype: str, head_dim: int) -> bool:
    """Whether `cudnn_causal_attend` passes jax's trace-time checks (dtype, head dim, cuDNN
    version, GPU generation) for this dtype and head dim."""
    x = jax.ShapeDtypeStruct((1, 16, 2, head_dim), jnp.dtype(dtype))
    valid = jax.ShapeDtypeStruct((1, 16), jnp.bool_)
    try:
        jax.eval_shape(cudnn_causal_attend, x, x, x, valid)
    except Exception:  # noqa: BLE001 - any refusal means: use the XLA attention
        return False
    return True


def cudnn_causal_attend(q: Array, k: Array, v: Array, valid: Array) -> Array:
    """The causal self-attention of `causal_attend` through cuDNN's fused kernel: the causal
    part by the kernel's own mask (it skips the masked blocks), invalid keys by a boolean
    mask (added as a bias). Rows of invalid queries are zeroed (they attend to nothing valid
    and must not carry a NaN into the values of later layers)."""
    b, t, n, h = q.shape
    key_ok = jnp.broadcast_to(valid[:, None, None, :], (b, 1, t, t))
    out = jax.nn.dot_product_attention(q, k, v, mask=key_ok, is_causal=True, implementation="cudnn")
    out = jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out.reshape(b, t, n * h)


def mlp(lp: dict[str, Any], x: Array) -> Array:
    gate = linear(x, lp["gate_proj"])
    return linear(jax.nn.silu(gate) * linear(x, lp["up_proj"]), lp["down_proj"])


def layer_params(layers: dict[str, Any], i: Array | int) -> dict[str, Any]:
    """Layer i of the stacked tree (a dynamic index: no copy of the stack)."""
    return jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, i, keepdims=False), layers)


def causal_mask(valid: Array) -> Array:
    """[B, T, T]: query slot t may attend key slot s <= t if s is valid (slot order = causal)."""
    t = valid.shape[1]
    tri = jnp.tril(jnp.ones((t, t), bool))
    return tri[None] & valid[:, None, :]


def prefill_layer(
    lp: dict[str, Any],
    cfg: TextConfig,
    x: Array,
    positions: Array,
    mask: Array | CausalMask,
    implementation: str = "xla",
) -> tuple[Array, Array, Array, Array]:
    """One decoder layer over a whole sequence.

    Args:
      x [B,T,D], positions [B,T] int32, mask [B,T,T] or a `CausalMask`; implementation:
      "cudnn" runs a `CausalMask` through cuDNN's fused attention (`cudnn_causal_attend`).
    Returns:
      (output [B,T,D], q [B,T,N,H], k [B,T,K,H], v [B,T,K,H]); q is returned for callers that
      need attention rows (pruning layers); XLA drops it where unused.
    """
    h = rms_norm(x, lp["input_layernorm"]["scale"], cfg.rms_norm_eps)
    q, k, v = qkv(lp, cfg, h, positions)
    if implementation == "cudnn" and isinstance(mask, CausalMask):
        att = cudnn_causal_attend(q, k, v, mask.valid)
    else:
        att = attend(q, k, v, mask)
    x = x + linear(att, lp["o_proj"])
    h = rms_norm(x, lp["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
    return x + mlp(lp, h), q, k, v


def prefill_stage(
    layers: dict[str, Any],
    cfg: TextConfig,
    start: int,
    stop: int,
    x: Array,
    positions: Array,
    valid: Array,
    query_tail: int = 0,
    unroll: bool = False,
    query_blocks: int | None = None,
    query_slots: Array | None = None,
) -> tuple[Array, KV, Array | None]:
    """Runs layers [start, stop) over a sequence as one scan.

    Args:
      query_tail: also return the last layer's queries for the last `query_tail` slots (the
        text rows a pruning layer scores with), so its attention rows can be recomputed
        without materialising every head's full attention matrix.
      query_blocks: query blocks of the causal attention (`query_block_ends`; default
        `QUERY_BLOCKS`, fewer on short sequences; 1 = no block skipping).
      query_slots: optional [B, S] int32 more slots whose queries come first (text between
        visual spans, which pruning layers also score with).
      unroll: unrolls the layer scan, and the tile loops of a long sequence's attention
        (`CausalMask.unroll`), for FLOP counting.
    Returns:
      (x [B,T,D], kv with k/v [stop-start, B, T, K, H], q [B, S + query_tail, N, H] or None).
    """
    mask = CausalMask(valid, query_block_ends(x.shape[1], query_blocks), unroll)
    impl = attention_implementation(x.dtype, cfg.head_dim)

    def body(x, i):
        out, q, k, v = prefill_layer(layer_params(layers, i), cfg, x, positions, mask, impl)
        rows = q[:, x.shape[1] - query_tail :]
        if query_slots is not None:
            picked = jnp.take_along_axis(q, query_slots[:, :, None, None], axis=1)
            rows = jnp.concatenate([picked, rows], axis=1)
        return out, (k, v, rows)

    x, (k, v, q) = jax.lax.scan(
        body, x, jnp.arange(start, stop), unroll=(stop - start) if unroll else 1
    )
    return x, KV(k, v), (q[-1] if query_tail else None)


def decode_stage(
    layers: dict[str, Any],
    cfg: TextConfig,
    start: int,
    x: Array,
    positions: Array,
    kv: KV,
    key_valid: Array,
    slot: Array,
    unroll: bool = False,
) -> tuple[Array, KV]:
    """One new token through a stage's layers, appending its k/v to the stage's cache.

    Args:
      x [B,1,D]; positions [B,1]; kv: the stage cache, k/v [L_s, B, S, K, H];
      key_valid [B, S] with the slot being written already marked valid; slot: scalar int32,
      where the new k/v go.
    Returns:
      (x [B,1,D], updated kv). The cache is a loop carry, updated in place.
    """
    mask = key_valid[:, None, :]

    def body(carry, j):
        x, ck, cv = carry
        lp = layer_params(layers, start + j)
        h = rms_norm(x, lp["input_layernorm"]["scale"], cfg.rms_norm_eps)
        q, k, v = qkv(lp, cfg, h, positions)
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (j, 0, slot, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (j, 0, slot, 0, 0))
        keys = jax.lax.dynamic_index_in_dim(ck, j, keepdims=False)
        vals = jax.lax.dynamic_index_in_dim(cv, j, keepdims=False)
        x = x + linear(attend(q, keys, vals, mask), lp["o_proj"])
        h = rms_norm(x, lp["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
        return (x + mlp(lp, h), ck, cv), None

    n = kv.k.shape[0]
    (x, k, v), _ = jax.lax.scan(body, (x, kv.k, kv.v), jnp.arange(n), unroll=n if unroll else 1)
    return x, KV(k, v)


def lm_head(params_text: dict[str, Any], cfg: TextConfig, x: Array) -> Array:
    """Final norm and logits [..., vocab] in float32."""
    h = rms_norm(x, params_text["norm"]["scale"], cfg.rms_norm_eps)
    w = params_text["embed_tokens"].T if cfg.tie_word_embeddings else params_text["lm_head"]
    return jnp.einsum("...d,dv->...v", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
