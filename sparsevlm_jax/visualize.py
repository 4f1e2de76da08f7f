"""`sparsevlm visualize`: which image patches survive each SparseVLM pruning layer.

One panel for the preprocessed (square) image, then one per pruning layer: kept patches at full
brightness, pruned ones dimmed, captioned "layer 2: 300 kept + 9 recycled of 576". PIL only.

Kept indices (`Result.stats["layers"][i]["kept"]`) at pruning layer i index that layer's visual
range: the previous layer's kept tokens in original order, then its recycled tokens. Composing
the layers maps every kept token back to its image patch; recycled tokens (cluster means) have
no patch, so they are counted but not drawn.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sparsevlm_jax.errors import InputError

GAP = 8
CAPTION = 40
DIM = 0.25  # brightness of pruned patches
OUTLINE = (255, 196, 0)  # border of the kept region
MIN_PANEL = 224  # small images are scaled up (nearest) to at least this many pixels


def token_origins(
    layers: Sequence[dict[str, Any]], num_image_tokens: int, num_patches: int
) -> list[list[int | None]]:
    """For each pruning layer, the image patch of each token of its output visual range.

    layers: per pruning layer `{"kept": [indices into its visual range], "recycled": n, ...}`.
    Returns per layer a list `[patch index or None]` (None: a recycled token, or CLIP's CLS
    token when the model feeds it to the decoder), kept tokens first, then recycled ones.
    """
    tokens: list[int | None] = [None] * (num_image_tokens - num_patches)
    tokens += list(range(num_patches))
    out = []
    for layer in layers:
        tokens = [tokens[j] for j in layer["kept"]] + [None] * int(layer["recycled"])
        out.append(tokens)
    return out


def display_pixels(pixel_values: np.ndarray, mean: Sequence[float], std: Sequence[float]):
    """Normalised [S, S, 3] pixels (the model's input) back to uint8 RGB."""
    rgb = np.asarray(pixel_values, np.float32) * np.asarray(std) + np.asarray(mean)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _font(size: int = 13) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def patch_mask(kept_patches: set[int], grid: int) -> np.ndarray:
    """[grid, grid] bool, True where the patch (row-major index) is kept."""
    mask = np.zeros(grid * grid, bool)
    mask[sorted(kept_patches)] = True
    return mask.reshape(grid, grid)


def outline_kept(draw: ImageDraw.ImageDraw, mask: np.ndarray, cell: int) -> None:
    """Draws the border of the kept region: every patch edge between kept and not kept."""
    width = max(1, cell // 14)
    padded = np.pad(mask, 1)
    for r, c in zip(*np.nonzero(mask), strict=True):
        x0, y0 = c * cell, CAPTION + r * cell
        x1, y1 = x0 + cell - 1, y0 + cell - 1
        if not padded[r, c + 1]:  # above
            draw.line([(x0, y0), (x1, y0)], fill=OUTLINE, width=width)
        if not padded[r + 2, c + 1]:  # below
            draw.line([(x0, y1), (x1, y1)], fill=OUTLINE, width=width)
        if not padded[r + 1, c]:  # left
            draw.line([(x0, y0), (x0, y1)], fill=OUTLINE, width=width)
        if not padded[r + 1, c + 2]:  # right
            draw.line([(x1, y0), (x1, y1)], fill=OUTLINE, width=width)


def draw_panel(
    rgb: np.ndarray,
    patch_size: int,
    kept_patches: set[int] | None,
    caption: Sequence[str],
    scale: int,
) -> Image.Image:
    """One captioned panel; `kept_patches=None` shows the image undimmed."""
    img = rgb.astype(np.float32)
    if kept_patches is not None:
        grid = rgb.shape[0] // patch_size
        mask = patch_mask(kept_patches, grid)
        full = np.kron(mask, np.ones((patch_size, patch_size), bool))
        pad = rgb.shape[0] - full.shape[0]  # image sizes that are not a multiple of the patch
        full = np.pad(full, ((0, pad), (0, pad)))
        img = np.where(full[:, :, None], img, img * DIM)
    pic = Image.fromarray(img.astype(np.uint8))
    if scale > 1:
        pic = pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)
    panel = Image.new("RGB", (pic.width, pic.height + CAPTION), "white")
    panel.paste(pic, (0, CAPTION))
    draw = ImageDraw.Draw(panel)
    if kept_patches is not None:
        outline_kept(draw, patch_mask(kept_patches, rgb.shape[0] // patch_size), patch_size * scale)
    font = _font()
    for i, line in enumerate(caption[:2]):
        draw.text((2, 2 + 18 * i), line, fill="black", font=font)
    return panel


def layer_caption(layer: dict[str, Any], num_image_tokens: int, drawn: int) -> list[str]:
    kept = len(layer["kept"])
    return [
        f"layer {layer['layer']}: {kept} kept + {layer['recycled']} recycled of {num_image_tokens}",
        f"rank {layer['rank']}, budget {layer['budget']}, {drawn} patches shown",
    ]


def render(
    rgb: np.ndarray,
    patch_size: int,
    layers: Sequence[dict[str, Any]],
    num_image_tokens: int,
) -> Image.Image:
    """The whole picture: the original, then one panel per pruning layer, left to right.

    rgb: [S, S, 3] uint8, the preprocessed image.
    layers: per-layer stats (`Result.stats["layers"]`).
    """
    size = rgb.shape[0]
    grid = size // patch_size
    scale = max(1, math.ceil(MIN_PANEL / size))
    origins = token_origins(layers, num_image_tokens, grid * grid)
    panels = [draw_panel(rgb, patch_size, None, ["original", f"{num_image_tokens} tokens"], scale)]
    for layer, tokens in zip(layers, origins, strict=True):
        patches = {t for t in tokens if t is not None}
        caption = layer_caption(layer, num_image_tokens, len(patches))
        panels.append(draw_panel(rgb, patch_size, patches, caption, scale))
    width = sum(p.width for p in panels) + GAP * (len(panels) - 1)
    out = Image.new("RGB", (width, panels[0].height), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + GAP
    return out


def image_format(path: str | os.PathLike) -> str:
    """PIL format name from the file extension (InputError when unknown)."""
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise InputError(f"{path}: cannot tell the picture format from {ext or 'no extension'!r}")
    return fmt


def save_atomic(img: Image.Image, path: str | os.PathLike) -> None:
    """Writes `img` to a temporary sibling file, then renames it onto `path`."""
    path = Path(path)
    fmt = image_format(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format=fmt)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def kept_picture(
    image: Image.Image, processor: Any, cfg: Any, layers: Sequence[dict[str, Any]]
) -> Image.Image:
    """The picture for one image run through `processor` (a `Processor`) and model `cfg`.

    layers: per-layer stats (`Result.stats["layers"]`).
    """
    pixels = processor.pixel_values([image])[0]
    rgb = display_pixels(pixels, processor.image_mean, processor.image_std)
    return render(rgb, cfg.vision.patch_size, layers, cfg.num_image_tokens)
