"""The model's input layout: one bucketed batch of image + prompt examples.

Every example is laid out in slots as

    [ prefix (right-aligned, left-padded) | image (V0 slots) | text (left-aligned, right-padded) ]
      P slots                               num_image_tokens    T slots

so the image occupies the same slots `[P, P + V0)` in every row whatever the per-example prompt
lengths are. The prefix is everything before the image (BOS, system prompt, `USER: `), the text
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
    pixel_values [B, H, W, C] float32, normalised (channels last)
    """

    prefix_ids: jax.Array
    prefix_mask: jax.Array
    text_ids: jax.Array
    text_mask: jax.Array
    pixel_values: jax.Array

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """(B, P, T): the bucket."""
        return (self.prefix_ids.shape[0], self.prefix_ids.shape[1], self.text_ids.shape[1])


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

    def __post_init__(self) -> None:
        for name in ("batch", "prefix", "text"):
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
) -> tuple[Batch, int]:
    """Pads token lists and images into one bucket.

    Args:
      prefixes: per example, token ids before the image (non-empty, starts with BOS).
      texts: per example, token ids after the image (non-empty).
      pixel_values: [n, H, W, C] float32.
      buckets: the bucket sizes to pad to.
    Returns:
      (batch, n): the padded batch (rows beyond n repeat the last example so every row is a
      well-formed prompt) and the number of real examples.
    """
    n = len(prefixes)
    if n == 0 or len(texts) != n or pixel_values.shape[0] != n:
        raise ValueError(
            f"need the same non-zero number of prefixes, texts and images, "
            f"got {len(prefixes)}, {len(texts)}, {pixel_values.shape[0]}"
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
    pix = np.asarray(pixel_values, np.float32)[rows]
    return Batch(prefix_ids, prefix_mask, text_ids, text_mask, pix), n
