"""The model's input layout: one bucketed batch of image + prompt examples.

Every example is laid out in slots as

    [ prefix (right-aligned, left-padded) | visual region | text (left-aligned, right-padded) ]
      P slots                               V slots         T slots

so the image occupies the same slots `[P, P + V)` in every row whatever the per-example prompt
lengths are. With one fixed-size image (LLaVA-1.5) V is the image's token count and every
visual slot is valid. Families whose visual count varies per example (LLaVA-NeXT's aspect
ratios) give each example a `visual_index` row: which row of the example's visual feature
table each visual slot holds (`PAD_SLOT` for padding, the family's negative codes for learned
tokens such as `image_newline`); V is then the batch's largest count rounded up to the visual
ladder (`Buckets.visual`), and padded visual slots are invalid like any other padding.

Several images in one prompt make several visual spans. The visual region then runs from the
first visual token to the last, and the text between spans stays where it is, in region slots
marked `TEXT_SLOT` (their token ids in `span_text_ids`, their region slots in
`span_text_slots`, padded to a small static capacity): valid, not visual, never pruned, and
text for SparseVLM's raters (SPEC §9.1). Text after the last span is the text part.

The prefix is everything before the image (BOS, system prompt, `USER: `), the text
everything after it (question and `ASSISTANT:`). Padding slots are invalid: they are never
attended to, and positions count valid slots only, so a padded example computes exactly what
the unpadded one does. `(B, P, T)` is the bucket: one compiled program per bucket.

Padding slots cost FLOPs like valid ones, so the buckets are tight where prompts are: the
prefix is the conversation template's constant, and `Buckets.with_prefix(n)` adds its exact
length as a bucket (no prefix padding at all, still one program per bucket); text buckets
step by 16 up to 128 tokens (at most 15 padding slots for the usual questions), then by
about a third.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from flax import struct

from sparsevlm_jax.errors import InputError


class BucketError(InputError):
    """A prompt that does not fit the largest bucket."""


@struct.dataclass
class Batch:
    """Arrays of one bucket (see module docstring).

    prefix_ids   [B, P] int32   tokens before the image, right-aligned (pad slots hold 0)
    prefix_mask  [B, P] bool    valid prefix slots
    text_ids     [B, T] int32   tokens after the image, left-aligned (pad slots hold 0)
    text_mask    [B, T] bool    valid text slots
    pixel_values [B, H, W, C] float32, normalised (channels last); [B, N, H, W, C] for
                 families that feed the tower several tiles per example (unused tiles: 0)
    visual_index [B, V] int32 or None: per visual slot, the row of the example's visual
                 feature table it holds; `PAD_SLOT` marks padding, `TEXT_SLOT` text between
                 spans (None: V = the image's fixed token count, every slot valid)
    span_text_ids   [B, S] int32 or None: token ids of the text between spans (0 padded)
    span_text_slots [B, S] int32 or None: their slots in the visual region, ascending
                 (`PAD_SLOT` padded); None when no example has text between spans
    positions    [B, P + V + T, 3] int32 or None: M-RoPE (t, h, w) per slot, built on the
                 host (`sparsevlm_jax.mrope`; padding 0); None: 1-D positions counting the
                 valid slots
    """

    prefix_ids: jax.Array
    prefix_mask: jax.Array
    text_ids: jax.Array
    text_mask: jax.Array
    pixel_values: jax.Array
    visual_index: jax.Array | None = None
    span_text_ids: jax.Array | None = None
    span_text_slots: jax.Array | None = None
    positions: jax.Array | None = None

    @property
    def shape_key(self) -> tuple[int, ...]:
        """(B, P, T) or (B, P, V, T) with a visual index (V, S, T with text between spans):
        the bucket; a family whose tower takes its own input pytree (Qwen-VL's patches) adds
        that input's static capacity last."""
        b, p, t = self.prefix_ids.shape[0], self.prefix_ids.shape[1], self.text_ids.shape[1]
        if self.visual_index is None:
            return (b, p, t)
        spans = () if self.span_text_slots is None else (self.span_text_slots.shape[1],)
        tower = getattr(self.pixel_values, "capacity", None)
        return (b, p, self.visual_index.shape[1], *spans, t, *(() if tower is None else (tower,)))

    def prompt_lengths(self, num_image_tokens: int) -> np.ndarray:
        """[B] valid prompt tokens per row (host arrays; `num_image_tokens`: the fixed visual
        count of a batch without `visual_index`)."""
        region = self.region_valid()
        vis = num_image_tokens if region is None else np.sum(np.asarray(region), axis=1)
        rest = np.sum(np.asarray(self.prefix_mask), 1) + np.sum(np.asarray(self.text_mask), 1)
        return rest + vis

    def region_valid(self) -> jax.Array | None:
        """[B, V] bool, the valid slots of the visual region (None: all of them)."""
        return None if self.visual_index is None else self.visual_index != PAD_SLOT

    def visual_mask(self) -> jax.Array | None:
        """[B, V] bool, the valid visual tokens of the region (None: all of them)."""
        if self.visual_index is None:
            return None
        return (self.visual_index != PAD_SLOT) & (self.visual_index != TEXT_SLOT)


PAD_SLOT = -1  # visual_index of a padding slot
TEXT_SLOT = -3  # visual_index of a text slot between two visual spans
SPAN_TEXT_BUCKETS = (4, 8, 16, 32, 64, 128, 256)


def ladder_size(n: int, steps: int = 4) -> int:
    """The project's one bucketing rule: the smallest size on the ladder that holds `n`.

    Ladder: 1..8, then `steps` even steps per octave (p, p(1 + 1/steps), ... for p = 8, 16,
    32, ...), so a size exceeds what it holds by at most 1/steps. Capacity buckets of the
    pruning (`sparsevlm_jax.prefill.capacity_bucket`) and the visual buckets use it.
    """
    n = max(int(n), 1)
    if n <= 8:
        return n
    p = 1 << (n.bit_length() - 1)  # p <= n < 2p, p >= 8
    return next(p * (steps + i) // steps for i in range(steps + 1) if p * (steps + i) // steps >= n)


VISUAL_STEPS = 16  # visual buckets: at most 6.25% padding (it costs FLOPs until the 1st pruning)


def visual_ladder(lo: int = 64, hi: int = 32768, steps: int = VISUAL_STEPS) -> tuple[int, ...]:
    """The visual buckets from `lo` to `hi`: `ladder_size`'s sizes with `steps` per octave."""
    sizes, n = [], lo
    while n <= hi:
        sizes.append(ladder_size(n, steps))
        n = sizes[-1] + 1
    return tuple(s for s in sizes if s <= hi)


TEXT_BUCKETS = (16, 32, 48, 64, 80, 96, 112, 128, 192, 256, 384, 512, 768, 1024)


@dataclass(frozen=True)
class Buckets:
    """Static sizes that prompts are padded up to (one compiled program per combination).

    A serving process compiles one program per bucket it meets, so only the buckets of the
    prompts it sees count: a fixed template (one prefix length, `with_prefix`) and questions
    of 20-100 tokens meet one prefix bucket and at most six text buckets per batch size.
    """

    batch: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    prefix: tuple[int, ...] = (8, 16, 48, 64, 128)
    text: tuple[int, ...] = TEXT_BUCKETS
    # 16 steps per octave (at most 6.25% padding): 2928 tokens (LLaVA-NeXT's 672x672) fit
    # 2944; with 8 steps 3072 padded the dense prefill enough to move FLOPs reductions by
    # up to 1.5 points (benchmarks/results/llava-next-7b-flops.md).
    visual: tuple[int, ...] = visual_ladder()

    def __post_init__(self) -> None:
        for name in ("batch", "prefix", "text", "visual"):
            sizes = getattr(self, name)
            if not sizes or any(s < 1 for s in sizes):
                raise ValueError(f"{name} buckets must be positive sizes, got {sizes}")
            object.__setattr__(self, name, tuple(sorted(set(int(s) for s in sizes))))

    def with_prefix(self, *lengths: int) -> Buckets:
        """These buckets with the exact prefix lengths added (e.g. the conversation template's
        constant prefix): prompts with such a prefix get a bucket without padding; other
        lengths still round up to the ladder, so the number of programs stays bounded."""
        return dataclasses.replace(self, prefix=(*self.prefix, *lengths))

    @staticmethod
    def pick(sizes: tuple[int, ...], n: int, what: str) -> int:
        for s in sorted(sizes):
            if n <= s:
                return s
        raise BucketError(f"{what} of {n} does not fit the largest bucket ({max(sizes)})")


def make_batch(
    prefixes: list[list[int]],
    texts: list[list[int]],
    pixel_values: np.ndarray,
    buckets: Buckets = Buckets(),
    visual_index: Sequence[np.ndarray] | None = None,
    region_ids: Sequence[np.ndarray] | None = None,
    positions: Sequence[np.ndarray] | None = None,
) -> tuple[Batch, int]:
    """Pads token lists and images into one bucket.

    Args:
      prefixes: per example, token ids before the image (non-empty, starts with BOS).
      texts: per example, token ids after the image (non-empty).
      pixel_values: [n, H, W, C] or [n, N, H, W, C] float32.
      buckets: the bucket sizes to pad to.
      visual_index: optional, per example the [V_i] int32 feature-table rows of its visual
        tokens (see `Batch`); padded with `PAD_SLOT` to the visual bucket of the largest V_i.
      region_ids: optional, aligned with `visual_index`: per example the token id at each
        `TEXT_SLOT` of its region (anything elsewhere): the text between its visual spans.
      positions: optional, per example [len(prefix) + len(region) + len(text), 3] int32 M-RoPE
        positions in sequence order (prefix, region as `visual_index` lists it, text).
    Returns:
      (batch, n): the padded batch (rows beyond n repeat the last example so every row is a
      well-formed prompt) and the number of real examples.
    """
    n = len(prefixes)
    n_pix = pixel_values.shape[0] if isinstance(pixel_values, np.ndarray) else n
    if n == 0 or len(texts) != n or n_pix != n:
        raise ValueError(
            f"need the same non-zero number of prefixes, texts and images, "
            f"got {len(prefixes)}, {len(texts)}, {n_pix}"
        )
    for i, (p, t) in enumerate(zip(prefixes, texts, strict=True)):
        if not p or not t:
            raise ValueError(f"example {i}: empty {'prefix' if not p else 'text'} around the image")
    b = Buckets.pick(buckets.batch, n, "batch size")
    pl = Buckets.pick(buckets.prefix, max(map(len, prefixes)), "prefix length")
    tl = Buckets.pick(buckets.text, max(map(len, texts)), "prompt length after the image")
    rows = list(range(n)) + [n - 1] * (b - n)
    prefix_ids = np.zeros((b, pl), np.int32)
    prefix_mask = np.zeros((b, pl), bool)
    text_ids = np.zeros((b, tl), np.int32)
    text_mask = np.zeros((b, tl), bool)
    for r, i in enumerate(rows):
        p, t = prefixes[i], texts[i]
        prefix_ids[r, pl - len(p) :] = p
        prefix_mask[r, pl - len(p) :] = True
        text_ids[r, : len(t)] = t
        text_mask[r, : len(t)] = True
    pix = (
        np.asarray(pixel_values, np.float32)[rows]
        if isinstance(pixel_values, np.ndarray)
        else pixel_values  # a family's own pytree of tower inputs, already batch-sized
    )
    vis = None
    if visual_index is not None:
        if len(visual_index) != n or any(len(v) == 0 for v in visual_index):
            raise ValueError("need one non-empty visual index per example")
        vl = Buckets.pick(buckets.visual, max(map(len, visual_index)), "visual token count")
        vis = np.full((b, vl), PAD_SLOT, np.int32)
        for r, i in enumerate(rows):
            vis[r, : len(visual_index[i])] = visual_index[i]
    span_ids = span_slots = None
    texts_in = [np.flatnonzero(np.asarray(v) == TEXT_SLOT) for v in visual_index or ()]
    if any(len(t) for t in texts_in):
        if region_ids is None or len(region_ids) != n:
            raise ValueError("text between visual spans needs its region_ids")
        sl = Buckets.pick(SPAN_TEXT_BUCKETS, max(map(len, texts_in)), "text between images")
        span_ids = np.zeros((b, sl), np.int32)
        span_slots = np.full((b, sl), PAD_SLOT, np.int32)
        for r, i in enumerate(rows):
            span_slots[r, : len(texts_in[i])] = texts_in[i]
            span_ids[r, : len(texts_in[i])] = np.asarray(region_ids[i])[texts_in[i]]
    pos = None
    if positions is not None:
        vl = 0 if vis is None else vis.shape[1]
        pos = np.zeros((b, pl + vl + tl, 3), np.int32)
        for r, i in enumerate(rows):
            p, t, v = len(prefixes[i]), len(texts[i]), len(visual_index[i]) if vl else 0
            src = np.asarray(positions[i], np.int32)
            if src.shape != (p + v + t, 3):
                raise ValueError(f"example {i}: positions {src.shape}, expected {(p + v + t, 3)}")
            pos[r, pl - p : pl] = src[:p]
            pos[r, pl : pl + v] = src[p : p + v]
            pos[r, pl + vl : pl + vl + t] = src[p + v :]
    return (
        Batch(prefix_ids, prefix_mask, text_ids, text_mask, pix, vis, span_ids, span_slots, pos),
        n,
    )
