"""`sparsevlm convert` (a source checkpoint to ours) and `sparsevlm info` (what a model is).

LLaVA-NeXT checkpoints have no one visual-token count: it depends on each image's size
(`sparsevlm_jax.anyres.num_visual_tokens`). `visual_range` finds the fewest and most over
every image size up to the largest pinpoint side (with the sizes that give them), and `info`
adds the counts of a few common photo sizes.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

from sparsevlm_jax.cli.errors import EXIT_OK
from sparsevlm_jax.cli.models import model_config, resolve_model
from sparsevlm_jax.cli.report import human_bytes
from sparsevlm_jax.config import ConfigError, LlavaConfig
from sparsevlm_jax.presets import anyres_spec
from sparsevlm_jax.sparse.config import V1_LAYERS_32, preset_layers

if TYPE_CHECKING:
    import numpy as np

    from sparsevlm_jax.anyres import AnyresSpec

# (height, width) of a few common photos: square, 4:3 and 16:9 landscape, one tile.
COMMON_SIZES: tuple[tuple[int, int], ...] = ((672, 672), (480, 640), (720, 1280), (336, 336))


def model_arrays(path: Path, cfg: LlavaConfig) -> tuple[dict[str, tuple], str]:
    """(flat key -> (shape, dtype), description) for a checkpoint or a source directory."""
    from sparsevlm_jax import checkpoint
    from sparsevlm_jax.params import flatten, param_shapes

    if checkpoint.is_checkpoint(path):
        return checkpoint.saved_arrays(path / checkpoint.PARAMS_DIR), "sparsevlm-jax checkpoint"
    src = json.loads((path / checkpoint.CONFIG_FILE).read_text())
    text = src.get("text_config") or {}
    dtype = str(src.get("torch_dtype") or src.get("dtype") or text.get("torch_dtype") or "?")
    shapes = {k: (tuple(v), dtype) for k, v in flatten(param_shapes(cfg)).items()}
    return shapes, "transformers / LLaVA directory, not converted: sizes from its config"


def format_info(path: Path, cfg: LlavaConfig, arrays: dict[str, tuple], kind: str) -> str:
    """The `sparsevlm info` summary: towers, projector, image tokens, parameters, dtype."""
    import numpy as np

    v, t = cfg.vision, cfg.text
    count = sum(int(np.prod(shape)) for shape, _ in arrays.values())
    nbytes = sum(int(np.prod(shape)) * _itemsize(dt) for shape, dt in arrays.values())
    dtypes = sorted({dt for _, dt in arrays.values()})
    style = "placeholder" if cfg.image_token_index < 0 else "expanded"
    try:
        layers = ",".join(map(str, preset_layers(V1_LAYERS_32, t.num_hidden_layers)))
    except ConfigError:
        layers = "none (too shallow; pass --layers)"
    proj = "bias" if cfg.projector_bias else "no bias"
    from sparsevlm_jax.checkpoint import load_metadata

    conv = load_metadata(path).get("conversion") or {}
    note = ""
    if conv.get("source_dtype"):
        note = (
            f" (converted from {conv['source_dtype']} with --dtype "
            f"{conv.get('requested_dtype', '?')})"
        )
    if cfg.qwen:
        from sparsevlm_jax.cli import info_qwen

        model_lines = info_qwen.lines(path, cfg)
    else:
        model_lines = [
            f"vision:      CLIP ViT, {v.num_hidden_layers} layers, hidden {v.hidden_size}, "
            f"MLP {v.intermediate_size}, {v.num_attention_heads} heads, image {v.image_size} px, "
            f"patch {v.patch_size}, feature layer {cfg.vision_feature_layer} "
            f"({cfg.vision_feature_select_strategy})",
            f"projector:   {v.hidden_size} -> {t.hidden_size} -> {t.hidden_size} "
            f"({cfg.projector_hidden_act}, {proj})",
            f"text:        Llama, {t.num_hidden_layers} layers, hidden {t.hidden_size}, "
            f"MLP {t.intermediate_size}, {t.num_attention_heads} heads ({t.num_key_value_heads} "
            f"KV, head dim {t.head_dim}), vocab {t.vocab_size}, rope theta {t.rope_theta:g}, "
            f"max positions {t.max_position_embeddings}",
            *image_lines(cfg, style),
        ]
    return "\n".join(
        [
            f"checkpoint:  {path} ({kind})",
            *model_lines,
            f"sparse v1:   default pruning layers {layers}",
            f"parameters:  {count:,} ({human_bytes(nbytes)})",
            f"dtype:       {', '.join(dtypes)}{note}",
        ]
    )


def image_lines(cfg: LlavaConfig, style: str) -> list[str]:
    """`info`'s family and image lines: LLaVA-1.5's one count, or LLaVA-NeXT's pinpoints,
    the range of counts over image sizes (and the sizes giving the extremes), common sizes."""
    index = f"image token index {cfg.image_token_index} ({style})"
    if not cfg.anyres:  # LLaVA-1.5 (and Video-LLaVA's image tower): one tile, one count
        family = []
        if cfg.family == "video_llava":
            family = ["family:      video_llava (Video-LLaVA): an image tower and a video tower"]
        return [
            *family,
            f"image:       {cfg.num_image_tokens} visual tokens per image, {index}",
            *video_lines(cfg),
        ]
    spec = anyres_spec(cfg)
    r = visual_range(spec)
    t, pps = spec.tile_size, spec.patches_per_side
    pins = ", ".join(f"{h}x{w}" for h, w in spec.pinpoints)
    grids = ", ".join(f"{h // t}x{w // t}" for h, w in spec.pinpoints)
    from sparsevlm_jax.anyres import num_visual_tokens

    common = ", ".join(f"{h}x{w} {num_visual_tokens((h, w), spec):,}" for h, w in COMMON_SIZES)
    alone = " (the base tile alone)" if r.fewest == pps * pps else ""
    band = f"{r.band.numerator}:{r.band.denominator}"
    name = (
        "llava_next (LLaVA-1.6"
        if not cfg.takes_video
        else "llava_next_video (LLaVA-NeXT-Video, images as LLaVA-1.6"
    )
    return [
        f"family:      {name} anyres): a base tile + a grid of {t} px tiles, "
        f"unpadded, one image_newline per grid row",
        f"pinpoints:   {pins} (h x w px; grids {grids} tiles)",
        f"image:       {r.fewest:,}-{r.most:,} visual tokens per image, by its size (h x w px); "
        f"{index}",
        f"             most: {r.most:,} at {_size(r.most_at)}, the {_grid(r.most_at, spec)} grid "
        "whole",
        f"             fewest: {r.band_fewest:,} at {_size(r.band_fewest_at)} among aspect ratios "
        f"up to {band}; {r.fewest:,}{alone} for strips like {_size(r.fewest_at)}",
        f"             common sizes: {common}",
        *video_lines(cfg),
    ]


def video_lines(cfg: LlavaConfig) -> list[str]:
    """`info`'s video line on video families: tokens per frame and at common frame counts."""
    if not cfg.takes_video:
        return []
    per = cfg.video_tokens_per_frame
    grid = cfg.vision.image_size // cfg.vision.patch_size
    pooled = grid // cfg.spatial_pool_stride
    counts = ", ".join(f"{n} frames {n * per:,}" for n in (8, 16, 32))
    if cfg.separate_video_tower:  # Video-LLaVA: every patch and the class token of a frame
        return [
            f"video:       {per:,} visual tokens per frame ({grid}x{grid} patches + the class "
            f"token, video tower); {counts}; video token index {cfg.video_token_index}",
        ]
    return [
        f"video:       {per:,} visual tokens per frame ({grid}x{grid} patches, "
        f"{cfg.spatial_pool_mode} pooled {cfg.spatial_pool_stride}x{cfg.spatial_pool_stride} "
        f"to {pooled}x{pooled}); {counts}; video token index {cfg.video_token_index}",
    ]


def visual_summary(cfg: LlavaConfig) -> str:
    """The visual tokens for `convert`'s summary line: "16 visual tokens", or on LLaVA-NeXT
    "llava_next (anyres), 16-88 visual tokens per image (by size)"."""
    if cfg.qwen:
        from sparsevlm_jax.cli.info_qwen import visual_summary as qwen_summary

        return qwen_summary(cfg)
    if not cfg.anyres:
        out = f"{cfg.num_image_tokens} visual tokens"
        if cfg.takes_video:
            out += f" per image, {cfg.video_tokens_per_frame:,} per video frame"
        return out
    r = visual_range(anyres_spec(cfg))
    out = f"{cfg.family} (anyres), {r.fewest:,}-{r.most:,} visual tokens per image (by size)"
    if cfg.takes_video:
        out += f", {cfg.video_tokens_per_frame:,} per video frame"
    return out


@dataclass(frozen=True)
class VisualRange:
    """Fewest and most visual tokens over image sizes, with a (height, width) giving each.

    `band`: the pinpoints' most elongated aspect ratio (3 for 1008x336): `band_fewest` is the
    fewest among images no more elongated than that.
    """

    fewest: int
    fewest_at: tuple[int, int]
    most: int
    most_at: tuple[int, int]
    band: Fraction
    band_fewest: int
    band_fewest_at: tuple[int, int]


def visual_range(spec: AnyresSpec) -> VisualRange:
    """The range of `num_visual_tokens` over every image size (h, w) with 1 <= h, w <= the
    largest pinpoint side (larger images fit the pinpoints as these do), exhaustively.

    Each extreme is reported at a size giving it: the most at a pinpoint's own size when one
    does, else at the simplest aspect ratio (then the largest such size); each is checked
    against `num_visual_tokens` itself.

    Raises:
      RuntimeError: the vectorised table disagrees with `num_visual_tokens` (a bug).
    """
    import numpy as np

    from sparsevlm_jax.anyres import num_visual_tokens

    limit = max(max(p) for p in spec.pinpoints)
    counts = count_table(spec, limit)
    h = np.arange(1, limit + 1)[:, None]
    w = np.arange(1, limit + 1)[None, :]
    band = max(Fraction(max(a, b), min(a, b)) for a, b in spec.pinpoints)
    p, q = band.numerator, band.denominator
    in_band = (q * w <= p * h) & (q * h <= p * w)
    banded = np.where(in_band, counts, np.iinfo(np.int64).max)

    def at(table: np.ndarray, value: int, prefer: tuple = ()) -> tuple[int, int]:
        for size in prefer:  # a pinpoint's own size, when it gives the value
            if table[size[0] - 1, size[1] - 1] == value:
                return _checked(size, value)
        ys, xs = np.nonzero(table == value)
        hs, ws = ys + 1, xs + 1
        g = np.gcd(hs, ws)
        order = np.lexsort((-(hs * ws), hs // g + ws // g))  # simplest ratio, then largest
        return _checked((int(hs[order[0]]), int(ws[order[0]])), value)

    def _checked(size: tuple[int, int], value: int) -> tuple[int, int]:
        if num_visual_tokens(size, spec) != value:
            raise RuntimeError(f"visual token table disagrees with num_visual_tokens at {size}")
        return size

    fewest, most, band_fewest = int(counts.min()), int(counts.max()), int(banded.min())
    return VisualRange(
        fewest=fewest,
        fewest_at=at(counts, fewest),
        most=most,
        most_at=at(counts, most, spec.pinpoints),
        band=band,
        band_fewest=band_fewest,
        band_fewest_at=at(banded, band_fewest),
    )


def count_table(spec: AnyresSpec, limit: int) -> np.ndarray:
    """[limit, limit] int64: entry [h-1, w-1] = `num_visual_tokens((h, w), spec)`, computed
    for all sizes at once with the same float64 arithmetic (`select_best_resolution`, then
    `unpadded_shape`; ties to the earlier pinpoint)."""
    import numpy as np

    oh = np.arange(1, limit + 1, dtype=np.float64)[:, None]
    ow = np.arange(1, limit + 1, dtype=np.float64)[None, :]
    best_eff = np.zeros((limit, limit))
    best_waste = np.full((limit, limit), np.inf)
    best = np.zeros((limit, limit), np.int64)
    for i, (ph, pw) in enumerate(spec.pinpoints):
        scale = np.minimum(pw / ow, ph / oh)
        eff = np.minimum(np.floor(ow * scale) * np.floor(oh * scale), oh * ow)
        waste = pw * ph - eff
        better = (eff > best_eff) | ((eff == best_eff) & (waste < best_waste))
        best_eff = np.where(better, eff, best_eff)
        best_waste = np.where(better, waste, best_waste)
        best = np.where(better, i, best)
    pins = np.asarray(spec.pinpoints, np.int64)
    pps = spec.patches_per_side
    ch = pins[best, 0] // spec.tile_size * pps
    cw = pins[best, 1] // spec.tile_size * pps
    wide = ow / oh > cw / ch
    new_h = np.floor(np.round(oh * (cw / ow), 7))
    new_w = np.floor(np.round(ow * (ch / oh), 7))
    uh = np.where(wide, ch - 2 * ((ch - new_h) // 2), ch)
    uw = np.where(wide, cw, cw - 2 * ((cw - new_w) // 2))
    return (pps * pps + uh * (uw + 1)).astype(np.int64)


def _size(hw: tuple[int, int]) -> str:
    """E.g. "300x100 (portrait 1:3)": height x width, and the aspect ratio as width:height."""
    h, w = hw
    g = math.gcd(h, w)
    if h == w:
        return f"{h}x{w} (square)"
    return f"{h}x{w} ({'landscape' if w > h else 'portrait'} {w // g}:{h // g})"


def _grid(hw: tuple[int, int], spec: AnyresSpec) -> str:
    from sparsevlm_jax.anyres import anyres_grid

    rows, cols = anyres_grid(hw, spec)
    return f"{rows}x{cols}"


def _itemsize(name: str) -> int:
    """Bytes per element of a dtype name (bfloat16 included); 0 when unknown."""
    import numpy as np

    if name == "bfloat16":
        return 2
    try:
        return np.dtype(name).itemsize
    except TypeError:
        return 0


def add_mesh_arg(p: argparse.ArgumentParser) -> None:
    """`info --mesh data=N,model=M`: how the model would be laid out over devices."""
    p.add_argument(
        "--mesh",
        metavar="data=N,model=M",
        help="also print every tensor's layout on such a mesh with its bytes per device "
        "(no devices needed; a missing axis is 1)",
    )


def cmd_info(args: argparse.Namespace) -> int:
    """Prints `format_info` for a checkpoint or source directory (no weights read), and with
    `--mesh` the layout table of `sparsevlm_jax.sharding.format_layout`."""
    path = resolve_model(args.checkpoint)
    cfg = model_config(path, args.clip)
    mesh = None
    if getattr(args, "mesh", None) is not None:
        from sparsevlm_jax.sharding import param_layouts, parse_mesh

        mesh = parse_mesh(args.mesh)
        param_layouts(cfg, mesh)  # a mesh the heads do not fit fails before any output
    arrays, kind = model_arrays(path, cfg)
    print(format_info(path, cfg, arrays, kind))
    if mesh is not None:
        from sparsevlm_jax.sharding import format_layout

        print()
        print(format_layout(cfg, mesh, {k: dt for k, (_, dt) in arrays.items()}))
    return EXIT_OK
