"""Frozen, hashable configs for the LLaVA model parts.

Every config is a frozen dataclass of plain Python values (tuples, not lists), so it can be a
static argument of `jax.jit`. HuggingFace / transformers field names appear only in the
`from_hf` constructors; `to_dict` / `from_dict` are our own saved format (config.json beside
an orbax checkpoint). The pruning methods' configs are in `sparsevlm_jax.sparse.config`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from sparsevlm_jax.config_qwen import QwenVisionConfig

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
    `mrope_section`: M-RoPE's split of the H/2 rotary frequencies between the (t, h, w) position
    streams (Qwen2-VL: (16, 24, 24)); `()` = one-dimensional RoPE. `attention_bias`: biases on
    q/k/v/o; `attention_out_bias` None follows it, False drops the o bias alone (Qwen2: q/k/v
    biases only).
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
    # Mistral's sliding attention window (None: full attention). Prompts are refused when they
    # would exceed it (`check_window`), so a window never changes a result silently.
    sliding_window: int | None = None
    mrope_section: tuple[int, ...] = ()
    attention_out_bias: bool | None = None

    def __post_init__(self) -> None:
        if self.mrope_section and 2 * sum(self.mrope_section) != self.head_dim:
            raise ConfigError(
                f"mrope_section {list(self.mrope_section)} sums to {sum(self.mrope_section)}, "
                f"not half the head dimension ({self.head_dim // 2})"
            )

    @property
    def o_bias(self) -> bool:
        """Whether o_proj has a bias."""
        if self.attention_out_bias is None:
            return self.attention_bias
        return self.attention_out_bias

    def check_window(self, length: int, what: str = "the prompt") -> None:
        """Raises ConfigError when `length` tokens exceed the sliding window."""
        if self.sliding_window is not None and length > self.sliding_window:
            raise ConfigError(
                f"{what} has {length} tokens, more than the decoder's sliding window "
                f"({self.sliding_window}); windowed attention is not implemented"
            )

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
        mrope = rope.pop("mrope_section", None)  # kept apart: "default" drops the rest
        if str(d.get("model_type", "")).startswith("qwen2") and "_vl" in str(d.get("model_type")):
            mrope = mrope or [16, 24, 24]  # transformers' default for the VL decoders
        if rope.get("rope_type", rope.get("type", "default")) in ("default", "mrope"):
            rope = {}
        eos = d.get("eos_token_id", 2)
        qwen2 = str(d.get("model_type", "")).startswith("qwen2")
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
            attention_bias=d.get("attention_bias", qwen2),
            attention_out_bias=False if qwen2 else None,
            mlp_bias=d.get("mlp_bias", False),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
            sliding_window=d.get("sliding_window") if d.get("use_sliding_window", True) else None,
            mrope_section=tuple(int(x) for x in mrope) if mrope else (),
        )


FAMILIES = ("llava", "llava_next", "llava_next_video", "video_llava", "qwen2_vl", "qwen2_5_vl")
ANYRES_FAMILIES = ("llava_next", "llava_next_video")
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")  # dynamic resolution, M-RoPE, their own tower
VIDEO_FAMILIES = ("llava_next_video", "video_llava", *QWEN_FAMILIES)
POOL_MODES = ("average", "max")


@dataclass(frozen=True)
class LlavaConfig:
    """The whole LLaVA model: vision tower, projector, decoder, and how images are spliced.

    `family`: "llava" (LLaVA-1.5: one tile, `num_image_tokens` visual tokens) or "llava_next"
    (LLaVA-1.6 "anyres": a base tile plus a grid of tiles chosen among
    `image_grid_pinpoints` ((height, width) pairs), unpadded and packed with one learned
    `image_newline` token per row; the visual count varies with the aspect ratio), or
    "llava_next_video" (LLaVA-NeXT-Video: images as LLaVA-NeXT; a video's frames each through
    the tower, its patch grid pooled `spatial_pool_stride` x `spatial_pool_stride`
    (`spatial_pool_mode`), marked by `video_token_index`), or "video_llava" (Video-LLaVA: two
    CLIP towers of the same shape, `image_tower` for images (one tile, CLS dropped under the
    "default" strategy: `num_image_tokens`) and `video_tower` for a video's frames (CLS always
    kept: `video_tokens_per_frame` = patches + 1), one projector; no anyres), or "qwen2_vl" /
    "qwen2_5_vl" (Qwen2-VL / Qwen2.5-VL: any resolution through their own tower,
    `qwen_vision` (a `config_qwen.QwenVisionConfig`; `vision` is then unused), one token
    per 28x28 pixels, M-RoPE positions (`text.mrope_section`), `<|vision_start|>` /
    `<|vision_end|>` markers around each item (text), `tokens_per_second` for Qwen2.5's
    video time axis).
    `image_token_index`: the id that marks the image in the token sequence (llava-hf: 32000,
    expanded to the image's visual-token count; original LLaVA: -200, a single placeholder).
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
    family: str = "llava"
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    video_token_index: int | None = None
    spatial_pool_stride: int = 2
    spatial_pool_mode: str = "average"
    qwen_vision: Any = None
    vision_start_token_id: int | None = None
    tokens_per_second: float | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown model family {self.family!r}; known: {FAMILIES}")
        if self.qwen and (self.qwen_vision is None or not self.text.mrope_section):
            raise ConfigError(f"a {self.family} config needs its vision config and mrope_section")
        if self.takes_video:
            if self.video_token_index is None:
                raise ConfigError(f"a {self.family} config needs video_token_index")
            if self.video_token_index == self.image_token_index or self.image_token_index < 0:
                raise ConfigError(
                    f"a {self.family} config needs distinct non-negative image and video token "
                    f"ids, got image_token_index {self.image_token_index} and "
                    f"video_token_index {self.video_token_index}"
                )
        if self.family == "llava_next_video":
            if self.spatial_pool_mode not in POOL_MODES:
                raise ConfigError(
                    f"spatial_pool_mode {self.spatial_pool_mode!r} is not supported "
                    f"(supported: {', '.join(POOL_MODES)})"
                )
            grid = self.vision.image_size // self.vision.patch_size
            if self.spatial_pool_stride < 1 or grid % self.spatial_pool_stride:
                raise ConfigError(
                    f"spatial_pool_stride {self.spatial_pool_stride} does not divide the "
                    f"{grid}x{grid} patch grid"
                )
        if self.anyres:
            if not self.image_grid_pinpoints:
                raise ConfigError("a llava_next config needs image_grid_pinpoints")
            tile = self.vision.image_size
            for hw in self.image_grid_pinpoints:
                if len(hw) != 2 or any(int(x) < tile or int(x) % tile for x in hw):
                    raise ConfigError(
                        f"image_grid_pinpoints entry {list(hw)} is not a pair of positive "
                        f"multiples of the tile size {tile}"
                    )
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
    def anyres(self) -> bool:
        """Images in LLaVA-NeXT's anyres layout (variable visual counts per example)."""
        return self.family in ANYRES_FAMILIES

    @property
    def takes_video(self) -> bool:
        return self.family in VIDEO_FAMILIES

    @property
    def qwen(self) -> bool:
        """Qwen2-VL / Qwen2.5-VL: their own tower, dynamic resolution, M-RoPE positions."""
        return self.family in QWEN_FAMILIES

    @property
    def variable_visual(self) -> bool:
        """Visual counts vary per example (anyres images, videos, an image and / or a video in
        one prompt): batches carry a host-built `Batch.visual_index` into a per-example
        feature table (`model.llava.VISUAL_TOKENS`)."""
        return self.anyres or self.takes_video or self.qwen

    @property
    def separate_video_tower(self) -> bool:
        """Frames run through a tower of their own (`params["video_vision"]`: Video-LLaVA)."""
        return self.family == "video_llava"

    @property
    def video_tokens_per_frame(self) -> int:
        """Visual tokens of one video frame: the pooled patch grid (144 on LLaVA-NeXT-Video),
        or the video tower's patches plus its class token (257 on Video-LLaVA)."""
        if self.family == "video_llava":
            return self.vision.num_patches + 1
        grid = self.vision.image_size // self.vision.patch_size // self.spatial_pool_stride
        return grid * grid

    @property
    def max_tiles(self) -> int:
        """Tower inputs per image: 1 (LLaVA-1.5), or the base tile + the largest grid (NeXT)."""
        if not self.anyres:
            return 1
        tile = self.vision.image_size
        return 1 + max((h // tile) * (w // tile) for h, w in self.image_grid_pinpoints)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image tile fed to the decoder (576 for LLaVA-1.5; on LLaVA-NeXT
        the base tile's count, the reference count of the named budgets)."""
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
        model_type = d.get("model_type")
        family = model_type if model_type in FAMILIES else "llava"
        if family in QWEN_FAMILIES:
            return cls._from_hf_qwen(d, family, overrides)
        pinpoints = d.get("image_grid_pinpoints") or ()
        kw: dict[str, Any] = dict(
            family=family,
            image_grid_pinpoints=tuple(tuple(int(x) for x in p) for p in pinpoints)
            if family in ANYRES_FAMILIES
            else (),
            vision=VisionConfig.from_hf(d.get("vision_config") or {}),
            text=TextConfig.from_hf(d.get("text_config") or {}),
            image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
            vision_feature_layer=layer,
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_bias=d.get("multimodal_projector_bias", True),
        )
        if family == "llava_next_video":
            kw.update(
                video_token_index=d.get("video_token_index", d.get("video_token_id")),
                spatial_pool_stride=int(d.get("spatial_pool_stride", 2)),
                spatial_pool_mode=d.get("spatial_pool_mode", "average"),
            )
        elif family == "video_llava":
            kw.update(video_token_index=d.get("video_token_index", d.get("video_token_id", 32001)))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def _from_hf_qwen(cls, d: dict[str, Any], family: str, overrides: dict) -> LlavaConfig:
        """Qwen2-VL / Qwen2.5-VL: transformers 5 nests the decoder in `text_config`; the hub's
        config.json keeps it at the top level."""
        text = dict(d.get("text_config") or d)
        text.setdefault("model_type", family)
        text.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", False))
        vision = dict(d.get("vision_config") or {})
        kw: dict[str, Any] = dict(
            family=family,
            text=TextConfig.from_hf(text),
            qwen_vision=QwenVisionConfig.from_hf({"model_type": family, **vision}),
            image_token_index=d.get("image_token_id", 151655),
            video_token_index=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            tokens_per_second=(vision.get("tokens_per_second", 2)
                               if family == "qwen2_5_vl" else None),
        )  # fmt: skip
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["text"]["rope_scaling"] = dict(self.text.rope_scaling)
        d["qwen_vision"] = None if self.qwen_vision is None else self.qwen_vision.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaConfig:
        d = dict(d)
        text = dict(d.pop("text"))
        text["rope_scaling"] = _freeze(text.get("rope_scaling") or {})
        d["image_grid_pinpoints"] = tuple(tuple(p) for p in d.get("image_grid_pinpoints", ()))
        if isinstance(text.get("eos_token_id"), list):
            text["eos_token_id"] = tuple(text["eos_token_id"])
        text["mrope_section"] = tuple(text.get("mrope_section") or ())
        if d.get("qwen_vision") is not None:
            d["qwen_vision"] = QwenVisionConfig.from_dict(d["qwen_vision"])
        return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**text), **d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> LlavaConfig:
        return cls.from_dict(json.loads(s))


def _freeze(d: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))
