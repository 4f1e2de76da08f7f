"""Host-side inputs of the Qwen2-VL / Qwen2.5-VL vision towers (numpy + PIL).

Preprocessing equals transformers' `Qwen2VLImageProcessorPil` (and `Qwen2VLImageProcessor`):
RGB conversion (alpha composited onto white), `smart_resize` to multiples of
patch * merge = 28 pixels within [min_pixels, max_pixels], a PIL bicubic resize, rescale by
1/255 (in float64, then float32), normalisation with the checkpoint's mean / std (float32),
and the patch rows of C * temporal_patch * 14 * 14 values in transformers' row order: merge
groups of 2x2 patches row-major over the image, the patches of a group row-major inside it,
each row ordered (channel, time, row, column), a single image repeated over the temporal patch
of 2. A video is a list of frames [T, H, W, 3]: pairs of frames make one temporal patch
(grid_t = ceil(T / 2), an odd last frame repeated as transformers does); its frames are
resized like images with PIL (transformers' video processor resizes with torchvision, which
differs by rounding) within the video pixel budget.

`pack` turns the rows of each example's images and videos into the padded, fixed-capacity
`qwen_vision.VisionInputs` of a batch, with every index array the tower needs computed here
from the grids (rotary row / column ids, attention segments in place of `cu_seqlens`, Qwen2.5's
window permutation and window segments, the output order, the attention tiles' key ranges);
see `sparsevlm_jax.model.qwen_vision` for their meaning.

Bucketing: an example of n patches (n / 4 output tokens) is padded to
`patch_capacity(n) = 4 * batch.ladder_size(max(n / 4, 64), VISUAL_STEPS)` patches, the batch
to the largest of its examples: the output token count P / 4 is then on the project's visual
ladder (`batch.visual_ladder`: 64 tokens at least, 16 steps per octave, at most 6.25%
padding), and a jitted tower compiles once per (B, P).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from sparsevlm_jax.batch import VISUAL_STEPS, ladder_size
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from sparsevlm_jax.model.qwen_vision import (
    ATTENTION_TILES,
    PAD_SEGMENT,
    TILE_MIN_PATCHES,
    QwenVisionConfig,
    VisionInputs,
)

MAX_ASPECT_RATIO = 200
MIN_TOKENS = 64  # the smallest capacity, in output tokens (the visual ladder's first rung)

ImageLike = Image.Image | np.ndarray  # PIL image, or uint8 [H, W, 3] / [H, W]
VideoLike = np.ndarray | Sequence[ImageLike]  # uint8 [T, H, W, 3], or a list of frames
Item = tuple[np.ndarray, tuple[int, int, int]]  # (rows [N, K] float32, grid (t, h, w))


@dataclass(frozen=True)
class QwenPreprocess:
    """The processor's settings (Qwen2-VL's and Qwen2.5-VL's defaults).

    Pixel budgets are in pixels (28 * 28 per output token); videos have their own (the video
    processor's defaults: 128 to 768 tokens a frame pair).
    """

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_hf(
        cls, image_cfg: dict[str, Any], video_cfg: dict[str, Any] | None = None
    ) -> QwenPreprocess:
        """From preprocessor_config.json (and video_preprocessor_config.json): `min_pixels` /
        `max_pixels` or `size: {shortest_edge, longest_edge}`, `image_mean`, `image_std`,
        `rescale_factor`."""
        d = cls()

        def budget(cfg: dict[str, Any], lo: int, hi: int) -> tuple[int, int]:
            size = cfg.get("size") or {}
            lo = cfg.get("min_pixels") or size.get("shortest_edge") or lo
            hi = cfg.get("max_pixels") or size.get("longest_edge") or hi
            return int(lo), int(hi)

        lo, hi = budget(image_cfg, d.min_pixels, d.max_pixels)
        vlo, vhi = budget(video_cfg or {}, d.video_min_pixels, d.video_max_pixels)
        return cls(
            min_pixels=lo,
            max_pixels=hi,
            video_min_pixels=vlo,
            video_max_pixels=vhi,
            image_mean=tuple(float(x) for x in image_cfg.get("image_mean", d.image_mean)),
            image_std=tuple(float(x) for x in image_cfg.get("image_std", d.image_std)),
            rescale_factor=float(image_cfg.get("rescale_factor", d.rescale_factor)),
        )


# --------------------------------------------------------------------------------------------
# Pixels


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:  # fmt: skip
    """transformers' `smart_resize`: (height, width) multiples of `factor` with
    min_pixels <= h * w <= max_pixels, the aspect ratio kept as closely as possible.

    Raises:
      InputError (a ValueError): an aspect ratio over 200 (one line, naming the size).
    """
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"image of {width}x{height} pixels: aspect ratio {ratio:.1f} is over the limit of "
            f"{MAX_ASPECT_RATIO} (Qwen2-VL's smart_resize)"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def rgb_array(image: ImageLike) -> np.ndarray:
    """uint8 [H, W, 3]: transformers' `convert_to_rgb` (alpha composited onto white)."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise InputError(f"an image array must be uint8 [H, W, 3] or [H, W], got "
                         f"{a.dtype} {list(a.shape)}")  # fmt: skip
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a


def resize_normalize(
    rgb: np.ndarray, size: tuple[int, int], settings: QwenPreprocess
) -> np.ndarray:
    """[3, h, w] float32 from uint8 rgb [H, W, 3]: PIL bicubic to size (h, w), rescale,
    normalise, exactly as the PIL processor computes them."""
    h, w = size
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), resample=Image.Resampling.BICUBIC))
    x = (resized.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    mean = np.asarray(settings.image_mean, np.float32)
    std = np.asarray(settings.image_std, np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


def patchify(frames: np.ndarray, vcfg: QwenVisionConfig) -> Item:
    """Patch rows [t * gh * gw, K] and the grid (t, gh, gw) of frames [T, C, H, W] (T a
    multiple of the temporal patch), in transformers' row order (module docstring)."""
    n, c, height, width = frames.shape
    tp, p, m = vcfg.temporal_patch_size, vcfg.patch_size, vcfg.spatial_merge_size
    gt, gh, gw = n // tp, height // p, width // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, gh/m, gw/m, m, m, C, tp, p, p)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)), (gt, gh, gw)


def preprocess_image(
    image: ImageLike, vcfg: QwenVisionConfig, settings: QwenPreprocess = QwenPreprocess()
) -> Item:
    """(rows [gh * gw, K] float32, grid (1, gh, gw)) of one image: one entry of the PIL
    processor's `pixel_values` / `image_grid_thw`."""
    rgb = rgb_array(image)
    size = smart_resize(*rgb.shape[:2], _factor(vcfg), settings.min_pixels, settings.max_pixels)
    x = resize_normalize(rgb, size, settings)
    return patchify(np.repeat(x[None], vcfg.temporal_patch_size, axis=0), vcfg)


def preprocess_video(
    frames: VideoLike, vcfg: QwenVisionConfig, settings: QwenPreprocess = QwenPreprocess()
) -> Item:
    """(rows [t * gh * gw, K] float32, grid (t, gh, gw)) of a video's frames (uint8
    [T, H, W, 3] or a list of images of one size), t = ceil(T / temporal_patch)."""
    arrays = [rgb_array(f) for f in frames]
    if not arrays or len({a.shape for a in arrays}) != 1:
        raise InputError(f"a video needs one or more frames of one size, got "
                         f"{sorted({a.shape for a in arrays})}")  # fmt: skip
    pad = -len(arrays) % vcfg.temporal_patch_size
    arrays += [arrays[-1]] * pad
    size = smart_resize(*arrays[0].shape[:2], _factor(vcfg), settings.video_min_pixels,
                        settings.video_max_pixels)  # fmt: skip
    return patchify(np.stack([resize_normalize(a, size, settings) for a in arrays]), vcfg)


def _factor(vcfg: QwenVisionConfig) -> int:
    return vcfg.patch_size * vcfg.spatial_merge_size


# --------------------------------------------------------------------------------------------
# Index arrays


def position_ids(grid: tuple[int, int, int], merge: int) -> np.ndarray:
    """[t * h * w, 2] int32 (row, column) of each patch in transformers' order (merge groups
    row-major, patches row-major inside a group, repeated per frame)."""
    t, h, w = grid
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hw = [a.reshape(shape).transpose(0, 2, 1, 3).reshape(-1) for a in (rows, cols)]
    return np.tile(np.stack(hw, axis=-1), (t, 1)).astype(np.int32)


def window_order(
    grid: tuple[int, int, int], vcfg: QwenVisionConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5's windows of one image / video, at merge-group granularity.

    Returns (index [G], window [G]) int32, G = t * h * w / merge_unit: tower row j holds the
    processor's group index[j] (transformers' `window_index`), which lies in window window[j]
    (windows numbered in tower order: frame, window row, window column). Qwen2-VL: the
    identity, one window per frame.
    """
    t, h, w = grid
    m = vcfg.spatial_merge_size
    lh, lw = h // m, w // m
    if not vcfg.windowed:
        return np.arange(t * lh * lw, dtype=np.int32), np.repeat(np.arange(t), lh * lw)
    v = vcfg.window_groups
    nh, nw = -(-lh // v), -(-lw // v)
    padded = np.full((t, nh * v, nw * v), -1, np.int64)
    padded[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
    padded = padded.reshape(t, nh, v, nw, v).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
    window = np.broadcast_to(np.arange(t * nh * nw)[:, None], padded.shape)
    keep = padded >= 0
    return padded[keep].astype(np.int32), window[keep].astype(np.int32)


def patch_capacity(
    num_patches: int, merge_unit: int = 4, steps: int = VISUAL_STEPS, min_tokens: int = MIN_TOKENS
) -> int:
    """The patch bucket of `num_patches`: merge_unit * ladder_size(tokens) (module docstring)."""
    tokens = -(-int(num_patches) // merge_unit)
    return merge_unit * ladder_size(max(tokens, min_tokens), steps)


def attention_block(capacity: int) -> int:
    """The attention tile rows of a capacity: P itself (dense) below TILE_MIN_PATCHES, else the
    largest of ATTENTION_TILES that divides P."""
    if capacity < TILE_MIN_PATCHES:
        return capacity
    return next((b for b in ATTENTION_TILES if capacity % b == 0), capacity)


def block_ranges(segments: np.ndarray, block: int) -> np.ndarray:
    """[P // block, 2] int32: for each query tile, the key tiles [lo, hi) holding every row of
    its segments, over all examples. segments [B, P], non-decreasing along each row."""
    starts = np.stack([np.searchsorted(s, s, "left") for s in segments])
    ends = np.stack([np.searchsorted(s, s, "right") for s in segments])
    lo = starts[:, ::block].min(axis=0) // block
    hi = -(-ends[:, block - 1 :: block].max(axis=0) // block)
    return np.stack([lo, hi], axis=-1).astype(np.int32)


def _example_arrays(items: Sequence[Item], vcfg: QwenVisionConfig) -> dict[str, np.ndarray]:
    """One example's valid rows in tower order: patches, pos_hw, segments, window_segments
    [n, ...] and window_index [n / merge_unit] (indices into the example's groups)."""
    mu = vcfg.merge_unit
    names = ("patches", "pos", "seg", "wseg", "index")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    groups = frames = windows = 0
    for rows, grid in items:
        t, h, w = grid
        g = t * h * w // mu
        if rows.shape != (t * h * w, vcfg.patch_dim):
            raise ValueError(f"rows {rows.shape} do not match grid {grid} (K={vcfg.patch_dim})")
        index, window = window_order(grid, vcfg)
        frame = index // (h * w // mu)  # windows never cross frames: frame of each tower group
        parts["patches"].append(rows.reshape(g, mu, -1)[index].reshape(g * mu, -1))
        pos = position_ids(grid, vcfg.spatial_merge_size)
        parts["pos"].append(pos.reshape(g, mu, 2)[index].reshape(g * mu, 2))
        parts["seg"].append(np.repeat(frames + frame, mu))
        parts["wseg"].append(np.repeat(windows + window, mu))
        parts["index"].append(groups + index)
        groups, frames, windows = groups + g, frames + t, windows + int(window.max()) + 1
    k = vcfg.patch_dim
    empty = {"patches": np.zeros((0, k), np.float32), "pos": np.zeros((0, 2), np.int32)}
    return {
        name: np.concatenate(v) if v else empty.get(name, np.zeros(0, np.int32))
        for name, v in parts.items()
    }


def pack(
    items_per_example: Sequence[Sequence[Item]],
    vcfg: QwenVisionConfig,
    capacity: int | None = None,
    block: int | None = None,
) -> VisionInputs:
    """The padded `VisionInputs` [B, P, ...] of a batch of examples, each a list of
    (rows, grid) items (`preprocess_image` / `preprocess_video`) whose tokens follow one
    another in the output.

    capacity: P (default: `patch_capacity` of the largest example); block: the attention tile
    rows (default `attention_block(P)`; must divide P).

    Raises:
      InputError: an example over `capacity`, or a block that does not divide it.
    """
    if not items_per_example:
        raise InputError("a batch needs at least one example")
    examples = [_example_arrays(items, vcfg) for items in items_per_example]
    mu = vcfg.merge_unit
    longest = max((len(e["seg"]) for e in examples), default=0)
    p = patch_capacity(longest, mu) if capacity is None else int(capacity)
    block = attention_block(p) if block is None else int(block)
    if longest > p or p % mu:
        raise InputError(f"{longest} patches do not fit a capacity of {p} (a multiple of {mu})")
    if p % block:
        raise InputError(f"attention block {block} does not divide the capacity {p}")
    b, g = len(examples), p // mu
    out = {
        "patches": np.zeros((b, p, vcfg.patch_dim), np.float32),
        "pos_hw": np.zeros((b, p, 2), np.int32),
        "segments": np.broadcast_to(PAD_SEGMENT + np.arange(p, dtype=np.int32), (b, p)).copy(),
        "reverse_index": np.broadcast_to(np.arange(g, dtype=np.int32), (b, g)).copy(),
    }
    out["window_segments"] = out["segments"].copy()
    num_tokens = np.zeros(b, np.int32)
    for i, e in enumerate(examples):
        n = len(e["seg"])
        out["patches"][i, :n] = e["patches"]
        out["pos_hw"][i, :n] = e["pos"]
        out["segments"][i, :n] = e["seg"]
        out["window_segments"][i, :n] = e["wseg"]
        index = np.concatenate([e["index"], np.arange(n // mu, g)])
        out["reverse_index"][i] = np.argsort(index)
        num_tokens[i] = n // mu
    ranges = np.stack([block_ranges(out[k], block) for k in ("segments", "window_segments")], 1)
    return VisionInputs(num_tokens=num_tokens, block_ranges=ranges, block=block, **out)


def is_video(item: Any) -> bool:
    """A video item: a uint8 array [T, H, W, 3] or a list / tuple of frames."""
    return isinstance(item, (list, tuple)) or (isinstance(item, np.ndarray) and item.ndim == 4)


def prepare(
    images_per_example: Sequence[Sequence[ImageLike | VideoLike]],
    vcfg: QwenVisionConfig,
    settings: QwenPreprocess = QwenPreprocess(),
    capacity: int | None = None,
    block: int | None = None,
) -> tuple[VisionInputs, list[np.ndarray]]:
    """Preprocesses and packs a batch: example b's images (PIL or uint8 [H, W, 3]) and videos
    (`is_video`) in order.

    Returns:
      (VisionInputs [B, P, ...], grids): grids[b] int64 [n_b, 3], the (t, h, w) patch grid of
      each of example b's items (transformers' `image_grid_thw` / `video_grid_thw` rows); item
      i contributes t * h * w / merge_unit output tokens, after those of items < i.
    """
    items = [
        [
            preprocess_video(x, vcfg, settings) if is_video(x)
            else preprocess_image(x, vcfg, settings)
            for x in example
        ]
        for example in images_per_example
    ]  # fmt: skip
    grids = [np.asarray([g for _, g in ex], np.int64).reshape(-1, 3) for ex in items]
    return pack(items, vcfg, capacity, block), grids
