"""`sparsevlm visualize`: which image patches survive each SparseVLM pruning layer.

One panel for the preprocessed (square) image, then one per pruning layer: kept patches at full
brightness, pruned ones dimmed, captioned "layer 2: 300 kept + 9 recycled of 576". PIL only.

Kept indices (`Result.stats["layers"][i]["kept"]`) at pruning layer i index that layer's visual
range: the previous layer's kept tokens in original order, then its recycled tokens. Composing
the layers maps every kept token back to its image patch; recycled tokens (cluster means) have
no patch, so they are counted but not drawn.

LLaVA-NeXT (anyres) images are drawn as they are, not as a tile: each packed visual token is
mapped to the region of the original image it covers (`packed_regions`): a base-tile patch
covers a 1/pps-size cell of the whole image, a grid patch its cell of the resized and padded
canvas mapped back to original pixels; `image_newline` tokens cover nothing. Each panel then
shows the image twice, the base tile's kept cells above and the grid's below.
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
    return compose_kept(layers, tokens + list(range(num_patches)))


def compose_kept(
    layers: Sequence[dict[str, Any]], initial: Sequence[int | None]
) -> list[list[int | None]]:
    """Per pruning layer, what each token of its output visual range was at the start
    (`initial[i]` for the image's token i; None for recycled tokens)."""
    tokens = list(initial)
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
    return side_by_side(panels)


def image_format(path: str | os.PathLike) -> str:
    """PIL format name from the file extension (InputError when unknown)."""
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise InputError(f"{path}: cannot tell the picture format from {ext or 'no extension'!r}")
    return fmt


def save_atomic(img: Image.Image, path: str | os.PathLike) -> None:
    """Writes `img` to a temporary sibling file, then renames it onto `path` (a full disk
    leaves neither: the OSError propagates, the temporary file is removed)."""
    import io

    path = Path(path)
    fmt = image_format(path)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    data = memoryview(buf.getvalue())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
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
    if getattr(processor, "anyres", None) is not None:  # LLaVA-NeXT: on the original image
        from sparsevlm_jax.processing import to_rgb

        return render_anyres(to_rgb(image), processor.anyres, layers)
    pixels = processor.pixel_values([image])[0]
    rgb = display_pixels(pixels, processor.image_mean, processor.image_std)
    return render(rgb, cfg.vision.patch_size, layers, cfg.num_image_tokens)


# ----------------------------------------------------------------------------------------------
# LLaVA-NeXT (anyres): kept tokens on the original image

BASE, GRID, NEWLINE = 0, 1, 2  # kinds of packed visual tokens (`packed_regions`)
NEXT_VIEW = 336  # long side of each drawn view of the original image, pixels
LABEL = 18  # height of the label strip above each view


def packed_regions(original_size: Sequence[int], spec: Any) -> tuple[np.ndarray, np.ndarray]:
    """Where each packed visual token of an image looks: its region of the ORIGINAL image.

    original_size: (height, width) of the image; spec: its `AnyresSpec`. Tokens are in packed
    order (`anyres.packed_indices`): the base tile's pps*pps patches, then the unpadded grid
    row by row, each row ended by an `image_newline` token.

    A base patch (r, c) covers the cell of the base tile (the whole image squashed to
    `shortest_edge` square, centre-cropped to the tile) scaled back to the image: with no
    crop, rows [r*H/pps, (r+1)*H/pps) and columns likewise. A grid patch covers its cell of the
    pinpoint canvas (tile by tile, through the same per-tile resize and crop) mapped back
    through the resize and centring of `anyres.grid_canvas`, clipped to the image: a patch
    over the canvas's padding only covers nothing. Newline tokens cover nothing.

    Returns:
      boxes [V, 4] float64 (top, left, bottom, right) in original pixels, half-open (empty
      when bottom <= top or right <= left); kinds [V] int8 (BASE, GRID, NEWLINE).
    """
    from sparsevlm_jax.anyres import (
        NEWLINE_INDEX,
        anyres_grid,
        fit_size,
        packed_indices,
        select_best_resolution,
    )

    oh, ow = (int(v) for v in original_size)
    idx = packed_indices((oh, ow), spec).astype(np.int64)
    pps, tile, patch, edge = (
        spec.patches_per_side,
        spec.tile_size,
        spec.patch_size,
        spec.shortest_edge,
    )
    per_tile = pps * pps
    # Each tile was resized to `edge` square, then centre-cropped (or zero-padded) to `tile`:
    # crop pixel y is pixel y + offset of the resized tile (`anyres._center_crop`).
    big = max(edge, tile)
    offset = (big - tile) // 2 - math.ceil((big - edge) / 2)

    def span(i: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
        lo = offset + i * patch
        return lo * scale, (lo + patch) * scale

    boxes = np.zeros((len(idx), 4))
    kinds = np.full(len(idx), NEWLINE, np.int8)
    base = (idx >= 0) & (idx < per_tile)
    kinds[base] = BASE
    y0, y1 = span(idx[base] // pps, oh / edge)
    x0, x1 = span(idx[base] % pps, ow / edge)
    boxes[base] = np.stack([y0, x0, y1, x1], axis=1)

    grid = idx >= per_tile
    kinds[grid] = GRID
    _, cols = anyres_grid((oh, ow), spec)
    bh, bw = select_best_resolution((oh, ow), spec.pinpoints)
    nh, nw = fit_size((oh, ow), (bh, bw))
    top, left = (bh - nh) // 2, (bw - nw) // 2
    t = idx[grid] // per_tile - 1
    within = idx[grid] % per_tile
    y0, y1 = span(within // pps, tile / edge)  # pixels of the tile
    x0, x1 = span(within % pps, tile / edge)
    ty, tx = (t // cols) * tile - top, (t % cols) * tile - left  # tile origin, image-relative
    ys = np.clip((np.stack([y0, y1]) + ty) * oh / nh, 0, oh)
    xs = np.clip((np.stack([x0, x1]) + tx) * ow / nw, 0, ow)
    boxes[grid] = np.stack([ys[0], xs[0], ys[1], xs[1]], axis=1)
    if np.any(idx[~base & ~grid] != NEWLINE_INDEX):
        raise RuntimeError("packed_indices holds an index that is neither a patch nor a newline")
    return boxes, kinds


def region_mask(boxes: np.ndarray, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """[h, w] bool: the union of `boxes` (original pixels) drawn at `scale` on a view of
    `shape`; edges round to the nearest pixel, so boxes sharing an edge leave no gap."""
    mask = np.zeros(shape, bool)
    for y0, x0, y1, x1 in np.rint(np.asarray(boxes, np.float64).reshape(-1, 4) * scale):
        mask[int(y0) : int(y1), int(x0) : int(x1)] = True
    return mask


def mask_edges(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` with a 4-neighbour outside it (its border, 1 pixel wide)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _view(rgb: np.ndarray, mask: np.ndarray | None, label: str) -> Image.Image:
    """One labelled view: `rgb` dimmed outside `mask`, its border outlined (None: plain)."""
    img = rgb.astype(np.float32)
    if mask is not None:
        img = np.where(mask[:, :, None], img, img * DIM)
        width = max(1, min(rgb.shape[:2]) // 112)
        edges = mask_edges(mask)
        for _ in range(width - 1):  # thicken inwards
            edges |= mask_edges(mask & ~edges)
        img[edges] = OUTLINE
    out = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + LABEL), "white")
    out.paste(Image.fromarray(img.astype(np.uint8)), (0, LABEL))
    ImageDraw.Draw(out).text((2, 2), label, fill="black", font=_font(12))
    return out


def render_anyres(image: Image.Image, spec: Any, layers: Sequence[dict[str, Any]]) -> Image.Image:
    """LLaVA-NeXT's picture: the original image, then one panel per pruning layer.

    Every panel shows the image twice: above, the cells of the base-tile patches kept at that
    layer; below, the cells of the grid patches kept. Newline and recycled tokens have no
    area; the captions count them.

    image: the original RGB image; spec: its `AnyresSpec`; layers: `Result.stats["layers"]`.
    """
    from sparsevlm_jax.anyres import anyres_grid, unpadded_shape

    oh, ow = image.height, image.width
    boxes, kinds = packed_regions((oh, ow), spec)
    v0 = len(kinds)
    scale = NEXT_VIEW / max(oh, ow)
    shape = (max(1, round(oh * scale)), max(1, round(ow * scale)))
    rgb = np.asarray(image.resize((shape[1], shape[0]), Image.BICUBIC))
    rows, cols = anyres_grid((oh, ow), spec)
    uh, uw = unpadded_shape((oh, ow), spec)
    n_base, n_grid = int(np.sum(kinds == BASE)), int(np.sum(kinds == GRID))
    first = [
        ["original", f"{v0} tokens: base {n_base} + grid {n_grid} + {uh} newlines"],
        _view(rgb, None, f"base tile: {n_base} patches over the whole image"),
        _view(rgb, None, f"grid {rows}x{cols} tiles: {uh}x{uw} patches unpadded"),
    ]
    _draw_tile_edges(first[2], (oh, ow), spec, scale)
    panels = [_panel(*first)]
    for layer, tokens in zip(layers, compose_kept(layers, range(v0)), strict=True):
        kept = np.array([t for t in tokens if t is not None], np.int64)
        counts = [int(np.sum(kinds[kept] == k)) for k in (BASE, GRID, NEWLINE)]
        rank = f"rank {layer['rank']}, " if layer.get("rank") is not None else ""
        caption = [
            f"layer {layer['layer']}: {len(layer['kept'])} kept + {layer['recycled']} "
            f"recycled of {v0}",
            f"{rank}budget {layer['budget']}, {counts[2]} of {uh} newlines kept",
        ]
        views = []
        for kind, name, total in ((BASE, "base", n_base), (GRID, "grid", n_grid)):
            mask = region_mask(boxes[kept[kinds[kept] == kind]], scale, shape)
            views.append(_view(rgb, mask, f"{name}: {counts[kind]} of {total} patches kept"))
        panels.append(_panel(caption, *views))
    return side_by_side(panels)


def _draw_tile_edges(view: Image.Image, size: tuple[int, int], spec: Any, scale: float) -> None:
    """Thin lines where the grid's tiles meet, on a view of the original image."""
    from sparsevlm_jax.anyres import fit_size, select_best_resolution

    bh, bw = select_best_resolution(size, spec.pinpoints)
    nh, nw = fit_size(size, (bh, bw))
    top, left = (bh - nh) // 2, (bw - nw) // 2
    draw = ImageDraw.Draw(view)
    for k in range(1, bh // spec.tile_size):
        y = (k * spec.tile_size - top) * size[0] / nh * scale
        if 0 < y < view.height - LABEL:
            draw.line([(0, LABEL + round(y)), (view.width, LABEL + round(y))], fill=OUTLINE)
    for k in range(1, bw // spec.tile_size):
        x = (k * spec.tile_size - left) * size[1] / nw * scale
        if 0 < x < view.width:
            draw.line([(round(x), LABEL), (round(x), view.height)], fill=OUTLINE)


def _panel(caption: Sequence[str], *views: Image.Image) -> Image.Image:
    """A caption over views stacked with gaps; at least MIN_PANEL wide for the text."""
    width = max(views[0].width, MIN_PANEL)
    height = CAPTION + sum(v.height for v in views) + GAP * (len(views) - 1)
    panel = Image.new("RGB", (width, height), "white")
    y = CAPTION
    for v in views:
        panel.paste(v, (0, y))
        y += v.height + GAP
    draw = ImageDraw.Draw(panel)
    for i, line in enumerate(caption[:2]):
        draw.text((2, 2 + 18 * i), line, fill="black", font=_font())
    return panel


def side_by_side(panels: Sequence[Image.Image]) -> Image.Image:
    """Panels left to right, GAP apart, on white (as tall as the first)."""
    width = sum(p.width for p in panels) + GAP * (len(panels) - 1)
    out = Image.new("RGB", (width, panels[0].height), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + GAP
    return out
