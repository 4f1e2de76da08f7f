"""`sparsevlm visualize` on Qwen2-VL / Qwen2.5-VL: kept tokens drawn on the original image.

Qwen resizes an image to multiples of 28 pixels (`qwen_images.smart_resize`) and gives one
visual token per 28x28 cell of the resized image, row by row. Token (r, c) therefore covers the
cell [r, r + 1) x [c, c + 1) of the resized grid, which maps back to the original image by the
resize's scale on each axis. The picture is the original image, then one panel per pruning
layer with the cells its kept tokens cover at full brightness (recycled tokens, cluster means,
have no cell; the caption counts them).

A video (`render_qwen_video`) gives one token per 28x28 cell per temporal pair of frames: the
picture is a grid, one column per pair (its first frame drawn), one row per pruning layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sparsevlm_jax.visualize import (
    GAP,
    MIN_PANEL,
    _font,
    _panel,
    _view,
    compose_kept,
    region_mask,
    side_by_side,
)

VIEW = 448  # long side of each drawn view of the original image, pixels


def token_cells(
    original_size: Sequence[int], processor: Any, video: bool = False
) -> tuple[np.ndarray, int, int]:
    """(boxes [V, 4] as (y0, x0, y1, x1) in original pixels, grid rows, grid columns) of an
    image's visual tokens in order (`video`: of one frame pair, under the video bounds)."""
    from sparsevlm_jax.qwen_images import smart_resize

    v, s = processor.vision, processor.settings
    factor = v.patch_size * v.spatial_merge_size
    oh, ow = original_size
    lo, hi = (s.video_min_pixels, s.video_max_pixels) if video else (s.min_pixels, s.max_pixels)
    rh, rw = smart_resize(oh, ow, factor, lo, hi)
    rows, cols = rh // factor, rw // factor
    r, c = np.divmod(np.arange(rows * cols), cols)
    sy, sx = oh / rows, ow / cols
    boxes = np.stack([r * sy, c * sx, (r + 1) * sy, (c + 1) * sx], axis=1)
    return boxes, rows, cols


def render_qwen(
    image: Image.Image, processor: Any, layers: Sequence[dict[str, Any]]
) -> Image.Image:
    """The original image, then one panel per pruning layer (`Result.stats["layers"]`)."""
    oh, ow = image.height, image.width
    boxes, rows, cols = token_cells((oh, ow), processor)
    v0 = rows * cols
    scale = VIEW / max(oh, ow)
    shape = (max(1, round(oh * scale)), max(1, round(ow * scale)))
    rgb = np.asarray(image.convert("RGB").resize((shape[1], shape[0]), Image.BICUBIC))
    panels = [_panel(["original", f"{v0} tokens: {rows}x{cols} cells of 28x28 px resized"],
                     _view(rgb, None, f"{oh}x{ow} px (h x w)"))]  # fmt: skip
    for layer, tokens in zip(layers, compose_kept(layers, range(v0)), strict=True):
        kept = np.array([t for t in tokens if t is not None], np.int64)
        rank = f"rank {layer['rank']}, " if layer.get("rank") is not None else ""
        caption = [
            f"layer {layer['layer']}: {len(layer['kept'])} kept + {layer['recycled']} "
            f"recycled of {v0}",
            f"{rank}budget {layer['budget']}",
        ]
        mask = region_mask(boxes[kept], scale, shape)
        panels.append(_panel(caption, _view(rgb, mask, f"{len(kept)} of {v0} cells kept")))
    return side_by_side(panels)


def render_qwen_video(video: Any, processor: Any, layers: Sequence[dict[str, Any]]) -> Image.Image:
    """A `sparsevlm_jax.video.Video`'s grid: a column per frame pair, a row per layer."""
    first = video.frames[0]
    oh, ow = first.height, first.width
    boxes, rows, cols = token_cells((oh, ow), processor, video=True)
    tp = processor.vision.temporal_patch_size
    pairs = -(-len(video.frames) // tp)
    per = rows * cols
    v0 = pairs * per
    scale = min(VIEW / 2, 224) / max(oh, ow)
    shape = (max(1, round(oh * scale)), max(1, round(ow * scale)))
    rgbs = [np.asarray(video.frames[g * tp].convert("RGB").resize((shape[1], shape[0]),
                                                                 Image.BICUBIC))
            for g in range(pairs)]  # fmt: skip
    grid = [[_view(rgb, None, f"frames {g * tp}-{min(g * tp + tp, len(video.frames)) - 1}")
             for g, rgb in enumerate(rgbs)]]  # fmt: skip
    captions = [f"{len(video.frames)} frames, {pairs} pairs x {rows}x{cols} cells: {v0} tokens"]
    for layer, tokens in zip(layers, compose_kept(layers, range(v0)), strict=True):
        kept = np.array([t for t in tokens if t is not None], np.int64)
        earlier = len(layer["kept"]) - len(kept)  # recycled tokens of earlier layers, kept
        note = f" ({earlier} of them recycled earlier)" if earlier else ""
        captions.append(f"after layer {layer['layer']}: {len(layer['kept'])} kept{note} + "
                        f"{layer['recycled']} recycled, of {v0}")  # fmt: skip
        row = []
        for g, rgb in enumerate(rgbs):
            mine = kept[(kept >= g * per) & (kept < (g + 1) * per)] - g * per
            row.append(_view(rgb, region_mask(boxes[mine], scale, shape), f"{len(mine)} kept"))
        grid.append(row)
    cell_w, cell_h = grid[0][0].width, grid[0][0].height
    width = max(pairs * (cell_w + GAP) - GAP, MIN_PANEL)
    out = Image.new("RGB", (width, len(grid) * (22 + cell_h + GAP)), "white")
    draw, y = ImageDraw.Draw(out), 0
    for caption, row in zip(captions, grid, strict=True):
        draw.text((2, y + 3), caption, fill="black", font=_font())
        y += 22
        for g, view in enumerate(row):
            out.paste(view, (g * (cell_w + GAP), y))
        y += cell_h + GAP
    return out
