"""Eager PyTorch reference implementation of SparseVLM (SPEC.md) on transformers' LLaVA.

This module is the oracle the JAX implementation is tested against decision for decision, and
the PyTorch side of the speed benchmarks. It is deliberately plain: batch 1, dynamic shapes,
one Python loop over the decoder layers, no compilation. It runs on the modules of a
`transformers.LlavaForConditionalGeneration` (their weights, norms, MLPs, projections and
rotary embedding) but computes self-attention itself, because the pruning layers need the
attention probabilities and every layer keeps a KV cache of its own length.

torch and transformers are imported inside the functions, so importing `sparsevlm_jax` never
needs them; nothing in the library imports this module.

Conventions (all indices are Python ints, all tensors are batch-1 and live on the model's
device):
  p   number of tokens before the image (index of the first image token),
  V0  number of image tokens, V the current visual count (recycled tokens included),
  the visual range is [p, p+V), the text range [p+V, n) where n is the current length.

Decisions are made in float32 whatever the model dtype: attention probabilities are the
float32 softmax output; raters, ranks and clustering use float32 copies.

Every discrete decision also records a *margin*: how far (relative) the deciding quantity is
from flipping. `RefResult.min_margin` is the smallest of them; a test comparing another
implementation with this one should only trust cases where it is well above float32 noise.
Kinds (per pruning layer in `RefPruneRecord.margins`, overall minimum in `RefResult.margins`):
  raters      min_j |m_j - mean(m)| / mean(m)                       (SPEC §1)
  rank        min_i |sigma_i - tol| / sigma_max                     (v1, SPEC §3)
  topk        (s_kth kept - s_best pruned) / max|s|                 (top-k boundary)
  heads       same boundary on the v2.0 per-head masses
  candidates  (s_last candidate - s_next pruned) / max|s|           (recycling, SPEC §4)
  centres     consecutive gaps of delta*rho among the top c (+1) / top score
  assignment  (2nd nearest - nearest centre distance) / max distance, non-centres
  density     smallest density gap of a pair whose swap would change the centres / max rho
              (pairs >= 1e-2 apart are not tried: 1e-2 then means "at least 1e-2")
Exact ties in DPC-KNN (structural: c = 1, or mutual nearest neighbours when c = 2) are
resolved by the index rules and not counted; c = 1 records no clustering margins at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

METHODS = ("dense", "v1", "v1_5", "v2_0", "fastv", "random")
RECYCLING_METHODS = ("v1", "v1_5")
KEEP_POSITION_METHODS = ("v2_0",)

RECYCLE_FRACTION = 0.3  # top 30% (+1) of the pruned tokens are clustering candidates
MERGE_EPS = 1e-6  # recycled token = sum / (count + MERGE_EPS), as the authors do
V2_HEADS = 14  # SparseVLM+ averages the top 14 heads whatever the model (SPEC §6)
V2_HEAD_FRACTION = V2_HEADS / 32  # models with fewer heads: the same fraction of LLaVA-7B's 32

# Named budgets of SPEC §6 (LLaVA-1.5-7B).
V1_BUDGETS: dict[int, tuple[float, float]] = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
V1_5_SCHEDULES: dict[int, tuple[int, ...]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
V2_0_SCHEDULES: dict[int, tuple[int, ...]] = {
    192: (300, 200, 118),
    128: (238, 108, 60),
    96: (246, 54, 28),
    64: (66, 34, 20),
}


# --------------------------------------------------------------------------------------------
# Parameters and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefSparseParams:
    """Which pruning method to run, and its numbers.

    Attributes:
      method: "dense", "v1" (rank-adaptive), "v1_5" / "v2_0" (fixed schedule), "fastv",
        "random".
      layers: pruning layers. A pruning layer runs on the current sequence; its attention
        scores the visual tokens and its *output* is pruned, so later layers see fewer tokens.
        (FastV's "K" = the first layer that sees the pruned sequence = `layers[0] + 1`; see
        `fastv()`.)
      scale, bias: v1 budget `k = min(int(rank * scale + bias), V - 1)`.
      schedule: per pruning layer, the kept count for v1.5 / v2.0 / random.
      fastv_ratio: FastV's R; keeps `round(V * (1 - R))` visual tokens.
      v2_heads: heads averaged by v2.0; None means `v2_head_count`'s rule (14, or
        round(14/32 * num_heads) on models with fewer than 14 heads).
      seed: seed of the "random" method.
      density_ties: how DPC-KNN orders equal densities (`density_order`): "lower_index"
        (default; the deterministic stand-in for the authors' tie-breaking noise) or
        "strict".
    """

    method: str = "v1"
    layers: tuple[int, ...] = (2, 6, 15, 19)
    scale: float = 13.5
    bias: float = 0.0
    schedule: tuple[int, ...] = ()
    fastv_ratio: float = 0.5
    v2_heads: int | None = None
    seed: int = 0
    density_ties: str = "lower_index"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"pruning layers must be strictly increasing, got {self.layers}")
        if self.density_ties not in ("lower_index", "strict"):
            raise ValueError(
                f"density_ties must be 'lower_index' or 'strict', not {self.density_ties!r}"
            )
        if self.v2_heads is not None and self.v2_heads < 1:
            raise ValueError(f"v2_heads must be >= 1, got {self.v2_heads}")
        if self.method in ("v1_5", "v2_0", "random") and len(self.schedule) != len(self.layers):
            raise ValueError(
                f"method {self.method} needs one schedule entry per pruning layer, "
                f"got schedule={self.schedule} for layers={self.layers}"
            )

    @property
    def recycles(self) -> bool:
        return self.method in RECYCLING_METHODS

    @property
    def keeps_positions(self) -> bool:
        return self.method in KEEP_POSITION_METHODS

    # Presets (SPEC §6, §7) --------------------------------------------------------------
    @classmethod
    def dense(cls) -> RefSparseParams:
        return cls(method="dense", layers=())

    @classmethod
    def v1(cls, budget: int = 192) -> RefSparseParams:
        scale, bias = V1_BUDGETS[budget]
        return cls(method="v1", layers=(2, 6, 15, 19), scale=scale, bias=bias)

    @classmethod
    def v1_5(cls, budget: int = 192) -> RefSparseParams:
        return cls(method="v1_5", layers=(2, 6, 15), schedule=V1_5_SCHEDULES[budget])

    @classmethod
    def v2_0(cls, budget: int = 192) -> RefSparseParams:
        return cls(method="v2_0", layers=(2, 6, 15), schedule=V2_0_SCHEDULES[budget])

    @classmethod
    def fastv(cls, k: int = 2, ratio: float = 0.5) -> RefSparseParams:
        """FastV as its authors' in-place code runs it: layer k-1's attention decides, and
        layers k, k+1, ... see the pruned sequence (so the pruning layer here is k-1)."""
        if k < 1:
            raise ValueError("FastV's K must be >= 1")
        return cls(method="fastv", layers=(k - 1,), fastv_ratio=ratio)


@dataclass
class RefPruneRecord:
    """What one pruning layer decided. Visual indices are relative to that layer's visual
    range [p, p+v_in) of the sequence it ran on.

    Attributes:
      layer: the layer index.
      v_in: visual count entering the layer.
      text_start: absolute index of the first text token in the layer's sequence (p + v_in).
      scores: float32 [v_in], the per-visual-token score `s` (FastV: last-token attention;
        "random": zeros).
      rank: v1 only: float32 rank of the |raters| x v_in matrix R.
      budget: k, the number of kept visual tokens (v_in when the layer pruned nothing).
      pruned: whether at least one visual token was dropped.
      kept: kept visual indices, ascending (original order).
      candidates: recycling candidates, visual indices in descending score order.
      centres: DPC-KNN centres as indices into `candidates`, in centre order.
      assignment: per candidate, the index (into `centres`) of the cluster it joined.
      n_recycled: number of recycled tokens appended after the kept ones (c, or 0).
      v_out: visual count after the layer (budget + n_recycled).
      heads: v2.0 only: the heads averaged, ascending.
      margins: smallest relative margin per decision kind at this layer.
    """

    layer: int
    v_in: int
    text_start: int
    scores: torch.Tensor
    rank: int | None
    budget: int
    pruned: bool
    kept: tuple[int, ...]
    candidates: tuple[int, ...] = ()
    centres: tuple[int, ...] = ()
    assignment: tuple[int, ...] = ()
    n_recycled: int = 0
    v_out: int = 0
    heads: tuple[int, ...] = ()
    margins: dict[str, float] = field(default_factory=dict)


@dataclass
class RefResult:
    """Everything a prefill (and optionally a generation) decided and produced.

    Attributes:
      prefix_len: p.
      num_image_tokens: V0.
      num_text_tokens: T = N - p - V0.
      raters: rater indices relative to the text start, ascending.
      rater_scores: float32 [T], the vector `m` of SPEC §1.
      prunes: one record per pruning layer, in layer order.
      visual_counts: visual count after each of the L layers (recycled included).
      equivalent_tokens: mean of `visual_counts` (SPEC §6).
      logits: float32 [N', vocab], prefill logits of every position of the final sequence.
      positions: int64 [N'], position ids of the final sequence at the last layer.
      kv_caches: per layer (k, v), each [1, num_kv_heads, len_l, head_dim] (keys after RoPE);
        len_l differs between layers.
      margins: smallest relative margin per decision kind over the whole prefill.
      min_margin: min of `margins` (inf when no decision was made).
      layer_inputs: only with `keep_layer_inputs=True`: per layer (hidden [1, n_l, D],
        positions [n_l]) that the layer ran on.
      greedy_gaps: filled by `reference_generate`: top-1 minus top-2 logit at every step.
      decode_positions: filled by `reference_generate`: per decoded token fed back, its
        position at every layer (SPEC §5).
    """

    prefix_len: int
    num_image_tokens: int
    num_text_tokens: int
    raters: tuple[int, ...]
    rater_scores: torch.Tensor
    prunes: list[RefPruneRecord]
    visual_counts: tuple[int, ...]
    equivalent_tokens: float
    logits: torch.Tensor
    positions: torch.Tensor
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    margins: dict[str, float]
    min_margin: float
    layer_inputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    greedy_gaps: list[float] = field(default_factory=list)
    decode_positions: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        """N, the original (unpruned) prompt length."""
        return self.prefix_len + self.num_image_tokens + self.num_text_tokens


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise ImportError(
            "sparsevlm_jax.reference_torch needs PyTorch and transformers "
            "(pip install 'sparsevlm-jax[torch]')"
        ) from e
    return torch


def _note(margins: dict[str, float], kind: str, value: float) -> None:
    """Keep the smallest margin seen of each kind."""
    margins[kind] = min(margins.get(kind, math.inf), float(value))


def _merge_margins(into: dict[str, float], other: dict[str, float]) -> None:
    for kind, value in other.items():
        _note(into, kind, value)


def v2_head_count(num_heads: int, override: int | None = None) -> int:
    """Heads SparseVLM+ averages (SPEC §6): `override` if given, else exactly 14 on a model
    with at least 14 heads, else round(14/32 * num_heads) and at least 1."""
    if override is not None:
        if not 1 <= override <= num_heads:
            raise ValueError(f"v2_heads must be in [1, {num_heads}], got {override}")
        return override
    return V2_HEADS if num_heads >= V2_HEADS else max(1, round(V2_HEAD_FRACTION * num_heads))


def descending_order(x: torch.Tensor) -> torch.Tensor:
    """Indices sorting the 1-D `x` by descending value, ties to the lower index."""
    torch = _import_torch()
    return torch.sort(-x, stable=True).indices


def _boundary_margin(sorted_values: torch.Tensor, k: int, scale: float) -> float:
    """Relative gap between the k-th and (k+1)-th of descending `sorted_values`, or inf."""
    if k <= 0 or k >= sorted_values.numel() or scale <= 0:
        return math.inf
    return float(sorted_values[k - 1] - sorted_values[k]) / scale


# --------------------------------------------------------------------------------------------
# The decision steps of SPEC §1-§4, each on plain tensors (unit-testable)
# --------------------------------------------------------------------------------------------


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
    torch = _import_torch()
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
    torch = _import_torch()
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
    return kept, pruned, _boundary_margin(scores[order], k, scale)


def _nearest_denser(dist: torch.Tensor, denser: torch.Tensor, dist_max: torch.Tensor):
    """delta_i = min over j with denser[i, j] of dist[i, j], or dist_max when there is none."""
    torch = _import_torch()
    return torch.where(denser, dist, dist_max).min(dim=1).values


def density_order(density: torch.Tensor, ties: str = "lower_index") -> torch.Tensor:
    """The "j is denser than i" relation of DPC-KNN as a bool matrix denser[i, j].

    ties="lower_index" (default, SPEC §4 [decision]): the authors add 1e-6 uniform noise to
    the densities so that the order is strict; instead, equal densities are ordered by
    index, the lower index counting as denser. ties="strict": plain `rho_j > rho_i`, so
    equal densities are incomparable (then, e.g., both members of the closest pair are
    centres whenever c = 2, because mutual nearest neighbours have bitwise-equal densities).
    """
    torch = _import_torch()
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
    torch = _import_torch()
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
                _note(margins, "centres", gap / smax)
    # Assignment: second-nearest minus nearest centre distance of non-centre tokens,
    # relative to max(d).
    if float(dist_max) > 0:
        two = torch.topk(to_centres, 2, dim=0, largest=False).values  # [2, n]
        gap = two[1] - two[0]
        non_centre = torch.ones(n, dtype=torch.bool, device=x.device)
        non_centre[centres] = False
        if bool(non_centre.any()):
            _note(margins, "assignment", float(gap[non_centre].min() / dist_max))
    # Density order: the smallest gap of a pair whose swap would change the centres.
    _note(margins, "density", _density_order_margin(dist, density, denser, dist_max, centres))
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
    torch = _import_torch()
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


# --------------------------------------------------------------------------------------------
# The decoder with explicit attention
# --------------------------------------------------------------------------------------------


def _attention(
    attn: Any,
    rotary_emb: Any,
    x: torch.Tensor,
    positions: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Self-attention of one Llama layer (eager, float32 softmax, GQA via repeat_kv).

    Args:
      attn: the layer's `self_attn` module. x: [1, q, D] normed input.
      positions: int64 [q] positions of the new tokens. past: cached (k, v) or None.
      causal: mask future keys (prefill); decoding attends to every cached key.
    Returns:
      (output [1, q, D], probabilities float32 [1, H, q, kv_len], new cache (k, v) each
      [1, Hkv, kv_len, head_dim]).
    """
    torch = _import_torch()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    _, q_len, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(1, q_len, -1, hd).transpose(1, 2)  # [1, H, q, hd]
    k = attn.k_proj(x).view(1, q_len, -1, hd).transpose(1, 2)  # [1, Hkv, q, hd]
    v = attn.v_proj(x).view(1, q_len, -1, hd).transpose(1, 2)  # [1, Hkv, q, hd]
    cos, sin = rotary_emb(v, positions[None, :])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if past is not None:
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
    kr = repeat_kv(k, attn.num_key_value_groups)  # [1, H, kv, hd]
    vr = repeat_kv(v, attn.num_key_value_groups)
    logits = (q @ kr.transpose(2, 3)) * attn.scaling  # [1, H, q, kv]
    if causal:
        kv_len = kr.shape[2]
        future = torch.ones(q_len, kv_len, dtype=torch.bool, device=x.device).triu(
            kv_len - q_len + 1
        )
        logits = logits.masked_fill(future, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [1, H, q, kv]
    out = (probs.to(vr.dtype) @ vr).transpose(1, 2).reshape(1, q_len, -1)  # [1, q, H*hd]
    return attn.o_proj(out), probs, (k, v)


def _decoder_layer(
    layer: Any,
    rotary_emb: Any,
    h: torch.Tensor,
    positions: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One pre-norm Llama decoder layer on hidden states h [1, q, D].

    Returns (output [1, q, D], attention probabilities [1, H, q, kv], cache (k, v))."""
    a, probs, kv = _attention(
        layer.self_attn, rotary_emb, layer.input_layernorm(h), positions, past, causal
    )
    h = h + a
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, probs, kv


def _language_model(model: Any) -> Any:
    return model.model.language_model


def _image_token_id(model: Any) -> int:
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the model config has no image_token_id / image_token_index")


def input_embeddings(
    model: Any, input_ids: torch.Tensor, pixel_values: torch.Tensor
) -> tuple[torch.Tensor, int, int]:
    """Token embeddings with the projected image features spliced in (llava-hf style).

    Args:
      input_ids: int64 [1, N] with the image token id repeated V0 times, contiguously.
      pixel_values: [1, 3, H, W].
    Returns:
      (E [1, N, D] in the model dtype, p, V0).
    """
    torch = _import_torch()
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"the reference runs batch 1: input_ids must be [1, N], got {tuple(input_ids.shape)}"
        )
    image_id = _image_token_id(model)
    where = torch.nonzero(input_ids[0] == image_id).flatten()
    if where.numel() == 0:
        raise ValueError("input_ids hold no image token")
    p, v0 = int(where[0]), int(where.numel())
    if int(where[-1]) != p + v0 - 1:
        raise ValueError("image tokens must be contiguous")
    lm = _language_model(model)
    embeds = lm.embed_tokens(input_ids)  # [1, N, D]
    features = _image_features(model, pixel_values).to(embeds.dtype)  # [V0, D]
    if features.shape[0] != v0:
        raise ValueError(f"{v0} image tokens but {features.shape[0]} image features")
    embeds = embeds.clone()
    embeds[0, p : p + v0] = features
    return embeds, p, v0


def _image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image features [V0, D] from whichever form get_image_features returns."""
    torch = _import_torch()
    getter = getattr(model.model, "get_image_features", None) or model.get_image_features
    dtype = next(model.parameters()).dtype
    out = getter(pixel_values=pixel_values.to(dtype))
    if hasattr(out, "pooler_output"):
        out = out.pooler_output
    if isinstance(out, (list, tuple)):
        out = torch.cat([f.reshape(-1, f.shape[-1]) for f in out], dim=0)
    return out.reshape(-1, out.shape[-1])


def _head_count(attn: Any) -> int:
    return attn.q_proj.out_features // attn.head_dim


def _rope_bias(
    rotary_emb: Any, head_dim: int, q_pos: torch.Tensor, k_pos: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """SparseVLM+ gravity bias: RoPE(q=1) . RoPE(k=1) / sqrt(head_dim), [len(q_pos), len(k_pos)]."""
    torch = _import_torch()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ones_q = torch.ones(1, 1, q_pos.numel(), head_dim, dtype=torch.float32, device=like.device)
    ones_k = torch.ones(1, 1, k_pos.numel(), head_dim, dtype=torch.float32, device=like.device)
    cos_q, sin_q = rotary_emb(ones_q, q_pos[None, :])
    cos_k, sin_k = rotary_emb(ones_k, k_pos[None, :])
    rq, _ = apply_rotary_pos_emb(ones_q, ones_q, cos_q, sin_q)
    _, rk = apply_rotary_pos_emb(ones_k, ones_k, cos_k, sin_k)
    return (rq[0, 0] @ rk[0, 0].T) / math.sqrt(head_dim)


# --------------------------------------------------------------------------------------------
# One pruning step (SPEC §2-§5)
# --------------------------------------------------------------------------------------------


def _prune_step(
    params: RefSparseParams,
    index: int,
    layer_idx: int,
    rotary_emb: Any,
    head_dim: int,
    h_out: torch.Tensor,
    probs: torch.Tensor,
    positions: torch.Tensor,
    p: int,
    v: int,
    raters: tuple[int, ...],
    track_margins: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, RefPruneRecord]:
    """Score, select, recycle and compact after pruning layer `layer_idx`.

    Args:
      index: position of this layer in `params.layers`.
      h_out: [1, n, D] the layer's output. probs: float32 [1, H, n, n] its attention.
      positions: [n] the positions the layer ran with. p, v: prefix length, visual count.
      track_margins: compute the (costly) clustering margins.
    Returns:
      (new hidden [1, n', D], new positions [n'], record).
    """
    torch = _import_torch()
    margins: dict[str, float] = {}
    text_start = p + v
    rows = torch.tensor(raters, device=h_out.device) + text_start  # absolute rater rows
    rank: int | None = None
    heads: tuple[int, ...] = ()

    if v == 0:  # nothing left to prune (possible only after v2.0 / random emptied the image)
        record = RefPruneRecord(
            layer=layer_idx,
            v_in=0,
            text_start=text_start,
            scores=probs.new_zeros(0),
            rank=None,
            budget=0,
            pruned=False,
            kept=(),
        )
        return h_out, positions, record

    # --- scores s [v] -----------------------------------------------------------------------
    if params.method == "fastv":
        scores = probs[0].mean(dim=0)[-1, p:text_start]  # last token's head-averaged attention
    elif params.method == "random":
        scores = probs.new_zeros(v)
    else:
        per_head = probs[0][:, rows, p:text_start]  # [H, |raters|, v]
        if params.method == "v2_0":
            bias = _rope_bias(rotary_emb, head_dim, positions[rows], positions[p:text_start], probs)
            per_head = per_head / bias  # gravity correction
            n_heads = per_head.shape[0]
            n_sel = v2_head_count(n_heads, params.v2_heads)
            head_mass = per_head.sum(dim=(1, 2))  # [H]
            head_order = descending_order(head_mass)
            _note(
                margins,
                "heads",
                _boundary_margin(head_mass[head_order], n_sel, float(head_mass.abs().max())),
            )
            heads = tuple(sorted(int(i) for i in head_order[:n_sel]))
            per_head = per_head[list(heads)]
        relation = per_head.mean(dim=0)  # R [|raters|, v]
        scores = relation.mean(dim=0)  # s [v]
        if params.method == "v1":
            rank, rank_margin = float32_rank(relation)
            _note(margins, "rank", rank_margin)

    # --- budget k ---------------------------------------------------------------------------
    if params.method == "v1":
        assert rank is not None
        k = v if v - rank == 0 else min(int(rank * params.scale + params.bias), v - 1)
    elif params.method == "fastv":
        k = min(round(v * (1 - params.fastv_ratio)), v)
    elif params.method == "random":
        k = min(params.schedule[index], v)
    else:  # v1_5, v2_0
        k = min(params.schedule[index], v - 1)
    k = max(k, 0)

    if k >= v:  # the layer prunes nothing
        record = RefPruneRecord(
            layer=layer_idx,
            v_in=v,
            text_start=text_start,
            scores=scores,
            rank=rank,
            budget=v,
            pruned=False,
            kept=tuple(range(v)),
            v_out=v,
            heads=heads,
            margins=margins,
        )
        return h_out, positions, record

    # --- kept / pruned ----------------------------------------------------------------------
    if params.method == "random":
        import numpy as np

        rng = np.random.default_rng([params.seed, layer_idx])
        chosen = np.sort(rng.choice(v, size=k, replace=False))
        kept = torch.as_tensor(chosen, dtype=torch.long, device=h_out.device)
        pruned = torch.as_tensor(
            np.setdiff1d(np.arange(v), chosen), dtype=torch.long, device=h_out.device
        )
    else:
        kept, pruned, topk_margin = select_top_k(scores, k)
        _note(margins, "topk", topk_margin)

    # --- recycling (v1, v1.5) ---------------------------------------------------------------
    candidates: tuple[int, ...] = ()
    centres: tuple[int, ...] = ()
    assignment: tuple[int, ...] = ()
    recycled = h_out.new_zeros(0, h_out.shape[-1])
    if params.recycles:
        n_pruned = pruned.numel()
        n_cand = int(n_pruned * RECYCLE_FRACTION) + 1
        cand = pruned[:n_cand]  # pruned is in descending-score order, ties to lower index
        s_sorted = scores[pruned]
        _note(margins, "candidates", _boundary_margin(s_sorted, n_cand, float(scores.abs().max())))
        c = int(n_cand / 10) + 1
        recycled, centre_list, assign, dpc_margins = dpc_knn_cluster(
            h_out[0, p + cand], c, params.density_ties, with_margins=track_margins
        )
        _merge_margins(margins, dpc_margins)
        candidates = tuple(int(i) for i in cand)
        centres = tuple(centre_list)
        assignment = tuple(int(i) for i in assign)

    # --- compaction: [prefix | kept | recycled | text] --------------------------------------
    new_h = torch.cat(
        [h_out[:, :p], h_out[:, p + kept], recycled[None].to(h_out.dtype), h_out[:, text_start:]],
        dim=1,
    )
    if params.keeps_positions:  # v2.0 (no recycling): kept tokens keep their position ids
        new_pos = torch.cat([positions[:p], positions[p + kept], positions[text_start:]])
    else:
        new_pos = torch.arange(new_h.shape[1], device=positions.device)
    record = RefPruneRecord(
        layer=layer_idx,
        v_in=v,
        text_start=text_start,
        scores=scores,
        rank=rank,
        budget=k,
        pruned=True,
        kept=tuple(int(i) for i in kept),
        candidates=candidates,
        centres=centres,
        assignment=assignment,
        n_recycled=int(recycled.shape[0]),
        v_out=k + int(recycled.shape[0]),
        heads=heads,
        margins=margins,
    )
    return new_h, new_pos, record


# --------------------------------------------------------------------------------------------
# Public API: prefill, decode step, greedy generation
# --------------------------------------------------------------------------------------------


def reference_prefill(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    params: RefSparseParams | None = None,
    keep_layer_inputs: bool = False,
    track_margins: bool = True,
) -> RefResult:
    """Prefill of LLaVA with SparseVLM pruning (SPEC §1-§6), batch 1, eager.

    Args:
      model: a `transformers.LlavaForConditionalGeneration` (Llama text model), in eval mode.
      input_ids: int64 [1, N], llava-hf style (the image token id repeated V0 times).
      pixel_values: [1, 3, H, W], already preprocessed.
      params: the method; default v1 at 192 (scale 13.5, layers 2, 6, 15, 19).
      keep_layer_inputs: also return what every layer ran on (tests).
      track_margins: compute the clustering margins too (turn off for timing; the cheap
        margins are always recorded).
    Returns:
      RefResult; `logits` are float32 [N', vocab] for the final (pruned) sequence.
    """
    torch = _import_torch()
    params = params or RefSparseParams()
    lm = _language_model(model)
    n_layers = len(lm.layers)
    if params.method != "dense" and params.layers and params.layers[-1] >= n_layers:
        raise ValueError(f"pruning layer {params.layers[-1]} >= number of layers {n_layers}")
    prune_at = {} if params.method == "dense" else {l: i for i, l in enumerate(params.layers)}

    with torch.no_grad():
        h, p, v0 = input_embeddings(model, input_ids, pixel_values)  # [1, N, D]
        n_text = h.shape[1] - p - v0
        margins: dict[str, float] = {}
        raters: tuple[int, ...] = ()
        rater_scores = h.new_zeros(0, dtype=torch.float32)
        if prune_at:
            raters, rater_scores, rater_margin = select_raters(h[0, p : p + v0], h[0, p + v0 :])
            if params.method not in ("fastv", "random"):
                _note(margins, "raters", rater_margin)

        positions = torch.arange(h.shape[1], device=h.device)
        v = v0
        caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        prunes: list[RefPruneRecord] = []
        visual_counts: list[int] = []
        layer_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        head_dim = lm.layers[0].self_attn.head_dim
        for i, layer in enumerate(lm.layers):
            if keep_layer_inputs:
                layer_inputs.append((h, positions))
            h_out, probs, kv = _decoder_layer(layer, lm.rotary_emb, h, positions)
            caches.append(kv)
            if i in prune_at:
                h, positions, record = _prune_step(
                    params,
                    index=prune_at[i],
                    layer_idx=i,
                    rotary_emb=lm.rotary_emb,
                    head_dim=head_dim,
                    h_out=h_out,
                    probs=probs,
                    positions=positions,
                    p=p,
                    v=v,
                    raters=raters,
                    track_margins=track_margins,
                )
                prunes.append(record)
                _merge_margins(margins, record.margins)
                v = record.v_out
            else:
                h = h_out
            visual_counts.append(v)
        logits = model.lm_head(lm.norm(h))[0].float()  # [N', vocab]

    return RefResult(
        prefix_len=p,
        num_image_tokens=v0,
        num_text_tokens=n_text,
        raters=raters,
        rater_scores=rater_scores,
        prunes=prunes,
        visual_counts=tuple(visual_counts),
        equivalent_tokens=sum(visual_counts) / len(visual_counts),
        logits=logits,
        positions=positions,
        kv_caches=caches,
        margins=margins,
        min_margin=min(margins.values(), default=math.inf),
        layer_inputs=layer_inputs if keep_layer_inputs else None,
    )


def reference_decode_step(
    model: Any,
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    token_id: int,
    return_layer_inputs: bool = False,
    position: int | None = None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor] | None]:
    """One decoding step with per-layer caches (SPEC §5).

    The new token attends to every cached token of each layer plus itself. Its position is
    `position` at every layer when given (v2.0: N + t for the t-th generated token, N the
    unpruned prompt length), else at layer l that layer's cache length before appending
    (v1, v1.5: len_l).

    Args:
      kv_caches: per layer (k, v) [1, Hkv, len_l, head_dim]; not modified.
      token_id: the new token.
      position: one position for every layer, or None for the per-layer cache length.
    Returns:
      (logits float32 [vocab], new caches, per-layer inputs [1, 1, D] of the new token or None).
    """
    torch = _import_torch()
    lm = _language_model(model)
    device = kv_caches[0][0].device
    with torch.no_grad():
        h = lm.embed_tokens(torch.tensor([[token_id]], device=device))  # [1, 1, D]
        new_caches = []
        inputs = []
        for layer, past in zip(lm.layers, kv_caches, strict=True):
            inputs.append(h)
            pos = past[0].shape[2] if position is None else position
            position_ids = torch.tensor([pos], device=device)
            h, _, kv = _decoder_layer(layer, lm.rotary_emb, h, position_ids, past, causal=False)
            new_caches.append(kv)
        logits = model.lm_head(lm.norm(h))[0, -1].float()
    return logits, new_caches, (inputs if return_layer_inputs else None)


def _greedy(logits: torch.Tensor) -> tuple[int, float]:
    """argmax (first maximum) and the top-1 minus top-2 gap."""
    torch = _import_torch()
    token = int(torch.argmax(logits))
    top2 = torch.topk(logits, 2).values if logits.numel() > 1 else logits.repeat(2)
    return token, float(top2[0] - top2[1])


def reference_generate(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    params: RefSparseParams | None = None,
    max_new_tokens: int = 32,
    eos_token_ids: tuple[int, ...] | list[int] = (),
    track_margins: bool = True,
) -> tuple[list[int], RefResult]:
    """Greedy generation: pruned prefill, then per-layer-cache decoding.

    Decode positions follow SPEC §5: v2.0 (kept positions) gives the t-th generated token
    position N + t at every layer, the other methods each layer's cache length;
    `result.decode_positions` records them.

    Stops after `max_new_tokens` tokens or after emitting a token in `eos_token_ids` (which is
    included in the output, as transformers' generate does). `result.greedy_gaps` holds the
    top-1 minus top-2 logit of every emitted token; `result.kv_caches` is left as after the
    prefill.

    Returns:
      (generated token ids, the prefill's RefResult).
    """
    params = params or RefSparseParams()
    result = reference_prefill(model, input_ids, pixel_values, params, track_margins=track_margins)
    eos = set(int(t) for t in eos_token_ids)
    tokens: list[int] = []
    logits = result.logits[-1]
    caches = result.kv_caches
    for step in range(max_new_tokens):
        token, gap = _greedy(logits)
        tokens.append(token)
        result.greedy_gaps.append(gap)
        if token in eos or step == max_new_tokens - 1:
            break
        position = result.prompt_len + step if params.keeps_positions else None
        result.decode_positions.append(
            tuple(k.shape[2] if position is None else position for k, _ in caches)
        )
        logits, caches, _ = reference_decode_step(model, caches, token, position=position)
    return tokens, result
