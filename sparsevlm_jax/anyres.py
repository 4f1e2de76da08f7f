"""LLaVA-NeXT's anyres image layout: tiles in, packed visual-slot indices out.

LLaVA-NeXT (LLaVA-1.6) shows the vision tower one image as several `tile x tile` crops:

  * tile 0, the *base* image: the whole image squashed to `shortest_edge x shortest_edge`
    (aspect ratio not kept), then the usual shortest-edge resize and centre crop to `tile`;
  * the *grid*: the image resized, keeping its aspect ratio, to fit the best pinpoint
    (`select_best_resolution`), pasted centred on a black canvas of that pinpoint's size and cut
    into `rows x cols` tiles, row-major.

The decoder then sees the base tile's patches, followed by the grid's patches assembled into one
`rows*pps x cols*pps` map, with the rows / columns that only cover the black padding removed
(`unpadded_shape`), row by row, each row followed by the learned `image_newline` embedding
(transformers' `LlavaNextModel.pack_image_features`, `spatial_unpad`). `packed_indices` gives
that order as indices into the image's feature table, so a model gathers instead of reshaping.

Everything here reproduces transformers' `LlavaNextImageProcessor` (PIL backend) and
`LlavaNextForConditionalGeneration` to the pixel / index, roundings included.
Sizes are (height, width) throughout, as in transformers' `image_sizes`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from sparsevlm_jax.config import ConfigError
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, to_rgb

NEWLINE_INDEX = -2  # packed_indices' stand-in for the learned `image_newline` embedding

FeatureStrategy = Literal["default", "full"]
Size = tuple[int, int]


@dataclass(frozen=True)
class AnyresSpec:
    """How one LLaVA-NeXT checkpoint tiles an image (its config + preprocessor config).

    Attributes:
      pinpoints: `image_grid_pinpoints` as (height, width) pairs, each a multiple of tile_size.
      tile_size: the vision tower's image size (= the processor's crop size), e.g. 336.
      patch_size: the vision tower's patch size, e.g. 14.
      image_mean, image_std: per-channel normalisation (RGB).
      shortest_edge: the processor's `size["shortest_edge"]`: the base image is squashed to
        this square, and every tile is resized to this shortest edge before the centre crop.
      resample: PIL filter for every resize (bicubic).
      rescale_factor: uint8 -> float scale before normalising.

    Lists are accepted and stored as tuples, so a spec is hashable (a valid jit static arg).
    """

    pinpoints: tuple[tuple[int, int], ...]
    tile_size: int
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    shortest_edge: int
    resample: int = Image.BICUBIC
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        tile, patch = self.tile_size, self.patch_size
        if not _is_pos_int(tile) or not _is_pos_int(patch) or tile % patch:
            raise ConfigError(
                f"anyres: tile size {tile!r} must be a positive multiple of the patch size "
                f"{patch!r}"
            )
        if not _is_pos_int(self.shortest_edge):
            raise ConfigError(
                f"anyres: shortest_edge must be a positive int, got {self.shortest_edge!r}"
            )
        if not self.pinpoints:
            raise ConfigError("anyres: image_grid_pinpoints is empty")
        pins = []
        for p in self.pinpoints:
            hw = tuple(p) if isinstance(p, Sequence) and not isinstance(p, str) else (p,)
            if len(hw) != 2 or not all(_is_pos_int(v) and v % tile == 0 for v in hw):
                raise ConfigError(
                    f"anyres: image_grid_pinpoint {list(hw)} is not a (height, width) pair of "
                    f"positive multiples of the tile size {tile}"
                )
            pins.append((int(hw[0]), int(hw[1])))
        mean, std = (
            tuple(float(m) for m in self.image_mean),
            tuple(float(s) for s in self.image_std),
        )
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise ConfigError(f"anyres: need 3 means and 3 positive stds, got {mean} and {std}")
        object.__setattr__(self, "pinpoints", tuple(pins))
        object.__setattr__(self, "image_mean", mean)
        object.__setattr__(self, "image_std", std)
        object.__setattr__(self, "tile_size", int(tile))
        object.__setattr__(self, "patch_size", int(patch))
        object.__setattr__(self, "shortest_edge", int(self.shortest_edge))

    @property
    def patches_per_side(self) -> int:
        """pps: patches along one side of a tile (336 // 14 = 24)."""
        return self.tile_size // self.patch_size

    @property
    def max_tiles(self) -> int:
        """1 (the base image) + the largest grid any pinpoint gives."""
        return 1 + max((h // self.tile_size) * (w // self.tile_size) for h, w in self.pinpoints)

    @classmethod
    def from_hf(
        cls, config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None
    ) -> AnyresSpec:
        """A spec from a llava-hf checkpoint's config.json and preprocessor_config.json dicts.

        Pinpoints: the config's `image_grid_pinpoints` (else the preprocessor's); tile and patch
        size: the config's `vision_config`; mean / std / shortest edge: the preprocessor's
        (OpenAI CLIP's and the tile size when absent). The preprocessor's crop size, when given,
        must equal the tile size.
        """
        pre = dict(preprocessor or {})
        vision = dict(config.get("vision_config") or {})
        tile = int(vision.get("image_size", 336))
        patch = int(vision.get("patch_size", 14))
        pins = config.get("image_grid_pinpoints") or pre.get("image_grid_pinpoints")
        if pins is None:
            raise ConfigError("anyres: no image_grid_pinpoints in the config")
        crop = pre.get("crop_size")
        crop_h = crop.get("height") if isinstance(crop, Mapping) else crop
        if crop_h is not None and int(crop_h) != tile:
            raise ConfigError(
                f"anyres: crop size {crop_h} differs from the tower's image size {tile}"
            )
        size = pre.get("size")
        edge = size.get("shortest_edge") if isinstance(size, Mapping) else size
        kw: dict[str, Any] = {"image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD}
        for key in ("image_mean", "image_std", "rescale_factor", "resample"):
            if pre.get(key) is not None:
                kw[key] = pre[key]
        return cls(
            pinpoints=tuple(tuple(p) for p in pins),
            tile_size=tile,
            patch_size=patch,
            shortest_edge=int(edge) if edge is not None else tile,
            **kw,
        )


def _is_pos_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def _check_size(original_size: Sequence[int]) -> Size:
    h, w = (int(v) for v in original_size)
    if h <= 0 or w <= 0:
        raise InputError(f"image size must be positive, got {h}x{w} (height x width)")
    return h, w


# ----------------------------------------------------------------------------------------------
# Geometry


def select_best_resolution(
    original_size: Sequence[int], pinpoints: Sequence[Sequence[int]]
) -> Size:
    """The pinpoint LLaVA-NeXT tiles an image of `original_size` = (h, w) into, as (h, w).

    transformers' rule: scale the image to fit each pinpoint; keep the one showing the most
    original pixels (`min(int(w*s) * int(h*s), w*h)`), ties to the least wasted area, then to
    the earlier pinpoint. (An image so thin that every pinpoint shows 0 pixels gets the pinpoint
    of least area, the first on ties.)

    Raises:
      ConfigError: no pinpoints.
    """
    oh, ow = _check_size(original_size)
    best: Size | None = None
    max_effective, min_wasted = 0, float("inf")
    for height, width in pinpoints:
        scale = min(width / ow, height / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        effective = min(dw * dh, ow * oh)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted = effective, wasted
            best = (int(height), int(width))
    if best is None:
        raise ConfigError("anyres: image_grid_pinpoints is empty")
    return best


def anyres_grid(original_size: Sequence[int], spec: AnyresSpec) -> Size:
    """(rows, cols) of grid tiles for an image of `original_size` = (h, w); the base tile is
    extra (num_tiles = 1 + rows * cols)."""
    h, w = select_best_resolution(original_size, spec.pinpoints)
    return h // spec.tile_size, w // spec.tile_size


def fit_size(original_size: Sequence[int], target: Sequence[int]) -> Size:
    """(h, w) the image is resized to inside the `target` (h, w) canvas, aspect kept
    (transformers' `get_patch_output_size`: the fitting side exact, the other rounded up and
    clipped to the canvas)."""
    oh, ow = _check_size(original_size)
    th, tw = int(target[0]), int(target[1])
    scale_w, scale_h = tw / ow, th / oh
    if scale_w < scale_h:
        return min(math.ceil(oh * scale_w), th), tw
    return th, min(math.ceil(ow * scale_h), tw)


def unpadded_shape(original_size: Sequence[int], spec: AnyresSpec) -> Size:
    """(height, width) in patches of the grid's feature map once the padding is cut off.

    transformers' `unpad_image` on the `rows*pps x cols*pps` map: the side the image does not
    fill loses `(current - round(original * scale)) // 2` patches at *each* end, so an odd
    difference keeps one padding row / column more than the image covers.
    """
    oh, ow = _check_size(original_size)
    rows, cols = anyres_grid((oh, ow), spec)
    pps = spec.patches_per_side
    ch, cw = rows * pps, cols * pps
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return ch - 2 * pad, cw
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return ch, cw - 2 * pad


# ----------------------------------------------------------------------------------------------
# Pixels


def _resize(arr: np.ndarray, size: Size, resample: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [size[0], size[1], 3] uint8 with PIL (a no-op at the same size)."""
    if arr.shape[:2] == tuple(size):
        return arr
    img = Image.fromarray(arr).resize((size[1], size[0]), resample=resample)
    return np.asarray(img)


def _shortest_edge_size(hw: Size, edge: int) -> Size:
    """transformers' `get_resize_output_image_size(default_to_square=False)`: the short side
    to `edge`, the long one `int(edge * long / short)`."""
    h, w = hw
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(edge * long / short)
    return (new_long, edge) if w <= h else (edge, new_long)


def _center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] -> [size, size, C], centred as transformers' `center_crop` (top/left =
    `(H - size) // 2`); a side shorter than `size` is zero-padded around the image first."""
    h, w = arr.shape[:2]
    nh, nw = max(size, h), max(size, w)
    if (nh, nw) != (h, w):
        top, left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
        canvas = np.zeros((nh, nw, *arr.shape[2:]), arr.dtype)
        canvas[top : top + h, left : left + w] = arr
        arr = canvas
    top, left = (nh - size) // 2, (nw - size) // 2
    return arr[top : top + size, left : left + size]


def _normalise(tile: np.ndarray, spec: AnyresSpec) -> np.ndarray:
    """[T, T, 3] uint8 -> float32 `(x * rescale - mean) / std` (rescale in float64, the rest
    in float32, as transformers does)."""
    x = (tile.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.image_mean, np.float32)
    std = np.asarray(spec.image_std, np.float32)
    return (x - mean) / std


def _finish_tile(arr: np.ndarray, spec: AnyresSpec) -> np.ndarray:
    """One crop through the processor's per-tile steps: shortest-edge resize, centre crop,
    rescale, normalise. [H, W, 3] uint8 -> [tile, tile, 3] float32."""
    arr = _resize(arr, _shortest_edge_size(arr.shape[:2], spec.shortest_edge), spec.resample)
    return _normalise(_center_crop(arr, spec.tile_size), spec)


def grid_canvas(image: Image.Image, spec: AnyresSpec) -> np.ndarray:
    """The image resized into its best pinpoint and centred on black.

    Returns:
      [rows * tile, cols * tile, 3] uint8.
    """
    img = to_rgb(image)
    size = (img.height, img.width)
    bh, bw = select_best_resolution(size, spec.pinpoints)
    nh, nw = fit_size(size, (bh, bw))
    resized = np.asarray(img.resize((nw, nh), resample=spec.resample))
    canvas = np.zeros((bh, bw, 3), np.uint8)
    top, left = (bh - nh) // 2, (bw - nw) // 2
    canvas[top : top + nh, left : left + nw] = resized
    return canvas


def preprocess_anyres(image: Image.Image, spec: AnyresSpec) -> np.ndarray:
    """One image to its anyres tiles (transformers' `LlavaNextImageProcessor`, channels last).

    Tile 0 is the whole image squashed to `shortest_edge` square; tiles 1.. are the grid of
    `grid_canvas`, row-major. Every tile then gets the shortest-edge resize, the centre crop to
    `tile_size`, rescale and normalisation. The image goes through `images.to_rgb` first
    (alpha dropped, as LLaVA does; transformers would composite it onto white).

    Returns:
      [1 + rows * cols, tile, tile, 3] float32, (rows, cols) = `anyres_grid(size, spec)`.
    """
    img = to_rgb(image)
    t = spec.tile_size
    canvas = grid_canvas(img, spec)
    base = np.asarray(img.resize((spec.shortest_edge, spec.shortest_edge), resample=spec.resample))
    crops = [base] + [
        canvas[i : i + t, j : j + t]
        for i in range(0, canvas.shape[0], t)
        for j in range(0, canvas.shape[1], t)
    ]
    return np.stack([_finish_tile(c, spec) for c in crops]).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# Packing


def grid_table_indices(original_size: Sequence[int], spec: AnyresSpec) -> np.ndarray:
    """The grid tiles' patches assembled into one map, before unpadding.

    Entry [y, x] is the feature-table row of the patch at that place: tile
    `1 + (y // pps) * cols + x // pps`, patch `(y % pps, x % pps)` of it, i.e. row
    `tile * pps*pps + (y % pps) * pps + x % pps` ("default" strategy table, no CLS).

    Returns:
      [rows * pps, cols * pps] int32.
    """
    rows, cols = anyres_grid(original_size, spec)
    pps = spec.patches_per_side
    y = np.arange(rows * pps)[:, None]
    x = np.arange(cols * pps)[None, :]
    tile = 1 + (y // pps) * cols + x // pps
    return (tile * pps * pps + (y % pps) * pps + x % pps).astype(np.int32)


def packed_indices(
    original_size: Sequence[int], spec: AnyresSpec, strategy: FeatureStrategy = "default"
) -> np.ndarray:
    """The visual tokens the decoder sees for one image, as rows of its feature table.

    The table is the projected tower output of the image's tiles, CLS dropped
    (`vision_feature_select_strategy="default"`): [num_tiles * pps*pps, D], row
    `t * pps*pps + r * pps + c` = patch (r, c) of tile t, tile 0 the base image,
    num_tiles = 1 + rows * cols. The sequence (transformers' `pack_image_features`,
    `spatial_unpad`): the base tile's pps*pps rows in order, then the unpadded grid map
    (`unpadded_shape`) row by row, each row followed by NEWLINE_INDEX (-2) for the learned
    `image_newline` vector.

    strategy "full" (CLS kept) raises NotImplementedError: transformers' packing (and original
    LLaVA-NeXT's) reshapes each tile's pps*pps+1 rows as a pps x pps map, which fails or mixes
    features, so there is no reference behaviour to reproduce.

    Returns:
      [V] int32, V = `num_visual_tokens(original_size, spec)`.
    """
    if strategy == "full":
        raise NotImplementedError(
            "anyres packing with vision_feature_select_strategy='full' (CLS kept) is not "
            "supported: transformers' LLaVA-NeXT cannot pack it either"
        )
    if strategy != "default":
        raise ConfigError(
            f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}"
        )
    oh, ow = _check_size(original_size)
    grid = grid_table_indices((oh, ow), spec)
    uh, uw = unpadded_shape((oh, ow), spec)
    top, left = (grid.shape[0] - uh) // 2, (grid.shape[1] - uw) // 2
    grid = grid[top : top + uh, left : left + uw]
    with_newlines = np.concatenate([grid, np.full((uh, 1), NEWLINE_INDEX, np.int32)], axis=1)
    base = np.arange(spec.patches_per_side**2, dtype=np.int32)
    return np.concatenate([base, with_newlines.reshape(-1)])


def num_visual_tokens(original_size: Sequence[int], spec: AnyresSpec) -> int:
    """Length of `packed_indices(original_size, spec)`: pps*pps + uh * (uw + 1), (uh, uw) =
    `unpadded_shape`. 2928 for a 672x672 image on llava-v1.6 (336 tiles, 14 patches)."""
    uh, uw = unpadded_shape(original_size, spec)
    return spec.patches_per_side**2 + uh * (uw + 1)
