"""`sparsevlm visualize` on Qwen2-VL / Qwen2.5-VL: kept tokens drawn on the original image.

Qwen resizes an image to multiples of 28 pixels (`qwen_images.smart_resize`) and gives one
visual token per 28x28 cell of the resized image, row by row. Token (r, c) therefore covers the
cell [r, r + 1) x [c, c + 1) of the resized grid, which maps back to the original image by the
resize's scale on each axis. The picture is the original image, then one panel per pruning
layer with the cells its kept tokens cover at full brightness (recycled tokens, cluster means,
have no cell; the caption counts them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sparsevlm_jax.visualize import (
    CAPTION,
    GAP,
    MIN_PANEL,
    _font,
    _view,
    compose_kept,
    region_mask,
)

VIEW = 448  # long side of each drawn view of the original image, pixels


def token_cells(original_size: Sequence[int], processor: Any) -> tuple[np.ndarray, int, int]:
    """(boxes [V, 4] as (y0, x0, y1, x1) in original pixels, grid rows, grid columns) of an
    image's visual tokens in order."""
    from sparsevlm_jax.qwen_images import smart_resize

    v, s = processor.vision, processor.settings
    factor = v.patch_size * v.spatial_merge_size
    oh, ow = original_size
    rh, rw = smart_resize(oh, ow, factor, s.min_pixels, s.max_pixels)
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
    width = sum(p.width for p in panels) + GAP * (len(panels) - 1)
    out = Image.new("RGB", (width, panels[0].height), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + GAP
    return out


def _panel(caption: Sequence[str], view: Image.Image) -> Image.Image:
    width = max(view.width, MIN_PANEL)
    panel = Image.new("RGB", (width, CAPTION + view.height), "white")
    panel.paste(view, (0, CAPTION))
    draw = ImageDraw.Draw(panel)
    for i, line in enumerate(caption[:2]):
        draw.text((2, 2 + 18 * i), line, fill="black", font=_font())
    return panel
