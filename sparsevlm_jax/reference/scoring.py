"""Scoring and selection (SPEC §1-§3, §6, §7): text raters, visual-token scores (with
SparseVLM+'s gravity correction and head count), the float32 rank, the budget k, and top-k
with ties to the lower index.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from sparsevlm_jax.reference.common import (
    boundary_margin,
    descending_order,
    import_torch,
    note_margin,
)
from sparsevlm_jax.reference.params import RefSparseParams

if TYPE_CHECKING:
    import torch


V2_HEADS = 14  # SparseVLM+ averages the top 14 heads whatever the model (SPEC §6)
V2_HEAD_FRACTION = V2_HEADS / 32  # models with fewer heads: the same fraction of LLaVA-7B's 32


def v2_head_count(num_heads: int, override: int | None = None) -> int:
    """Heads SparseVLM+ averages (SPEC §6): `override` if given, else exactly 14 on a model
    with at least 14 heads, else round(14/32 * num_heads) and at least 1."""
    if override is not None:
        if not 1 <= override <= num_heads:
            raise ValueError(f"v2_heads must be in [1, {num_heads}], got {override}")
        return override
    return V2_HEADS if num_heads >= V2_HEADS else max(1, round(V2_HEAD_FRACTION * num_heads))


def select_raters(
    vis: torch.Tensor, txt: torch.Tensor
) -> tuple[tuple[int, ...], torch.Tensor, float]:
    """Text raters (SPEC §1).

    Args:
      vis: [V0, D] visual input embeddings. txt: [T, D] text input embeddings.
    Returns:
      (raters relative to the text start ascending, m [T] float32, relative margin
      min_j |m_j - mean(m)| / mean(m)).
    """
    torch = import_torch()
    if txt.shape[0] == 0:
        raise ValueError("SparseVLM needs at least one text token after the image")
    relation = vis.float() @ txt.float().T  # [V0, T]
    m = relation.softmax(dim=1).mean(dim=0)  # [T]
    mean = m.mean()
    raters = tuple(int(j) for j in torch.nonzero(m > mean).flatten())
    if not raters:
        raise ValueError("no text token scores above the mean: SparseVLM needs raters")
    margin = float((m - mean).abs().min() / mean)
    return raters, m, margin


def float32_rank(matrix: torch.Tensor) -> tuple[int, float]:
    """Rank with `torch.linalg.matrix_rank`'s float32 semantics (SPEC §3), and its margin.

    rank = #{singular values > sigma_max * max(rows, cols) * eps_float32}. The margin is
    min_i |sigma_i - tol| / sigma_max (inf for a zero matrix: rank 0 then, robustly).
    """
    torch = import_torch()
    a = matrix.float()
    sv = torch.linalg.svdvals(a)
    if sv.numel() == 0 or float(sv.max()) == 0.0:
        return 0, math.inf
    smax = sv.max()
    tol = smax * max(a.shape) * torch.finfo(torch.float32).eps
    rank = int((sv > tol).sum())
    margin = float((sv - tol).abs().min() / smax)
    return rank, margin


def select_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Top-k of `scores` with ties to the lower index (SPEC §3).

    Returns:
      (kept indices ascending [k], pruned indices in descending-score order [V-k],
      relative boundary margin (s_kth - s_best_pruned) / max|s|).
    """
    order = descending_order(scores)
    kept = order[:k].sort().values
    pruned = order[k:]
    scale = float(scores.abs().max()) if scores.numel() else 0.0
    return kept, pruned, boundary_margin(scores[order], k, scale)


def rope_bias(
    rotary_emb: Any, head_dim: int, q_pos: torch.Tensor, k_pos: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """SparseVLM+ gravity bias: RoPE(q=1) . RoPE(k=1) / sqrt(head_dim), [len(q_pos), len(k_pos)]
    (positions [n] or, M-RoPE, [n, 3]: the model's own sectioned rotation)."""
    torch = import_torch()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ones_q = torch.ones(1, 1, q_pos.shape[0], head_dim, dtype=torch.float32, device=like.device)
    ones_k = torch.ones(1, 1, k_pos.shape[0], head_dim, dtype=torch.float32, device=like.device)
    from sparsevlm_jax.reference.layers import rotary_pos_ids

    cos_q, sin_q = rotary_emb(ones_q, rotary_pos_ids(q_pos))
    cos_k, sin_k = rotary_emb(ones_k, rotary_pos_ids(k_pos))
    rq, _ = apply_rotary_pos_emb(ones_q, ones_q, cos_q, sin_q)
    _, rk = apply_rotary_pos_emb(ones_k, ones_k, cos_k, sin_k)
    return (rq[0, 0] @ rk[0, 0].T) / math.sqrt(head_dim)


def visual_scores(
    params: RefSparseParams,
    probs: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    vis_idx: torch.Tensor,
    rotary_emb: Any,
    head_dim: int,
    margins: dict[str, float],
) -> tuple[torch.Tensor, int | None, tuple[int, ...]]:
    """The score s of every visual token at a pruning layer (SPEC §2, §6, §7).

    Args:
      probs: float32 [1, H, n, n] the layer's attention. positions: [n] its position ids.
      rows: [|raters|] absolute rater rows. vis_idx: [v] the visual tokens' indices (v > 0).
      margins: receives the "heads" (v2.0) and "rank" (v1) margins.
    Returns:
      (s float32 [v], v1's rank of R or None, v2.0's averaged heads ascending or ()).
    """
    if params.method == "fastv":  # the last token's head-averaged attention
        return probs[0].mean(dim=0)[-1, vis_idx], None, ()
    if params.method == "random":
        return probs.new_zeros(int(vis_idx.numel())), None, ()
    heads: tuple[int, ...] = ()
    per_head = probs[0][:, rows][:, :, vis_idx]  # [H, |raters|, v]
    if params.switched("gravity"):
        bias = rope_bias(rotary_emb, head_dim, positions[rows], positions[vis_idx], probs)
        per_head = per_head / bias  # gravity correction
    if params.switched("top_heads"):
        n_sel = v2_head_count(per_head.shape[0], params.v2_heads)
        head_mass = per_head.sum(dim=(1, 2))  # [H]
        head_order = descending_order(head_mass)
        note_margin(
            margins,
            "heads",
            boundary_margin(head_mass[head_order], n_sel, float(head_mass.abs().max())),
        )
        heads = tuple(sorted(int(i) for i in head_order[:n_sel]))
        per_head = per_head[list(heads)]
    relation = per_head.mean(dim=0)  # R [|raters|, v]
    scores = relation.mean(dim=0)  # s [v]
    if params.method != "v1":
        return scores, None, heads
    rank, rank_margin = float32_rank(relation)
    note_margin(margins, "rank", rank_margin)
    return scores, rank, heads


def budget(
    params: RefSparseParams, index: int, rank: int | None, v: int, v0: int | None = None
) -> int:
    """k, the visual tokens kept at the index-th pruning layer (SPEC §3, §7); k >= v keeps all.

    With `params.schedule_tokens` a schedule entry is scaled to the example's initial visual
    count v0 (SPEC §9.3): max(1, round(entry * v0 / schedule_tokens)).
    """
    scheduled = params.schedule[index] if params.schedule else 0
    if params.schedule and params.schedule_tokens:
        assert v0 is not None
        scheduled = max(1, round(scheduled * v0 / params.schedule_tokens))
    if params.method == "v1":
        assert rank is not None
        k = v if v - rank == 0 else min(int(rank * params.scale + params.bias), v - 1)
    elif params.method == "fastv":
        k = min(round(v * (1 - params.fastv_ratio)), v)
    elif params.method == "random":
        k = min(scheduled, v)
    else:  # v1_5, v2_0
        k = min(scheduled, v - 1)
    return max(k, 0)
