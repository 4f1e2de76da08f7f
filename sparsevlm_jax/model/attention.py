"""Causal prefill attention tiled over keys as well as queries (online softmax).

Einsum letters: B batch, T slots (queries = keys), K kv-heads, G query heads per kv-head,
H head dim, Q query rows of one block, S key columns of one block.

`flash_causal_attend` computes what `llama.causal_attend` computes, the causal self-attention
in which query slot t sees key slot s iff s <= t and valid[b, s], without ever forming more
than one [B, K, G, Q, S] tile of scores: the slots are cut into static blocks of `block`
rows; query block i visits the key blocks 0..i-1 in a `lax.fori_loop` (only the validity mask
applies there) and then its own diagonal block (the causal mask too), carrying the running
row maximum, the softmax denominator and the unnormalised weighted sum of values in float32
(flash-attention's online softmax). The blocks above the diagonal are never visited. Memory
is linear in T (one tile plus [B, T, N, H] accumulators and the output); the work is the
causal half of the score matrix, in tiles that stay in cache.

Rows with no valid key at or before them (left padding) attend to nothing: their output is
zero (as `llama.cudnn_causal_attend` gives for invalid query rows), never NaN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -1e30  # finite, as in llama: a block whose keys are all masked gives no NaN

# Block size by sequence length (`flash_block`), measured on 2 CPU cores (mini-next heads, 4 of
# 64, float32; benchmarks/results/long-prefill.md): tiles of 512 were the fastest from 1,024 to
# 4,096 slots (2,048: 22 ms against 33 / 37 ms for 256 / 1,024 and 61 ms for query blocks; 4,096:
# 74 against 115 / 91 / 311) and within 4% of 1,024 at 8,192 (289 vs 279, 256: 457; query
# blocks 1,562). Below 1,024 slots the gain is a millisecond or less (640: 3.2 vs 4.0 ms) and
# within noise at 320-900 whatever the tile, so those keep llama's query-block path unchanged.
FLASH_MIN_LENGTH = 1024
FLASH_BLOCK = 512


def flash_block(length: int) -> int | None:
    """The tile size (query rows = key columns) of the online-softmax attention for a
    `length`-slot sequence, or None below `FLASH_MIN_LENGTH` (then whole rows are cheaper)."""
    if length < FLASH_MIN_LENGTH:
        return None
    return FLASH_BLOCK


def flash_causal_attend(
    q: Array, k: Array, v: Array, valid: Array, block: int, unroll: bool = False
) -> Array:
    """Causal self-attention [B, T, N*H] by key tiles with an online softmax.

    Args:
      q [B, T, N, H]; k, v [B, T, K, H] (N a multiple of K: grouped-query heads);
      valid [B, T] bool (key slot s may be attended iff valid[b, s], by queries t >= s);
      block: static tile size; T need not be a multiple (the last query block is shorter).
      unroll: Python loops instead of `fori_loop`s (the same numbers): for programs whose
        FLOPs are counted (XLA's cost analysis counts a loop body once; `unroll_layers`).
    Returns:
      [B, T, N*H] in v's dtype; scores, softmax and the weighted sums in float32 (bf16 inputs
      are multiplied with float32 accumulation, as `llama.attend` does).

    The full query blocks run in a `lax.fori_loop` (block i: a `fori_loop` over key blocks
    0..i-1, then the diagonal block), writing into the output in place; a shorter last block
    runs after it with static shapes. So the program and its temporaries do not grow with the
    number of blocks.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    scale = 1.0 / math.sqrt(h)
    qt = jnp.transpose(q.reshape(b, t, kh, g, h), (0, 2, 3, 1, 4))  # [B, K, G, T, H]
    kt = jnp.transpose(k, (0, 2, 1, 3))  # [B, K, T, H]
    vt = jnp.transpose(v, (0, 2, 1, 3))

    def tile(state, qb, kb, vb, allowed):
        """One [Q, S] tile folded into (max [B,K,G,Q], sum [B,K,G,Q], acc [B,K,G,Q,H]):
        qb [B,K,G,Q,H], kb/vb [B,K,S,H], allowed [B, Q or 1, S]."""
        m, l, acc = state
        s = jnp.einsum("bkgqh,bksh->bkgqs", qb, kb, preferred_element_type=jnp.float32)
        s = jnp.where(allowed[:, None, None], s * scale, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)  # 0 once a valid key replaces the NEG_INF start
        l = l * alpha + jnp.sum(p, axis=-1)
        pv = jnp.einsum(
            "bkgqs,bksh->bkgqh", p.astype(v.dtype), vb, preferred_element_type=jnp.float32
        )
        return m_new, l, acc * alpha[..., None] + pv

    def off_diagonal(qb, blocks, rows):
        """State after key blocks [0, blocks) (no causal mask needed there)."""
        init = (
            jnp.full((b, kh, g, rows), NEG_INF, jnp.float32),
            jnp.zeros((b, kh, g, rows), jnp.float32),
            jnp.zeros((b, kh, g, rows, h), jnp.float32),
        )

        def body(j, state):
            kb = jax.lax.dynamic_slice_in_dim(kt, j * block, block, axis=2)
            vb = jax.lax.dynamic_slice_in_dim(vt, j * block, block, axis=2)
            ok = jax.lax.dynamic_slice_in_dim(valid, j * block, block, axis=1)[:, None, :]
            return tile(state, qb, kb, vb, ok)

        if isinstance(blocks, int) and (unroll or blocks == 0):
            for j in range(blocks):
                init = body(j, init)
            return init
        return jax.lax.fori_loop(0, blocks, body, init)

    def finish(state):
        """[B, Q, N*H]: normalised; rows that saw no valid key (max still NEG_INF) are 0."""
        m, l, acc = state
        out = jnp.where((m > NEG_INF / 2)[..., None], acc / l[..., None], 0.0)
        return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, -1, n * h).astype(v.dtype)

    full = t // block

    def query_block(i, out):
        start = i * block
        qb = jax.lax.dynamic_slice_in_dim(qt, start, block, axis=3)
        kb = jax.lax.dynamic_slice_in_dim(kt, start, block, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(vt, start, block, axis=2)
        tri = jnp.tril(jnp.ones((block, block), bool))
        ok = tri[None] & jax.lax.dynamic_slice_in_dim(valid, start, block, axis=1)[:, None, :]
        state = tile(off_diagonal(qb, i, block), qb, kb, vb, ok)
        return jax.lax.dynamic_update_slice_in_dim(out, finish(state), start, axis=1)

    out = jnp.zeros((b, t, n * h), v.dtype)
    if unroll:
        for i in range(full):
            out = query_block(i, out)
    elif full:
        out = jax.lax.fori_loop(0, full, query_block, out)
    start = full * block
    if start < t:  # the shorter last query block, static
        rows = t - start
        qb = qt[:, :, :, start:]
        ok = jnp.tril(jnp.ones((rows, rows), bool))[None] & valid[:, None, start:]
        state = tile(off_diagonal(qb, full, rows), qb, kt[:, :, start:], vt[:, :, start:], ok)
        out = out.at[:, start:].set(finish(state))
    return out
