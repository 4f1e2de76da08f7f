"""Shared static-shape helpers for the sparse-selection functions.

All helpers are pure, jit-able and batched over a leading `B` axis. Data-dependent counts are
carried as int32 arrays and applied through boolean masks, never through shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
I32 = jnp.int32


def iota_like(x: jax.Array, axis: int = -1) -> jax.Array:
    """int32 positions `0..N-1` along `axis`, broadcast to `x.shape`."""
    return lax.broadcasted_iota(I32, x.shape, axis % x.ndim)


def descending_order(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Permutation that sorts valid entries by descending score, ties to the lower index.

    Args:
      scores: [B, N] scores (any float dtype; compared in float32).
      mask: [B, N] bool, valid entries.

    Returns:
      perm: [B, N] int32. `perm[b, :n_valid[b]]` are the valid indices by descending score
      (equal scores in ascending index order); the invalid indices follow in ascending order.
    """
    iota = iota_like(scores)
    invalid = (~mask).astype(I32)
    # `+ 0.0` turns -0.0 into +0.0 so signed zeros tie (lax.sort already treats them equal).
    neg = jnp.where(mask, -scores.astype(F32), 0.0) + 0.0
    _, _, perm = lax.sort((invalid, neg, iota), dimension=-1, num_keys=3)
    return perm


def inverse_permutation(perm: jax.Array) -> jax.Array:
    """Inverse of a batch of permutations: [B, N] int32 -> [B, N] int32 (rank of each index)."""
    _, inv = lax.sort((perm, iota_like(perm)), dimension=-1, num_keys=1)
    return inv


def take_first(x: jax.Array, n: int, fill: int = 0) -> jax.Array:
    """First `n` entries of the last axis of [B, N] `x`, right-padded with `fill` if n > N."""
    size = x.shape[-1]
    if n <= size:
        return x[..., :n]
    pad = [(0, 0)] * (x.ndim - 1) + [(0, n - size)]
    return jnp.pad(x, pad, constant_values=fill)


def gather_mask(mask: jax.Array, count: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """The slots a mask selects, ascending (original order), in a buffer of static `size`.

    Args:
      mask: [B, N] bool, the selected slots. count: [B] int32, how many there are.
    Returns:
      (idx [B, size] int32: the selected slots first, 0 beyond `count`; valid [B, size]).
    """
    _, ascending = lax.sort(((~mask).astype(I32), iota_like(mask.astype(I32))), num_keys=2)
    valid = jnp.arange(size, dtype=I32)[None, :] < count[:, None]
    return jnp.where(valid, take_first(ascending, size), 0).astype(I32), valid


def gather_slots(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Gather slots along axis 1.

    Args:
      x: [B, V, ...] values.
      idx: [B, C] int32 slot indices in `[0, V)`.

    Returns:
      [B, C, ...] with `out[b, c] = x[b, idx[b, c]]`.
    """
    idx_full = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx_full, axis=1)


def boundary_margin(sorted_vals: jax.Array, n_sel: jax.Array, n_valid: jax.Array) -> jax.Array:
    """Relative margin of a top-`n_sel` decision, ignoring exact ties.

    The selected set is the first `n_sel` of the `n_valid` valid values (sorted descending).
    The margin is the smallest nonzero gap `v_a - v_b` between a selected value `v_a` and an
    unselected valid value `v_b`, divided by `max |v|` over the valid values. Exact ties are
    not counted: they are broken by index, deterministically, in every implementation that
    sees the same values. `inf` when nothing (or everything) is selected or all gaps are 0.

    Args:
      sorted_vals: [B, N] values, descending over the first `n_valid[b]` positions.
      n_sel: [B] int32 number selected.
      n_valid: [B] int32 number of valid values.

    Returns:
      [B] float32 relative margin (>= 0, possibly inf).
    """
    v = sorted_vals.astype(F32)
    pos = iota_like(v)
    sel = pos < n_sel[:, None]
    rest = (pos >= n_sel[:, None]) & (pos < n_valid[:, None])
    inf = jnp.float32(jnp.inf)
    lowest_sel = jnp.min(jnp.where(sel, v, inf), axis=-1, keepdims=True)
    highest_rest = jnp.max(jnp.where(rest, v, -inf), axis=-1, keepdims=True)
    above = jnp.min(jnp.where(sel & (v > highest_rest), v, inf), axis=-1) - highest_rest[:, 0]
    below = lowest_sel[:, 0] - jnp.max(jnp.where(rest & (v < lowest_sel), v, -inf), axis=-1)
    gap = jnp.minimum(above, below)
    scale = jnp.max(jnp.where(pos < n_valid[:, None], jnp.abs(v), 0.0), axis=-1)
    gap = jnp.where(jnp.isfinite(gap), gap, inf)
    return jnp.where(scale > 0, gap / jnp.where(scale > 0, scale, 1.0), inf)


def distinct_gap_margin(vals: jax.Array, mask: jax.Array) -> jax.Array:
    """Smallest nonzero gap between two valid values, relative to the largest `|value|`.

    Measures how close an ordering comparison (`a > b`) among the valid values comes to
    flipping. Exact ties are not counted (see `boundary_margin`).

    Args:
      vals: [B, N] values.
      mask: [B, N] bool, valid entries.

    Returns:
      [B] float32 relative margin (inf when fewer than two distinct valid values).
    """
    inf = jnp.float32(jnp.inf)
    s = jnp.sort(jnp.where(mask, vals.astype(F32), inf), axis=-1)
    diffs = s[:, 1:] - s[:, :-1]
    ok = jnp.isfinite(s[:, 1:]) & (diffs > 0)
    gap = jnp.min(jnp.where(ok, diffs, inf), axis=-1, initial=inf)
    scale = jnp.max(jnp.where(mask, jnp.abs(vals.astype(F32)), 0.0), axis=-1)
    return jnp.where(scale > 0, gap / jnp.where(scale > 0, scale, 1.0), inf)
