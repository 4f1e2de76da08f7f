"""Recycling of pruned tokens (SPEC §4): the best-scored pruned tokens are clustered by
DPC-KNN and each cluster is merged into one recycled token; every clustering decision records
its margin.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from sparsevlm_jax.reference.common import (
    boundary_margin,
    descending_order,
    import_torch,
    merge_margins,
    note_margin,
)

if TYPE_CHECKING:
    import torch


RECYCLE_FRACTION = 0.3  # top 30% (+1) of the pruned tokens are clustering candidates
MERGE_EPS = 1e-6  # recycled token = sum / (count + MERGE_EPS), as the authors do


def _nearest_denser(dist: torch.Tensor, denser: torch.Tensor, dist_max: torch.Tensor):
    """delta_i = min over j with denser[i, j] of dist[i, j], or dist_max when there is none."""
    torch = import_torch()
    return torch.where(denser, dist, dist_max).min(dim=1).values


def density_order(density: torch.Tensor, ties: str = "lower_index") -> torch.Tensor:
    """The "j is denser than i" relation of DPC-KNN as a bool matrix denser[i, j].

    ties="lower_index" (default, SPEC §4 [decision]): the authors add 1e-6 uniform noise to
    the densities so that the order is strict; instead, equal densities are ordered by
    index, the lower index counting as denser. ties="strict": plain `rho_j > rho_i`, so
    equal densities are incomparable (then, e.g., both members of the closest pair are
    centres whenever c = 2, because mutual nearest neighbours have bitwise-equal densities).
    """
    torch = import_torch()
    n = density.numel()
    greater = density[None, :] > density[:, None]  # [i, j]: rho_j > rho_i
    if ties == "strict":
        return greater
    if ties != "lower_index":
        raise ValueError(f"unknown density tie rule {ties!r}")
    idx = torch.arange(n, device=density.device)
    equal = density[None, :] == density[:, None]
    return greater | (equal & (idx[None, :] < idx[:, None]))


def dpc_knn_cluster(
    x: torch.Tensor,
    num_clusters: int,
    density_ties: str = "lower_index",
    with_margins: bool = True,
) -> tuple[torch.Tensor, list[int], torch.Tensor, dict[str, float]]:
    """DPC-KNN clustering and merging of SPEC §4 (no density noise; ties to lower indices).

    Steps: distances d_ij = ||x_i - x_j|| / sqrt(D) computed exactly (d_ii = 0, d symmetric
    bitwise); density rho_i = exp(-mean of the c smallest d_ij^2, self included); delta_i =
    distance to the nearest denser token (see `density_order`), or max(d) if none; the c
    largest delta * rho (stable sort: ties to the lower index) are the centres, in that
    order; every token joins its nearest centre (ties: the earlier centre), a centre itself;
    merged = sum of members / (count + 1e-6).

    Args:
      x: [n, D] candidate tokens, in candidate order. num_clusters: c (1 <= c <= n).
      density_ties: see `density_order`.
      with_margins: compute the margins (the density one costs O(n^2) per close pair).
    Returns:
      (merged [c, D] in centre order and x's dtype, centres as indices into x in centre
      order, assignment [n] (cluster index per token), margins {"density", "centres",
      "assignment"} (relative; see the comments below)).
    """
    torch = import_torch()
    n, d = x.shape
    c = num_clusters
    if not 1 <= c <= n:
        raise ValueError(f"need 1 <= clusters <= tokens, got {c} clusters for {n} tokens")
    xf = x.float()
    # Exact pairwise distances (the matmul form leaves non-zero self-distances).
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / (d**0.5)  # [n, n]
    nearest = torch.sort(dist, dim=1).values[:, :c]  # [n, c], self (0) included
    density = (-(nearest**2).mean(dim=1)).exp()  # [n]
    dist_max = dist.max()
    denser = density_order(density, density_ties)  # [n, n]
    delta = _nearest_denser(dist, denser, dist_max)  # [n]
    score = delta * density
    order = descending_order(score)
    centres = [int(i) for i in order[:c]]

    # Assignment: nearest centre, ties to the earlier centre; a centre joins itself.
    to_centres = dist[centres]  # [c, n]
    assignment = to_centres.argmin(dim=0)
    assignment[centres] = torch.arange(c, device=x.device)
    counts = torch.bincount(assignment, minlength=c).to(torch.float32)  # [c]
    sums = torch.zeros(c, d, dtype=torch.float32, device=x.device).index_add_(0, assignment, xf)
    merged = (sums / (counts[:, None] + MERGE_EPS)).to(x.dtype)

    margins: dict[str, float] = {}
    if c == 1 or not with_margins:  # c = 1: one cluster takes every token, nothing to flip
        return merged, centres, assignment, margins
    # Centre choice and order: gaps between consecutive scores among the top c (+1 boundary),
    # relative to the top score. Exact ties (gap 0) are skipped: they are structural (e.g.
    # with ties="strict" both members of a mutual-nearest pair, bitwise-equal densities),
    # reproduced bitwise by any implementation with symmetric exact distances, and resolved
    # by the lower-index rule.
    sorted_scores = score[order]
    smax = float(sorted_scores[0])
    if smax > 0:
        for i in range(min(c, n - 1)):
            gap = float(sorted_scores[i] - sorted_scores[i + 1])
            if gap > 0:
                note_margin(margins, "centres", gap / smax)
    # Assignment: second-nearest minus nearest centre distance of non-centre tokens,
    # relative to max(d).
    if float(dist_max) > 0:
        two = torch.topk(to_centres, 2, dim=0, largest=False).values  # [2, n]
        gap = two[1] - two[0]
        non_centre = torch.ones(n, dtype=torch.bool, device=x.device)
        non_centre[centres] = False
        if bool(non_centre.any()):
            note_margin(margins, "assignment", float(gap[non_centre].min() / dist_max))
    # Density order: the smallest gap of a pair whose swap would change the centres.
    note_margin(margins, "density", _density_order_margin(dist, density, denser, dist_max, centres))
    return merged, centres, assignment, margins


def _density_order_margin(
    dist: torch.Tensor,
    density: torch.Tensor,
    denser: torch.Tensor,
    dist_max: torch.Tensor,
    centres: list[int],
    screen: float = 1e-2,
) -> float:
    """Smallest relative density gap |rho_i - rho_j| / max(rho) > 0 of a pair whose order, if
    swapped, would change the ordered centre list.

    Pairs are tried in increasing gap order; pairs with a gap of `screen` or more are not
    tried and `screen` is then returned as a lower bound. Exact ties (gap 0) are structural
    (mutual nearest neighbours when c = 2) and ordered by the tie rule, so they are skipped.
    """
    torch = import_torch()
    c = len(centres)
    rmax = float(density.max())
    if density.numel() < 2 or rmax <= 0:
        return math.inf
    gaps = (density[:, None] - density[None, :]).abs() / rmax  # [n, n]
    close = torch.nonzero(torch.triu((gaps < screen) & (gaps > 0), diagonal=1))  # [m, 2]
    close_gaps = gaps[close[:, 0], close[:, 1]]
    for t in torch.sort(close_gaps, stable=True).indices.tolist():
        i, j = close[t].tolist()
        swapped = denser.clone()
        swapped[i, j], swapped[j, i] = denser[j, i], denser[i, j]
        score = _nearest_denser(dist, swapped, dist_max) * density
        if [int(u) for u in descending_order(score)[:c]] != centres:
            return float(close_gaps[t])
    return screen


def recycle_pruned(
    x: torch.Tensor,
    scores: torch.Tensor,
    pruned: torch.Tensor,
    density_ties: str,
    margins: dict[str, float],
    with_margins: bool = True,
) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Recycled tokens from the pruned ones (SPEC §4).

    The top floor(0.3 * n_pruned) + 1 pruned tokens by score are the candidates; they form
    floor(n_candidates / 10) + 1 clusters (`dpc_knn_cluster`), each merged into one token.

    Args:
      x: [v, D] the layer's output at the visual tokens. scores: [v] their scores s.
      pruned: pruned visual indices in descending-score order (ties to the lower index).
      density_ties: see `density_order`. margins: receives the "candidates" margin and the
        clustering ones (the latter only `with_margins`).
    Returns:
      (recycled [c, D] in centre order, candidates (visual indices), centres (indices into
      the candidates), assignment (per candidate, its cluster)).
    """
    n_cand = int(pruned.numel() * RECYCLE_FRACTION) + 1
    cand = pruned[:n_cand]
    scale = float(scores.abs().max())
    note_margin(margins, "candidates", boundary_margin(scores[pruned], n_cand, scale))
    recycled, centres, assign, dpc_margins = dpc_knn_cluster(
        x[cand], int(n_cand / 10) + 1, density_ties, with_margins=with_margins
    )
    merge_margins(margins, dpc_margins)
    return (
        recycled,
        tuple(int(i) for i in cand),
        tuple(centres),
        tuple(int(i) for i in assign),
    )
