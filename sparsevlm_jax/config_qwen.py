"""The Qwen2-VL / Qwen2.5-VL vision tower's config (kept apart from the tower so that
`sparsevlm_jax.config` can build it without importing any model code)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class QwenVisionConfig:
    """The vision tower of Qwen2-VL ("qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl").

    embed_dim is the tower's width (HF Qwen2-VL `embed_dim`, Qwen2.5-VL `hidden_size`),
    out_hidden_size the merger's output = the text model's width (HF Qwen2-VL `hidden_size`,
    Qwen2.5-VL `out_hidden_size`). Qwen2-VL: LayerNorm, fc1 -> act -> fc2; Qwen2.5-VL:
    RMSNorm, SwiGLU (gate, up, down, with biases), window attention in every block not in
    `fullatt_block_indexes`.
    """

    kind: str = "qwen2_vl"
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    intermediate_size: int = 5120
    out_hidden_size: int = 3584
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 0  # pixels; Qwen2.5-VL only
    fullatt_block_indexes: tuple[int, ...] = ()  # Qwen2.5-VL only
    tokens_per_second: float = 0.0  # Qwen2.5-VL's video time scale (read by the decoder)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown Qwen vision tower kind {self.kind!r} (one of {KINDS})")
        if self.embed_dim % self.num_heads or self.head_dim % 4:
            raise ValueError(
                f"embed_dim {self.embed_dim} / num_heads {self.num_heads} must be a head dim "
                "divisible by 4 (2-D rotary embedding)"
            )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def merge_unit(self) -> int:
        """Patches per output token (spatial_merge_size ** 2)."""
        return self.spatial_merge_size**2

    @property
    def patch_dim(self) -> int:
        """K: values per patch row, ordered (channel, time, row, column)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def windowed(self) -> bool:
        return self.kind == "qwen2_5_vl"

    @property
    def window_groups(self) -> int:
        """Side of an attention window in merge groups (Qwen2.5: 112 // 2 // 14 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    def full_attention_layers(self) -> np.ndarray:
        """[depth] bool: blocks that attend within whole frames (the others: windows)."""
        if not self.windowed:
            return np.ones(self.depth, bool)
        return np.isin(np.arange(self.depth), np.asarray(self.fullatt_block_indexes, int))

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], kind: str | None = None) -> QwenVisionConfig:
        """From transformers' `vision_config` dict (hub config.json or `to_dict()`).

        The kind is `kind` if given, else Qwen2.5-VL when the dict has Qwen2.5's keys
        (`out_hidden_size`, `fullatt_block_indexes`) or a `qwen2_5` model_type.
        """
        if kind is None:
            qwen25 = str(d.get("model_type", "")).startswith("qwen2_5") or any(
                k in d for k in ("out_hidden_size", "fullatt_block_indexes")
            )
            kind = "qwen2_5_vl" if qwen25 else "qwen2_vl"
        common = dict(
            kind=kind,
            depth=int(d.get("depth", 32)),
            num_heads=int(d.get("num_heads", 16)),
            in_channels=int(d.get("in_channels", d.get("in_chans", 3))),
            patch_size=_scalar(d.get("patch_size", 14)),
            temporal_patch_size=_scalar(d.get("temporal_patch_size", 2)),
            spatial_merge_size=int(d.get("spatial_merge_size", 2)),
            rope_theta=float((d.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        )
        if kind == "qwen2_vl":
            width = int(d.get("embed_dim", 1280))
            return cls(
                embed_dim=width,
                intermediate_size=int(width * d.get("mlp_ratio", 4)),
                out_hidden_size=int(d.get("hidden_size", 3584)),
                hidden_act=str(d.get("hidden_act", "quick_gelu")),
                **common,
            )
        return cls(
            embed_dim=int(d.get("hidden_size", 1280)),
            intermediate_size=int(d.get("intermediate_size", 3420)),
            out_hidden_size=int(d.get("out_hidden_size", 3584)),
            hidden_act=str(d.get("hidden_act", "silu")),
            window_size=int(d.get("window_size", 112)),
            fullatt_block_indexes=tuple(int(i) for i in d.get("fullatt_block_indexes", ())),
            tokens_per_second=float(d.get("tokens_per_second", 4)),
            **common,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QwenVisionConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _scalar(v: Any) -> int:
    """HF allows patch sizes as [t, h] lists; ours are one int."""
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise NotImplementedError(f"non-square patch sizes are not supported: {v}")
        v = v[0]
    return int(v)
