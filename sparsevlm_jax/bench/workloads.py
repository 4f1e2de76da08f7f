"""Benchmark workload: model shape and prompt sizes, the methods measured, inputs and weights.

Every method of the registry is measured: dense plus each `named_presets()` entry. Timed
runs use each preset's default capacity policy (`bench_sparse_config(..., static=False)`): the
rank-adaptive v1 runs `bucketed` (stage programs sized by the budgets it really produced),
fixed schedules size their own static buffers. FLOPs-only runs lower ONE program without
weights, so there v1 gets static capacities (`V1_STATIC_SHAPES_7B`). Weights are random:
speed does not depend on their values.

The prompt is laid out in the buckets a serving process uses (`Workload.buckets`): the
template's prefix gets its exact-length bucket (`Buckets.with_prefix`), the text the default
ladder.

LLaVA-NeXT shapes (family llava_next) also take the images' sizes (`Workload.images`, height x
width): each example's visual count follows from its aspect ratio (`anyres`), the batch's
largest is rounded up to the visual ladder (`Buckets.visual`), and the presets are the
family's (`variable_visual_budgets`: schedules written for 576 tokens scale with each
example's count, SPEC §9.3). A FLOPs-only run counts them on image sets (`IMAGE_SETS`).

Qwen-VL shapes (families qwen2_vl / qwen2_5_vl) take the same items: an image's visual count
is its `smart_resize` grid at the processor's pixel budget (`Workload.qwen_settings`, default
`QwenPreprocess()`: at most 1280 tokens an image), a video of N frames (`Nf`) has frames of
`Workload.video_frame` pixels (default 448x448), one token per 28x28 pixels per frame pair
within the video budget. The tower's patch capacity is the visual slots x 4 (`qwen_images.
patch_capacity`, the same ladder), and the prompt is Qwen's chat template (`QWEN_PREFIX_TOKENS`).
Default FLOPs-only sets: `QWEN_SETS`; a timed run's default item is `QWEN_TIMED_IMAGES`, random
pixels through the processor's preprocessing (`qwen_inputs`: the same rows, grids and token ids
feed transformers' model and the reference, positions from `mrope.rope_index`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm_jax.batch import Buckets
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.params import flatten, param_shapes, unflatten
from sparsevlm_jax.qwen_images import QwenPreprocess
from sparsevlm_jax.sparse.config import (
    AUTHORS_VIDEO,
    NEXT_BUDGETS,
    V1_STATIC_SHAPES_7B,
    SparseConfig,
    authors_video_config,
    named_presets,
    named_sparse_config,
    variable_visual_budgets,
)

PREFIX_TOKENS = 35  # vicuna_v1 system prompt + "USER: " before the image
# Qwen2(.5)-VL's chat template up to the first pad: "<|im_start|>system\nYou are a helpful
# assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"; the text after the pads starts
# with <|vision_end|> and ends with "<|im_end|>\n<|im_start|>assistant\n".
QWEN_PREFIX_TOKENS = 15
TEXT_TOKENS = 60  # a realistic question + " ASSISTANT:" after the image


# Static buffer shapes of rank-adaptive methods (their budgets depend on the weights);
# fixed-schedule methods size their buffers from their schedule.
STATIC_SHAPES: dict[str, dict[int, tuple[int, ...]]] = {"v1": V1_STATIC_SHAPES_7B}


Size = tuple[int, int]

MIXED: tuple[Size, ...] = ((480, 640), (720, 1280), (336, 336), (672, 672))
# Image sets (height, width) of LLaVA-NeXT FLOPs-only runs: the largest visual count of the
# llava-v1.6 pinpoints (672x672: 2,928 tokens), a batch of mixed aspect ratios (rows padded to
# the batch's largest), and the same images one per batch (`EACH`: padding to the visual ladder
# only; the set's counts are the sums of its images').
EACH = "each:"
IMAGE_SETS: dict[str, tuple[Size, ...]] = {
    "672x672": ((672, 672),),
    "mixed-batch": MIXED,
    f"{EACH}mixed-one-by-one": MIXED,
}
# Video shapes (LLaVA-NeXT-Video): a video of N frames is the item (VIDEO, N), written "Nf".
VIDEO = 0
VIDEO_SETS: dict[str, tuple[Size, ...]] = {f"{n}-frames": ((VIDEO, n),) for n in (8, 16, 32)}
# Qwen-VL FLOPs-only sets: a 1080p frame at the image budget (1,222 tokens) and a 32-frame
# 448x448 clip (4,096 tokens), each its own batch.
QWEN_FRAME: Size = (448, 448)
QWEN_SETS: dict[str, tuple[Size, ...]] = {"1080x1920": ((1080, 1920),), "32-frames": ((VIDEO, 32),)}
# The timed (full) run's image on LLaVA-NeXT shapes.
TIMED_IMAGES: tuple[Size, ...] = ((480, 640),)
# ... and on Qwen-VL shapes: a 720p frame, 728x1288 pixels at the default image budget (26 x 46
# = 1,196 visual tokens, 1,216 slots).
QWEN_TIMED_IMAGES: tuple[Size, ...] = ((720, 1280),)
# Qwen2.5-VL's seconds per temporal patch of a bench video: two frames sampled at the
# processor's 2 fps.
QWEN_SECONDS_PER_GRID = 1.0


def item_name(hw: Size) -> str:
    """ "672x672", or "8f" for a video of 8 frames."""
    return f"{hw[1]}f" if hw[0] == VIDEO else f"{hw[0]}x{hw[1]}"


def parse_image_sets(text: str) -> dict[str, tuple[Size, ...]]:
    """`672x672;480x640,720x1280` -> {"672x672": ..., "480x640+720x1280": ...}: sets split by
    ';', images by ',', each HEIGHTxWIDTH or Nf (a video of N frames, video shapes); an
    optional `name=` names a set; a name starting with `each:` runs each image as its own
    batch (the set's FLOPs are their sums)."""
    out: dict[str, tuple[Size, ...]] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, _, sizes = part.rpartition("=")
        images = []
        for item in (x.strip() for x in sizes.split(",") if x.strip()):
            if item.lower().endswith("f") and item[:-1].isdigit() and int(item[:-1]) >= 1:
                images.append((VIDEO, int(item[:-1])))  # a video of that many frames
                continue
            h, sep, w = item.lower().partition("x")
            if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
                raise ValueError(f"image size {item!r} is not HEIGHTxWIDTH")
            images.append((int(h), int(w)))
        if not images:
            raise ValueError(f"no image sizes in {part!r}")
        out[name.strip() or "+".join(map(item_name, images))] = tuple(images)
    if not out:
        raise ValueError("no image sets given")
    return out


@dataclass(frozen=True)
class Workload:
    """One benchmark setting: model shape, dtype, prompt sizes and their buckets; for
    LLaVA-NeXT shapes the images' (height, width), one example each (`images`)."""

    shape: str
    cfg: LlavaConfig
    prefix_tokens: int = PREFIX_TOKENS
    text_tokens: int = TEXT_TOKENS
    max_new_tokens: int = 32
    count_dtype: str = "float32"
    images: tuple[Size, ...] = ()
    image_set: str = ""
    qwen_settings: QwenPreprocess = field(default_factory=QwenPreprocess)
    video_frame: Size = QWEN_FRAME

    def __post_init__(self) -> None:
        if self.variable and not self.images:
            raise ValueError(f"shape {self.shape} needs image sizes")

    @property
    def variable(self) -> bool:
        """Whether visual counts vary per example (LLaVA-NeXT, LLaVA-NeXT-Video, Qwen-VL)."""
        return self.cfg.variable_visual

    @property
    def has_video(self) -> bool:
        """Whether an example is a video (the authors' video preset runs only then)."""
        return any(hw[0] == VIDEO for hw in self.images)

    def qwen_grid(self, hw: Size) -> tuple[int, int, int]:
        """The (t, h, w) patch grid of a Qwen-VL item: an image (height, width) resized within
        the image budget, or a video (VIDEO, frames) of `video_frame` pixels within the video
        budget (frames padded to the temporal patch, as the processor repeats the last)."""
        from sparsevlm_jax.qwen_images import smart_resize

        vcfg, st = self.cfg.qwen_vision, self.qwen_settings
        factor = vcfg.patch_size * vcfg.spatial_merge_size
        if hw[0] == VIDEO:
            h, w = smart_resize(*self.video_frame, factor, st.video_min_pixels,
                                st.video_max_pixels)  # fmt: skip
            t = -(-hw[1] // vcfg.temporal_patch_size)
        else:
            (h, w), t = smart_resize(*hw, factor, st.min_pixels, st.max_pixels), 1
        return t, h // vcfg.patch_size, w // vcfg.patch_size

    @property
    def patch_capacity(self) -> int:
        """Qwen-VL: the tower's patch rows per example (the largest example's bucket)."""
        from sparsevlm_jax.qwen_images import patch_capacity

        vcfg = self.cfg.qwen_vision
        return patch_capacity(max(vcfg.merge_unit * v for v in self.visual_counts),
                              vcfg.merge_unit)  # fmt: skip

    @property
    def batch(self) -> int:
        return max(len(self.images), 1)

    @property
    def visual_counts(self) -> list[int]:
        """Valid visual tokens of each example (V0)."""
        if not self.variable:
            return [self.cfg.num_image_tokens]
        if self.cfg.qwen:
            mu = self.cfg.qwen_vision.merge_unit
            return [int(np.prod(self.qwen_grid(hw))) // mu for hw in self.images]
        from sparsevlm_jax.anyres import num_visual_tokens
        from sparsevlm_jax.presets import anyres_spec

        spec = anyres_spec(self.cfg) if self.cfg.anyres else None
        per_frame = self.cfg.video_tokens_per_frame if self.cfg.takes_video else 0
        return [
            hw[1] * per_frame
            if hw[0] == VIDEO
            else (num_visual_tokens(hw, spec) if spec else self.cfg.num_image_tokens)
            for hw in self.images
        ]

    @property
    def tiles(self) -> int:
        """Tower inputs per example: the most any example needs (a video: its frames)."""
        return max(hw[1] if hw[0] == VIDEO else self.cfg.max_tiles for hw in self.images)

    @property
    def visual_slots(self) -> int:
        """Visual slots of the compiled program: the largest count on the visual ladder."""
        if not self.variable:
            return self.cfg.num_image_tokens
        return Buckets.pick(self.buckets.visual, max(self.visual_counts), "visual token count")

    @property
    def buckets(self) -> Buckets:
        """The default buckets with the prefix's exact length (a template's constant)."""
        return Buckets().with_prefix(self.prefix_tokens)

    @property
    def prefix_bucket(self) -> int:
        return Buckets.pick(self.buckets.prefix, self.prefix_tokens, "prefix length")

    @property
    def text_bucket(self) -> int:
        return Buckets.pick(self.buckets.text, self.text_tokens, "text length")

    @property
    def prompt_tokens(self) -> int:
        """Valid non-visual tokens (prefix + text)."""
        return self.prefix_tokens + self.text_tokens

    @property
    def prompt_slots(self) -> int:
        """Non-visual slots the compiled program processes (prefix + text buckets)."""
        return self.prefix_bucket + self.text_bucket

    def describe(self) -> dict[str, Any]:
        t = self.cfg.text
        out = {
            "shape": self.shape,
            "model_dtype": self.cfg.dtype,
            "count_dtype": self.count_dtype,
            "batch": self.batch,
            "prefix_tokens": self.prefix_tokens,
            "text_tokens": self.text_tokens,
            "prefix_bucket": self.prefix_bucket,
            "text_bucket": self.text_bucket,
            "num_image_tokens": self.cfg.num_image_tokens,
            "num_layers": t.num_hidden_layers,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_heads": t.num_attention_heads,
            "vision_hidden_size": self.cfg.vision.hidden_size,  # CLIP (Qwen: below)
            "vision_layers_run": self.cfg.vision_layers_used,
            "max_new_tokens": self.max_new_tokens,
        }
        if self.cfg.qwen:
            v, st = self.cfg.qwen_vision, self.qwen_settings
            out.update(
                family=self.cfg.family,
                vision_hidden_size=v.embed_dim,
                vision_layers_run=v.depth,
                vision_kind=v.kind,
                num_kv_heads=self.cfg.text.num_key_value_heads,
                image_set=self.image_set,
                images=[list(hw) for hw in self.images],
                grids=[list(self.qwen_grid(hw)) for hw in self.images],
                video_frame=list(self.video_frame),
                pixel_budgets={
                    "min_pixels": st.min_pixels,
                    "max_pixels": st.max_pixels,
                    "video_min_pixels": st.video_min_pixels,
                    "video_max_pixels": st.video_max_pixels,
                },
                visual_counts=self.visual_counts,
                visual_slots=self.visual_slots,
                patch_capacity=self.patch_capacity,
                visual_ladder_steps_per_octave=ladder_steps(self.buckets.visual),
            )
        elif self.variable:
            out.update(
                family=self.cfg.family,
                image_grid_pinpoints=[list(p) for p in self.cfg.image_grid_pinpoints],
                image_set=self.image_set,
                images=[list(hw) for hw in self.images],
                visual_counts=self.visual_counts,
                visual_slots=self.visual_slots,
                visual_ladder_steps_per_octave=ladder_steps(self.buckets.visual),
            )
        return out


def ladder_steps(ladder: Sequence[int]) -> int:
    """Steps per octave of a visual ladder (rungs in [1024, 2048))."""
    return sum(1024 <= x < 2048 for x in ladder)


@dataclass
class Options:
    """Measurement settings of a full run."""

    warmup: int = 1
    repeat: int = 5
    decode_repeat: int = 10
    ttft_repeat: int = 3
    compile_count: bool = True
    count_flops: bool = True
    deadline_s: float = 0.0
    torch: bool = True
    torch_device: str | None = None
    threads: int = 0
    blas_threads: int = 1
    init: str = "auto"
    seed: int = 0
    quiet: bool = False
    methods: tuple[str, ...] = field(default_factory=tuple)


# LLaVA-NeXT runs measure the community's budgets (640 / 320 / 160 of 2880) and 192 of 576;
# 128 and 64 of 576 are the same configs as 640 and 320 (SPEC §9.3), 96 is not run by default.
NEXT_DEFAULT_576 = (192,)


def variable_presets() -> list[tuple[str, int]]:
    """Every (method, budget) of the families with per-example visual counts."""
    return [(m, b) for m in dict(named_presets()) for b in variable_visual_budgets(m)]


def method_list(
    select: Sequence[str] = (), variable: bool = False, video: bool = False
) -> list[tuple[str, int | None]]:
    """Dense first, then every named preset of the registry; `select` keeps the entries whose
    method name or label (e.g. "v1", "v1-64") it lists (dense is always kept).

    `variable` (LLaVA-NeXT): the presets of `variable_visual_budgets`; without `select` the
    NeXT budgets 640 / 320 / 160 and 192 of 576 (`NEXT_DEFAULT_576`). `video`: the authors'
    video setting too (`AUTHORS_VIDEO`, SPEC §9.6)."""
    if variable:
        extra = [(AUTHORS_VIDEO, None)] if video else []
        every = [("dense", None), *extra, *variable_presets()]
        if not select:
            keep = set(NEXT_BUDGETS) | set(NEXT_DEFAULT_576)
            return [(m, b) for m, b in every if b is None or b in keep]
    else:
        every = [("dense", None), *named_presets()]
    if not select:
        return every
    known = {m for m, _ in every} | {method_label(m, b) for m, b in every}
    unknown = sorted(set(select) - known)
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(sorted(known))}")
    return [(m, b) for m, b in every if m == "dense" or m in select or method_label(m, b) in select]


def method_label(method: str, budget: int | None) -> str:
    return method if budget is None else f"{method}-{budget}"


def bench_sparse_config(
    method: str,
    budget: int | None,
    cfg: LlavaConfig,
    static: bool = True,
    visual_counts: Sequence[int] | None = None,
) -> SparseConfig:
    """The preset as benchmarked.

    static=False (timed runs): the preset's own capacity policy (v1: `bucketed`).
    static=True (one program to lower, FLOPs-only runs): static capacities, a known static
    shape for rank-adaptive methods, else the method's own schedule. LLaVA-NeXT
    (`visual_counts`: each example's V0): the capacities are the batch's largest budgets and
    recycled counts at each pruning layer (`counts.expected_counts`), what the bucketed run
    would see before rounding to its capacity ladder.
    """
    if method == AUTHORS_VIDEO:
        sparse = authors_video_config()
    elif cfg.variable_visual:
        sparse = named_sparse_config(
            method, budget, cfg.text.num_hidden_layers, variable_visual=True
        )
    if cfg.variable_visual or method == AUTHORS_VIDEO:
        if not static or not sparse.enabled:
            return sparse
        from sparsevlm_jax.bench.counts import static_capacities

        if visual_counts is None:
            raise ValueError("a static LLaVA-NeXT config needs the examples' visual counts")
        return static_capacities(sparse, visual_counts, v1_shape(method, budget))
    sparse = named_sparse_config(
        method, budget, num_layers=cfg.text.num_hidden_layers, num_image_tokens=cfg.num_image_tokens
    )
    if not static or not sparse.enabled or sparse.capacity == "static":
        return sparse
    shapes = STATIC_SHAPES.get(method, {})
    if budget in shapes:
        return sparse.with_static_shape(shapes[budget], cfg.num_image_tokens)
    schedule = tuple(getattr(sparse, "schedule", ()) or ())
    if schedule:
        return sparse.with_static_shape(schedule, cfg.num_image_tokens)
    return sparse  # "exact" capacity: reported as such in the sparse_config field


def v1_shape(method: str, budget: int | None) -> tuple[int, ...] | None:
    """The assumed kept counts of a rank-adaptive preset without weights (LLaVA-NeXT names
    640 / 320 by their 576-token budgets 128 / 64; v1's rule is absolute, SPEC §9.3)."""
    if method == AUTHORS_VIDEO:  # k = rank <= the raters: assume every text token rates
        return (TEXT_TOKENS,)
    shapes = STATIC_SHAPES.get(method)
    if shapes is None or budget is None:
        return None
    return shapes.get(NEXT_BUDGETS.get(budget, budget))


def image_token_id(cfg: LlavaConfig) -> int:
    """The image token id the PyTorch side uses (inside the vocabulary)."""
    v = cfg.text.vocab_size
    return cfg.image_token_index if cfg.image_token_index < v else v - 1


def prompt_ids(wl: Workload, seed: int = 0) -> tuple[list[int], list[int]]:
    """Random prefix (BOS first) and text token ids, never the image token."""
    rng = np.random.default_rng(seed)
    hi = min(wl.cfg.text.vocab_size, image_token_id(wl.cfg))
    prefix = [wl.cfg.text.bos_token_id or 1] + rng.integers(3, hi, wl.prefix_tokens - 1).tolist()
    return prefix, rng.integers(3, hi, wl.text_tokens).tolist()


def qwen_prompt_ids(wl: Workload, seed: int = 0) -> tuple[list[int], list[int]]:
    """`prompt_ids` laid out as Qwen's chat template around its items: the prefix ends with
    `<|vision_start|>`, the text starts with `<|vision_end|>` (its id the next one, as in
    Qwen's vocabulary)."""
    prefix, text = prompt_ids(wl, seed)
    start = wl.cfg.vision_start_token_id
    if start is not None and start + 1 < min(wl.cfg.image_token_index, wl.cfg.video_token_index):
        prefix[-1], text[0] = start, start + 1
    return prefix, text


@dataclass
class QwenInputs:
    """A Qwen-VL workload's host inputs: the tower's packed `VisionInputs` [B, P, ...] (rows
    in the tower's window order), each example's visual index and (t, h, w) positions, and
    each example's item as the processor gives it (`rows` [N, K] in transformers'
    `pixel_values` order, the `grid`), with its token ids."""

    pixels: Any
    visual_index: list[np.ndarray]
    positions: list[np.ndarray]
    rows: list[np.ndarray]
    grids: list[tuple[int, int, int]]
    video: list[bool]
    input_ids: list[list[int]]
    second_per_grid: float | None


def qwen_inputs(wl: Workload, prefix: list[int], text: list[int], seed: int = 0) -> QwenInputs:
    """Random uint8 pixels of each item of `wl.images` (an image of its size, or a video of
    N frames of `wl.video_frame` pixels) through the processor's preprocessing
    (`qwen_images.preprocess_image` / `preprocess_video`, `smart_resize` within
    `wl.qwen_settings`), one example each, packed at `wl.patch_capacity`; positions from
    `mrope.rope_index` on prefix + the item's pad tokens + text (videos at
    `QWEN_SECONDS_PER_GRID` on Qwen2.5)."""
    from sparsevlm_jax import mrope, qwen_images

    cfg, st = wl.cfg, wl.qwen_settings
    vcfg = cfg.qwen_vision
    rng = np.random.default_rng(seed)
    timed = cfg.tokens_per_second is not None
    out = QwenInputs(None, [], [], [], [], [], [], QWEN_SECONDS_PER_GRID if timed else None)
    items = []
    for hw in wl.images:
        video = hw[0] == VIDEO
        if video:
            frames = rng.integers(0, 256, (hw[1], *wl.video_frame, 3), dtype=np.uint8)
            rows, grid = qwen_images.preprocess_video(frames, vcfg, st)
        else:
            image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
            rows, grid = qwen_images.preprocess_image(image, vcfg, st)
        items.append([(rows, grid)])
        count = int(np.prod(grid)) // vcfg.merge_unit
        pad = cfg.video_token_index if video else cfg.image_token_index
        ids = [*prefix, *([pad] * count), *text]
        pos, _ = mrope.rope_index(
            np.asarray(ids), None, [] if video else [grid], [grid] if video else [],
            cfg.image_token_index, cfg.video_token_index, None, vcfg.spatial_merge_size,
            second_per_grid_ts=[out.second_per_grid] if video and timed else None,
            tokens_per_second=cfg.tokens_per_second,
        )  # fmt: skip
        out.visual_index.append(np.arange(count, dtype=np.int32))
        out.positions.append(pos)
        out.rows.append(rows)
        out.grids.append(tuple(int(g) for g in grid))
        out.video.append(video)
        out.input_ids.append(ids)
    out.pixels = qwen_images.pack(items, vcfg, capacity=wl.patch_capacity)
    return out


def random_pixels(cfg: LlavaConfig, seed: int = 0) -> np.ndarray:
    s, c = cfg.vision.image_size, cfg.vision.num_channels
    return np.random.default_rng(seed).normal(size=(1, s, s, c)).astype(np.float32)


def next_inputs(wl: Workload, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """A LLaVA-NeXT workload's random tower inputs [B, tiles, s, s, C] (unused ones zero, as
    the processor leaves them), its per-example visual indices and input counts (an image's
    anyres tiles; a video's frames, indexing the pooled rows after every input's patches)."""
    from sparsevlm_jax.anyres import anyres_grid, packed_indices
    from sparsevlm_jax.presets import anyres_spec

    cfg = wl.cfg
    spec = anyres_spec(cfg) if cfg.anyres else None
    feats = cfg.vision.num_patches  # table rows per tower input ("default" strategy)
    s, c = cfg.vision.image_size, cfg.vision.num_channels
    rng = np.random.default_rng(seed)
    cap = wl.tiles
    pix = np.zeros((wl.batch, cap, s, s, c), np.float32)
    index, tiles = [], []
    for i, hw in enumerate(wl.images):
        if hw[0] == VIDEO:
            per = cfg.video_tokens_per_frame
            tiles.append(hw[1])
            index.append(cap * feats + np.arange(hw[1] * per, dtype=np.int32))
        elif spec is None:  # one tower input, its features in order
            tiles.append(1)
            index.append(np.arange(cfg.num_image_tokens, dtype=np.int32))
        else:
            rows, cols = anyres_grid(hw, spec)
            tiles.append(1 + rows * cols)
            index.append(packed_indices(hw, spec))
        pix[i, : tiles[-1]] = rng.normal(size=(tiles[-1], s, s, c))
    return pix, index, tiles


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any, std: float) -> jax.Array:
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def device_init_params(cfg: LlavaConfig, seed: int = 0, std: float = 0.02) -> dict:
    """Random weights generated on the default device (`jax.random`), leaf by leaf."""
    dtype = jnp.dtype(cfg.param_dtype)
    flat = flatten(param_shapes(cfg))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
    out = {}
    for key, (name, shape) in zip(keys, flat.items(), strict=True):
        if name.endswith("/scale"):
            out[name] = jnp.ones(shape, dtype)
        elif name.endswith("/bias"):
            out[name] = jnp.zeros(shape, dtype)
        else:
            out[name] = _normal(key, tuple(shape), dtype, std)
    return unflatten(out)
