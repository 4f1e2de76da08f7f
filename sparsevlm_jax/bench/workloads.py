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
from sparsevlm_jax.sparse.config import (
    V1_STATIC_SHAPES_7B,
    SparseConfig,
    named_presets,
    named_sparse_config,
)

PREFIX_TOKENS = 35  # vicuna_v1 system prompt + "USER: " before the image
TEXT_TOKENS = 60  # a realistic question + " ASSISTANT:" after the image


# Static buffer shapes of rank-adaptive methods (their budgets depend on the weights);
# fixed-schedule methods size their buffers from their schedule.
STATIC_SHAPES: dict[str, dict[int, tuple[int, ...]]] = {"v1": V1_STATIC_SHAPES_7B}


@dataclass(frozen=True)
class Workload:
    """One benchmark setting: model shape, dtype, prompt sizes and their buckets."""

    shape: str
    cfg: LlavaConfig
    prefix_tokens: int = PREFIX_TOKENS
    text_tokens: int = TEXT_TOKENS
    max_new_tokens: int = 32
    count_dtype: str = "float32"

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
        return {
            "shape": self.shape,
            "model_dtype": self.cfg.dtype,
            "count_dtype": self.count_dtype,
            "batch": 1,
            "prefix_tokens": self.prefix_tokens,
            "text_tokens": self.text_tokens,
            "prefix_bucket": self.prefix_bucket,
            "text_bucket": self.text_bucket,
            "num_image_tokens": self.cfg.num_image_tokens,
            "num_layers": t.num_hidden_layers,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_heads": t.num_attention_heads,
            "vision_hidden_size": self.cfg.vision.hidden_size,
            "vision_layers_run": self.cfg.vision_layers_used,
            "max_new_tokens": self.max_new_tokens,
        }


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


def method_list(select: Sequence[str] = ()) -> list[tuple[str, int | None]]:
    """Dense first, then every named preset of the registry; `select` keeps the entries whose
    method name or label (e.g. "v1", "v1-64") it lists (dense is always kept)."""
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
    method: str, budget: int | None, cfg: LlavaConfig, static: bool = True
) -> SparseConfig:
    """The preset as benchmarked.

    static=False (timed runs): the preset's own capacity policy (v1: `bucketed`).
    static=True (one program to lower, FLOPs-only runs): static capacities, a known static
    shape for rank-adaptive methods, else the method's own schedule.
    """
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


def random_pixels(cfg: LlavaConfig, seed: int = 0) -> np.ndarray:
    s, c = cfg.vision.image_size, cfg.vision.num_channels
    return np.random.default_rng(seed).normal(size=(1, s, s, c)).astype(np.float32)


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
