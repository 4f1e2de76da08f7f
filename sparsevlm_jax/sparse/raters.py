"""Text raters (SPEC §1) and per-visual-token scores (SPEC §2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sparsevlm_jax.sparse.common import F32


def _masked_mean(x: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
    """Mean of `x` over `axis` counting only `mask`; 0 where the mask is empty."""
    total = jnp.sum(jnp.where(mask, x, 0.0), axis=axis)
    count = jnp.sum(mask, axis=axis).astype(F32)
    return total / jnp.maximum(count, 1.0)


def text_relevance(
    vis_emb: jax.Array,
    text_emb: jax.Array,
    text_mask: jax.Array,
    vis_mask: jax.Array | None = None,
) -> jax.Array:
    """Mean (over visual tokens) softmax-over-text relevance vector `m` of SPEC §1.

    Args:
      vis_emb: [B, V0, D] input embeddings of the visual tokens.
      text_emb: [B, T, D] input embeddings of the text after the image (padded).
      text_mask: [B, T] bool, valid (non-padding) text positions.
      vis_mask: optional [B, V0] bool, valid visual tokens (default: all valid).

    Returns:
      m: [B, T] float32; 0 at invalid text positions.
    """
    logits = jnp.einsum(
        "bvd,btd->bvt",
        vis_emb.astype(F32),
        text_emb.astype(F32),
        precision=lax.Precision.HIGHEST,
    )
    valid = text_mask[:, None, :]
    row_max = jnp.max(jnp.where(valid, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    e = jnp.where(valid, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(denom > 0, denom, 1.0)
    if vis_mask is None:
        return jnp.mean(probs, axis=1)
    return _masked_mean(probs, vis_mask[:, :, None], axis=1)


def text_raters_with_margin(
    vis_emb: jax.Array,
    text_emb: jax.Array,
    text_mask: jax.Array,
    vis_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`text_raters` plus the relative margin of the `m > mean(m)` decisions.

    Returns:
      rater_mask: [B, T] bool.
      margin: [B] float32, `min over valid j of |m_j - mean(m)| / mean(m)` (inf if no text).
    """
    m = text_relevance(vis_emb, text_emb, text_mask, vis_mask)
    mean = _masked_mean(m, text_mask, axis=-1)[:, None]
    raters = text_mask & (m > mean)
    rel = jnp.abs(m - mean) / jnp.where(mean > 0, mean, 1.0)
    margin = jnp.min(jnp.where(text_mask, rel, jnp.inf), axis=-1)
    return raters, margin


def text_raters(
    vis_emb: jax.Array,
    text_emb: jax.Array,
    text_mask: jax.Array,
    vis_mask: jax.Array | None = None,
) -> jax.Array:
    """Text raters of SPEC §1: valid text positions whose relevance exceeds the mean.

    `M = vis @ text^T` (float32, HIGHEST precision), softmax over the valid text axis, mean over
    the visual axis -> `m` [B, T]; raters are the valid `j` with `m[j] > mean_valid(m)`
    (strict). A single valid text token is never a rater (m == mean).

    Args:
      vis_emb: [B, V0, D] input embeddings of the visual tokens (not a layer output).
      text_emb: [B, T, D] input embeddings of the text after the image (padded).
      text_mask: [B, T] bool, valid text positions.
      vis_mask: optional [B, V0] bool (default: all visual tokens valid).

    Returns:
      rater_mask: [B, T] bool, indices relative to the text start.
    """
    return text_raters_with_margin(vis_emb, text_emb, text_mask, vis_mask)[0]


def rater_scores(attn: jax.Array, rater_mask: jax.Array, vis_mask: jax.Array) -> jax.Array:
    """Per-visual-slot score = mean over rater rows of the head-averaged attention (SPEC §2).

    Args:
      attn: [B, T, V] head-averaged attention probabilities of the text rows onto the
        visual slots (only rater rows are read; others may hold anything finite).
      rater_mask: [B, T] bool.
      vis_mask: [B, V] bool, valid visual slots.

    Returns:
      scores: [B, V] float32; `-inf` at invalid visual slots; 0 at valid slots if an example
      has no raters.
    """
    s = _masked_mean(attn.astype(F32), rater_mask[:, :, None], axis=1)
    return jnp.where(vis_mask, s, -jnp.inf)
