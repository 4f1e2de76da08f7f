"""Frozen, hashable configs for the LLaVA model parts.

Every config is a frozen dataclass of plain Python values (tuples, not lists), so it can be a
static argument of `jax.jit`. HuggingFace / transformers field names appear only in the
`from_hf` constructors; `to_dict` / `from_dict` are our own saved format (config.json beside
an orbax checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config that cannot be built or is not supported."""


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower (HF `CLIPVisionConfig`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VisionConfig:
        return cls(
            hidden_size=d.get("hidden_size", 768),
            intermediate_size=d.get("intermediate_size", 3072),
            num_hidden_layers=d.get("num_hidden_layers", 12),
            num_attention_heads=d.get("num_attention_heads", 12),
            image_size=d.get("image_size", 224),
            patch_size=d.get("patch_size", 32),
            num_channels=d.get("num_channels", 3),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
            hidden_act=d.get("hidden_act", "quick_gelu"),
        )


@dataclass(frozen=True)
class TextConfig:
    """Llama decoder (HF `LlamaConfig`).

    `rope_scaling` is a sorted tuple of (key, value) pairs of HF's `rope_scaling` /
    `rope_parameters` minus `rope_theta`, e.g. `(("factor", 8.0), ("rope_type", "llama3"), ...)`;
    `()` means the default (unscaled) RoPE.
    """

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> TextConfig:
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported Llama hidden_act {d['hidden_act']!r} (only silu)")
        heads = d.get("num_attention_heads", 32)
        hidden = d.get("hidden_size", 4096)
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        eos = d.get("eos_token_id", 2)
        return cls(
            vocab_size=d.get("vocab_size", 32000),
            hidden_size=hidden,
            intermediate_size=d.get("intermediate_size", 11008),
            num_hidden_layers=d.get("num_hidden_layers", 32),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=_freeze(rope),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            attention_bias=d.get("attention_bias", False),
            mlp_bias=d.get("mlp_bias", False),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
        )


@dataclass(frozen=True)
class LlavaConfig:
    """The whole LLaVA model: vision tower, projector, decoder, and how images are spliced.

    `image_token_index`: the id that marks the image in the token sequence (llava-hf: 32000,
    expanded to `num_patches` copies; original LLaVA: -200, a single placeholder).
    `param_dtype` is the dtype weights are stored in, `dtype` the compute dtype.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 32000
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Unrolls the layer scans (XLA's cost analysis counts a scan body once, so FLOP counting
    # needs the unrolled program); numerics are identical.
    unroll_layers: bool = False

    def __post_init__(self) -> None:
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(
                "vision_feature_select_strategy must be 'default' or 'full', "
                f"got {self.vision_feature_select_strategy!r}"
            )
        if self.projector_hidden_act != "gelu":
            raise ConfigError(f"unsupported projector_hidden_act {self.projector_hidden_act!r}")

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image fed to the decoder (576 for LLaVA-1.5)."""
        extra = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.num_patches + extra

    @property
    def vision_layers_used(self) -> int:
        """How many CLIP encoder layers run: the selected hidden state needs no more."""
        n = self.vision.num_hidden_layers
        layer = self.vision_feature_layer
        # hidden_states[0] is the embedding output, hidden_states[i] the i-th layer's output.
        return layer % (n + 1)

    def replace(self, **kw: Any) -> LlavaConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides: Any) -> LlavaConfig:
        """From a transformers `LlavaConfig.to_dict()` / llava-hf `config.json`."""
        layer = d.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ConfigError(f"vision_feature_layer must be one int, got {layer!r}")
        kw: dict[str, Any] = dict(
            vision=VisionConfig.from_hf(d.get("vision_config") or {}),
            text=TextConfig.from_hf(d.get("text_config") or {}),
            image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
            vision_feature_layer=layer,
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_bias=d.get("multimodal_projector_bias", True),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["text"]["rope_scaling"] = dict(self.text.rope_scaling)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaConfig:
        d = dict(d)
        text = dict(d.pop("text"))
        text["rope_scaling"] = _freeze(text.get("rope_scaling") or {})
        if isinstance(text.get("eos_token_id"), list):
            text["eos_token_id"] = tuple(text["eos_token_id"])
        return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**text), **d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> LlavaConfig:
        return cls.from_dict(json.loads(s))


def _freeze(d: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


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
# 3rd kept. Calibrate (`sparsevlm_jax.sparse.calibrate`) for real workloads.
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
    capacity: "exact" (the kept buffer can hold every budget: identical decisions to the
      reference, no compute saved beyond the valid-slot count) or "static" (`capacities[i]`
      visual slots after pruning layer i; a larger budget keeps the top-`capacities[i]` tokens
      and reports the difference as overflow).
    recycled_capacities: static slots for recycled tokens per pruning layer; empty = the
      largest count that can occur.
    """

    method: str = "dense"
    layers: tuple[int, ...] = ()
    scale: float = 0.0
    bias: float = 0.0
    schedule: tuple[int, ...] = ()
    fastv_ratio: float = 0.5
    v2_heads: int | None = None
    seed: int = 0
    capacity: str = "exact"
    capacities: tuple[int, ...] = ()
    recycled_capacities: tuple[int, ...] = ()
    budget_name: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown sparse method {self.method!r}; known: {', '.join(METHODS)}")
        if self.capacity not in CAPACITY_POLICIES:
            raise ConfigError(
                f"unknown capacity policy {self.capacity!r}; known: {', '.join(CAPACITY_POLICIES)}"
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

    @property
    def recycles(self) -> bool:
        return self.method in RECYCLING_METHODS

    @property
    def keeps_positions(self) -> bool:
        """v2.0 keeps the kept tokens' original position ids; the others renumber."""
        return self.method == "v2_0"

    @property
    def name(self) -> str:
        """e.g. "v1@192", "fastv@64", "dense"."""
        if not self.enabled:
            return "dense"
        return f"{self.method}@{self.budget_name}" if self.budget_name else self.method

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
        capacity: str = "exact",
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


# The name callers used while the rule scaled every depth; same function.
scale_layers = preset_layers


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
    **kw: Any,
) -> SparseConfig:
    """The SparseConfig of a named preset (`("dense", None)` gives no pruning).

    Pruning layers are the authors' whatever the depth, scaled only on models too shallow for
    them (`preset_layers`, SPEC §6); models with other than 576 visual tokens get schedules
    scaled to the same fractions (`scale_schedule`). Fixed-schedule methods (v1.5, v2.0,
    random) and FastV get static capacities equal to what they keep (identical decisions, no
    waste); v1 is rank-adaptive and runs `exact` unless capacities are given (`kw`).

    random@B keeps, at v1.5@B's layers, as many tokens as v1.5@B has visual tokens after each
    layer (kept + recycled), so the two are compared at equal visual counts.
    """
    if method == "dense":
        return SparseConfig()
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


def _visual_counts_after(cfg: SparseConfig) -> tuple[int, ...]:
    """Visual tokens after each pruning layer of a static fixed-schedule config (k + c)."""
    return tuple(k + c for k, c in zip(cfg.capacities, cfg.recycled_capacities, strict=True))
