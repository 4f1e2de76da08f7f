"""Top-k selection of visual slots into a static-capacity buffer (SPEC §3)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparsevlm_jax.sparse.common import (
    I32,
    boundary_margin,
    descending_order,
    gather_mask,
    inverse_permutation,
)


class TopK(NamedTuple):
    """Result of `select_topk` (B = batch, V = visual slots, C = capacity)."""

    kept_idx: jax.Array  # [B, C] int32 slot indices, ascending; 0 beyond n_kept
    kept_mask: jax.Array  # [B, C] bool, position < n_kept
    n_kept: jax.Array  # [B] int32 = min(n_keep, capacity, n_valid)
    overflow: jax.Array  # [B] int32 = max(n_keep - capacity, 0)
    keep_mask_full: jax.Array  # [B, V] bool, slot is kept
    margin: jax.Array  # [B] float32 relative top-k boundary margin (see boundary_margin)


def select_topk(
    scores: jax.Array,
    n_keep: jax.Array,
    capacity: int,
    vis_mask: jax.Array | None = None,
) -> TopK:
    """Keep the top-`n_keep` valid slots by score, ties to the lower index, original order.

    Args:
      scores: [B, V] scores (float32 after casting).
      n_keep: [B] int32 requested count `k` (clipped to [0, ...]).
      capacity: static int `C`, the size of the kept buffer.
      vis_mask: optional [B, V] bool valid slots; default `scores != -inf` (as produced by
        `rater_scores`). Invalid slots are never chosen.

    Returns:
      TopK(kept_idx [B, C], kept_mask [B, C], n_kept [B], overflow [B],
      keep_mask_full [B, V], margin [B]). `kept_idx[b, :n_kept[b]]` are the kept slot indices
      in ascending (original) order; later entries are 0 and masked off. The margin is the
      relative gap between kept and not-kept valid scores (exact ties excluded).
    """
    scores = scores.astype(jnp.float32)
    if vis_mask is None:
        vis_mask = scores != -jnp.inf
    n_keep = jnp.maximum(n_keep.astype(I32), 0)
    n_valid = jnp.sum(vis_mask, axis=-1).astype(I32)
    n_kept = jnp.minimum(jnp.minimum(n_keep, capacity), n_valid)
    overflow = jnp.maximum(n_keep - capacity, 0)

    order = descending_order(scores, vis_mask)
    rank = inverse_permutation(order)
    keep_full = vis_mask & (rank < n_kept[:, None])

    kept_idx, kept_mask = gather_mask(keep_full, n_kept, capacity)

    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    margin = boundary_margin(sorted_scores, n_kept, n_valid)
    return TopK(kept_idx, kept_mask, n_kept, overflow, keep_full, margin)
