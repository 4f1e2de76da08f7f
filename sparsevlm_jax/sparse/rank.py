"""Rank of the rater-attention matrix and the v1 rank-adaptive budget (SPEC §3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm_jax.sparse.common import F32, I32

EPS_F32 = float(np.finfo(np.float32).eps)


def matrix_rank(
    r: jax.Array, row_mask: jax.Array, col_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`torch.linalg.matrix_rank` (float32) of the valid sub-matrix of a padded matrix.

    Masked rows/columns are zeroed (which leaves the singular values unchanged); the tolerance
    uses the TRUE sizes: `tol = sigma_max * (max(n_rows, n_cols) * eps_f32)` with
    `n_rows = row_mask.sum()`, `n_cols = col_mask.sum()`; rank = #{sigma > tol}.

    Args:
      r: [B, T, V] matrix (e.g. rater rows x visual slots of the head-averaged attention).
      row_mask: [B, T] bool, valid rows (raters).
      col_mask: [B, V] bool, valid columns (valid visual slots).

    Returns:
      rank: [B] int32 (0 for an all-zero / empty matrix).
      margin: [B] float32, `min over singular values |sigma - tol| / sigma_max` (inf when
        sigma_max == 0). Values of order `max(n_rows, n_cols) * eps` are normal (the near-zero
        singular values sit just below `tol`); a decision flipped by rounding would show up
        as a margin of a few `eps` or less.
    """
    mask = row_mask[:, :, None] & col_mask[:, None, :]
    x = jnp.where(mask, r.astype(F32), 0.0)
    sv = jnp.linalg.svd(x, compute_uv=False)  # [B, min(T, V)], descending
    smax = jnp.max(sv, axis=-1)
    n_rows = jnp.sum(row_mask, axis=-1)
    n_cols = jnp.sum(col_mask, axis=-1)
    rtol = jnp.maximum(n_rows, n_cols).astype(F32) * jnp.float32(EPS_F32)
    tol = smax * rtol
    rank = jnp.sum(sv > tol[:, None], axis=-1).astype(I32)
    rel = jnp.abs(sv - tol[:, None]) / jnp.where(smax > 0, smax, 1.0)[:, None]
    margin = jnp.where(smax > 0, jnp.min(rel, axis=-1), jnp.inf)
    return rank, margin


def budget_table(scale: float, bias: float, max_rank: int) -> np.ndarray:
    """Host-side table `table[r] = max(int(r * scale + bias), 0)` for `r = 0..max_rank`.

    Built with Python float arithmetic so that `floor(r * scale + bias)` matches the authors'
    code bit for bit (e.g. `r * 13.5`, `r * 0.8`); index it on device with `rank_budget`.

    Returns:
      np.ndarray int32 [max_rank + 1].
    """
    return np.asarray([max(int(r * scale + bias), 0) for r in range(max_rank + 1)], np.int32)


def rank_budget(rank: jax.Array, n_visual: jax.Array, table: jax.Array | np.ndarray) -> jax.Array:
    """v1 budget: `k = min(table[r], V - 1)`, or `k = V` when `V - r == 0` (prune nothing).

    Args:
      rank: [B] int32 rank `r` of the rater-attention matrix.
      n_visual: [B] int32 current valid visual count `V`.
      table: [R + 1] int32 from `budget_table` (R >= the largest possible rank, i.e.
        min(#text, #visual slots); larger ranks are clamped to the last entry).

    Returns:
      k: [B] int32 number of visual tokens to keep.
    """
    table = jnp.asarray(table, I32)
    r = jnp.clip(rank.astype(I32), 0, table.shape[0] - 1)
    n_visual = n_visual.astype(I32)
    k = jnp.minimum(table[r], n_visual - 1)
    return jnp.where(n_visual - rank == 0, n_visual, k).astype(I32)


def scaled_count(k: int, n_visual0: jax.Array, reference: int) -> jax.Array:
    """A schedule entry written for `reference` visual tokens on examples with `n_visual0`
    (SPEC §9.3): `round(k * V0 / reference)` (halves to even, as Python's round), at least 1.

    Integer arithmetic, so the rounding is exact. n_visual0 [B] int32 -> [B] int32.
    """
    num = jnp.asarray(k, I32) * n_visual0.astype(I32)
    q, r = num // reference, num % reference
    up = (2 * r > reference) | ((2 * r == reference) & (q % 2 == 1))
    return jnp.maximum(q + up.astype(I32), 1).astype(I32)


def fixed_budget(n_visual: jax.Array, k: int | jax.Array) -> jax.Array:
    """v1.5 / v2.0 budget: `min(k, V - 1)` (SPEC §3).

    Args:
      n_visual: [B] int32 current valid visual count `V`.
      k: scheduled count for this pruning layer (scalar or [B]).

    Returns:
      [B] int32.
    """
    return jnp.minimum(jnp.asarray(k, I32), n_visual.astype(I32) - 1).astype(I32)
