"""`sparsevlm info` and `convert`'s summary for Qwen2-VL / Qwen2.5-VL: the family, its tower,
its decoder's M-RoPE sections, and the visual-token counts its resize rule gives (one token per
28x28 pixels within the checkpoint's pixel bounds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsevlm_jax.config import LlavaConfig

# Image sizes (height, width) whose counts `info` prints, and the video clips.
COMMON_SIZES: tuple[tuple[int, int], ...] = ((448, 448), (672, 672), (720, 1280), (1080, 1920))
COMMON_CLIPS: tuple[tuple[int, int, int], ...] = ((8, 448, 448), (32, 448, 448))
NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}


def settings(path: Path, cfg: LlavaConfig) -> Any:
    """The checkpoint's image processor settings (`preprocessor_config.json`, defaults else)."""
    from sparsevlm_jax.qwen_images import QwenPreprocess

    def read(name: str) -> dict:
        f = path / name
        try:
            return json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, ValueError):
            return {}

    return QwenPreprocess.from_hf(
        read("preprocessor_config.json"), read("video_preprocessor_config.json") or None
    )


def tokens(cfg: LlavaConfig, s: Any, h: int, w: int, frames: int = 1) -> int:
    """Merged visual tokens of an image (frames = 1) or a clip of h x w frames."""
    from sparsevlm_jax.qwen_images import smart_resize

    v = cfg.qwen_vision
    factor = v.patch_size * v.spatial_merge_size
    lo, hi = (s.min_pixels, s.max_pixels) if frames == 1 else (s.video_min_pixels,
                                                                s.video_max_pixels)  # fmt: skip
    rh, rw = smart_resize(h, w, factor, lo, hi)
    pairs = -(-frames // v.temporal_patch_size)
    return pairs * (rh // factor) * (rw // factor)


def visual_summary(cfg: LlavaConfig) -> str:
    """`convert`'s summary: "qwen2_5_vl (Qwen2.5-VL), any resolution: one visual token per
    28x28 px"."""
    v = cfg.qwen_vision
    f = v.patch_size * v.spatial_merge_size
    return f"{cfg.family} ({NAMES[cfg.family]}), any resolution: one visual token per {f}x{f} px"


def lines(path: Path, cfg: LlavaConfig) -> list[str]:
    """`info`'s family, vision, text, image and video lines of a Qwen-VL model."""
    v, t = cfg.qwen_vision, cfg.text
    s = settings(path, cfg)
    f = v.patch_size * v.spatial_merge_size
    if v.windowed:
        full = ", ".join(map(str, v.fullatt_block_indexes))
        attn = f"full attention in blocks {full}, {v.window_size} px windows elsewhere"
        block = f"RMSNorm, SwiGLU MLP {v.intermediate_size}"
    else:
        attn = "full attention within each image / frame"
        block = f"LayerNorm, MLP {v.intermediate_size} ({v.hidden_act})"
    common = ", ".join(f"{h}x{w} {tokens(cfg, s, h, w):,}" for h, w in COMMON_SIZES)
    clips = ", ".join(f"{n} frames at {h}x{w} {tokens(cfg, s, h, w, n):,}"
                      for n, h, w in COMMON_CLIPS)  # fmt: skip
    lo, hi = s.min_pixels // (f * f), s.max_pixels // (f * f)
    sections = "/".join(map(str, t.mrope_section))
    return [
        f"family:      {cfg.family} ({NAMES[cfg.family]}): any resolution, one visual token per "
        f"{f}x{f} px, M-RoPE (t, h, w) positions",
        f"vision:      {NAMES[cfg.family]} ViT, {v.depth} blocks, width {v.embed_dim}, "
        f"{v.num_heads} heads, {block}, patch {v.patch_size}, temporal patch "
        f"{v.temporal_patch_size}; {attn}; {v.spatial_merge_size}x{v.spatial_merge_size} "
        f"merger -> {v.out_hidden_size}",
        f"text:        Qwen2, {t.num_hidden_layers} layers, hidden {t.hidden_size}, "
        f"MLP {t.intermediate_size}, {t.num_attention_heads} heads ({t.num_key_value_heads} "
        f"KV, head dim {t.head_dim}), q/k/v biases, vocab {t.vocab_size}, rope theta "
        f"{t.rope_theta:g}, M-RoPE sections {sections} (t/h/w)",
        f"image:       {lo:,}-{hi:,} visual tokens per image ({s.min_pixels:,}-{s.max_pixels:,} "
        f"pixels after resize; --min-pixels / --max-pixels); {common}; image token index "
        f"{cfg.image_token_index}",
        f"video:       one token per {f}x{f} px per {v.temporal_patch_size} frames: {clips}; "
        f"video token index {cfg.video_token_index}",
    ]
