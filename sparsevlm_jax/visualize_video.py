"""Kept tokens of a video: a grid of frames, one row per pruning layer.

A video token is one cell of a frame's pooled patch grid (LLaVA-NeXT-Video: 2x2 patches,
12x12 cells a frame; Video-LLaVA: one patch, 16x16 cells plus the frame's class token, counted
in the captions); each row shows every sampled frame with the cells still held after that
pruning layer at full brightness and outlined, the rest dimmed; the first row is the frames
as the model saw them. Recycled tokens belong to no frame and are counted in the caption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sparsevlm_jax.visualize import GAP, MIN_PANEL, _font, compose_kept, display_pixels, draw_panel

ROW_LABEL = 22  # height of the caption strip above each row


def video_origins(
    layers: Sequence[dict[str, Any]],
    num_image_tokens: int,
    frames: int,
    per_frame: int,
    cls: bool = False,
) -> list[list[tuple[int, int] | None]]:
    """Per pruning layer, the (frame, cell) of each token of its output visual range (None:
    an image's token before the video, or a recycled token; cell -1: the frame's class token,
    first of its frame, when `cls`)."""
    initial: list[tuple[int, int] | None] = [None] * num_image_tokens
    initial += [(f, c) for f in range(frames) for c in range(-1 if cls else 0, per_frame)]
    return compose_kept(layers, initial)


def render_video(
    frames_rgb: np.ndarray,
    cell: int,
    layers: Sequence[dict[str, Any]],
    num_image_tokens: int = 0,
    cls: bool = False,
) -> Image.Image:
    """The grid picture.

    frames_rgb: [F, S, S, 3] uint8, the frames as the model saw them; cell: pixels per pooled
    token (patch size x pool stride); layers: per-layer stats (`Result.stats["layers"]`);
    num_image_tokens: visual tokens of images before the video in the prompt; cls: each
    frame's tokens start with its class token (Video-LLaVA), counted but not drawn.
    """
    f, size = frames_rgb.shape[0], frames_rgb.shape[1]
    per_frame = (size // cell) ** 2
    scale = max(1, math.ceil(MIN_PANEL / 2 / size))
    origins = video_origins(layers, num_image_tokens, f, per_frame, cls)
    total = f * (per_frame + int(cls))
    rows: list[tuple[str, list[Image.Image]]] = [
        (f"{f} frames, {total} tokens", [
            draw_panel(frames_rgb[i], cell, None, [f"frame {i}"], scale) for i in range(f)
        ]),
    ]  # fmt: skip
    for layer, tokens in zip(layers, origins, strict=True):
        cells: list[set[int]] = [set() for _ in range(f)]
        for t in tokens:
            if t is not None:
                cells[t[0]].add(t[1])
        kept = sum(map(len, cells))
        caption = (
            f"after layer {layer['layer']}: {kept} of {total} video tokens kept + "
            f"{layer['recycled']} recycled"
        )
        panels = [
            draw_panel(frames_rgb[i], cell, cells[i] - {-1}, [f"frame {i}: {len(cells[i])}"],
                       scale)
            for i in range(f)
        ]  # fmt: skip
        rows.append((caption, panels))
    width = max(sum(p.width for p in ps) + GAP * (len(ps) - 1) for _, ps in rows)
    height = sum(ROW_LABEL + ps[0].height + GAP for _, ps in rows)
    out = Image.new("RGB", (width, height), "white")
    draw, font, y = ImageDraw.Draw(out), _font(), 0
    for caption, panels in rows:
        draw.text((2, y + 3), caption, fill="black", font=font)
        x, y = 0, y + ROW_LABEL
        for p in panels:
            out.paste(p, (x, y))
            x += p.width + GAP
        y += panels[0].height + GAP
    return out


def video_picture(video: Any, processor: Any, cfg: Any, layers: Sequence[dict[str, Any]]):
    """The picture for one video (`sparsevlm_jax.video.Video`) run through `processor`."""
    pixels = processor.frame_pixels(video)
    rgb = np.stack([display_pixels(p, processor.image_mean, processor.image_std) for p in pixels])
    if cfg.separate_video_tower:  # Video-LLaVA: every patch, plus the class token
        return render_video(rgb, cfg.vision.patch_size, layers, cls=True)
    return render_video(rgb, cfg.vision.patch_size * cfg.spatial_pool_stride, layers)
