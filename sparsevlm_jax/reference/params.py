"""What the reference runs and what it returns: `RefSparseParams` (a method and its numbers,
with the named presets of SPEC §6-§7), `RefPruneRecord` (one pruning layer's decisions) and
`RefResult` (a whole prefill). Plain dataclasses; torch appears in type hints only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


METHODS = ("dense", "v1", "v1_5", "v2_0", "fastv", "random")
RECYCLING_METHODS = ("v1", "v1_5")
KEEP_POSITION_METHODS = ("v2_0",)
# SparseVLM+'s ingredients as switches on v1 / v1.5 / v2.0: {switch: methods where it is on}.
SWITCH_DEFAULTS: dict[str, tuple[str, ...]] = {
    "top_heads": ("v2_0",),
    "gravity": ("v2_0",),
    "original_positions": KEEP_POSITION_METHODS,
    "recycling": RECYCLING_METHODS,
}

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
      top_heads, gravity, original_positions, recycling: SparseVLM+'s ingredients switched
        on or off on v1 / v1.5 / v2.0 (None: the method's own, `SWITCH_DEFAULTS`). A recycled
        token under original positions takes its centre's position id.
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
    schedule_tokens: int | None = None
    top_heads: bool | None = None
    gravity: bool | None = None
    original_positions: bool | None = None
    recycling: bool | None = None

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

    def switched(self, name: str) -> bool:
        """Whether an ingredient of `SWITCH_DEFAULTS` is on for this run."""
        value = getattr(self, name)
        return self.method in SWITCH_DEFAULTS[name] if value is None else bool(value)

    @property
    def recycles(self) -> bool:
        return self.switched("recycling")

    @property
    def keeps_positions(self) -> bool:
        return self.switched("original_positions")

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
      positions: int64 [N'] (or [N', 3] (t, h, w) on M-RoPE models), position ids of the
        final sequence at the last layer.
      kv_caches: per layer (k, v), each [1, num_kv_heads, len_l, head_dim] (keys after RoPE);
        len_l differs between layers.
      margins: smallest relative margin per decision kind over the whole prefill.
      min_margin: min of `margins` (inf when no decision was made).
      layer_inputs: only with `keep_layer_inputs=True`: per layer (hidden [1, n_l, D],
        positions [n_l]) that the layer ran on.
      greedy_gaps: filled by `reference_generate`: top-1 minus top-2 logit at every step.
      decode_positions: filled by `reference_generate`: per decoded token fed back, its
        position at every layer (SPEC §5).
      next_position: one past the largest position of the original prompt (SPEC §9.5).
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
    next_position: int = -1  # one past the original prompt's largest position (N on 1-D)

    @property
    def prompt_len(self) -> int:
        """N, the original (unpruned) prompt length."""
        return self.prefix_len + self.num_image_tokens + self.num_text_tokens
