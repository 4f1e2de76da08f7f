"""SparseConfig: which visual-token pruning runs in the prefill, and the methods' presets.

The named budgets and pruning layers of SPEC §6 (LLaVA-1.5-7B), the rules that carry them to
other models (`preset_layers`, `scale_schedule`, `v2_num_heads`) and `named_sparse_config`,
which builds a preset's config. Plain frozen dataclasses of Python values, so a config can be
a static argument of `jax.jit`; the model configs are in `sparsevlm_jax.config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sparsevlm_jax.config import ConfigError

# SparseVLM v1 named budgets (SPEC §6): budget -> (scale, bias) of k = floor(rank*scale + bias).
V1_BUDGETS: dict[int, tuple[float, float]] = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
V1_LAYERS_32 = (2, 6, 15, 19)
# v1.5 / v2.0 (SparseVLM+) fixed schedules on LLaVA-1.5-7B (SPEC §6): kept per pruning layer.
V15_LAYERS_32 = (2, 6, 15)
V15_SCHEDULES: dict[int, tuple[int, ...]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
V20_SCHEDULES: dict[int, tuple[int, ...]] = {
    192: (300, 200, 118),
    128: (238, 108, 60),
    96: (246, 54, 28),
    64: (66, 34, 20),
}
# Static buffer shapes for v1 on LLaVA-1.5-7B when no calibration set is at hand (benchmarks
# with random weights): the v1.5 schedules of the same budget, the 4th layer keeping what the
# 3rd kept. Calibrate (`sparsevlm calibrate`, `sparsevlm_jax.calibrated`) for real workloads.
V1_STATIC_SHAPES_7B: dict[int, tuple[int, ...]] = {
    192: (300, 200, 110, 110),
    128: (303, 110, 36, 36),
    64: (66, 30, 17, 17),
}
# FastV (SPEC §7): keep round(V * (1 - R)) visual tokens after layer K. Named budgets are the
# R that keeps about that many of 576 tokens, pruning after layer K = 2.
FASTV_K = 2
FASTV_RATIOS: dict[int, float] = {192: 2 / 3, 128: 7 / 9, 64: 8 / 9}
# SparseVLM+ averages the top V2_HEADS heads (SPEC §6); models with fewer keep 14/32 of theirs.
V2_HEADS = 14
V2_HEAD_FRACTION = V2_HEADS / 32
REFERENCE_IMAGE_TOKENS = 576
METHODS = ("dense", "v1", "v1_5", "v2_0", "fastv", "random")
FIXED_SCHEDULE_METHODS = ("v1_5", "v2_0", "random")
RECYCLING_METHODS = ("v1", "v1_5")
# SparseVLM+ (v2.0) differs from v1.5 in four ingredients; each is a switch (`SparseConfig`'s
# `top_heads`, `gravity`, `original_positions`, `recycling`) on SparseVLM's own methods, None
# meaning the method's own choice: {switch: methods where it is on by default}.
INGREDIENTS: dict[str, tuple[str, ...]] = {
    "top_heads": ("v2_0",),
    "gravity": ("v2_0",),
    "original_positions": ("v2_0",),
    "recycling": RECYCLING_METHODS,
}
INGREDIENT_METHODS = ("v1", "v1_5", "v2_0")
CAPACITY_POLICIES = ("bucketed", "static", "exact")


@dataclass(frozen=True)
class SparseConfig:
    """Which visual-token pruning runs in the prefill, and with what static capacities.

    method: "dense" (no pruning); "v1" (SparseVLM's rank-adaptive method, SPEC §3); "v1_5" and
      "v2_0" (SparseVLM's fixed schedules; v2.0 = SparseVLM+ with gravity-corrected top-head
      scores, no recycling, original positions); "fastv" (the last prompt token's attention,
      SPEC §7); "random" (a seeded uniform subset, SPEC §7).
    layers: the pruning layers (0-based); the layer runs on the unpruned sequence, later
      layers see the pruned one.
    scale, bias: v1's budget `k = min(floor(rank*scale + bias), V-1)`.
    schedule: kept count per pruning layer for v1_5 / v2_0 (`min(schedule[i], V-1)`) and
      random (`min(schedule[i], V)`).
    fastv_ratio: FastV's R; keeps `round(V * (1 - R))`.
    v2_heads: heads averaged by v2.0; None = `v2_num_heads`'s rule (14, or round(14/32 *
      heads) on models with fewer than 14 heads).
    seed: the random method's seed.
    schedule_tokens: None, or the visual count `schedule` is written for: each example then
      runs `round(schedule[i] * V0 / schedule_tokens)` (SPEC §9.3, V0 its own visual count),
      for families whose visual count varies per example (LLaVA-NeXT).
    capacity: the capacity policy (DESIGN.md). "bucketed" (default): the prefill runs stage by
      stage, the host reads each pruning layer's budgets and the next stage runs with the
      batch's largest rounded up to a bucket (`sparsevlm_jax.prefill`): the decisions of
      "exact", compute following the budget. "static": `capacities[i]` visual slots after
      pruning layer i in one compiled program; a larger budget keeps the top-`capacities[i]`
      tokens and reports the difference as overflow. "exact": one program whose buffers hold
      every budget (saves nothing; for parity tests).
    recycled_capacities: static slots for recycled tokens per pruning layer; empty = the
      largest count that can occur.
    top_heads, gravity, original_positions, recycling: SparseVLM+'s four ingredients as
      switches on v1 / v1.5 / v2.0 (None: the method's own; v2.0 has the first three and not
      recycling, v1 and v1.5 only recycling). top_heads: average the `v2_heads` heads with the
      most rater-to-visual attention instead of all heads; gravity: divide attention by the
      RoPE bias first (SPEC §6); original_positions: kept tokens keep their position ids (a
      recycled token takes its centre's) and decoding continues the prompt's; recycling:
      SPEC §4.
    preset: the name of a setting that is not a method at a budget (`AUTHORS_VIDEO`).
    """

    method: str = "dense"
    layers: tuple[int, ...] = ()
    scale: float = 0.0
    bias: float = 0.0
    schedule: tuple[int, ...] = ()
    fastv_ratio: float = 0.5
    v2_heads: int | None = None
    seed: int = 0
    capacity: str = "bucketed"
    ladder_steps: int = 4
    capacities: tuple[int, ...] = ()
    recycled_capacities: tuple[int, ...] = ()
    budget_name: int | None = None
    schedule_tokens: int | None = None
    top_heads: bool | None = None
    gravity: bool | None = None
    original_positions: bool | None = None
    recycling: bool | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown sparse method {self.method!r}; known: {', '.join(METHODS)}")
        if self.capacity not in CAPACITY_POLICIES:
            raise ConfigError(
                f"unknown capacity policy {self.capacity!r}; known: {', '.join(CAPACITY_POLICIES)}"
            )
        if not 1 <= self.ladder_steps <= 64:
            raise ConfigError(f"ladder_steps must be in 1..64, got {self.ladder_steps}")
        if self.method not in INGREDIENT_METHODS:
            named = [k for k in INGREDIENTS if getattr(self, k) is not None]
            if named:
                raise ConfigError(
                    f"{', '.join(named)}: switches of SparseVLM's methods "
                    f"({', '.join(INGREDIENT_METHODS)}), not of {self.method}"
                )
        if self.method == "dense":
            return
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ConfigError(f"pruning layers must be increasing and distinct, got {self.layers}")
        if self.layers[0] < 0:
            raise ConfigError(f"pruning layers must be >= 0, got {self.layers}")
        if self.method in FIXED_SCHEDULE_METHODS and len(self.schedule) != len(self.layers):
            raise ConfigError(
                f"method {self.method} needs one schedule entry per pruning layer "
                f"({len(self.layers)}), got {self.schedule}"
            )
        if self.schedule_tokens is not None and self.schedule_tokens < 1:
            raise ConfigError(f"schedule_tokens must be >= 1, got {self.schedule_tokens}")
        if any(k < 0 for k in self.schedule):
            raise ConfigError(f"schedule entries must be >= 0, got {self.schedule}")
        if self.v2_heads is not None and self.v2_heads < 1:
            raise ConfigError(f"v2_heads must be >= 1, got {self.v2_heads}")
        if self.method == "fastv" and not 0.0 <= self.fastv_ratio <= 1.0:
            raise ConfigError(f"fastv_ratio must be in [0, 1], got {self.fastv_ratio}")
        if self.capacity == "static" and len(self.capacities) != len(self.layers):
            raise ConfigError(
                f"static capacity needs one capacity per pruning layer ({len(self.layers)}), "
                f"got {self.capacities}"
            )
        if self.recycled_capacities and len(self.recycled_capacities) != len(self.layers):
            raise ConfigError("recycled_capacities needs one entry per pruning layer")

    @property
    def enabled(self) -> bool:
        return self.method != "dense"

    def uses(self, ingredient: str) -> bool:
        """Whether one of `INGREDIENTS` is on: its switch, else the method's default."""
        switch = getattr(self, ingredient)
        return self.method in INGREDIENTS[ingredient] if switch is None else switch

    @property
    def recycles(self) -> bool:
        return self.uses("recycling")

    @property
    def keeps_positions(self) -> bool:
        """Kept tokens keep their original position ids (v2.0's default); else renumbered."""
        return self.uses("original_positions")

    @property
    def ingredients(self) -> dict[str, bool]:
        """{ingredient: on} for SparseVLM's methods (what the statistics record), else {}."""
        if self.method not in INGREDIENT_METHODS:
            return {}
        return {k: self.uses(k) for k in INGREDIENTS}

    @property
    def switched(self) -> dict[str, bool]:
        """The ingredients switched away from the method's own choice: {ingredient: on}."""
        return {
            k: on
            for k, on in self.ingredients.items()
            if getattr(self, k) is not None and on != (self.method in INGREDIENTS[k])
        }

    @property
    def name(self) -> str:
        """e.g. "v1@192", "fastv@64", "dense"; switched ingredients follow as "+gravity" (on)
        or "-recycling" (off), e.g. "v2_0@64-top_heads"."""
        if not self.enabled:
            return "dense"
        name = f"{self.method}@{self.budget_name}" if self.budget_name else self.method
        if self.preset:
            name = self.preset
        return name + "".join(("+" if on else "-") + k for k, on in self.switched.items())

    def replace(self, **kw: Any) -> SparseConfig:
        return dataclasses.replace(self, **kw)

    def validate_for(self, num_layers: int) -> None:
        if self.enabled and self.layers[-1] >= num_layers - 1:
            raise ConfigError(
                f"pruning layers {self.layers} must be below the last decoder layer "
                f"({num_layers - 1})"
            )

    def with_static_shape(self, capacities: tuple[int, ...], num_image_tokens: int = 576):
        """`static` capacities, with recycled slots sized for budgets equal to the capacities.

        With k = C at every pruning layer the recycled counts are determined:
        V_in - C pruned, (3(V_in - C))//10 + 1 candidates, candidates//10 + 1 clusters. A
        smaller budget then prunes more and can need more recycled slots: those extra
        clusters are dropped and counted as `recycled_overflow`. Methods that do not recycle
        get one (never used) recycled slot.
        """
        recycled, vis = [], num_image_tokens
        for cap in capacities:
            pruned = max(vis - cap, 0)
            rec = (((3 * pruned) // 10 + 1) // 10 + 1) if pruned and self.recycles else 0
            recycled.append(max(rec, 1))
            vis = min(cap, vis) + rec
        return self.replace(
            capacity="static", capacities=tuple(capacities), recycled_capacities=tuple(recycled)
        )

    @classmethod
    def v1(
        cls,
        budget: int = 192,
        num_layers: int = 32,
        layers: tuple[int, ...] | None = None,
        capacity: str = "bucketed",
        capacities: tuple[int, ...] = (),
    ) -> SparseConfig:
        """SparseVLM v1 at a named budget (192, 128 or 64) of SPEC §6.

        `layers` default to the authors' 2, 6, 15, 19 (`preset_layers`: scaled only on models
        too shallow for them).
        """
        if budget not in V1_BUDGETS:
            raise ConfigError(
                f"no v1 budget named {budget}; named budgets: {sorted(V1_BUDGETS, reverse=True)}"
            )
        scale, bias = V1_BUDGETS[budget]
        return cls(
            method="v1",
            layers=layers if layers is not None else preset_layers(V1_LAYERS_32, num_layers),
            scale=scale,
            bias=bias,
            capacity=capacity,
            capacities=capacities,
            budget_name=budget,
        )


def preset_layers(layers: tuple[int, ...], num_layers: int, reference: int = 32) -> tuple[int, ...]:
    """The pruning layers of a preset on a model of `num_layers` decoder layers (SPEC §6).

    The authors use the same layers for every LLaVA, whatever its depth (LLaVA-1.5-13B's 40
    layers included), so `layers` are returned unchanged whenever the model has a layer after
    the last of them (`num_layers > layers[-1] + 1`). Only a model too shallow for them gets
    layer l moved to round(l * num_layers / reference) (Python's round: halves to even),
    pushed up to stay distinct and increasing; the result must stay below the last layer.

    Raises:
        ConfigError: the model is too shallow even for the scaled layers.
    """
    if not layers or num_layers > layers[-1] + 1:
        return tuple(layers)
    out: list[int] = []
    for layer in layers:
        v = max(round(layer * num_layers / reference), out[-1] + 1 if out else 0)
        out.append(v)
    if out[-1] >= num_layers - 1:
        raise ConfigError(f"a {num_layers}-layer model is too shallow for pruning at {layers}")
    return tuple(out)


def v2_num_heads(num_heads: int, override: int | None = None) -> int:
    """How many heads SparseVLM+ (v2.0) averages on a model with `num_heads` heads (SPEC §6).

    The authors keep exactly `V2_HEADS` = 14 heads whatever the model (14 of LLaVA-13B's 40);
    a model with fewer heads keeps round(14/32 * num_heads), at least 1. `override` (the
    config's `v2_heads`) wins when given.

    Raises:
        ConfigError: `override` is not in [1, num_heads].
    """
    if override is not None:
        if not 1 <= override <= num_heads:
            raise ConfigError(f"v2_heads must be in [1, {num_heads}], got {override}")
        return override
    if num_heads >= V2_HEADS:
        return V2_HEADS
    return max(1, round(V2_HEAD_FRACTION * num_heads))


def scale_schedule(schedule: tuple[int, ...], num_image_tokens: int) -> tuple[int, ...]:
    """A 576-token schedule as the same fractions of `num_image_tokens` (rounded, >= 1)."""
    if num_image_tokens == REFERENCE_IMAGE_TOKENS:
        return schedule
    return tuple(max(1, round(k * num_image_tokens / REFERENCE_IMAGE_TOKENS)) for k in schedule)


NAMED_BUDGETS: dict[str, tuple[int, ...]] = {
    "v1": tuple(sorted(V1_BUDGETS, reverse=True)),
    "v1_5": tuple(sorted(V15_SCHEDULES, reverse=True)),
    "v2_0": tuple(sorted(V20_SCHEDULES, reverse=True)),
    "fastv": tuple(sorted(FASTV_RATIOS, reverse=True)),
    "random": tuple(sorted(V15_SCHEDULES, reverse=True)),
}


def named_presets() -> list[tuple[str, int]]:
    """Every (method, named budget) pair this version implements, for benchmarks and CLIs."""
    return [(m, b) for m, budgets in NAMED_BUDGETS.items() for b in budgets]


def named_sparse_config(
    method: str,
    budget: int | None,
    num_layers: int = 32,
    num_image_tokens: int = REFERENCE_IMAGE_TOKENS,
    variable_visual: bool = False,
    **kw: Any,
) -> SparseConfig:
    """The SparseConfig of a named preset (`("dense", None)` gives no pruning).

    `variable_visual`: for families whose visual count varies per example (LLaVA-NeXT): the
    schedules stay written for 576 tokens and scale per example (`schedule_tokens`, SPEC
    §9.3), and every method runs the `bucketed` policy unless `kw` names a capacity.

    Pruning layers are the authors' whatever the depth, scaled only on models too shallow for
    them (`preset_layers`, SPEC §6); models with other than 576 visual tokens get schedules
    scaled to the same fractions (`scale_schedule`). Fixed-schedule methods (v1.5, v2.0,
    random) and FastV get static capacities equal to what they keep (identical decisions, no
    waste); v1 is rank-adaptive and runs `bucketed` unless capacities are given (`kw`).

    random@B keeps, at v1.5@B's layers, as many tokens as v1.5@B has visual tokens after each
    layer (kept + recycled), so the two are compared at equal visual counts.
    """
    if method == "dense":
        return SparseConfig()
    if variable_visual:
        return _variable_visual_config(method, budget, num_layers, **kw)
    known = NAMED_BUDGETS.get(method)
    if known is None:
        raise ConfigError(f"unknown sparse method {method!r}; known: {', '.join(METHODS)}")
    if budget not in known:
        raise ConfigError(f"no {method} budget named {budget}; named budgets: {list(known)}")
    if method == "v1":
        return SparseConfig.v1(budget, num_layers=num_layers, **kw)
    if method == "fastv":
        ratio = FASTV_RATIOS[budget]
        cfg = SparseConfig(
            method="fastv",
            layers=(max(preset_layers((FASTV_K,), num_layers)[0] - 1, 0),),
            fastv_ratio=ratio,
            budget_name=budget,
            **kw,
        )
        kept = round(num_image_tokens * (1 - ratio))
        return cfg if "capacity" in kw else cfg.with_static_shape((kept,), num_image_tokens)
    table = V20_SCHEDULES if method == "v2_0" else V15_SCHEDULES
    schedule = scale_schedule(table[budget], num_image_tokens)
    layers = preset_layers(V15_LAYERS_32, num_layers)
    if method == "random":
        v15 = SparseConfig(method="v1_5", layers=layers, schedule=schedule)
        schedule = _visual_counts_after(v15.with_static_shape(schedule, num_image_tokens))
    cfg = SparseConfig(method=method, layers=layers, schedule=schedule, budget_name=budget, **kw)
    return cfg if "capacity" in kw else cfg.with_static_shape(schedule, num_image_tokens)


# LLaVA-NeXT's community budgets ("640 / 320 / 160 of 2880", SPEC §9.3) as budgets of 576.
NEXT_BUDGETS: dict[int, int] = {640: 128, 320: 64, 160: 32}
# Where the authors have no schedule (32 of 576), fixed schedules run the 64 one at half.
HALF_OF_64 = 32


def variable_visual_budgets(method: str) -> tuple[int, ...]:
    """Named budgets of `method` on families with per-example visual counts: its 576-token
    budgets (as fractions) plus the LLaVA-NeXT community's 640 / 320 / 160 of 2880."""
    extra = [b for b, b576 in NEXT_BUDGETS.items() if b576 in NAMED_BUDGETS[method]]
    if method != "v1":  # v1's budgets are rank rules: there is none for 32 of 576
        extra = list(NEXT_BUDGETS)
    return (*NAMED_BUDGETS[method], *extra)


def _variable_visual_config(method: str, budget: int | None, num_layers: int, **kw: Any):
    """`named_sparse_config` for per-example visual counts (SPEC §9.3): schedules written
    for 576 tokens scale with each example's count; 640 / 320 / 160 (of 2880) name 128 / 64
    / 32 (of 576); 32 runs the 64 schedule at half (schedule_tokens 1152)."""
    known = NAMED_BUDGETS.get(method)
    if known is None:
        raise ConfigError(f"unknown sparse method {method!r}; known: {', '.join(METHODS)}")
    if budget not in variable_visual_budgets(method):
        named = list(variable_visual_budgets(method))
        raise ConfigError(f"no {method} budget named {budget}; named budgets: {named}")
    kw.setdefault("capacity", "bucketed")
    ref = REFERENCE_IMAGE_TOKENS
    b576 = NEXT_BUDGETS.get(budget, budget)
    half = b576 == HALF_OF_64
    tokens = 2 * ref if half else ref
    cfg = named_sparse_config(method, 64 if half else b576, num_layers, ref, **kw)
    if method == "fastv" and half:
        cfg = cfg.replace(fastv_ratio=1 - b576 / ref)
    if method in FIXED_SCHEDULE_METHODS:
        if method == "random":  # v1.5's counts after each layer at 576 tokens, scaled alike
            v15 = named_sparse_config("v1_5", 64 if half else b576, num_layers, ref)
            cfg = cfg.replace(schedule=_visual_counts_after(v15))
        cfg = cfg.replace(schedule_tokens=tokens)
    return cfg.replace(budget_name=budget)


def _visual_counts_after(cfg: SparseConfig) -> tuple[int, ...]:
    """Visual tokens after each pruning layer of a static fixed-schedule config (k + c)."""
    return tuple(k + c for k, c in zip(cfg.capacities, cfg.recycled_capacities, strict=True))


# The authors' video setting (their `video` branch on Video-LLaVA, SPEC §9.6): one pruning
# layer, layer 1; k = min(rank, V - 1) (v1's rule with scale 1, bias 0); recycling as v1;
# positions renumbered; all frames one visual region.
AUTHORS_VIDEO = "video"


def authors_video_config(**kw: Any) -> SparseConfig:
    """SPEC §9.6's preset as a SparseConfig (named "video"); `kw` e.g. a capacity policy."""
    return SparseConfig(method="v1", layers=(1,), scale=1.0, bias=0.0, preset=AUTHORS_VIDEO, **kw)
